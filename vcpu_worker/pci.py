"""PCI: config space of each function, the host bridge, config mechanism #1 (0xCF8/0xCFC), BAR placement and MSI routes.

One PCI bus (bus 0), no bridges, no ACPI: Linux finds it by probing config
mechanism #1 (pci_check_type1 writes 0x80000000 to 0xCF8 and expects to read
it back, then pci_sanity_check looks for a host-bridge class code on bus 0).

Config space
    `PciFunction` models the 256-byte type-0 header plus a capability list.
    Each byte has a write mask (read-only bits ignore writes) and a
    write-1-to-clear mask (status register).  Memory BARs are 32-bit,
    non-prefetchable, a power of two in size; writing all-ones to a BAR and
    reading it back gives the size mask (the standard sizing protocol),
    because the BAR's low bits are read-only zeros.

BAR placement
    The VMM plays firmware: `PciRoot.add` gives every BAR a fixed address in
    the MMIO window (0xE000_0000..0xFE00_0000, below the debug page, IOAPIC
    and LAPIC) and sets COMMAND.MEM, the way a BIOS leaves devices.  Linux
    claims firmware-assigned BARs as they are.  If the guest moves a BAR
    anyway, the new address takes effect whenever COMMAND.MEM is on and the
    BAR lies wholly inside the window (Linux clears MEM while it sizes BARs,
    so the all-ones sizing value is never decoded); a function is told with
    `bar_moved(index, old, new)` so it can move what KVM knows about (the
    virtio notify ioeventfds).

    The whole window is one MmioBus registration (`PciMmioWindow`) that
    dispatches to the decoded BARs itself, so moving a BAR never touches the
    MmioBus (which has no unregister).

MSI routes
    `MsiRoutes` owns KVM's GSI routing table.  KVM_SET_GSI_ROUTING replaces
    the whole table, so every update re-sends the in-kernel irqchip's
    defaults for GSIs 0-23 (IOAPIC pins 0-23, plus the PIC for 0-15: KVM's
    default_routing) followed by one MSI entry per live vector; without the
    defaults the serial port's IRQ 4 and the PIT would stop working.  MSI
    GSIs are allocated from 24 upward.  An irqfd bound to a GSI delivers
    whatever MSI the route currently names (KVM re-reads routes on update).
"""
import select
import struct
import threading

# --- config space layout (type 0 header) -----------------------------------
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG, HEADER_TYPE = 0x08, 0x09, 0x0E
BAR0, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, ROM_ADDRESS = 0x10, 0x2C, 0x2E, 0x30
CAPABILITY_LIST, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D
CAP_START = 0x40
CONFIG_SIZE = 256
NUM_BARS = 6

CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
STATUS_CAP_LIST = 0x10
STATUS_W1C = 0xF900            # parity/abort/SERR error bits: write 1 to clear

CAP_ID_VNDR, CAP_ID_MSIX = 0x09, 0x11

BAR_MEM32 = 0x0                # memory, 32-bit, non-prefetchable (low 4 bits)

# config mechanism #1
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 0x8000_0000

MMIO_WINDOW_START = 0xE000_0000
MMIO_WINDOW_END = 0xFE00_0000   # exclusive; the debug page is at 0xFEBFF000, IOAPIC 0xFEC00000

HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE = 0x1B36, 0x0008   # Red Hat "PCIe host bridge": no Linux driver binds
CLASS_HOST_BRIDGE = 0x060000

FIRST_MSI_GSI = 24             # 0-23: IOAPIC pins (0-15 also the PIC)
IOAPIC_PINS = 24


class PciError(ValueError):
    """A VMM-side PCI configuration mistake (no slot left, window full, bad BAR size)."""


def default_irqchip_routes():
    """KVM's default GSI routes for an in-kernel irqchip (arch/x86/kvm default_routing)."""
    from pyhv.vcpu_worker._kvm import lib
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append((gsi, "irqchip", lib.KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < 16:
            chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, "irqchip", chip, gsi % 8))
    return routes


class MsiRoutes:
    """The VM's GSI routing table: irqchip defaults + MSI routes; irqfd binding.

    `vm` None runs without KVM (unit tests): the calls are only recorded in
    `log`.  Thread-safe: vCPU threads program MSI-X tables concurrently.
    """

    def __init__(self, vm=None):
        self.vm = vm
        self._lock = threading.Lock()
        self._next_gsi = FIRST_MSI_GSI
        self._msi = {}                        # gsi -> (address, data)
        self._defaults = default_irqchip_routes() if vm is not None else []
        self.updates = 0                      # KVM_SET_GSI_ROUTING calls
        self.log = []                         # without a VM: ("route"|"unroute"|"bind"|"unbind", ...)

    def allocate(self):
        with self._lock:
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def set_msi(self, gsi, address, data):
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._commit(("route", gsi, address, data))

    def clear(self, gsi):
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._commit(("unroute", gsi))

    def _commit(self, what):
        self.updates += 1
        if self.vm is None:
            self.log.append(what)
            return
        routes = self._defaults + [(g, "msi", a, d) for g, (a, d) in sorted(self._msi.items())]
        self.vm.set_gsi_routing(routes)

    def bind(self, eventfd, gsi):
        """KVM_IRQFD: writes to `eventfd` inject GSI `gsi` (and a count already pending is injected now)."""
        if self.vm is None:
            self.log.append(("bind", eventfd, gsi))
        else:
            self.vm.irqfd(eventfd, gsi)

    def unbind(self, eventfd, gsi):
        """Detach the irqfd; later writes accumulate in the eventfd's counter."""
        if self.vm is None:
            self.log.append(("unbind", eventfd, gsi))
        else:
            self.vm.irqfd(eventfd, gsi, deassign=True)


