"""MSI-X for a virtio-pci function: the vector table, the PBA, and which vectors are live in KVM.

Each vector owns an irq eventfd (from the device's Eventfds) and a GSI
(allocated from the IrqRouter at plug time).  A vector is *live* when MSI-X
is enabled, the function is not masked and the entry is not masked; then its
GSI is routed as an MSI with the entry's address/data and the eventfd is
bound to it as an irqfd.  When a vector stops being live the irqfd is
unbound: further writes accumulate in the eventfd counter, and the PBA bit
reads 1 while the counter is nonzero (poll, no read).  When it becomes live
again, KVM_IRQFD polls the eventfd on assignment and, if the counter is
nonzero, schedules one injection: exactly the MSI-X "pending message is sent
on unmask" rule.  KVM does not consume the counter on that path (only its
wakeup callback does), so it is read right after the assignment: a count
still there can only be the one KVM already scheduled (any later write wakes
the irqfd, which zeroes the counter itself), so nothing is lost and a later
mask shows no stale PBA bit.  Unbinding flushes KVM's irqfd work, so no
message is delivered through a masked vector.  Several writes while masked
give one message, as on hardware (the PBA is a bit, not a count).

Not self-locking: the transport holds its lock around every call.
"""
import os
import select
import struct

from pyhv.proto.errors import StateError, state_bytes

ENTRY = 16
CTRL_ENABLE, CTRL_MASKALL = 0x8000, 0x4000


def eventfd_pending(fd):
    """Whether an eventfd's counter is nonzero, without consuming it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _drain(fd):
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class _Vector:
    __slots__ = ("fd", "gsi", "address", "data", "masked", "bound")

    def __init__(self, fd):
        self.fd = fd
        self.gsi = None
        self.address = 0
        self.data = 0
        self.masked = True          # MSI-X entries come out of reset masked
        self.bound = False


class MsixTable:
    def __init__(self, irq_fds, router):
        self.router = router
        self.vectors = [_Vector(fd) for fd in irq_fds]
        self.table = bytearray(ENTRY * len(self.vectors))
        for v in range(len(self.vectors)):
            self.table[v * ENTRY + 12] = 1
        self.control = 0            # the capability's message control word, as the guest wrote it
        self.writes = 0

    def plugged(self):
        for v in self.vectors:
            v.gsi = self.router.allocate_gsi()

    def fd(self, vector):
        return self.vectors[vector].fd

    def read(self, offset, size):
        return bytes(self.table[offset:offset + size]).ljust(size, b"\0")

    def write(self, offset, data):
        self.writes += 1
        end = min(offset + len(data), len(self.table))
        if offset >= end:
            return
        self.table[offset:end] = data[:end - offset]
        for v in range(offset // ENTRY, (end - 1) // ENTRY + 1):
            base = v * ENTRY
            ctrl = self.table[base + 12] & 1
            self.table[base + 12:base + 16] = bytes([ctrl, 0, 0, 0])   # reserved bits read 0
            self._update(v)

    def set_control(self, control):
        """The guest wrote the capability's message control (enable, function mask)."""
        self.control = control
        for v in range(len(self.vectors)):
            self._update(v)

    def _update(self, v):
        """Make KVM's route and irqfd binding match the guest's MSI-X state for vector v."""
        vec = self.vectors[v]
        addr_lo, addr_hi, data, ctrl = struct.unpack_from("<IIII", self.table, v * ENTRY)
        vec.address = addr_hi << 32 | addr_lo
        vec.data = data
        vec.masked = bool(ctrl & 1)
        live = bool(self.control & CTRL_ENABLE) and not self.control & CTRL_MASKALL and not vec.masked
        if live:
            self.router.route_msi(vec.gsi, vec.address, vec.data)
            if not vec.bound:
                self.router.bind_irqfd(vec.fd, vec.gsi)   # KVM injects a count that built up while masked...
                vec.bound = True
                _drain(vec.fd)                          # ...but leaves the counter set (see the docstring)
        elif vec.bound:
            self.router.unbind_irqfd(vec.fd, vec.gsi)
            vec.bound = False

    def pba(self):
        bits = 0
        for i, vec in enumerate(self.vectors):
            if not vec.bound and eventfd_pending(vec.fd):
                bits |= 1 << i
        return bits.to_bytes(8 * ((len(self.vectors) + 63) // 64), "little")

    def drop_pending(self):
        """Forget interrupts raised while unbound (a device reset)."""
        for v in self.vectors:
            if not v.bound:
                _drain(v.fd)

    def live_vectors(self):
        return sum(v.bound for v in self.vectors)

    # -- state ------------------------------------------------------------------------------
    def snapshot(self):
        """The table, the control word and the pending bits (an unbound vector's raised interrupt)."""
        pending = [i for i, v in enumerate(self.vectors) if not v.bound and eventfd_pending(v.fd)]
        return {"table": bytes(self.table), "control": self.control, "pending": pending}

    def restore(self, state):
        table = state_bytes(state["table"], "MSI-X table")
        if len(table) != len(self.table):
            raise StateError(f"MSI-X table of {len(table)} bytes, the device has {len(self.table)}")
        self.table[:] = table
        for i in state["pending"]:
            if 0 <= i < len(self.vectors):
                os.eventfd_write(self.vectors[i].fd, 1)
        self.set_control(int(state["control"]))
