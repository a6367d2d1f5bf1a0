"""What the fuzz targets (tests/unit/fuzz/) share: a bounded hypothesis budget, canary guest RAM, a strict fake KVM.

Budget: every target runs `max_examples` examples with no deadline (these
machines' timings are noise), scaled by HV_FUZZ_SCALE (default 1; CI keeps
1, a long local run sets 50).  Each run draws new examples, so CI explores a
little more every time; a failure prints its reproduction blob, and the
input it found is kept in the target as an explicit @example.

CanaryMemory is guest RAM whose every byte starts as a known pseudo-random
pattern; after the device under test ran, `assert_written_only_within()`
checks that it wrote only where the guest's descriptors allowed (and, since GuestMemory checks every range, an access
outside RAM surfaces as a GuestMemoryError that the target reports).
StrictRouter fails as KVM does; ChainDriver lays out hostile descriptor
chains; Bus is a PCI bus with two virtio functions and its invariants.
"""
import errno
import os
import random
import struct

from hypothesis import HealthCheck, settings

from fakes import FakeBackend
from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.irq import IrqRouter
from pyhv.devices.pci import config_space as CS
from pyhv.devices.pci.root import MMIO_WINDOW_END, MMIO_WINDOW_START, PciRoot
from pyhv.devices.virtio.device import Eventfds
from pyhv.devices.virtio.rng import VirtioRng
from pyhv.devices.virtio.transport import pci as V
from pyhv.devices.virtio.transport.msix import CTRL_ENABLE, CTRL_MASKALL

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
        self.reset()

    def reset(self):
        """Every byte back to the canary."""
        self._view[:] = _pattern(self.size)
        self.baseline = _pattern(self.size)

    def settle(self):
        """What the driver (the test) wrote so far is the new baseline: only later writes count as the device's."""
        self.baseline = self._map[:]

    def changed(self):
        """Whether any byte differs from the baseline (bytes compared with memcmp, not a memoryview's loop)."""
        return self._map[:] != self.baseline

    def assert_written_only_within(self, allowed):
        """Every byte changed since the baseline lies in one of the (addr, length) ranges of `allowed`.

        Compares the stretches outside `allowed` with the baseline (C-speed slices), not byte by byte."""
        merged = []
        for lo, n in sorted((lo, n) for lo, n in allowed if n > 0):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], lo + n)
            else:
                merged.append([lo, lo + n])
        base, pos = self.baseline, 0
        for lo, hi in merged + [[self.size, self.size]]:
            lo, hi = max(lo, pos), min(max(hi, lo), self.size)
            if pos < lo and self._map[pos:lo] != base[pos:lo]:
                first = next(i for i in range(pos, lo) if self._view[i] != base[i])
                raise AssertionError(f"device wrote guest byte 0x{first:x}, outside what it was given: "
                                     f"{sorted(allowed)}")
            pos = max(pos, hi)

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

    def used_ring_exposed(self):
        """Whether a writable buffer overlaps the used ring (a hostile driver may ask the device to write there,
        so the used elements cannot be taken at face value)."""
        lo, n = self.used_ring()
        return any(a < lo + n and lo < a + ln for a, ln in self.writable)

    def used_elems(self, count):
        return [struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (i % self.size), 8)) for i in range(count)]


# --- a PCI bus as a guest sees it ----------------------------------------------------------------

SLOTS = 4                       # the bridge, two functions, and an empty slot
WIDTHS = (1, 2, 4)              # config-space access widths


