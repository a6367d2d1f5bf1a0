"""One guest VM in this process: KVM VM, memory and irqchip, its devices, its vCPU threads and their lifecycle.

Both `hvctl run` (vcpu_worker.runner) and the supervised worker
(vcpu_worker.worker) drive a guest through this class.  The VM ends when the
first vCPU (or device) reports an Outcome (exit port, reset, failure) or when
the owner stops it; every other vCPU is then kicked out of KVM_RUN with
immediate_exit plus a signal.  Pause parks every vCPU outside KVM_RUN, then
stops the devices' data paths.  A debugger (`--gdb`, vcpu_worker/gdb/) holds
vCPUs the same way (debug_hold), independently of pause, and sets their
guest-debug state through each vCPU's GuestDebug.
"""
import os
import threading
import time

from pyhv.devices.guest_memory import GuestMemory, ram_regions
from pyhv.proto.errors import EXIT_OK, EXIT_STOPPED, HvError, StateError, VmFailure
from pyhv.vcpu_worker import boot, compat, cpuid, syscall_hook
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.boot import layout
from pyhv.vcpu_worker.bus import MmioBus, PioBus
from pyhv.vcpu_worker.device_manager import DeviceManager
from pyhv.vcpu_worker.guest_debug import GuestDebug, block_irq_supported
from pyhv.vcpu_worker.irq_router import KvmIrqRouter
from pyhv.vcpu_worker.kvm import Kvm, KvmError, KvmUnavailable
from pyhv.vcpu_worker.vcpu import EXIT_NAMES, ExitContext, Outcome, VcpuThread

KICK_SIGNAL = lib.SIGUSR1


class BareVm:
    """A VM with all that no guest config decides: the KVM handle, the VM with its irqchip, PIT and IRQ router,
    the SYSCALL hook's MSR filter if this host needs it, and what KVM offers (CPUID, guest-debug flags).

    A spare worker (supervisor/zygote.py) builds one before any guest asks for it, which takes these ~3 ms off
    a guest's start; Machine builds its own otherwise.
    """

    def __init__(self, wants_hook):
        """`wants_hook`: whether the guest's compat profile may use the SYSCALL hook (then the host decides)."""
        self.wants_hook = wants_hook
        self.kvm = Kvm()                # KvmUnavailable (a VmFailure) as it is
        try:
            self.vm = self.kvm.create_vm()
            self.host_facts = syscall_hook.host_facts(self.kvm) if wants_hook else None
            self.hooked = (self.host_facts is not None and syscall_hook.needed(self.host_facts)
                           and os.environ.get("HV_SYSCALL_HOOK") != "off")   # off: for a kernel with its own fix
            if self.hooked:             # first: once the irqchip exists, KVM_X86_SET_MSR_FILTER waits ~15 ms here
                syscall_hook.watch_syscall_msrs(self.vm)
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit()
            self.router = KvmIrqRouter(self.vm)
            self.supported_cpuid = self.kvm.supported_cpuid()
            self.block_irq = block_irq_supported(self.kvm)
        except (KvmError, OSError) as e:
            self.close()
            raise VmFailure(f"cannot create the VM: {e}") from None

    def close(self):
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        self.kvm.close()