def eventfd_pending(fd):
    """Whether an eventfd's counter is nonzero, without consuming it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class PciFunction:
    """One PCI function: 256 bytes of config space with write masks, memory BARs, capabilities.

    Subclasses handle their BARs (`bar_read`/`bar_write`) and may hook config
    accesses (`config_read_hook`, `config_written`).
    """

    def __init__(self, vendor, device, class_code, revision=0, subsystem_vendor=0, subsystem_id=0,
                 header_type=0):
        self.config = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1c = bytearray(CONFIG_SIZE)
        self.bar_sizes = [0] * NUM_BARS
        self.bar_addr = [None] * NUM_BARS     # decoded address, None when not decoded
        self.devfn = None
        self.root = None
        self._cap_end = CAP_START
        self._last_cap = None
        self._set(VENDOR_ID, 2, vendor)
        self._set(DEVICE_ID, 2, device)
        self._set(REVISION_ID, 1, revision)
        self._set(CLASS_PROG, 3, class_code)
        self._set(HEADER_TYPE, 1, header_type)
        self._set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._set(SUBSYSTEM_ID, 2, subsystem_id)
        self._mask(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE)
        struct.pack_into("<H", self.w1c, STATUS, STATUS_W1C)
        self._mask(INTERRUPT_LINE, 1, 0xFF)   # scratch for the OS; no INTx pin (INTERRUPT_PIN 0)

    # -- raw helpers ----------------------------------------------------------
    def _set(self, off, size, value):
        self.config[off:off + size] = value.to_bytes(size, "little")

    def _get(self, off, size):
        return int.from_bytes(self.config[off:off + size], "little")

    def _mask(self, off, size, mask):
        self.wmask[off:off + size] = mask.to_bytes(size, "little")

    # -- building ---------------------------------------------------------------
    def add_bar(self, index, size):
        """A 32-bit memory BAR of `size` bytes (a power of two, at least 4 KiB)."""
        if not 0 <= index < NUM_BARS or self.bar_sizes[index]:
            raise PciError(f"BAR {index} is taken or out of range")
        if size < 0x1000 or size & (size - 1) or size > 1 << 31:
            raise PciError(f"BAR size 0x{size:x} is not a power of two >= 4 KiB")
        self.bar_sizes[index] = size
        self._set(BAR0 + 4 * index, 4, BAR_MEM32)
        self._mask(BAR0 + 4 * index, 4, ~(size - 1) & 0xFFFF_FFF0)

    def add_capability(self, cap_id, body, writable=b""):
        """Append a capability (id, next pointer, then `body`); returns its config offset.

        `writable` is a write mask for `body` (shorter than body: the rest is read-only).
        """
        length = 2 + len(body)
        off = self._cap_end
        if off + length > CONFIG_SIZE:
            raise PciError("config space full")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2:off + length] = body
        self.wmask[off + 2:off + 2 + len(writable)] = writable
        if self._last_cap is None:
            self.config[CAPABILITY_LIST] = off
            self._set(STATUS, 2, self._get(STATUS, 2) | STATUS_CAP_LIST)
        else:
            self.config[self._last_cap + 1] = off
        self._last_cap = off
        self._cap_end = (off + length + 3) & ~3
        return off

    def capabilities(self):
        """[(offset, id)] by walking the list as a driver would (bounded)."""
        out = []
        off = self.config[CAPABILITY_LIST] & ~3
        while off and len(out) < 48:
            out.append((off, self.config[off]))
            off = self.config[off + 1] & ~3
        return out

    # -- config space access (from PciRoot) ------------------------------------------
    def config_read(self, offset, size):
        """`size` bytes at `offset` (size 1/2/4, naturally aligned) as an int."""
        value = self.config_read_hook(offset, size)
        if value is None:
            value = self._get(offset, size)
        return value

    def config_write(self, offset, value, size):
        old_cmd = self._get(COMMAND, 2)
        for i in range(size):
            o = offset + i
            b = (value >> (8 * i)) & 0xFF
            cur = self.config[o]
            cur = (cur & ~self.wmask[o]) | (b & self.wmask[o])
            cur &= ~(b & self.w1c[o])
            self.config[o] = cur & 0xFF
        self.config_written(offset, size)
        if offset < BAR0 + 4 * NUM_BARS and offset + size > BAR0 or (
                offset < COMMAND + 2 and offset + size > COMMAND and old_cmd != self._get(COMMAND, 2)):
            self.update_decoding()

    def config_read_hook(self, offset, size):
        """Override: a value for a dynamic register, or None to read config space."""
        return None

    def config_written(self, offset, size):
        """Override: react to a config write (already applied through the masks)."""

    # -- BAR decoding -------------------------------------------------------------------
    def bar_value(self, index):
        return self._get(BAR0 + 4 * index, 4) & ~0xF

    def place_bar(self, index, addr):
        """Firmware-style assignment (the VMM's): write the BAR directly."""
        self._set(BAR0 + 4 * index, 4, (addr & ~0xF) | BAR_MEM32)

    def update_decoding(self):
        mem_on = bool(self._get(COMMAND, 2) & CMD_MEMORY)
        for i, size in enumerate(self.bar_sizes):
            if not size:
                continue
            addr = self.bar_value(i)
            ok = mem_on and MMIO_WINDOW_START <= addr and addr + size <= MMIO_WINDOW_END
            new = addr if ok else None
            old = self.bar_addr[i]
            if new != old:
                self.bar_addr[i] = new
                if self.root is not None:
                    self.root.window.changed()
                self.bar_moved(i, old, new)

    def bar_moved(self, index, old, new):
        """Override: BAR `index` is now decoded at `new` (None: not decoded); it was at `old`."""

    def plugged(self):
        """Override: now on the bus (`self.root` set), BARs placed, decoding not yet on."""

    def bar_read(self, index, offset, size):
        return b"\xff" * size

    def bar_write(self, index, offset, data):
        pass

    def close(self):
        """Release host resources (threads, eventfds)."""


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
        self._lock = threading.Lock()

    def read(self, offset, size):
        if offset == 0 and size == 4:
            return self.address.to_bytes(4, "little")
        if offset < 4:
            return b"\xff" * size          # not the address register: nothing decodes it
        with self._lock:
            addr = self.address
        return self.root.config_data_read(addr, offset - 4, size).to_bytes(size, "little")

    def write(self, offset, data):
        size = len(data)
        if offset == 0 and size == 4:
            with self._lock:
                self.address = int.from_bytes(data, "little") & 0x80FF_FFFC
            return
        if offset < 4:
            return                          # e.g. Linux's outb(0x01, 0xCFB) type-2 probe: ignored
        with self._lock:
            addr = self.address
        self.root.config_data_write(addr, offset - 4, int.from_bytes(data, "little"), size)


class PciMmioWindow:
    """The MMIO window as one MmioBus device: routes accesses to the decoded BARs."""

    def __init__(self, root):
        self.root = root
        self._map = []                      # [(start, end, function, bar index)]
        self.unclaimed = 0

    def changed(self):
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
    """Bus 0: the host bridge at 00.0, devices from 01.0 up, config I/O ports, MMIO window, MSI routes."""

    def __init__(self, vm=None, window=(MMIO_WINDOW_START, MMIO_WINDOW_END)):
        self.functions = {}                 # devfn -> PciFunction
        self.names = {}                     # devfn -> name
        self.msi = MsiRoutes(vm)
        self.config_io = PciConfigIo(self)
        self.window = PciMmioWindow(self)
        self._next_bar = window[0]
        self._window_end = window[1]
        self.add(PciHostBridge(), "host-bridge", slot=0)

    def add(self, function, name, slot=None):
        """Put `function` at slot.0 (next free slot by default), place its BARs, enable decoding."""
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
                if addr + size > self._window_end:
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

    def attach(self, pio, mmio):
        """Register the config ports and the MMIO window on the VM's buses."""
        pio.register(CONFIG_ADDRESS_PORT, 8, self.config_io, "pci-config")
        mmio.register(MMIO_WINDOW_START, MMIO_WINDOW_END - MMIO_WINDOW_START, self.window, "pci-window")

    def _target(self, address, offset):
        """(function, register offset) for a CONFIG_ADDRESS value, or None."""
        if not address & CONFIG_ENABLE:
            return None
        bus = (address >> 16) & 0xFF
        devfn = (address >> 8) & 0xFF
        if bus != 0:
            return None
        fn = self.functions.get(devfn)
        if fn is None:
            return None
        return fn, (address & 0xFC) + offset

    def config_data_read(self, address, offset, size):
        t = self._target(address, offset)
        if t is None:
            return (1 << (8 * size)) - 1    # nonexistent function: all-ones
        fn, reg = t
        if reg % size:                      # misaligned (e.g. a dword at 0xCFD): split bytewise
            return int.from_bytes(bytes(fn.config_read(reg + i, 1) for i in range(size)), "little")
        return fn.config_read(reg, size)

    def config_data_write(self, address, offset, value, size):
        t = self._target(address, offset)
        if t is None:
            return
        fn, reg = t
        if reg % size:
            for i in range(size):
                fn.config_write(reg + i, (value >> (8 * i)) & 0xFF, 1)
            return
        fn.config_write(reg, value, size)

    def counters(self):
        out = {"mmio_unclaimed": self.window.unclaimed, "gsi_routing_updates": self.msi.updates}
        for devfn, fn in self.functions.items():
            c = getattr(fn, "counters", None)
            if c is not None:
                out[self.names[devfn]] = c()
        return out

    def close(self):
        for fn in self.functions.values():
            fn.close()
