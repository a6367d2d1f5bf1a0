"""`hvctl run`: one guest in this process, console on stdout, stdin to COM1, exit with its status.

No supervisor: the guest's RAM is a memfd made here, the vCPU threads belong
to this process, its device services are children of this process
(LocalLauncher) with their sockets in a private temp dir, and net switches
are started in the default runtime dir if nobody serves them.  Kept free of
heavy imports (no ZeroMQ unless the guest has devices) so the first guest
byte appears within milliseconds of exec.
"""
import os
import threading

from pyhv.devices.guest_memory import create_memfd
from pyhv.proto.errors import EXIT_INTERRUPTED, EXIT_STOPPED, EXIT_TIMEOUT
from pyhv.vcpu_worker.vcpu import Outcome


def write_all(fd, data):
    """All of `data` to `fd`; a reader that went away is not the guest's problem."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def _pump_stdin(machine, escape=None):
    """stdin to COM1; the `escape` byte (Ctrl-] on a terminal) stops the guest instead."""
    try:
        while True:
            data = os.read(0, 4096)
            if not data:
                return
            if escape is not None and escape in data:
                machine.feed_console(data.split(escape)[0])
                machine.finish(Outcome(EXIT_STOPPED, "stopped from the console (Ctrl-])"))
                return
            machine.feed_console(data)
    except OSError:
        return


class Foreground:
    """A guest being built and run in the foreground; `notices` are lines for the user (the CLI prints them).

    With `snapshot` (a checked proto.snapshot.Snapshot) the guest continues from it: its RAM is loaded into
    the new memfd, and its writable disks are copied into the run's private dir (gone when the run ends).
    """

    def __init__(self, config, snapshot=None):
        self.notices = []
        self.host = self.launcher = None
        try:
            self._build(config, snapshot)
        except BaseException:
            self.close()
            raise

    def _build(self, config, snapshot):
        from pyhv.vcpu_worker.machine import Machine
        if snapshot is not None and snapshot.disks():
            from pyhv.proto import runtime
            from pyhv.vcpu_worker.snapshot import private_disks
            self.host = runtime.PrivateDir()
            config = private_disks(snapshot, config, lambda device: self.host.file(f"disk-{device}"))
        self.config = config
        if config.devices or config.plugins:
            from pyhv.devices.virtio import kinds
            from pyhv.proto import runtime
            from pyhv.vcpu_worker.launchers import LocalLauncher, ensure_switch
            self.host = self.host or runtime.PrivateDir()
            for name in kinds.switches(config.devices):
                runtime.check_switch_socket(self.host.switch_root, name)
            self.launcher = LocalLauncher(config, self.host)    # the disks are ours (locked) before anything runs
            switch_dir = runtime.RuntimeDir(self.host.switch_root)
            for name in kinds.switches(config.devices):
                ensure_switch(switch_dir, name)
            if config.devices_of("console"):
                self.notices.append(f"virtio console on {self.host.socket_path('vconsole')}")
        mem_fd = create_memfd(config.mem_bytes, f"guest-ram-{config.name or 'run'}")
        if snapshot is not None:
            snapshot.load_memory(mem_fd)
        self.machine = Machine(config, mem_fd, lambda data: write_all(1, data), host=self.host, launcher=self.launcher,
                               restore=snapshot.state if snapshot is not None else None)

    def run(self, escape=None):
        """Run to the end; the Outcome.  A byte `escape` on stdin stops the guest."""
        machine = self.machine
        threading.Thread(target=_pump_stdin, args=(machine, escape), name="stdin", daemon=True).start()
        from pyhv.proto import sandbox
        sandbox.apply("runner")          # a worker that also spawns its services, plugins and switch
        machine.start()
        outcome = machine.wait(self.config.timeout)
        if outcome is None:
            machine.finish(Outcome(EXIT_TIMEOUT, f"timed out after {self.config.timeout:g} s"))
            outcome = machine.outcome
        machine.join()
        return outcome

    def close(self):
        machine = getattr(self, "machine", None)
        if machine is not None and machine.tracer is not None and not machine.tracer.closed:
            # run() did not get to the end (Ctrl-C on hvctl): end the guest so its trace is whole
            machine.finish(Outcome(EXIT_INTERRUPTED, "hvctl was interrupted"))
            machine.join()
        if self.launcher is not None:
            self.launcher.close()
            self.launcher = None
        if self.host is not None:
            self.host.remove()
            self.host = None
