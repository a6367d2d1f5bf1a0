"""One vCPU's guest debugging: the only caller of KVM_SET_GUEST_DEBUG, owning its four breakpoint slots and single-step.

KVM takes a vCPU's whole debug setup in one ioctl (control flags, DR0-DR3,
DR7), so everything that wants a hardware breakpoint or single-stepping
claims it here and `apply()` composes the one KVM_SET_GUEST_DEBUG:

- slot 0 (DR0) is the SYSCALL hook's (vcpu_worker/syscall_hook.py, compat
  profile `nested`): an execute breakpoint on the guest's #PF entry;
- slots 1-3 (DR1-DR3) are left for a debugger (`--gdb`);
- single-step is one flag, whoever asks for it.

These are the VMM's breakpoints: KVM keeps them apart from the guest's own
DR0-DR7, which the guest still reads and writes as its own.  On these
nested hosts the guest's own breakpoints and debug exceptions go to the
guest without involving us (measured, docs/kvm-notes.md); a KVM_EXIT_DEBUG
that none of our slots or our single-step explains is delivered to the
guest as the #DB it was (`deliver_to_guest`), never a VM failure.
"""
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.kvm import ioctl

SLOTS = 4
HOOK_SLOT = 0                  # DR0: the SYSCALL hook
DEBUGGER_SLOTS = (1, 2, 3)     # DR1-DR3: a debugger

# DR7 R/W field: what a slot breaks on; LEN field by length in bytes.
EXECUTE, WRITE, ACCESS = 0b00, 0b01, 0b11
LENGTHS = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
DR7_FIXED = 1 << 10            # reads as 1
DR6_B = 0xF                    # B0-B3: which slot matched
DR6_BS = 1 << 14               # single-step
DR6_FIXED = 0xFFFF0FF0         # DR6's bits that read as 1 (Linux's DR6_RESERVED)
DB_VECTOR = 1


class Breakpoint:
    __slots__ = ("addr", "kind", "length", "owner")

    def __init__(self, addr, kind, length, owner):
        self.addr, self.kind, self.length, self.owner = addr, kind, length, owner


def dr7_for(slots):
    """DR7 for the enabled `slots` (a list of 4 Breakpoint-or-None): local enable, R/W and LEN per slot."""
    dr7 = DR7_FIXED
    for i, bp in enumerate(slots):
        if bp is not None:
            length = 0 if bp.kind == EXECUTE else LENGTHS[bp.length]
            dr7 |= 1 << (2 * i) | bp.kind << (16 + 4 * i) | length << (18 + 4 * i)
    return dr7


def control_for(slots, singlestep):
    """KVM_SET_GUEST_DEBUG's control word: 0 (all off) unless a slot or single-step is in use."""
    control = 0
    if any(bp is not None for bp in slots):
        control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP
    if singlestep:
        control |= lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
    return control


class GuestDebug:
    """The debug setup KVM holds for one vCPU, and who asked for each part of it."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.slots = [None] * SLOTS
        self.singlestep = None         # the owner that asked for it, or None
        self.applied = None            # (control, debugregs) last given to KVM
        self.delivered = 0             # debug exits passed on to the guest

    def set(self, slot, owner, addr, kind=EXECUTE, length=1):
        held = self.slots[slot]
        if held is not None and held.owner != owner:
            raise ValueError(f"DR{slot} belongs to {held.owner}, not {owner}")
        if kind != EXECUTE and length not in LENGTHS:
            raise ValueError(f"a watchpoint is 1, 2, 4 or 8 bytes, not {length}")
        self.slots[slot] = Breakpoint(addr, kind, length, owner)

    def clear(self, slot, owner):
        held = self.slots[slot]
        if held is not None and held.owner == owner:
            self.slots[slot] = None

    def free_slot(self):
        """A debugger slot nobody holds, or None."""
        return next((i for i in DEBUGGER_SLOTS if self.slots[i] is None), None)

    def step(self, owner, on):
        self.singlestep = owner if on else None

    def apply(self):
        """Give KVM the composed setup (one ioctl; none if it is what KVM already has)."""
        control = control_for(self.slots, self.singlestep is not None)
        regs = [bp.addr if bp is not None else 0 for bp in self.slots] + [0, 0, 0, dr7_for(self.slots)]   # DR0-3, DR7
        if (control, regs) == self.applied:
            return
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, value in enumerate(regs):
            dbg.arch.debugreg[i] = value
        ioctl(self.vcpu.fd, "KVM_SET_GUEST_DEBUG", dbg)
        self.applied = (control, regs)

    def owners(self, dr6):
        """Who a debug exit with this DR6 is for: the owners of the matching slots, and single-step's."""
        found = [bp.owner for i, bp in enumerate(self.slots) if bp is not None and dr6 & (1 << i)]
        if dr6 & DR6_BS and self.singlestep is not None:
            found.append(self.singlestep)
        return found

    def deliver_to_guest(self, dr6):
        """A debug exit none of ours explains: the guest's own #DB.  Set its DR6 as the CPU would and inject it."""
        regs = ffi.new("struct kvm_debugregs *")
        ioctl(self.vcpu.fd, "KVM_GET_DEBUGREGS", regs)
        regs.dr6 = (regs.dr6 & ~(DR6_B | DR6_BS)) | (dr6 & ~DR6_FIXED & 0xFFFFFFFF) | DR6_FIXED
        ioctl(self.vcpu.fd, "KVM_SET_DEBUGREGS", regs)
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.vcpu.fd, "KVM_GET_VCPU_EVENTS", events)
        events.exception.injected = 1
        events.exception.nr = DB_VECTOR
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        events.exception.pending = 0
        ioctl(self.vcpu.fd, "KVM_SET_VCPU_EVENTS", events)
        self.delivered += 1

    def describe(self):
        return {"slots": [None if bp is None else {"addr": f"0x{bp.addr:x}", "owner": bp.owner} for bp in self.slots],
                "singlestep": self.singlestep, "delivered_to_guest": self.delivered}
