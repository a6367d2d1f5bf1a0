"""Every guest-debug decision for one vCPU: the DR0-DR3 slots, single-step and software breakpoints, one ioctl.

KVM takes one KVM_SET_GUEST_DEBUG per vCPU (a control word and DR0-DR3/DR7)
while several parts of the VMM want a say: the GDB stub (breakpoints,
watchpoints, stepping) and the nested profile's system-call fix-up (an
execute breakpoint on the guest's #PF handler).  Each is an *owner*: it
reserves or takes slots, asks for single-step or for software breakpoints,
and this class combines the wishes into the one control word and issues it
(`apply`), and hands each KVM_EXIT_DEBUG to the owner whose slot or step
fired (`on_exit`).  An owner reserves a slot for good with `reserve`; the
GDB stub takes whatever `free_slots` leaves it (DR1-DR3 when DR0 is
reserved, all four otherwise).

A debug exit that none of the breakpoints or the single-step KVM held for
this vCPU explains is the guest's own (its DR0-DR7, TF, int1): it goes to
the attached debugger if there is one (`set_debugger`; the GDB stub while a
client is connected), else to the guest as the #DB the CPU would have
raised (`deliver_to_guest`), never a VM failure.  One that our setup
explains but whose owner has let go (a step ending after GDB detached)
runs on.

An owner implements `on_debug(ctx, event)` -> None (run on) or an Outcome,
and, to claim software breakpoints, `on_software_breakpoint(ctx, rip)` ->
NOT_MINE, None or an Outcome.  `apply` must run while the vCPU is outside
KVM_RUN (its own thread, or any thread of the worker while it is parked).
"""
import threading

from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.kvm import KvmError, ioctl

SLOTS = 4
DR6_BS = 1 << 14               # single-step (KVM reports DR6 with the B bits and BS active-high)
DR7_FIXED = 1 << 10            # DR7 bit 10 reads as 1
DR7_GE = 1 << 9
DR6_B = 0xF                    # B0-B3: which slot matched
DR6_FIXED = 0xFFFF0FF0         # DR6's bits that read as 1 (Linux's DR6_RESERVED)
RW_BITS = {"x": 0, "w": 1, "rw": 3}       # DR7 R/W: execute, write, read or write (2 is I/O, unused)
LEN_BITS = {1: 0, 2: 1, 8: 2, 4: 3}       # DR7 LEN
BP_VECTOR, DB_VECTOR = 3, 1


class _NotMine:
    def __repr__(self):
        return "NOT_MINE"


NOT_MINE = _NotMine()          # an owner's answer for a software breakpoint it did not set


class Slot:
    """One debug register's use: an execute breakpoint (kind "x", length 1) or a watchpoint ("w" / "rw")."""
    __slots__ = ("owner", "address", "kind", "length")

    def __init__(self, owner, address, kind="x", length=1):
        if kind not in RW_BITS:
            raise ValueError(f"debug register kind {kind!r}")
        if kind == "x":
            length = 1
        if length not in LEN_BITS or address % length:
            raise ValueError(f"a debug register watches 1, 2, 4 or 8 aligned bytes, not {length} at 0x{address:x}")
        self.owner, self.address, self.kind, self.length = owner, address, kind, length


class DebugEvent:
    """A KVM_EXIT_DEBUG as an owner sees it: which of its slots fired (index, Slot) and whether a step ended."""
    __slots__ = ("exception", "pc", "dr6", "slots", "step")

    def __init__(self, exception, pc, dr6, slots, step):
        self.exception, self.pc, self.dr6, self.slots, self.step = exception, pc, dr6, slots, step


