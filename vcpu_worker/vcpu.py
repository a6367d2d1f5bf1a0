"""The vCPU thread and `handle_exit`, one dispatch over exit reasons: an exit in, None (run on) or an Outcome out.

Port exits that need no device never reach this file: the C loop absorbs
them (vcpu_worker/csrc/hv_kvm.c).  `handle_exit` is a plain function over
the exit record and an ExitContext (buses, the vCPU, guest memory, the
fix-up profile, the kick hook), so it can be tested with made-up exits.
Everything here is on the exit path: it allocates little and never logs;
counters live in the C struct hv_vcpu and the context.
"""
import os
import threading

from pyhv.proto.errors import EXIT_OK, EXIT_VM_FAILED
from pyhv.vcpu_worker import fixups
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.guest_debug import NOT_MINE

EXIT_NAMES = {getattr(lib, n): n[len("KVM_EXIT_"):] for n in dir(lib)
              if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
# KVM reports an instruction its emulator refused as an internal error; in a guest that runs on, every one was
# completed by a fix-up (vcpu_worker/fixups.py; any other ends the VM), so stats must not read like a fault.
EXIT_NAMES[lib.KVM_EXIT_INTERNAL_ERROR] = "EMULATION_FIXUP"
SYSTEM_EVENTS = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: "powered off", lib.KVM_SYSTEM_EVENT_RESET: "reset"}


class Outcome:
    """How a VM ended: the status `hvctl run`/`wait` exit with, and why."""
    __slots__ = ("status", "reason")

    def __init__(self, status, reason):
        self.status = status
        self.reason = reason

    def __repr__(self):
        return f"Outcome({self.status}, {self.reason!r})"

    def __eq__(self, other):
        return isinstance(other, Outcome) and (self.status, self.reason) == (other.status, other.reason)


class ExitContext:
    """What handling one vCPU's exits needs; `on_kick(ctx)` answers a kick (park, sample) and may end the loop.

    `debug` is the vCPU's GuestDebug (vcpu_worker/guest_debug.py): whoever set a breakpoint or step gets its
    debug exits, and an int3 it planted is its own, not the guest's.  `hook` is its SyscallHook or None."""
    __slots__ = ("vcpu", "pio_lookup", "mmio_lookup", "mem", "fixups", "fixup_counts", "on_kick", "mmio_unclaimed",
                 "debug", "hook")

    def __init__(self, vcpu, pio_lookup, mmio_lookup, mem, fixups=(), fixup_counts=None, on_kick=None, debug=None,
                 hook=None):
        self.vcpu = vcpu
        self.pio_lookup = pio_lookup
        self.mmio_lookup = mmio_lookup
        self.mem = mem
        self.fixups = fixups
        self.fixup_counts = {} if fixup_counts is None else fixup_counts
        self.on_kick = on_kick
        self.mmio_unclaimed = 0
        self.debug = debug
        self.hook = hook


def _io(e, ctx):
    device, base = ctx.pio_lookup(e.io_port)
    offset, size, count = e.io_port - base, e.io_size, e.io_count
    data = e.io_data
    if count == 1:                      # the common case: no buffer object
        if e.io_dir == lib.KVM_EXIT_IO_OUT:
            device.write(offset, ffi.unpack(data, size))
        else:
            ffi.memmove(data, device.read(offset, size)[:size].ljust(size, b"\xff"), size)
        return None
    buf = ffi.buffer(data, size * count)   # string I/O (rep outsb/insb)
    if e.io_dir == lib.KVM_EXIT_IO_OUT:
        for i in range(0, size * count, size):
            device.write(offset, buf[i:i + size])
    else:
        for i in range(0, size * count, size):
            buf[i:i + size] = device.read(offset, size)[:size].ljust(size, b"\xff")
    return None


def _mmio(e, ctx):
    found = ctx.mmio_lookup(e.mmio_addr)
    n = e.mmio_len
    if found is None:
        ctx.mmio_unclaimed += 1
        if not e.mmio_write:
            ffi.memmove(e.mmio_data, b"\xff" * n, n)
        return None
    device, base = found
    if e.mmio_write:
        device.write(e.mmio_addr - base, ffi.unpack(e.mmio_data, n))
    else:
        ffi.memmove(e.mmio_data, device.read(e.mmio_addr - base, n)[:n].ljust(n, b"\xff"), n)
    return None


def _guest_exit(e, ctx):
    return Outcome(e.exit_value, f"guest wrote {e.exit_value} to the exit port")


def _interrupted(e, ctx):
    # Clear the kick first: a stop that lands after this still finds immediate_exit set on the next KVM_RUN.
    ctx.vcpu.kick_clear()
    if ctx.hook is not None:
        ctx.hook.on_kick()
    return ctx.on_kick(ctx) if ctx.on_kick is not None else None


def _step_done(e, ctx):
    """A stepped instruction that exited for I/O has completed (the C loop's HV_EXIT_STEP_DONE): its step ends here.

    It came as a kick would (immediate_exit), so one that coincided is answered too."""
    ctx.vcpu.kick_clear()
    outcome = ctx.debug.step_completed(ctx) if ctx.debug is not None else None
    if outcome is None and ctx.on_kick is not None:
        outcome = ctx.on_kick(ctx)
    return outcome


def _ignore(e, ctx):
    return None


def _shutdown(e, ctx):
    return Outcome(EXIT_OK, "guest reset (triple fault)")


def _system_event(e, ctx):
    return Outcome(EXIT_OK, f"guest {SYSTEM_EVENTS.get(e.suberror, f'system event {e.suberror}')}")


