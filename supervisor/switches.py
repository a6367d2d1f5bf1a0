"""The virtual switches of one supervisor: one `pyhv.devices.net.switch` process per switch name, started, adopted and restarted here.

A guest with `--net switch:NAME` gets its switch started before its worker
(the switch's NIC ports connect by path; ZeroMQ queues until the switch has
bound, so there is no ordering race).  `watch()` restarts a switch that died
while a running guest uses it (at most once per RESTART_BACKOFF); its ports
reconnect by themselves and are relearned from their hellos, so guests see a
short loss of frames, nothing else.

A switch outlives the supervisor that started it (its guests do too).  The
switch process holds an flock on RUNTIME/switch-NAME.lock for its whole life
and writes its pid there, so whoever serves a name can be found: before
starting one, a supervisor adopts the process that holds the lock (checked
by its command line and the lock still being held, then watched through a
pidfd: supervisor/procs.py).  That covers a switch an earlier supervisor
started and one a standalone `hvctl run` started.  A switch started here
that exits ALREADY_SERVED lost a race for the lock: the winner is adopted.
"""
import subprocess
import sys

from pyhv.devices.net.switch import ALREADY_SERVED, is_served
from pyhv.devices.restarts import RestartPolicy
from pyhv.proto import runtime, sandbox
from pyhv.supervisor.procs import Adopted, cmdline
from pyhv.vcpu_worker.launchers import switch_command

RESTART_BACKOFF = 1.0


class Switches:
    def __init__(self, runtime_dir):
        self.runtime = runtime_dir          # a proto.runtime.RuntimeDir
        self.procs = {}                 # name -> Popen, or procs.Adopted for one we did not start
        self.restarts = {}              # name -> count
        self.failures = {}              # name -> how its last process ended
        self._policy = {}               # name -> RestartPolicy

    def ensure(self, name):
        """Switch NAME runs afterwards: ours already, adopted, or started now."""
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            return
        if p is not None:
            self._ended(name, p)
        adopted = self._adopt(name)
        if adopted is not None:
            self.procs[name] = adopted
            print(f"supervisor: adopted switch {name} (pid {adopted.pid})", file=sys.stderr, flush=True)
            return
        log = open(self.runtime.switch_file(name, "log"), "ab")
        try:
            self.procs[name] = subprocess.Popen(
                switch_command(self.runtime, name), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                env=runtime.child_env(), start_new_session=True)
        finally:
            log.close()

    def _adopt(self, name):
        """The process serving switch NAME, if there is one: the switch whose pid is in the lock file, checked by
        its command line and by the lock being held (probed only then: a probe could make a switch that is
        starting at that moment miss the lock)."""
        lock = self.runtime.switch_file(name, "lock")
        try:
            with open(lock) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None

        def is_it(pid):
            argv = cmdline(pid)
            return ("pyhv.devices.net.switch" in argv and "--lock" in argv and
                    argv[argv.index("--lock") + 1:][:1] == [lock] and is_served(lock))
        return Adopted.open(pid, is_it)

    def _ended(self, name, p):
        del self.procs[name]
        if isinstance(p, Adopted):
            p.close()
        if p.returncode != ALREADY_SERVED:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            if isinstance(p, Adopted):
                how = "ended"
            elif p.returncode < 0:
                how = sandbox.killed_by(-p.returncode)
            else:
                how = f"exited with status {p.returncode}"
            self.failures[name] = how
            print(f"supervisor: switch {name} {how}; restarting", file=sys.stderr, flush=True)

    def watch(self, in_use):
        """Adopt or start the switches among `in_use` (names used by running guests) that we have not seen running;
        restart those that died (at most once per RESTART_BACKOFF)."""
        for name in in_use:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                continue
            if p is not None and p.returncode != ALREADY_SERVED:
                policy = self._policy.setdefault(name, RestartPolicy(interval=RESTART_BACKOFF))
                if not policy.due():
                    continue
                policy.record()
            self.ensure(name)

    def status(self, name):
        p = self.procs.get(name)
        running = p is not None and p.poll() is None
        out = {"name": name, "state": "running" if running else "stopped", "pid": p.pid if running else None,
               "restarts": self.restarts.get(name, 0), "endpoint": self.runtime.switch_endpoint(name)}
        if name in self.failures:
            out["last_exit"] = self.failures[name]         # how the last one ended (e.g. killed by SIGSYS)
        return out

    def close(self, keep=()):
        """End our switches, but those named in `keep` (used by guests left running): they run on, to be adopted."""
        ending = {n: p for n, p in self.procs.items() if n not in keep}
        for p in ending.values():
            if p.poll() is None:
                p.terminate()
        for p in ending.values():
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in self.procs.values():
            if isinstance(p, Adopted):
                p.close()
        self.procs.clear()
