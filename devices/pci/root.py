"""PCI bus 0: the host bridge, config mechanism #1 (ports 0xCF8-0xCFF), BAR placement and the MMIO window.

One bus, no bridges: Linux finds it by probing config mechanism #1
(pci_check_type1 writes 0x80000000 to 0xCF8 and expects to read it back,
then pci_sanity_check looks for a host-bridge class code on bus 0).

The VMM plays firmware: `add` gives every BAR a fixed address in the MMIO
window (0xE000_0000..0xFE00_0000, below the debug page, IOAPIC and LAPIC)
and sets COMMAND.MEM, the way a BIOS leaves devices; Linux keeps
firmware-assigned BARs.  The whole window is one MMIO bus registration
(`PciMmioWindow`) that dispatches to the decoded BARs itself, so moving a
BAR never touches the bus.

Every config access and every decoding decision happens under the root's
lock: vCPUs may program config space concurrently (Linux does on SMP), and a
BAR's decoding depends on every other function's (overlapping BARs do not
decode, see config_space.py).  Config data accesses that run past byte 0xFF
of a function's config space read all-ones and write nothing for the bytes
beyond it.
"""
import threading

from pyhv.devices.pci.config_space import CMD_MEMORY, COMMAND, CONFIG_SIZE, PciError, PciFunction
from pyhv.proto.errors import StateError

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_ENABLE = 0x8000_0000
MMIO_WINDOW_START = 0xE000_0000
MMIO_WINDOW_END = 0xFE00_0000   # exclusive; the debug page is at 0xFEBFF000, IOAPIC 0xFEC00000

HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE = 0x1B36, 0x0008   # Red Hat "PCIe host bridge": no Linux driver binds
CLASS_HOST_BRIDGE = 0x060000


class PciHostBridge(PciFunction):
    """Device 00.0: the host bridge; its class code is what Linux's type-1 sanity check looks for."""

    def __init__(self):
        super().__init__(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE,
                         subsystem_vendor=HOST_BRIDGE_VENDOR, subsystem_id=0x1100)


