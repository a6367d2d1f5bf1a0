"""One guest VM in this process: memory, irqchip, devices, boot image, vCPU threads and their lifecycle.

Both `hvctl run` (vcpu_worker.runner) and the supervised worker
(vcpu_worker.worker) drive a guest through this class.  The VM ends when the
first vCPU reports an Outcome (exit port, reset, failure) or when the owner
stops it; every other vCPU is then kicked out of KVM_RUN with immediate_exit
plus a signal.
"""
import os
import threading
import time

from pyhv.devices.debug_page import DEBUG_PAGE_ADDR, DEBUG_PAGE_SIZE, DebugPage
from pyhv.devices.guest_memory import GuestMemory, ram_regions
from pyhv.devices.i8042 import I8042
from pyhv.devices.rtc import CmosRtc
from pyhv.devices.serial import Serial8250
from pyhv.vcpu_worker import compat, cpuid
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.boot import acpi, cpu_state, layout, mptable
from pyhv.vcpu_worker.bus import MmioBus, PioBus
from pyhv.vcpu_worker.kvm import Kvm, KvmError, KvmUnavailable
from pyhv.vcpu_worker.vcpu import (EXIT_NAMES, STATUS_FAILED, STATUS_RESET, STATUS_STOPPED, Outcome,
                              VcpuThread)

KICK_SIGNAL = lib.SIGUSR1
COM1_PORT, COM1_IRQ = 0x3F8, 4
EXIT_PORT, POST_PORT = 0x501, 0x80
RAW_LOAD_ADDR = {"raw16": layout.RAW16_LOAD_ADDR, "raw32": layout.HIMEM_START,
                 "raw64": layout.HIMEM_START, "user64": layout.HIMEM_START}
VMM_TABLES = (layout.GDT_ADDR, layout.PD_ADDR + 4 * 4096)