def _failed(ctx, what):
    return Outcome(EXIT_VM_FAILED, f"vCPU {ctx.vcpu.index}: {what}; {fixups.register_summary(ctx.vcpu)}")


def _internal_error(e, ctx):
    data = [e.data[i] for i in range(e.ndata)]
    if e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
        insn = fixups.instruction_bytes(ctx.vcpu, ctx.mem, data)
        # An int3 in ring 0 ends KVM_RUN as an emulation failure at the 0xCC byte here, even under
        # KVM_GUESTDBG_USE_SW_BP: one a debugger planted is its breakpoint; the guest's own gets #BP (the fix-up).
        if insn[:1] == b"\xcc" and ctx.debug is not None:
            outcome = ctx.debug.software_breakpoint(ctx, ctx.vcpu.get_regs().rip)
            if outcome is not NOT_MINE:
                return outcome
        if fixups.apply(ctx.vcpu, ctx.mem, insn, ctx.fixups, ctx.fixup_counts):
            if ctx.debug is not None and ctx.debug.steppers:      # the fix-up did the stepped instruction
                return ctx.debug.step_completed(ctx)
            return None
        return _failed(ctx, f"emulation failure: instruction {fixups.describe(insn)}")
    return _failed(ctx, f"KVM internal error, suberror {e.suberror}, data {[hex(d) for d in data]}")


def _debug(e, ctx):
    """A KVM_EXIT_DEBUG the C loop did not take: to the owner whose slot or step fired (the SYSCALL hook, the GDB
    stub), else to an attached debugger, else to the guest as its own #DB (vcpu_worker/guest_debug.py)."""
    if ctx.debug is None:
        return _unknown(e, ctx)
    return ctx.debug.on_exit(e, ctx)


def _fail_entry(e, ctx):
    return _failed(ctx, f"VM entry failed, hardware reason 0x{e.data[0]:x}")


def _run_failed(e, ctx):
    return Outcome(EXIT_VM_FAILED, f"vCPU {ctx.vcpu.index}: KVM_RUN failed: {os.strerror(e.err)}")


def _wrmsr(e, ctx):
    """The guest wrote an MSR the SYSCALL hook watches (STAR, LSTAR, FMASK): the hook writes it and re-arms."""
    ok = ctx.hook is not None and e.suberror == lib.KVM_MSR_EXIT_REASON_FILTER and ctx.hook.on_wrmsr(e.data[0], e.data[1])
    lib.hv_set_msr_error(ctx.vcpu.run, 0 if ok else 1)       # refused: the guest gets the #GP the CPU would give
    return None


def _hook(e, ctx):
    """HV_EXIT_HOOK: the SYSCALL hook needs Python (re-arm, a single-step, a frame it cannot read)."""
    why = ctx.hook.on_hook_exit(e.suberror, e.data[0])
    if why is not None:
        return _failed(ctx, why)
    if e.suberror == lib.HV_HOOK_REARM:       # the exit that showed the change, as the loop would have gone on
        return handle_exit(lib.hv_finish_exit(ctx.vcpu.state, e), e, ctx)
    return None


def _unknown(e, ctx):
    return _failed(ctx, f"unhandled exit {EXIT_NAMES.get(e.reason, str(e.reason))}")


HANDLERS = {
    lib.KVM_EXIT_IO: _io,
    lib.KVM_EXIT_MMIO: _mmio,
    lib.HV_EXIT_GUEST_EXIT: _guest_exit,
    lib.KVM_EXIT_INTR: _interrupted,
    lib.KVM_EXIT_HLT: _ignore,
    lib.KVM_EXIT_IRQ_WINDOW_OPEN: _ignore,
    lib.KVM_EXIT_SHUTDOWN: _shutdown,
    lib.KVM_EXIT_SYSTEM_EVENT: _system_event,
    lib.KVM_EXIT_INTERNAL_ERROR: _internal_error,
    lib.KVM_EXIT_DEBUG: _debug,
    lib.KVM_EXIT_FAIL_ENTRY: _fail_entry,
    lib.HV_EXIT_ERRNO: _run_failed,
    lib.HV_EXIT_STEP_DONE: _step_done,
    lib.HV_EXIT_ABSORBED: _ignore,
    lib.KVM_EXIT_X86_WRMSR: _wrmsr,
    lib.HV_EXIT_HOOK: _hook,
}


def handle_exit(reason, e, ctx):
    """One exit (`reason`, the struct hv_exit `e`): None to run on, or the Outcome that ends the VM."""
    return HANDLERS.get(reason, _unknown)(e, ctx)


class VcpuThread(threading.Thread):
    def __init__(self, vcpu, ctx, pin, finish):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.ctx = ctx
        self.pin = pin
        self.finish = finish
        self.host_tid = None

    @property
    def mmio_unclaimed(self):
        return self.ctx.mmio_unclaimed

    def run(self):
        self.host_tid = threading.get_native_id()
        try:
            if self.pin:
                os.sched_setaffinity(0, {self.pin[self.vcpu.index % len(self.pin)]})   # 0: this thread
            outcome = self._loop()
        except Exception as e:  # a VMM bug must end this VM, not hang it
            outcome = Outcome(EXIT_VM_FAILED, f"vCPU {self.vcpu.index}: VMM error: {type(e).__name__}: {e}")
        self.finish(outcome)

    def _loop(self):
        run, state, ex, ctx = lib.hv_vcpu_run, self.vcpu.state, self.vcpu.exit, self.ctx
        handlers, unknown = HANDLERS, _unknown
        while True:
            outcome = handlers.get(run(state, ex), unknown)(ex, ctx)
            if outcome is not None:
                return outcome
