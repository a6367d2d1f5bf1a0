"""The virtual switches of one supervisor: one `pyhv.devices.net.switch` process per switch name, started and restarted here.

A guest with `--net switch:NAME` gets its switch started before its worker
(the switch's NIC ports connect by path; ZeroMQ queues until the switch has
bound, so there is no ordering race).  `watch()` restarts a switch that died
while a running guest uses it (at most once per RESTART_BACKOFF); its ports
reconnect by themselves and are relearned from their hellos, so guests see a
short loss of frames, nothing else.  A switch that exits ALREADY_SERVED found
another process serving that name in this runtime dir (a standalone
`hvctl run` started it first): that one is used.
"""
import subprocess
import sys

from pyhv.devices.net.switch import ALREADY_SERVED
from pyhv.devices.restarts import RestartPolicy
from pyhv.proto import runtime
from pyhv.vcpu_worker.launchers import switch_command

RESTART_BACKOFF = 1.0


class Switches:
    def __init__(self, runtime_dir):
        self.runtime = runtime_dir          # a proto.runtime.RuntimeDir
        self.procs = {}                 # name -> Popen
        self.restarts = {}              # name -> count
        self.failures = {}              # name -> last exit status
        self._policy = {}               # name -> RestartPolicy

    def ensure(self, name):
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            return
        if p is not None:
            self._ended(name, p)
        log = open(self.runtime.switch_file(name, "log"), "ab")
        try:
            self.procs[name] = subprocess.Popen(
                switch_command(self.runtime, name), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                env=runtime.child_env(), start_new_session=True)
        finally:
            log.close()

    def _ended(self, name, p):
        del self.procs[name]
        if p.returncode != ALREADY_SERVED:
            self.failures[name] = p.returncode
            self.restarts[name] = self.restarts.get(name, 0) + 1
            print(f"supervisor: switch {name} exited with status {p.returncode}; restarting",
                  file=sys.stderr, flush=True)

    def watch(self, in_use):
        """Restart dead switches among `in_use` (names used by running guests)."""
        for name in in_use:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                continue
            policy = self._policy.setdefault(name, RestartPolicy(interval=RESTART_BACKOFF))
            if not policy.due():
                continue
            policy.record()
            self.ensure(name)

    def status(self, name):
        p = self.procs.get(name)
        running = p is not None and p.poll() is None
        return {"name": name, "state": "running" if running else "stopped", "pid": p.pid if running else None,
                "restarts": self.restarts.get(name, 0), "endpoint": self.runtime.switch_endpoint(name)}

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