class GuestDebug:
    """One vCPU's guest-debug state; methods are safe from any thread, `apply` only while the vCPU is out of KVM_RUN."""

    def __init__(self, vcpu, block_irq=False):
        self.vcpu = vcpu
        self.block_irq = block_irq        # KVM_GUESTDBG_BLOCKIRQ is offered: no interrupt is taken while stepping
        self.slots = [None] * SLOTS
        self.reserved = {}                # slot index -> owner
        self.steppers = []                # owners that asked for single-step
        self.sw_owner = None              # the owner of software breakpoints (int3 it planted)
        self.unclaimed = 0                # debug exits our setup explains but nobody wants now (run on)
        self.delivered = 0                # the guest's own debug exits, given back to it as #DB
        self.debugger = None              # an owner that takes the guest's own debug exits while `attached()`
        self._step_asked = False          # single-step asked for since KVM last held a setup without it
        self._lock = threading.Lock()
        self._applied = (0, (0,) * 8)     # a new vCPU has guest debugging off

    # -- what owners ask for ----------------------------------------------------------------------------
    def reserve(self, index, owner):
        """Keep slot `index` for `owner` alone (the syscall fix-up's DR0); ValueError if another holds it."""
        with self._lock:
            holder = self.reserved.get(index) or (self.slots[index].owner if self.slots[index] else None)
            if holder is not None and holder is not owner:
                raise ValueError(f"DR{index} is in use by {holder!r}")
            self.reserved[index] = owner

    def free_slots(self, owner):
        with self._lock:
            return [i for i in range(SLOTS) if self.slots[i] is None and self.reserved.get(i, owner) is owner]

    def set_slot(self, owner, address, kind="x", length=1):
        """Put a breakpoint or watchpoint in a free slot of `owner`'s; its index, or None if none is free."""
        slot = Slot(owner, address, kind, length)
        with self._lock:
            for i in range(SLOTS):
                if self.slots[i] is None and self.reserved.get(i, owner) is owner:
                    self.slots[i] = slot
                    return i
        return None

    def clear_slot(self, owner, index):
        with self._lock:
            if self.slots[index] is not None and self.slots[index].owner is owner:
                self.slots[index] = None

    def set_step(self, owner, on):
        with self._lock:
            if on and owner not in self.steppers:
                self.steppers.append(owner)
                self._step_asked = True
            elif not on and owner in self.steppers:
                self.steppers.remove(owner)

    def set_software_breakpoints(self, owner, on):
        with self._lock:
            if on:
                self.sw_owner = owner
            elif self.sw_owner is owner:
                self.sw_owner = None

    def set_debugger(self, owner):
        """`owner.on_debug` gets the debug exits nobody's breakpoint explains whenever `owner.attached()`."""
        with self._lock:
            self.debugger = owner

    def clear(self, owner):
        """Drop everything `owner` set (slots, step, software breakpoints); its reservations stay."""
        with self._lock:
            self.slots = [s if s is None or s.owner is not owner else None for s in self.slots]
            if owner in self.steppers:
                self.steppers.remove(owner)
            if self.sw_owner is owner:
                self.sw_owner = None

    # -- KVM ------------------------------------------------------------------------------------------------
    def control(self):
        """(control word, debugreg[8]) that KVM_SET_GUEST_DEBUG should hold now."""
        with self._lock:
            control, regs = 0, [0] * 8
            dr7 = 0
            for i, s in enumerate(self.slots):
                if s is None:
                    continue
                regs[i] = s.address
                dr7 |= (2 << (2 * i)) | (RW_BITS[s.kind] << (16 + 4 * i)) | (LEN_BITS[s.length] << (18 + 4 * i))
            if dr7:
                control |= lib.KVM_GUESTDBG_USE_HW_BP
                regs[7] = dr7 | DR7_GE | DR7_FIXED
            if self.steppers:
                control |= lib.KVM_GUESTDBG_SINGLESTEP | (lib.KVM_GUESTDBG_BLOCKIRQ if self.block_irq else 0)
            if self.sw_owner is not None:
                control |= lib.KVM_GUESTDBG_USE_SW_BP
            if control:
                control |= lib.KVM_GUESTDBG_ENABLE
            return control, tuple(regs)

    def apply(self):
        """Issue KVM_SET_GUEST_DEBUG if what owners want changed since the last call (vCPU outside KVM_RUN)."""
        control, regs = self.control()
        if (control, regs) == self._applied:
            return
        arg = ffi.new("struct kvm_guest_debug *")
        arg.control = control
        for i, v in enumerate(regs):
            arg.arch.debugreg[i] = v
        ioctl(self.vcpu.fd, "KVM_SET_GUEST_DEBUG", arg)
        self._applied = (control, regs)
        if not control & lib.KVM_GUESTDBG_SINGLESTEP:
            with self._lock:
                self._step_asked = bool(self.steppers)
        self.vcpu.state.stepping = 1 if control & lib.KVM_GUESTDBG_SINGLESTEP else 0

    # -- exits ----------------------------------------------------------------------------------------------
    def on_exit(self, e, ctx):
        """A KVM_EXIT_DEBUG (suberror: the exception; data: pc, dr6, dr7): to the owners whose slot or step fired."""
        exception, pc, dr6 = e.suberror, e.data[0], e.data[1]
        if exception == BP_VECTOR:                # an int3 under KVM_GUESTDBG_USE_SW_BP (hosts where it exits so)
            return self.software_breakpoint(ctx, pc, reinject=True)
        with self._lock:
            fired = [(i, s) for i, s in enumerate(self.slots) if s is not None and dr6 & (1 << i)]
            step = bool(dr6 & DR6_BS)
            owners = []
            for o in [s.owner for _, s in fired] + (list(self.steppers) if step else []):
                if o not in owners:
                    owners.append(o)
        for owner in owners:
            mine = [f for f in fired if f[1].owner is owner]
            outcome = owner.on_debug(ctx, DebugEvent(exception, pc, dr6, mine, step and owner in self.steppers))
            if outcome is not None:
                return outcome
        if owners:
            return None
        if self.explains(dr6):
            self.unclaimed += 1                   # e.g. a step that ended after its owner let go: run on
            return None
        debugger = self.debugger
        if debugger is not None and debugger.attached():
            return debugger.on_debug(ctx, DebugEvent(exception, pc, dr6, [], bool(dr6 & DR6_BS)))
        self.deliver_to_guest(dr6)
        return None

    def explains(self, dr6):
        """Whether a setup of ours (the one KVM held when this vCPU last ran, or one asked for since) can have
        caused this DR6: a single-step, or a slot's B bit."""
        control, regs = self._applied
        if dr6 & DR6_BS and (self._step_asked or control & lib.KVM_GUESTDBG_SINGLESTEP):
            return True
        return any(dr6 & (1 << i) and (self.slots[i] is not None or regs[7] & (3 << (2 * i))) for i in range(SLOTS))

    def deliver_to_guest(self, dr6):
        """The guest's own debug exception: set its DR6 as the CPU would and inject #DB."""
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

    def step_completed(self, ctx):
        """A stepped instruction finished without a debug exit (see hv_kvm.c's hv_complete_alone): a step event."""
        with self._lock:
            steppers = list(self.steppers)
        if not steppers:
            self.unclaimed += 1
            return None
        pc = ctx.vcpu.get_regs().rip
        for owner in steppers:
            outcome = owner.on_debug(ctx, DebugEvent(DB_VECTOR, pc, DR6_BS, [], True))
            if outcome is not None:
                return outcome
        return None

    def software_breakpoint(self, ctx, rip, reinject=False):
        """An int3 at `rip` stopped the vCPU: its owner's answer, or NOT_MINE (the guest's own int3).

        With `reinject` (a KVM_EXIT_DEBUG #BP) the guest's own int3 is delivered to it here, as the CPU would."""
        owner = self.sw_owner
        answer = NOT_MINE if owner is None else owner.on_software_breakpoint(ctx, rip)
        if answer is NOT_MINE and reinject:
            from pyhv.vcpu_worker import fixups
            fixups.apply(ctx.vcpu, ctx.mem, b"\xcc", ("int3",), ctx.fixup_counts)
            return None
        return answer


def block_irq_supported(kvm):
    """Whether this KVM can hold off interrupts while single-stepping (KVM_CAP_SET_GUEST_DEBUG2 lists BLOCKIRQ)."""
    try:
        return bool(kvm.check_extension("KVM_CAP_SET_GUEST_DEBUG2") & lib.KVM_GUESTDBG_BLOCKIRQ)
    except KvmError:
        return False