class Bus:
    """The host bridge, virtio-rng (its model in this process, on canary RAM) and a recording virtio function, on a
    StrictRouter; cfg_read/cfg_write/mmio are what a vCPU does, check() what must hold whatever it did."""

    def __init__(self, any_length=False):
        self.mem = CanaryMemory(1 << 20)
        self.router = StrictRouter(any_length)
        self.root = PciRoot(self.router)
        self.fns = []
        for backend in (VirtioRng(), FakeBackend(config=bytes(range(12)))):
            fn = V.VirtioPciDevice(backend, self.mem, self.router, Eventfds.create(backend.num_queues))
            self.root.add(fn, backend.name)
            self.fns.append(fn)

    def close(self):
        self.root.close()
        for fn in self.fns:
            fn.eventfds.close()
        self.mem.close()

    # -- what a vCPU does ----------------------------------------------------------------
    def cfg_read(self, slot, reg, width):
        self.root.config_io.write(0, (0x8000_0000 | slot << 11 | (reg & 0xFC)).to_bytes(4, "little"))
        data = self.root.config_io.read(4 + (reg & 3), width)
        assert len(data) == width
        return int.from_bytes(data, "little")

    def cfg_write(self, slot, reg, value, width):
        self.root.config_io.write(0, (0x8000_0000 | slot << 11 | (reg & 0xFC)).to_bytes(4, "little"))
        self.root.config_io.write(4 + (reg & 3), (value & ((1 << 8 * width) - 1)).to_bytes(width, "little"))

    def mmio(self, gpa, width, value=None):
        """An access to the MMIO window, as the bus hands it to the window device."""
        off = gpa - MMIO_WINDOW_START
        if value is None:
            data = self.root.window.read(off, width)
            assert len(data) == width
        else:
            self.root.window.write(off, (value & ((1 << 8 * width) - 1)).to_bytes(width, "little"))

    # -- the consistency the guest cannot break ---------------------------------------------
    def check(self):
        decoded = []
        for fn in self.root.functions.values():
            for i, size in enumerate(fn.bar_sizes):
                addr = fn.bar_addr[i]
                if not size:
                    assert addr is None
                    continue
                if addr is not None:
                    assert addr == fn.bar_value(i) and fn.memory_enabled()
                    assert MMIO_WINDOW_START <= addr and addr + size <= MMIO_WINDOW_END
                    decoded.append((addr, addr + size, fn, i))
        decoded.sort(key=lambda t: t[0])
        for a, b in zip(decoded, decoded[1:]):
            assert a[1] <= b[0], "two decoded BARs overlap"
        assert [(s, e, f, i) for s, e, f, i in self.root.window._map] == decoded
        want = {}
        for fn in self.fns:
            base = fn.bar_addr[V.BAR]
            if base is not None:
                for q, fd in enumerate(fn.eventfds.notify):
                    want[(base + V.NOTIFY_OFF + V.NOTIFY_MULTIPLIER * q, fn._ioeventfd_len)] = fd
        assert self.router.ioeventfds == want
        bound = {}
        for fn in self.fns:
            control = fn.msix.control
            for v in fn.msix.vectors:
                live = bool(control & CTRL_ENABLE) and not control & CTRL_MASKALL and not v.masked
                assert v.bound == live
                if v.bound:
                    bound[v.fd] = v.gsi
        assert self.router.bound == bound


# --- what a hostile vCPU does to that bus ------------------------------------------------------------