class PciConfigIo:
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS (dword at 0xCF8) and CONFIG_DATA (0xCFC-0xCFF, any width)."""

    def __init__(self, root):
        self.root = root
        self.address = 0

    def read(self, offset, size):
        if offset == 0 and size == 4:
            return self.address.to_bytes(4, "little")
        if offset < 4:
            return b"\xff" * size          # not the address register: nothing decodes it
        return self.root.config_data_read(self.address, offset - 4, size).to_bytes(size, "little")

    def write(self, offset, data):
        size = len(data)
        if offset == 0 and size == 4:
            self.address = int.from_bytes(data, "little") & 0x80FF_FFFC     # one reference store
            return
        if offset < 4:
            return                          # e.g. Linux's outb(0x01, 0xCFB) type-2 probe: ignored
        self.root.config_data_write(self.address, offset - 4, int.from_bytes(data, "little"), size)


class PciMmioWindow:
    """The MMIO window as one bus device: routes accesses to the decoded BARs."""

    def __init__(self, root):
        self.root = root
        self._map = []                      # [(start, end, function, bar index)]
        self.unclaimed = 0

    def rebuild(self):
        m = []
        for fn in self.root.functions.values():
            for i, addr in enumerate(fn.bar_addr):
                if addr is not None:
                    m.append((addr, addr + fn.bar_sizes[i], fn, i))
        m.sort(key=lambda t: t[0])
        self._map = m                       # one reference swap: readers see old or new

    def _find(self, gpa):
        for start, end, fn, i in self._map:
            if start <= gpa < end:
                return fn, i, gpa - start
        return None

    def read(self, offset, size):
        hit = self._find(MMIO_WINDOW_START + offset)
        if hit is None:
            self.unclaimed += 1
            return b"\xff" * size
        fn, i, off = hit
        return fn.bar_read(i, off, size)

    def write(self, offset, data):
        hit = self._find(MMIO_WINDOW_START + offset)
        if hit is None:
            self.unclaimed += 1
            return
        fn, i, off = hit
        fn.bar_write(i, off, data)


class PciRoot:
    """Bus 0: the host bridge at 00.0, devices from 01.0 up, config I/O ports, the MMIO window."""

    def __init__(self, router, window=(MMIO_WINDOW_START, MMIO_WINDOW_END)):
        self.router = router                # devices.irq.IrqRouter: MSI routes, irqfds, ioeventfds
        self.functions = {}                 # devfn -> PciFunction
        self.names = {}                     # devfn -> name
        self.config_io = PciConfigIo(self)
        self.window = PciMmioWindow(self)
        self._window = window
        self._next_bar = window[0]
        self._lock = threading.RLock()      # config space and decoding of every function
        self.bar_conflicts = 0
        self.add(PciHostBridge(), "host-bridge", slot=0)

    def add(self, function, name, slot=None):
        """Put `function` at slot.0 (next free slot by default), place its BARs, enable decoding."""
        with self._lock:
            if slot is None:
                slot = next((s for s in range(1, 32) if (s << 3) not in self.functions), None)
                if slot is None:
                    raise PciError("no free PCI slot on bus 0")
            devfn = slot << 3
            if devfn in self.functions:
                raise PciError(f"PCI slot {slot} is taken")
            for i, size in enumerate(function.bar_sizes):
                if size:
                    addr = (self._next_bar + size - 1) & ~(size - 1)
                    if addr + size > self._window[1]:
                        raise PciError(f"{name}: BAR {i} (0x{size:x} bytes) does not fit in the MMIO window")
                    function.place_bar(i, addr)
                    self._next_bar = addr + size
            function.devfn = devfn
            function.root = self
            self.functions[devfn] = function
            self.names[devfn] = name
            function.plugged()
            if any(function.bar_sizes):
                function.config_write(COMMAND, CMD_MEMORY, 2)   # as firmware leaves it
            return devfn

    def by_name(self):
        return {self.names[d]: fn for d, fn in self.functions.items()}

    def attach(self, pio, mmio):
        """Register the config ports and the MMIO window on the VM's buses."""
        pio.register(CONFIG_ADDRESS_PORT, 8, self.config_io, "pci-config")
        start, end = self._window
        mmio.register(start, end - start, self.window, "pci-window")

    # -- decoding (lock held by the config write that called it) ------------------------
    def decode(self):
        """Recompute which BARs decode: memory enabled, inside the window, and overlapping no other decoded BAR.

        BARs that already decode keep their place; a moved BAR that would
        overlap one of them stays undecoded (counted in bar_conflicts).
        """
        with self._lock:
            start, end = self._window
            wanted = {}                     # (fn, i) -> addr the guest asks for
            for fn in self.functions.values():
                on = fn.memory_enabled()
                for i, size in enumerate(fn.bar_sizes):
                    if size:
                        addr = fn.bar_value(i)
                        ok = on and start <= addr and addr + size <= end
                        wanted[(fn, i)] = addr if ok else None
            # keep the ones already decoded at the same place first, then place the rest in order
            decided = []                    # [(start, end)]
            new = {}
            order = sorted(wanted, key=lambda k: (wanted[k] != k[0].bar_addr[k[1]], k[0].devfn, k[1]))
            for fn, i in order:
                addr = wanted[(fn, i)]
                if addr is not None:
                    stop = addr + fn.bar_sizes[i]
                    if any(a < stop and addr < b for a, b in decided):
                        self.bar_conflicts += 1
                        addr = None
                    else:
                        decided.append((addr, stop))
                new[(fn, i)] = addr
            moved = [(fn, i, fn.bar_addr[i], addr) for (fn, i), addr in new.items() if fn.bar_addr[i] != addr]
            for fn, i, _, addr in moved:
                fn.bar_addr[i] = addr
            if moved:
                self.window.rebuild()
            # Every BAR leaves its old place before any takes a new one: a BAR may be taking the place another
            # has just left (its function stopped decoding), and KVM refuses a second ioeventfd at an address.
            for fn, i, old, addr in moved:
                if old is not None:
                    fn.bar_moved(i, old, None)
            for fn, i, old, addr in moved:
                if addr is not None:
                    fn.bar_moved(i, None, addr)

    # -- config mechanism #1 ------------------------------------------------------------
    def _target(self, address):
        """The function a CONFIG_ADDRESS value selects, or None."""
        if not address & CONFIG_ENABLE or (address >> 16) & 0xFF != 0:
            return None
        return self.functions.get((address >> 8) & 0xFF)

    def config_data_read(self, address, offset, size):
        fn = self._target(address)
        if fn is None:
            return (1 << (8 * size)) - 1    # nonexistent function: all-ones
        reg = (address & 0xFC) + offset
        with self._lock:
            if reg % size or reg + size > CONFIG_SIZE:   # misaligned or past the end: bytewise
                return int.from_bytes(bytes(fn.config_read(reg + i, 1) if reg + i < CONFIG_SIZE else 0xFF
                                            for i in range(size)), "little")
            return fn.config_read(reg, size)

    def config_data_write(self, address, offset, value, size):
        fn = self._target(address)
        if fn is None:
            return
        reg = (address & 0xFC) + offset
        with self._lock:
            if reg % size or reg + size > CONFIG_SIZE:
                for i in range(size):
                    if reg + i < CONFIG_SIZE:
                        fn.config_write(reg + i, (value >> (8 * i)) & 0xFF, 1)
                return
            fn.config_write(reg, value, size)

    # -- state, observation, teardown ---------------------------------------------------
    def snapshot(self):
        with self._lock:
            return {"address": self.config_io.address,
                    "functions": {self.names[d]: fn.snapshot() for d, fn in self.functions.items()}}

    def restore(self, state):
        with self._lock:
            by_name = self.by_name()
            for name, s in state["functions"].items():
                if name not in by_name:
                    raise StateError(f"the snapshot has PCI device {name}, this guest does not")
                by_name[name].restore(s)
            self.config_io.address = int(state["address"]) & 0x80FF_FFFC

    def counters(self):
        out = {"mmio_unclaimed": self.window.unclaimed, "bar_conflicts": self.bar_conflicts}
        for devfn, fn in self.functions.items():
            c = fn.counters()
            if c:
                out[self.names[devfn]] = c
        return out

    def close(self):
        for fn in self.functions.values():
            fn.close()
