"""What the fuzz targets (tests/unit/fuzz/) share: a bounded hypothesis budget, canary guest RAM, a strict fake KVM.

Budget: every target runs `max_examples` examples with no deadline (these
machines' timings are noise), scaled by HV_FUZZ_SCALE (default 1; CI keeps
1, a long local run sets 50).  Each run draws new examples, so CI explores a
little more every time; a failure prints its reproduction blob, and the
input it found is kept in the target as an explicit @example.

CanaryMemory is guest RAM whose every byte starts as a known pseudo-random
pattern; after the device under test ran, `changed()` lists the bytes it
wrote, so a target can assert that a device wrote only where the guest's
descriptors allowed (and, since GuestMemory checks every range, an access
outside RAM surfaces as a GuestMemoryError that the target reports).
"""
import errno
import os
import random
import struct

from hypothesis import HealthCheck, settings

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.irq import IrqRouter

SCALE = float(os.environ.get("HV_FUZZ_SCALE", "1"))


def budget(examples):
    """Hypothesis settings for one target: `examples` examples (times HV_FUZZ_SCALE), no deadline."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


PAGE = 4096
_PATTERNS = {}


def _pattern(size):
    if size not in _PATTERNS:
        _PATTERNS[size] = random.Random(size).randbytes(size)
    return _PATTERNS[size]


class CanaryMemory(GuestMemory):
    """Guest RAM (a memfd, `size` bytes from guest-physical 0) filled with a canary pattern."""

    def __init__(self, size=2 << 20):
        fd = create_memfd(size, "fuzz-ram")
        super().__init__(fd, size)
        self.baseline = bytearray(size)
        self.reset()

    def reset(self):
        """Every byte back to the canary."""
        self._view[:] = _pattern(self.size)
        self.baseline[:] = self._view

    def settle(self):
        """What the driver (the test) wrote so far is the new baseline: only later writes count as the device's."""
        self.baseline[:] = self._view

    def changed(self):
        """[(addr, length)] of the byte runs that differ from the baseline."""
        out, view, base = [], self._view, memoryview(self.baseline)
        for page in range(0, self.size, PAGE):
            if view[page:page + PAGE] == base[page:page + PAGE]:
                continue
            for i in range(page, min(page + PAGE, self.size)):
                if view[i] != base[i]:
                    if out and out[-1][0] + out[-1][1] == i:
                        out[-1] = (out[-1][0], out[-1][1] + 1)
                    else:
                        out.append((i, 1))
        return out

    def assert_written_only_within(self, allowed):
        """Every byte changed since the baseline lies in one of the (addr, length) ranges of `allowed`."""
        merged = []
        for lo, n in sorted((lo, n) for lo, n in allowed if n > 0):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], lo + n)
            else:
                merged.append([lo, lo + n])
        for addr, length in self.changed():
            end = addr + length
            while addr < end:
                cover = next((hi for lo, hi in merged if lo <= addr < hi), None)
                assert cover is not None, \
                    f"device wrote guest byte 0x{addr:x}, outside what it was given: {sorted(allowed)}"
                addr = cover

    def close(self):
        super().close()
        os.close(self.fd)


class StrictRouter(IrqRouter):
    """An IrqRouter that fails as KVM does: a second ioeventfd at an address and length taken (or either length 0:
    any) is EEXIST, removing one that is not there ENOENT, binding an eventfd already bound EBUSY.  Thread-safe
    enough for the tests' purposes: every call is checked under one lock, as KVM's slots lock would."""

    def __init__(self, any_length=False):
        import threading
        self.ioeventfd_any_length = any_length
        self.ioeventfds = {}        # (addr, len) -> eventfd
        self.bound = {}             # eventfd -> gsi
        self.routes = {}            # gsi -> (address, data)
        self.lines = {}
        self._next_gsi = 24
        self._lock = threading.Lock()

    def set_irq_line(self, irq, level):
        self.lines[irq] = level

    def allocate_gsi(self):
        with self._lock:
            self._next_gsi += 1
            return self._next_gsi - 1

    def route_msi(self, gsi, address, data):
        self.routes[gsi] = (address, data)

    def unroute(self, gsi):
        self.routes.pop(gsi, None)

    def bind_irqfd(self, eventfd, gsi):
        with self._lock:
            if eventfd in self.bound:
                raise OSError(errno.EBUSY, f"irqfd {eventfd} is bound already")
            self.bound[eventfd] = gsi

    def unbind_irqfd(self, eventfd, gsi):
        with self._lock:
            self.bound.pop(eventfd, None)            # KVM's deassign of a missing irqfd is not an error

    def add_ioeventfd(self, eventfd, addr, length):
        with self._lock:
            for (a, n) in self.ioeventfds:
                if a == addr and (n == length or not n or not length):
                    raise OSError(errno.EEXIST, f"ioeventfd at 0x{addr:x}+{length} exists")
            self.ioeventfds[(addr, length)] = eventfd

    def remove_ioeventfd(self, eventfd, addr, length):
        with self._lock:
            if self.ioeventfds.get((addr, length)) != eventfd:
                raise OSError(errno.ENOENT, f"no ioeventfd {eventfd} at 0x{addr:x}+{length}")
            del self.ioeventfds[(addr, length)]


# --- a split-ring driver for hostile chains -----------------------------------------------------

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class ChainDriver:
    """Lays out descriptor chains in canary RAM: the rings at `rings`, buffers from a bump arena above `arena`.

    A chain is a list of (data or length, writable): bytes are copied into a fresh buffer, an int is a buffer of
    that length left as canary, and a ("raw", addr, len, flags) tuple is a descriptor taken as given (pointing
    anywhere, with any flags).  Zero-length buffers are allowed, as a hostile driver would make them."""

    def __init__(self, mem, size, rings, arena):
        self.mem, self.size = mem, size
        self.desc, self.avail, self.used = rings
        self.arena, self.arena_end = arena, mem.size - 0x1000
        self.next_desc = self.avail_idx = 0
        self.writable = []          # every writable range a chain handed to the device

    def post(self, bufs):
        """Lay out one chain and make it available; its head, or None if the ring or arena is full."""
        if not bufs or self.next_desc + len(bufs) > self.size:
            return None
        laid = []
        for b in bufs:
            if isinstance(b[0], tuple):
                _, addr, ln, flags = b[0]
                laid.append((addr, ln, flags & ~F_NEXT))
                continue
            data, writable = b
            ln = data if isinstance(data, int) else len(data)
            if self.arena + ln > self.arena_end:
                return None
            addr = self.arena
            self.arena = (self.arena + ln + 15) & ~15
            if not isinstance(data, int):
                self.mem.write(addr, data)
            laid.append((addr, ln, F_WRITE if writable else 0))
        first = self.next_desc
        for k, (addr, ln, flags) in enumerate(laid):
            i = first + k
            last = k == len(laid) - 1
            self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, ln & 0xFFFFFFFF,
                                                           flags | (0 if last else F_NEXT), 0 if last else i + 1))
            if flags & F_WRITE and not flags & F_INDIRECT:
                self.writable.append((addr, ln))
        self.next_desc += len(laid)
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), first)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)
        return first

    def used_ring(self):
        return (self.used, 6 + 8 * self.size)

    def used_elems(self, count):
        return [struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (i % self.size), 8)) for i in range(count)]