def bar_targets(bus):
    """Addresses a guest may move a BAR to: the others' BARs (overlaps), window edges, outside the window."""
    out = [MMIO_WINDOW_START, MMIO_WINDOW_END - V.BAR_SIZE, MMIO_WINDOW_END, 0, 0xFFFF_F000, 0xFEBF_F000]
    for fn in bus.root.functions.values():
        for i, size in enumerate(fn.bar_sizes):
            if size:
                out += [fn.bar_value(i), fn.bar_value(i) + size // 2]
    return out


def driver_init(bus, fn, rng):
    """What a (sloppy) driver does through BAR 0: reset, negotiate, set up every queue, DRIVER_OK, kick."""
    base = fn.bar_value(V.BAR)

    def common(off, value, width):
        bus.mmio(base + V.COMMON_OFF + off, width, value)
    common(0x14, 0, 1)
    common(0x14, 3, 1)
    features = fn.backend.features if rng.random() < 0.8 else rng.getrandbits(64)
    for sel in (0, 1):
        common(0x08, sel, 4)
        common(0x0C, features >> 32 * sel, 4)
    common(0x14, 0xB, 1)
    for q in range(len(fn.common.queues) + rng.randrange(2)):
        common(0x16, q, 2)
        common(0x18, rng.choice([1, 2, 4, 8, 16, 3, 0, 0xFFFF]), 2)
        common(0x1A, rng.choice([0, 1, 2, 3, 0xFFFF]), 2)
        ram = bus.mem.size
        for off, align in ((0x20, 16), (0x28, 2), (0x30, 4)):
            common(off, rng.randrange(0, ram, align) if rng.random() < 0.9 else rng.getrandbits(64), 8)
        common(0x1C, 1, 2)
    common(0x14, 0xF, 1)
    for q in range(len(fn.common.queues)):
        bus.mmio(base + V.NOTIFY_OFF + 4 * q, 2, q)


def msix_program(bus, fn, rng):
    base = fn.bar_value(V.BAR)
    for v in range(len(fn.msix.vectors)):
        entry = base + V.MSIX_TABLE_OFF + 16 * v
        bus.mmio(entry, 4, 0xFEE0_0000)
        bus.mmio(entry + 8, 4, rng.getrandbits(32))
        bus.mmio(entry + 12, 4, rng.getrandbits(1))
    bus.cfg_write(fn.devfn >> 3, fn.msix_cap + 2, rng.choice([CTRL_ENABLE, CTRL_ENABLE, CTRL_ENABLE | CTRL_MASKALL]), 2)


def random_op(bus, rng):
    """One thing a hostile vCPU does to the bus."""
    fn = rng.choice(bus.fns)
    slot = fn.devfn >> 3
    kind = rng.randrange(14)
    if kind == 0:                                  # COMMAND memory enable on or off (defect 2)
        bus.cfg_write(slot, CS.COMMAND, rng.choice([0, CS.CMD_MEMORY, CS.CMD_MEMORY, 0xFFFF]), 2)
    elif kind == 1:                                # move BAR 0, often onto another BAR (defect 3)
        target = rng.choice(bar_targets(bus)) if rng.random() < 0.8 else rng.getrandbits(32)
        bus.cfg_write(slot, CS.BAR0, target, 4)
    elif kind == 2:                                # any config register, any width, any value
        bus.cfg_write(rng.randrange(SLOTS), rng.randrange(256), rng.getrandbits(32), rng.choice(WIDTHS))
    elif kind == 3:
        bus.cfg_read(rng.randrange(SLOTS + 1), rng.randrange(256), rng.choice(WIDTHS))
    elif kind == 4:                                # MSI-X enable / function mask
        bus.cfg_write(slot, fn.msix_cap + 2, rng.choice([0, CTRL_ENABLE, CTRL_ENABLE | CTRL_MASKALL]), 2)
    elif kind == 5:
        driver_init(bus, fn, rng)
    elif kind == 6:
        msix_program(bus, fn, rng)
    elif kind == 7:                                # the PCI_CFG window onto BAR 0
        cap = fn.pci_cfg_cap
        bus.cfg_write(slot, cap + 4, rng.choice([0, 0, 1, 0xFF]), 1)
        bus.cfg_write(slot, cap + 8, rng.choice([0x14, 0x16, 0x1C, V.MSIX_TABLE_OFF, rng.getrandbits(32)]), 4)
        bus.cfg_write(slot, cap + 12, rng.choice([1, 2, 4, 3, 0, rng.getrandbits(32)]), 4)
        if rng.random() < 0.5:
            bus.cfg_write(slot, cap + 16, rng.getrandbits(32), rng.choice(WIDTHS))
        else:
            bus.cfg_read(slot, cap + 16, rng.choice(WIDTHS))
    else:                                          # BAR registers: common config, ISR, device config, notify, MSI-X
        base = fn.bar_value(V.BAR)
        region = rng.choice([V.COMMON_OFF, V.ISR_OFF, V.DEVICE_OFF, V.NOTIFY_OFF, V.MSIX_TABLE_OFF, V.MSIX_PBA_OFF,
                             0x6000])
        off = region + (rng.randrange(0x40) if rng.random() < 0.8 else rng.randrange(0x1000))
        width = rng.choice((1, 2, 4, 8))
        if region == V.COMMON_OFF and rng.random() < 0.5:       # the status byte and the queue registers
            off = rng.choice([0x14, 0x16, 0x18, 0x1A, 0x1C, 0x20, 0x28, 0x30])
            value = rng.choice([0, 1, 3, 0xB, 0xF, 0xFF, rng.getrandbits(64)])
        else:
            value = rng.getrandbits(64)
        if rng.random() < 0.5:
            bus.mmio(base + off, width)
        else:
            bus.mmio(base + off, width, value)
