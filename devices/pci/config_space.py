"""One PCI function's config space: the 256-byte type-0 header with write masks, memory BARs and a capability list.

Each byte has a write mask (read-only bits ignore writes) and a
write-1-to-clear mask (status register).  Memory BARs are 32-bit,
non-prefetchable, a power of two in size; writing all-ones to a BAR and
reading it back gives the size mask (the standard sizing protocol), because
the BAR's low bits are read-only zeros.

A BAR is decoded (`bar_addr[i]` set) while COMMAND.MEM is on and the BAR lies
wholly inside the root's MMIO window and overlaps no other function's
decoded BAR: a BAR the guest moves onto another one stops decoding, as
overlapping PCI devices would not work either (they would fight over the
cycles); it decodes again once moved apart.  The root owns the decision
(`root.decode`), so that all functions are checked against each other under
one lock; a function is told with `bar_moved(index, old, None)` when a BAR
stops decoding at `old` and `bar_moved(index, None, new)` when it starts at
`new` (every BAR has left its old place before any takes a new one).
"""
import struct

from pyhv.proto.errors import HvError, StateError, state_bytes

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


class PciError(HvError):
    """A VMM-side PCI configuration mistake (no slot left, window full, bad BAR size, config space full)."""


class PciFunction:
    """One PCI function.  Subclasses serve their BARs (`bar_read`/`bar_write`) and may hook config accesses."""

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

    # -- config space access (from the root, its lock held) ---------------------------
    def config_read(self, offset, size):
        """`size` bytes at `offset` (1/2/4, naturally aligned, inside the 256 bytes) as an int."""
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

    def memory_enabled(self):
        return bool(self._get(COMMAND, 2) & CMD_MEMORY)

    def update_decoding(self):
        """Ask the root which BARs decode now (all functions: moving one can uncover another)."""
        if self.root is not None:
            self.root.decode()

    def bar_moved(self, index, old, new):
        """Override: BAR `index` stopped decoding at `old` (new is None) or started at `new` (old is None)."""

    def plugged(self):
        """Override: now on the bus (`self.root` set), BARs placed, decoding not yet on."""

    def bar_read(self, index, offset, size):
        return b"\xff" * size

    def bar_write(self, index, offset, data):
        pass

    # -- state ----------------------------------------------------------------------------
    def snapshot(self):
        """Config space as the guest left it (BAR addresses, COMMAND, capabilities' writable fields)."""
        return {"config": bytes(self.config)}

    def restore(self, state):
        config = state_bytes(state["config"], "PCI config space")
        if len(config) != CONFIG_SIZE or config[:4] != self.config[:4]:
            raise StateError("PCI config space does not belong to this function")
        self.config[:] = config
        self.update_decoding()

    def counters(self):
        return {}

    def close(self):
        """Release host resources (threads, eventfds)."""
