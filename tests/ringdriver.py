"""Just enough of a split-ring virtio driver, in Python, to feed device backends from tests.

Rings sit at fixed guest-physical addresses (DESC, AVAIL, USED) in a
memfd-backed GuestMemory; the test posts chains and waits for used entries.
"""
import struct
import time

DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
F_NEXT, F_WRITE = 1, 2


class RingDriver:
    def __init__(self, mem, size=8):
        self.mem, self.size, self.avail, self.used_seen, self.free = mem, size, 0, 0, 0

    def post(self, bufs):
        """bufs: [(addr, len, writable)]; returns the head."""
        n = len(bufs)
        idx = [(self.free + k) % self.size for k in range(n)]
        self.free += n
        for k, (addr, ln, w) in enumerate(bufs):
            flags = (F_WRITE if w else 0) | (F_NEXT if k < n - 1 else 0)
            self.mem.write(DESC + 16 * idx[k], struct.pack("<QIHH", addr, ln, flags, idx[k + 1] if k < n - 1 else 0))
        self.mem.write_u16(AVAIL + 4 + 2 * (self.avail % self.size), idx[0])
        self.avail = (self.avail + 1) & 0xFFFF
        self.mem.write_u16(AVAIL + 2, self.avail)
        return idx[0]

    def wait_used(self, timeout=10):
        """(id, len) of the next used element; TimeoutError if the device posts none in time."""
        deadline = time.monotonic() + timeout
        while self.mem.read_u16(USED + 2) == self.used_seen:
            if time.monotonic() > deadline:
                raise TimeoutError("no used entry")
            time.sleep(0.0005)
        slot = self.used_seen % self.size
        self.used_seen = (self.used_seen + 1) & 0xFFFF
        return struct.unpack("<II", self.mem.read(USED + 4 + 8 * slot, 8))
