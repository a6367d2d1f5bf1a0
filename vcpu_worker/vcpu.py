"""The vCPU thread: run KVM_RUN (in C) and dispatch each exit Python must see by its reason.

Port exits that need no device never reach this file: the C loop absorbs
them (vcpu_worker/csrc/hv_kvm.c).  Everything here is on the exit path, so it
allocates little and never logs; counters live in the C struct hv_vcpu.
"""
import os
import threading

from pyhv.vcpu_worker import fixups
from pyhv.vcpu_worker._kvm import ffi, lib

EXIT_NAMES = {getattr(lib, n): n[len("KVM_EXIT_"):] for n in dir(lib)
              if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}

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


STATUS_RESET = 0
STATUS_FAILED = 70
STATUS_TIMEOUT = 124
STATUS_STOPPED = 143


class VcpuThread(threading.Thread):
    def __init__(self, machine, vcpu):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.machine = machine
        self.vcpu = vcpu
        self.mmio_unclaimed = 0
        self.host_tid = None
        self._pio_lookup = machine.pio.lookup
        self._mmio_lookup = machine.mmio.lookup
        self._handlers = {
            lib.KVM_EXIT_IO: self._io,
            lib.KVM_EXIT_MMIO: self._mmio,
            lib.HV_EXIT_GUEST_EXIT: self._guest_exit,
            lib.KVM_EXIT_INTR: self._interrupted,
            lib.KVM_EXIT_HLT: self._ignore,
            lib.KVM_EXIT_IRQ_WINDOW_OPEN: self._ignore,
            lib.KVM_EXIT_SHUTDOWN: self._shutdown,
            lib.KVM_EXIT_SYSTEM_EVENT: self._system_event,
            lib.KVM_EXIT_INTERNAL_ERROR: self._internal_error,
            lib.KVM_EXIT_FAIL_ENTRY: self._fail_entry,
            lib.HV_EXIT_ERRNO: self._run_failed,
        }

    def run(self):
        pin = self.machine.config.pin
        self.host_tid = threading.get_native_id()
        try:
            if pin:
                os.sched_setaffinity(0, {pin[self.vcpu.index % len(pin)]})   # 0: this thread
            outcome = self._loop()
        except Exception as e:  # a VMM bug must end this VM, not hang it
            outcome = Outcome(STATUS_FAILED, f"vCPU {self.vcpu.index}: VMM error: {type(e).__name__}: {e}")
        self.machine.finish(outcome)

    def _loop(self):
        run, state, ex = lib.hv_vcpu_run, self.vcpu.state, self.vcpu.exit
        handlers, unknown = self._handlers, self._unknown
        while True:
            outcome = handlers.get(run(state, ex), unknown)(ex)
            if outcome is not None:
                return outcome

    # -- exit handlers: return None to keep running, or an Outcome ----------

    def _io(self, e):
        device, base = self._pio_lookup(e.io_port)
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

    def _mmio(self, e):
        found = self._mmio_lookup(e.mmio_addr)
        n = e.mmio_len
        if found is None:
            self.mmio_unclaimed += 1
            if not e.mmio_write:
                ffi.memmove(e.mmio_data, b"\xff" * n, n)
            return None
        device, base = found
        if e.mmio_write:
            device.write(e.mmio_addr - base, ffi.unpack(e.mmio_data, n))
        else:
            ffi.memmove(e.mmio_data, device.read(e.mmio_addr - base, n)[:n].ljust(n, b"\xff"), n)
        return None

    def _guest_exit(self, e):
        return Outcome(e.exit_value, f"guest wrote {e.exit_value} to the exit port")

    def _interrupted(self, e):
        # Clear the kick first: a stop that lands after this still finds
        # immediate_exit set on the next KVM_RUN.
        self.vcpu.kick_clear()
        return self.machine.on_kick(self)

    def _ignore(self, e):
        return None

    def _shutdown(self, e):
        return Outcome(STATUS_RESET, "guest reset (triple fault)")

    def _system_event(self, e):
        return Outcome(STATUS_RESET, f"guest {SYSTEM_EVENTS.get(e.suberror, f'system event {e.suberror}')}")

    def _internal_error(self, e):
        data = [e.data[i] for i in range(e.ndata)]
        if e.suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
            insn = fixups.instruction_bytes(self.vcpu, self.machine.mem, data)
            if fixups.apply(self.vcpu, self.machine.mem, insn, self.machine.profile.fixups, self.machine.fixup_counts):
                return None
            return Outcome(STATUS_FAILED, f"vCPU {self.vcpu.index}: emulation failure: instruction "
                           f"{fixups.describe(insn)}; {fixups.register_summary(self.vcpu)}")
        return Outcome(STATUS_FAILED, f"vCPU {self.vcpu.index}: KVM internal error, suberror {e.suberror}, "
                       f"data {[hex(d) for d in data]}; {fixups.register_summary(self.vcpu)}")

    def _fail_entry(self, e):
        return Outcome(STATUS_FAILED, f"vCPU {self.vcpu.index}: VM entry failed, hardware reason 0x{e.data[0]:x}; "
                       f"{fixups.register_summary(self.vcpu)}")

    def _run_failed(self, e):
        return Outcome(STATUS_FAILED, f"vCPU {self.vcpu.index}: KVM_RUN failed: {os.strerror(e.err)}")

    def _unknown(self, e):
        name = EXIT_NAMES.get(e.reason, str(e.reason))
        return Outcome(STATUS_FAILED, f"vCPU {self.vcpu.index}: unhandled exit {name}; {fixups.register_summary(self.vcpu)}")
