"""The MC146818 CMOS real-time clock at ports 0x70/0x71: the host's UTC time, read-only, no interrupts.

Without it Linux spends seconds of emulated time failing to read the RTC on
every boot ("Unable to read current time from RTC") and starts at 1970.
Offset 0 is the index port (bit 7 is the NMI mask, ignored), offset 1 the
data port.  Time registers read in BCD, 24-hour mode; the update-in-progress
bit is never set, because each read returns a consistent snapshot.
"""
import threading
import time

from pyhv.proto.errors import StateError, state_bytes

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
STATUS_B_24H = 0x02                 # BCD (bit 2 clear), 24-hour mode
STATUS_D_VALID = 0x80               # battery good: time and RAM are valid
CMOS_SIZE = 128


def _bcd(v):
    return (v // 10) << 4 | (v % 10)


class CmosRtc:
    def __init__(self, clock=time.time):
        self._clock = clock
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)        # non-time bytes: plain storage, as on real CMOS
        self._lock = threading.Lock()
        self.reads = 0

    def _time_register(self, index):
        t = time.gmtime(self._clock())
        values = {SECONDS: t.tm_sec, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
                  DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100}
        return _bcd(values[index]) if index in values else None

    def read(self, offset, size):
        if offset != 1:
            return bytes([self._index]) + b"\xff" * (size - 1)
        with self._lock:
            self.reads += 1
            index = self._index
            value = self._time_register(index)
            if value is None:
                value = {STATUS_A: 0x26, STATUS_B: STATUS_B_24H, STATUS_C: 0, STATUS_D: STATUS_D_VALID}.get(
                    index, self._ram[index])
        return bytes([value]) + b"\xff" * (size - 1)

    def write(self, offset, data):
        with self._lock:
            if offset == 0:
                self._index = data[0] & 0x7F
            elif self._index not in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY,
                                     STATUS_A, STATUS_B, STATUS_C, STATUS_D):
                self._ram[self._index] = data[0]   # setting the clock is ignored: it is the host's

    def counters(self):
        return {"reads": self.reads}

    def snapshot(self):
        """The index register and CMOS RAM (the time is the host's, so it is not state)."""
        with self._lock:
            return {"index": self._index, "ram": bytes(self._ram), "reads": self.reads}

    def restore(self, state):
        ram = state_bytes(state["ram"], "CMOS RAM")
        if len(ram) != CMOS_SIZE:
            raise StateError(f"CMOS RAM of {len(ram)} bytes, expected {CMOS_SIZE}")
        with self._lock:
            self._index, self._ram, self.reads = int(state["index"]) & 0x7F, bytearray(ram), int(state["reads"])
