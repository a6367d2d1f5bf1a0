"""Address buses: which device owns a port or MMIO address, and at what offset.

Devices register a range; an exit is routed as `device.read(offset, size)` /
`device.write(offset, data)`.  The port bus also fills the C run loop's
per-port action table, so ports no Python device claims never leave C.
"""
import bisect

from pyhv.proto.errors import HvError
from pyhv.vcpu_worker._kvm import ffi, lib


class BusConflict(HvError):
    """Two devices claimed overlapping ranges: a VMM configuration bug."""


class PioBus:
    """I/O ports 0..0xFFFF: a flat table, so lookup is one index."""

    def __init__(self):
        self._owner = [None] * 0x10000          # port -> (device, base)
        self.action = bytearray([lib.HV_PORT_UNCLAIMED]) * 0x10000
        self.action_ptr = ffi.from_buffer("uint8_t[]", self.action)
        self.names = {}

    def register(self, base, length, device, name):
        if any(self._owner[p] for p in range(base, base + length)) or any(
                self.action[p] != lib.HV_PORT_UNCLAIMED for p in range(base, base + length)):
            raise BusConflict(f"{name}: ports 0x{base:x}+{length} already claimed")
        for p in range(base, base + length):
            self._owner[p] = (device, base)
            self.action[p] = lib.HV_PORT_PYTHON
        self.names[name] = (base, length)

    def register_fast(self, port, action, name):
        """A port the C loop answers itself (HV_PORT_SINK, HV_PORT_EXIT)."""
        if self._owner[port] or self.action[port] != lib.HV_PORT_UNCLAIMED:
            raise BusConflict(f"{name}: port 0x{port:x} already claimed")
        self.action[port] = action
        self.names[name] = (port, 1)

    def lookup(self, port):
        return self._owner[port]


class MmioBus:
    """Guest-physical MMIO ranges, looked up by bisection."""

    def __init__(self):
        self._starts = []
        self._ranges = []                        # (start, end, device)

    def register(self, base, length, device, name):
        i = bisect.bisect_right(self._starts, base)
        if (i > 0 and self._ranges[i - 1][1] > base) or (i < len(self._ranges) and self._ranges[i][0] < base + length):
            raise BusConflict(f"{name}: MMIO 0x{base:x}+0x{length:x} overlaps another device")
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, base + length, device))

    def lookup(self, addr):
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, device = self._ranges[i]
            if addr < end:
                return device, start
        return None