class MachineError(Exception):
    """The guest could not be built; `status` is 2 for unusable input, 70 for a VM failure."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


class Machine:
    def __init__(self, config, mem_fd, console_out, runtime_dir=None):
        self.config = config
        self.console_out = console_out
        self.runtime_dir = runtime_dir   # the guest's runtime dir (supervised); None: a temp dir if needed
        self._temp_dir = None
        self.vconsole = None             # {"socket": path, "log": path or None} with --vconsole
        self.outcome = None
        self.paused = False
        self.profile = compat.profile(config.compat)
        self.fixup_counts = {}
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._park = threading.Condition(self._lock)
        self._parked = 0
        self._sampling, self._samples = set(), {}   # sample_positions(): vCPUs still to answer, answers
        self.threads = []
        image = self._read_file(config.kernel, "kernel")
        initrd = self._read_file(config.initrd, "initrd") if config.initrd else None
        try:
            self.kvm = Kvm()
            self.vm = self.kvm.create_vm()
            self.mem = GuestMemory(mem_fd, config.mem_bytes)
            self._map_memory()
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit()
        except (KvmError, KvmUnavailable, OSError) as e:
            raise MachineError(f"cannot create the VM: {e}", STATUS_FAILED) from None
        self._add_devices()
        entry, boot_rsi = self._load(image, initrd)
        self._create_vcpus(entry, boot_rsi)

    @staticmethod
    def _read_file(path, what):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise MachineError(f"cannot read {what} file {path}: {e.strerror}") from None

    def _map_memory(self):
        self._host_buf = ffi.from_buffer(self.mem.host_buffer())
        host = int(ffi.cast("uintptr_t", self._host_buf))
        for gpa, size, offset in ram_regions(self.config.mem_bytes):
            self.vm.add_memory(gpa, host + offset, size)

    def _add_devices(self):
        self.pio = PioBus()
        self.mmio = MmioBus()
        self.serial = Serial8250(irq=lambda level: self.vm.irq_line(COM1_IRQ, level), out=self.console_out)
        self.pio.register(COM1_PORT, 8, self.serial, "serial")
        self.i8042 = I8042(reset=lambda: self.finish(Outcome(STATUS_RESET, "guest reset (i8042)")))
        self.pio.register(0x60, 1, self.i8042.data_port(), "i8042-data")
        self.pio.register(0x64, 1, self.i8042.command_port(), "i8042-command")
        self.rtc = CmosRtc()
        self.pio.register(0x70, 2, self.rtc, "rtc")
        self.pio.register_fast(POST_PORT, lib.HV_PORT_SINK, "post")
        self.pio.register_fast(EXIT_PORT, lib.HV_PORT_EXIT, "exit-port")
        self.debug_page = DebugPage(
            exit_vm=lambda v: self.finish(Outcome(v, f"guest wrote {v} to the debug page")),
            console_out=self.console_out)
        self.mmio.register(DEBUG_PAGE_ADDR, DEBUG_PAGE_SIZE, self.debug_page, "debug-page")
        self._add_pci()

    def _add_pci(self):
        """PCI bus 0 on config mechanism #1: the host bridge always, virtio devices by option.

        Each virtio device model runs in its own device-service process
        (devices/service.py) behind a RemoteBackend; for a supervised guest
        the supervisor starts it (devices/virtio/launch.py), for `hvctl run`
        this process does.
        HV_DEVICE_SERVICES=0 runs the models in-process instead (debugging).
        """
        from pyhv.vcpu_worker.pci import PciRoot
        self.pci = PciRoot(self.vm)
        self.virtio = {}                 # name -> VirtioPciDevice
        wanted = (["rng"] if self.config.rng else []) + [("blk", d) for d in self.config.disks]
        if self.config.vconsole:
            wanted.append("console")
        wanted += [("net", n) for n in self.config.nets]
        if wanted:
            from pyhv.vcpu_worker.virtio_pci import VirtioPciDevice
        counts = {}
        try:
            for dev in wanted:
                kind, arg = dev if isinstance(dev, tuple) else (dev, None)
                n = counts[kind] = counts.get(kind, -1) + 1
                name = {"rng": "virtio-rng", "console": "virtio-console"}.get(kind, f"virtio-{kind}{n}")
                fn = VirtioPciDevice(self._backend(kind, arg), self.mem)
                self.pci.add(fn, name)
                self.virtio[name] = fn
        except (KvmError, OSError, RuntimeError, ValueError) as e:
            self.pci.close()             # services already started end here
            raise MachineError(f"cannot add PCI devices: {e}", STATUS_FAILED) from None
        self.pci.attach(self.pio, self.mmio)

    def _backend(self, kind, arg):
        """The backend for one device; `arg` is the disk spec (blk) or the --net spec (net)."""
        extra = []
        if kind == "console":
            sock, log = self._vconsole_paths()
            extra = ["--console-sock", sock] + (["--console-log", log] if log else [])
        elif kind == "net":
            extra = self._net_args(arg)
        if os.environ.get("HV_DEVICE_SERVICES", "1") == "0":
            from pyhv.devices.service import main_args_model
            return main_args_model(kind, arg if kind == "blk" else None, extra)
        from pyhv.devices.virtio.remote import RemoteBackend
        launcher = None
        if self.runtime_dir:             # supervised: the supervisor starts (and reaps) the service
            from pyhv.devices.virtio.launch import SupervisorLauncher
            launcher = SupervisorLauncher(os.path.join(self._supervisor_dir(), "services.sock"), self.config.name)
        return RemoteBackend(kind, self.mem, disk=arg if kind == "blk" else None, extra_args=extra,
                             launcher=launcher)

    def _supervisor_dir(self):
        """The supervisor's runtime dir: the guest's is RUNTIME/guests/NAME."""
        return os.path.dirname(os.path.dirname(os.path.abspath(self.runtime_dir)))

    def _net_args(self, spec):
        """Service options for a --net spec.  A switch lives in the supervisor's runtime dir
        (supervised: the supervisor runs it); a standalone run uses the default runtime dir and
        starts the switch itself if nobody serves it."""
        from pyhv.proto import switch as wire
        from pyhv.supervisor.config import default_runtime_dir, parse_net
        kind, name, mac = parse_net(spec)
        if kind == "tap":
            return ["--net", f"tap:{name}", "--mac", mac]
        if self.runtime_dir:
            return ["--net", "switch:" + wire.endpoint(self._supervisor_dir(), name), "--mac", mac]
        run_dir = os.path.abspath(default_runtime_dir())
        return ["--net", "switch:" + wire.endpoint(run_dir, name), "--mac", mac,
                "--switch-dir", run_dir, "--switch-name", name]

    def _vconsole_paths(self):
        """(socket, log) for --vconsole: in the guest's runtime dir, or a private temp dir for `hvctl run`."""
        if self.runtime_dir:
            sock = os.path.join(self.runtime_dir, "vconsole.sock")
            log = os.path.join(self.runtime_dir, "vconsole.log")
        else:
            import sys
            import tempfile
            self._temp_dir = tempfile.mkdtemp(prefix="pyhv-vconsole-")
            sock, log = os.path.join(self._temp_dir, "vconsole.sock"), None
            print(f"hvctl: virtio console on {sock}", file=sys.stderr, flush=True)
        self.vconsole = {"socket": sock, "log": log}
        return sock, log

    def _load(self, image, initrd):
        """Put the boot image in guest RAM; returns (entry RIP, RSI for the boot vCPU or None)."""
        boot = self.config.boot
        if boot == "linux":
            from pyhv.vcpu_worker.boot.linux import KernelImageError, load_linux
            try:
                cmdline = self.profile.kernel_cmdline(self.config.cmdline or "", self.vm.tsc_khz())
                info = load_linux(self.mem, image, cmdline, initrd)
            except KernelImageError as e:
                raise MachineError(f"{self.config.kernel}: {e}") from None
            cpu_state.write_tables(self.mem)
            mptable.write(self.mem, self.config.vcpus)
            acpi.write(self.mem, self.config.vcpus)
            return info.entry, info.boot_params
        load = self.config.load_addr if self.config.load_addr is not None else RAW_LOAD_ADDR[boot]
        end = load + len(image)
        if not self.mem.contains(load, len(image)):
            raise MachineError(f"{self.config.kernel}: image of {len(image)} bytes at 0x{load:x} does not fit in guest RAM")
        if boot == "raw16" and end > 0x10000:
            raise MachineError(f"{self.config.kernel}: raw16 images must end below 0x10000 (CS=0); this one ends at 0x{end:x}")
        if boot != "raw16":
            if load < VMM_TABLES[1] and end > VMM_TABLES[0]:
                raise MachineError(f"{self.config.kernel}: image at 0x{load:x}-0x{end:x} overlaps the VMM's tables "
                                   f"(0x{VMM_TABLES[0]:x}-0x{VMM_TABLES[1]:x}); load it at 0x100000 or above")
            cpu_state.write_tables(self.mem)
        self.mem.write(load, image)
        return load, None

    def _create_vcpus(self, entry, boot_rsi):
        n, boot = self.config.vcpus, self.config.boot
        try:
            supported = self.kvm.supported_cpuid()
            self.vcpus = []
            for i in range(n):
                vcpu = self.vm.create_vcpu(i)
                vcpu.state.port_action = self.pio.action_ptr
                vcpu.set_cpuid(cpuid.vcpu_cpuid(supported, i, n, self.profile.cpuid_masks))
                sregs = vcpu.get_sregs()
                cpu_state.set_boot_sregs(sregs, boot)
                vcpu.set_sregs(sregs)
                if boot == "linux" and i > 0:
                    self.vcpus.append(vcpu)     # APs wait for INIT/SIPI from the boot CPU
                    continue
                regs = vcpu.get_regs()
                regs.rip = entry
                regs.rflags = cpu_state.RFLAGS_RESERVED
                if boot == "linux":
                    regs.rsi = boot_rsi
                else:
                    regs.rdi, regs.rsi, regs.rdx = i, n, vcpu.tsc_khz()
                vcpu.set_regs(regs)
                if i > 0:
                    vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
                self.vcpus.append(vcpu)
        except KvmError as e:
            raise MachineError(f"cannot create the vCPUs: {e}", STATUS_FAILED) from None

    # -- lifecycle ----------------------------------------------------------

    def start(self):
        lib.hv_install_kick_handler(KICK_SIGNAL)
        self.threads = [VcpuThread(self, v) for v in self.vcpus]
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
        """After the VM ended: wait for vCPU threads to leave KVM_RUN, so no kick is still in flight."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self.pci.close()                 # device threads stop; their eventfds close
        if self._temp_dir is not None:
            import shutil
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def stop(self):
        self.finish(Outcome(STATUS_STOPPED, "stopped by request"))
        return self.outcome

    def pause(self, timeout=2.0):
        """Hold every vCPU outside KVM_RUN, then stop the device services' data paths; True once all are parked."""
        with self._lock:
            self.paused = True
        self._kick_all()
        with self._lock:
            parked = self._park.wait_for(lambda: self._parked == len(self.threads) or self.outcome, timeout)
        for fn in self.virtio.values():
            getattr(fn.backend, "pause", lambda: None)()
        return parked

    def resume(self):
        for fn in self.virtio.values():
            getattr(fn.backend, "resume", lambda: None)()
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

    def on_kick(self, thread):
        """Called by a vCPU thread after a kick: answer a position sample, park while paused; an Outcome ends its loop."""
        with self._lock:
            index = thread.vcpu.index
            self._parked += 1
            self._park.notify_all()
            while True:
                if index in self._sampling:          # parked threads answer too (stats of a paused guest)
                    self._answer_sample(thread)
                if not self.paused or self.outcome:
                    break
                self._park.wait()
            self._parked -= 1
            return self.outcome          # the VM's own outcome ends this vCPU's loop; None keeps it running

    def _answer_sample(self, thread):
        index = thread.vcpu.index
        try:
            rip, cpl = thread.vcpu.get_regs().rip, thread.vcpu.get_sregs().cs.dpl
            self._samples[index] = {"rip": f"0x{rip:x}", "cpl": cpl}
        except OSError:
            pass
        self._sampling.discard(index)
        self._park.notify_all()

    def _kick_all(self):
        for t in self.threads:
            t.vcpu.kick_prepare()
            if t.ident and t.is_alive():
                lib.hv_kick_thread(t.ident, KICK_SIGNAL)  # ESRCH if it just ended: harmless

    def feed_console(self, data):
        self.serial.feed(data)

    # -- observation --------------------------------------------------------

    def device_status(self):
        """Each virtio device's service: state, pid, restarts, failure reason (no call to the service)."""
        return {name: {k: getattr(fn.backend, k, None) for k in ("state", "pid", "restarts", "reason", "paused")}
                for name, fn in self.virtio.items()}

    def stats(self):
        positions = self.sample_positions() if any(t.is_alive() for t in self.threads) else {}
        vcpus = []
        for t in self.threads or [None] * 0:
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
            "devices": {"serial": self.serial.counters(), "i8042": self.i8042.counters(),
                        "debug_page": self.debug_page.counters(), "rtc": self.rtc.counters(), "pci": self.pci.counters()},
            "services": self.device_status(),
            "pio_unclaimed": sum(v["io_unclaimed"] for v in vcpus),
            "mmio_unclaimed": sum(v["mmio_unclaimed"] for v in vcpus),
            "fixups": dict(self.fixup_counts),
            "vconsole": self.vconsole,
            "compat": self.profile.describe(),
        }