class Machine:
    def __init__(self, config, mem_fd, console_out, host=None, launcher=None, in_process=False, restore=None,
                 paused=False, bare=None, before_devices=None):
        """`host` resolves device paths (a GuestDir or PrivateDir), `launcher` starts device services.

        `bare` is a BareVm built before the guest was known (a spare worker's); it is used if it was built for
        this guest's compat profile, else closed.  `before_devices()` is called before anything is written to
        the guest's RAM or done outside this process (the worker waits there for its go byte): for a restore once
        the VM, its RAM mapping and its vCPUs exist, for a boot before its kernel is loaded.

        With `restore` (a MachineState, proto/snapshot.py) the guest continues from it instead of booting: its RAM
        must already be in `mem_fd`.  With `paused` no vCPU runs until resume().
        """
        self.config = config
        self.outcome = None
        self.paused = paused
        self.profile = compat.profile(config.compat)
        self.fixup_counts = {}
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._park = threading.Condition(self._lock)
        self._parked = set()             # indices of the vCPUs parked in on_kick
        self._debug_held = frozenset()   # the vCPUs the debugger holds (debug_hold)
        self.debugger = None
        self._sampling, self._samples = set(), {}   # sample_positions(): vCPUs still to answer, answers
        self.threads = []
        self.tracer = None
        if bare is None or bare.wants_hook != self.profile.syscall_hook:
            if bare is not None:
                bare.close()
            bare = BareVm(self.profile.syscall_hook)
        self.kvm, self.vm, self.router, self.host_facts, self.hooked = (
            bare.kvm, bare.vm, bare.router, bare.host_facts, bare.hooked)
        self._supported_cpuid, self._block_irq = bare.supported_cpuid, bare.block_irq
        try:
            self.mem_fd = mem_fd
            self.mem = GuestMemory(mem_fd, config.mem_bytes)
            self._map_memory()
        except (KvmError, OSError) as e:
            raise VmFailure(f"cannot create the VM: {e}") from None
        self.pio = PioBus()
        self.mmio = MmioBus()
        ready = before_devices or (lambda: None)
        if restore is None:             # a boot writes its kernel into RAM: only once the worker may run the guest
            ready()
            entry = boot.load(config, self.mem, self.profile, self.vm.tsc_khz())   # bad images before any service
            self._create_vcpus(entry)
        else:
            self._create_vcpus(None)
            ready()
        self.devices = DeviceManager(
            config, self.mem, self.router, self.pio, self.mmio, console_out,
            on_reset=lambda: self.finish(Outcome(EXIT_OK, "guest reset (i8042)")),
            on_exit=lambda v: self.finish(Outcome(v, f"guest wrote {v} to the debug page")),
            host=host, launcher=launcher, in_process=in_process)
        try:
            if restore is not None:
                self._load_state(restore)
            if config.gdb:
                from pyhv.vcpu_worker.gdb.stub import GdbStub
                self.debugger = GdbStub(self, config.gdb)     # listens now: a port in use fails before the guest runs
            if config.trace:
                from pyhv.vcpu_worker.trace import Tracer
                self.tracer = Tracer(config.trace, self.vcpus, {"guest": config.name, "boot": config.boot,
                                                               "tsc_khz": self.vm.tsc_khz()})
        except HvError:
            self.devices.close()
            raise

    def _map_memory(self):
        self._host_buf = ffi.from_buffer(self.mem.host_buffer())
        host = int(ffi.cast("uintptr_t", self._host_buf))
        for gpa, size, offset in ram_regions(self.config.mem_bytes):
            self.vm.add_memory(gpa, host + offset, size)
        self._ram = syscall_hook.guest_ram(self.mem, host)        # the C loop's view of the same mapping

    def _create_vcpus(self, entry):
        n = self.config.vcpus
        try:
            supported, block_irq = self._supported_cpuid, self._block_irq
            self.vcpus, self.guest_debug, self.hooks = [], [], []
            group = syscall_hook.HookGroup(self._kick_one)
            for i in range(n):
                vcpu = self.vm.create_vcpu(i)
                vcpu.state.port_action = self.pio.action_ptr
                vcpu.set_cpuid(cpuid.vcpu_cpuid(supported, i, n, self.profile.cpuid_masks))
                if entry is not None:
                    boot.setup_vcpu(vcpu, i, n, self.config.boot, entry)
                self.vcpus.append(vcpu)
                self.guest_debug.append(GuestDebug(vcpu, block_irq))
                # Armed by the vCPU's own LSTAR write (an MSR exit), or from restored state in _load_state.
                self.hooks.append(syscall_hook.SyscallHook(vcpu, self.guest_debug[i], self.mem, self._ram, group)
                                  if self.hooked else None)
        except KvmError as e:
            raise VmFailure(f"cannot create the vCPUs: {e}") from None

    # -- state --------------------------------------------------------------

    def save_state(self):
        """The MachineState of this paused guest: every vCPU's and the VM's KVM state, every device's."""
        from pyhv.proto.snapshot import MachineState
        if not self.paused:
            raise VmFailure("internal: state of a running guest (pause it first)")
        try:
            msrs = self.kvm.msr_indices()
            return MachineState(vcpus=[v.save_state(msrs) for v in self.vcpus], vm=self.vm.save_state(),
                                devices=self.devices.snapshot())
        except KvmError as e:
            raise VmFailure(f"cannot read the guest's state: {e}") from None

    def _load_state(self, state):
        """KVM's state from a MachineState (the vCPUs exist and have their CPUID), then the devices'."""
        try:
            self.vm.load_state(state.vm)
            for vcpu, saved in zip(self.vcpus, state.vcpus, strict=True):
                vcpu.load_state(saved)
            for hook in self.hooks:          # KVM keeps no guest-debug state in a snapshot: arm from the guest's
                if hook is not None:
                    hook.arm()
        except KvmError as e:
            raise VmFailure(f"cannot restore the guest's state: {e}") from None
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise StateError(f"the snapshot's vCPU state is malformed: {type(e).__name__}: {e}") from None
        self.devices.restore(state.devices, paused=self.paused)

    # -- lifecycle ----------------------------------------------------------

    def start(self):
        lib.hv_install_kick_handler(KICK_SIGNAL)
        if self.tracer is not None:
            self.tracer.start()
        if self.debugger is not None:
            self.debugger.start()        # holds every vCPU until a client has attached
        if self.paused or self._debug_held:   # each vCPU parks before its first instruction
            for v in self.vcpus:
                v.kick_prepare()
        self.threads = [VcpuThread(v, ExitContext(v, self.pio.lookup, self.mmio.lookup, self.mem,
                                                  self.profile.fixups, self.fixup_counts, self.on_kick,
                                                  self.guest_debug[i], self.hooks[i]),
                                   self.config.pin, self.finish)
                        for i, v in enumerate(self.vcpus)]
        self.started_at = time.time()    # the worker logs it: when a restored guest got its vCPUs back
        for t in self.threads:
            t.start()

    def wait(self, timeout=None):
        """The Outcome once the VM has ended, or None if still running after `timeout` seconds."""
        self._done.wait(timeout)
        return self.outcome

    def finish(self, outcome):
        """End the VM with `outcome` unless it already ended; the first outcome wins."""
        with self._lock:
            if self.outcome is not None:
                return
            self.outcome = outcome
            self._park.notify_all()
        self._kick_all()
        self._done.set()

    def join(self, timeout=2.0):
        """After the VM ended: wait for vCPU threads to leave KVM_RUN, then close the devices."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        if self.debugger is not None:
            self.debugger.close()
        self.devices.close()
        self.close_trace(0)

    def close_trace(self, timeout=2.0):
        """After the VM ended: the trace's last records and its end record (vCPU threads get `timeout` s to leave)."""
        if self.tracer is None or self.tracer.closed:
            return
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self.tracer.close({t.vcpu.index for t in self.threads if not t.is_alive()} if self.threads
                          else {v.index for v in self.vcpus}, self.outcome)

    def stop(self):
        self.finish(Outcome(EXIT_STOPPED, "stopped by request"))
        return self.outcome

    def pause(self, timeout=2.0):
        """Hold every vCPU outside KVM_RUN, then stop the devices' data paths; True once all are parked."""
        with self._lock:
            self.paused = True
        self._kick_all()
        with self._lock:
            parked = self._park.wait_for(lambda: len(self._parked) == len(self.threads) or self.outcome, timeout)
        self.devices.pause()
        return parked

    def resume(self):
        self.devices.resume()
        with self._lock:
            self.paused = False
            self._park.notify_all()

    def sample_positions(self, timeout=1.0):
        """Where each running vCPU is now: {index: {"rip", "cpl"}}, read by its own thread after a kick.

        For long silent stretches of emulated guest code (a Linux boot here):
        `hvctl stats` shows the RIPs, to be looked up in the kernel's System.map.
        """
        with self._lock:
            if self.outcome:
                return {}
            self._sampling = {t.vcpu.index for t in self.threads if t.is_alive()}
            self._samples = {}
            self._park.notify_all()                   # parked (paused) vCPUs answer at once
        self._kick_all()
        with self._lock:
            self._park.wait_for(lambda: not self._sampling or self.outcome, timeout)
            self._sampling = set()
            return dict(self._samples)

    def on_kick(self, ctx):
        """A vCPU thread after a kick: answer a position sample, park while paused; an Outcome ends its loop."""
        vcpu = ctx.vcpu
        with self._lock:
            self._parked.add(vcpu.index)
            self._park.notify_all()
            while True:
                if vcpu.index in self._sampling:     # parked threads answer too (stats of a paused guest)
                    self._answer_sample(vcpu)
                if self.outcome or not (self.paused or vcpu.index in self._debug_held):
                    break
                self._park.wait()
            self._parked.discard(vcpu.index)
            return self.outcome          # the VM's own outcome ends this vCPU's loop; None keeps it running

    def _answer_sample(self, vcpu):
        try:
            rip, cpl = vcpu.get_regs().rip, vcpu.get_sregs().cs.dpl
            self._samples[vcpu.index] = {"rip": f"0x{rip:x}", "cpl": cpl}
        except OSError:
            pass
        self._sampling.discard(vcpu.index)
        self._park.notify_all()

    def debug_hold(self, indices):
        """Hold the vCPUs in `indices` outside KVM_RUN for the debugger, let the others run; from any thread."""
        with self._lock:
            self._debug_held = frozenset(indices)
            self._park.notify_all()
        self._kick_all(self._debug_held)

    def wait_parked(self, indices, timeout):
        """True once every vCPU in `indices` is parked in on_kick (its state may be read and set), or the VM ended."""
        want = set(indices)
        with self._lock:
            return bool(self._park.wait_for(lambda: self.outcome or want <= self._parked, timeout))

    def is_parked(self, index):
        with self._lock:
            return index in self._parked and not self.outcome

    def _kick_all(self, indices=None):
        for t in self.threads:
            if indices is not None and t.vcpu.index not in indices:
                continue
            self._kick_thread(t)

    def _kick_one(self, index):
        if index < len(self.threads):
            self._kick_thread(self.threads[index])

    @staticmethod
    def _kick_thread(t):
        t.vcpu.kick_prepare()
        if t.ident and t.is_alive():
            lib.hv_kick_thread(t.ident, KICK_SIGNAL)  # ESRCH if it just ended: harmless

    def feed_console(self, data):
        self.devices.feed_console(data)

    # -- observation --------------------------------------------------------

    def device_status(self):
        return self.devices.status()

    def stats(self):
        positions = self.sample_positions() if any(t.is_alive() for t in self.threads) else {}
        vcpus = []
        for t in self.threads:
            c = t.vcpu.counters()
            c["exits"] = {EXIT_NAMES.get(k, str(k)): v for k, v in c["exits"].items()}
            c["index"] = t.vcpu.index
            c["position"] = positions.get(t.vcpu.index)
            c["mmio_unclaimed"] = t.mmio_unclaimed
            c["host_tid"] = t.host_tid
            try:
                c["host_cpus"] = sorted(os.sched_getaffinity(t.host_tid)) if t.host_tid else []
            except OSError:
                c["host_cpus"] = []      # the thread has ended
            vcpus.append(c)
        return {
            "vcpus": vcpus,
            "devices": self.devices.counters(),
            "services": self.device_status(),
            "pio_unclaimed": sum(v["io_unclaimed"] for v in vcpus),
            "mmio_unclaimed": sum(v["mmio_unclaimed"] for v in vcpus),
            "fixups": dict(self.fixup_counts),
            "compat": self.profile.describe(),
            "syscall_hook": self.hook_stats(),
            **({"gdb": self.debugger.status()} if self.debugger is not None else {}),
            **({"trace": self.tracer.status()} if self.tracer is not None else {}),
        }

    def hook_stats(self):
        """The SYSCALL hook on this guest: per vCPU, and the sums (None if it is off)."""
        if not self.hooked:
            return None
        per = [h.counters() for h in self.hooks]
        return {"vcpus": per, **{k: sum(p[k] for p in per) for k in ("syscalls", "faults", "rearms", "steps")}}
