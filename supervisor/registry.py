"""The guest registry: each guest's config, state, exit status, processes and runtime files.

States: created -> running <-> paused -> stopped | failed (and back to running
on start).  Each guest's record is saved to RUNTIME_DIR/guests/NAME/guest.json
on every change, so a restarted supervisor still lists the guests it had; a
guest that was running then is marked failed (its worker died with the
supervisor).
"""
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

from pyhv.proto import errors
from pyhv.proto.errors import RequestFailed
from pyhv.proto.messages import GuestConfig, GuestInfo, to_plain

UNIX_PATH_MAX = 107


@dataclass
class Guest:
    config: GuestConfig
    dir: str
    state: str = "created"
    exit_status: int | None = None
    reason: str = ""
    proc: object = None               # spawn.WorkerProcess while a worker runs (pid, poll, kill, wait)
    starting: bool = False            # a Start is waiting for the zygote's answer
    mem_fd: int | None = None
    stop_reason: str | None = None    # set by stop/shutdown: a worker exit then means "stopped", not "failed"
    kill_at: float | None = None      # monotonic time at which the worker gets SIGKILL
    waiters: list = field(default_factory=list)   # reply envelopes deferred until the guest ends

    @property
    def name(self):
        return self.config.name

    def path(self, leaf):
        return os.path.join(self.dir, leaf)

    @property
    def control(self):
        return "ipc://" + self.path("worker.sock")

    @property
    def live(self):
        """Has a worker process (running or paused)."""
        return self.state in ("running", "paused")

    def info(self):
        return GuestInfo(
            name=self.name, state=self.state, vcpus=self.config.vcpus,
            mem_bytes=self.config.mem_bytes, exit_status=self.exit_status, reason=self.reason,
            pids={"worker": self.proc.pid} if self.proc else {},
            config=self.config, console_log=self.path("console.log"),
            console_sock=self.path("console.sock"))

    def set_state(self, state, exit_status=None, reason=""):
        self.state, self.exit_status, self.reason = state, exit_status, reason
        self.save()

    def save(self):
        record = {"config": to_plain(self.config), "state": self.state,
                  "exit_status": self.exit_status, "reason": self.reason}
        tmp = self.path("guest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.path("guest.json"))


class Registry:
    def __init__(self, runtime_dir):
        self.root = os.path.join(runtime_dir, "guests")
        os.makedirs(self.root, exist_ok=True)
        self.guests = {}
        for name in sorted(os.listdir(self.root)):
            self._load(name)

    def _load(self, name):
        d = os.path.join(self.root, name)
        try:
            with open(os.path.join(d, "guest.json")) as f:
                record = json.load(f)
            g = Guest(GuestConfig(**record["config"]), d, record["state"],
                      record["exit_status"], record["reason"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            print(f"supervisor: ignoring unreadable guest record in {d}: {e}", file=sys.stderr)
            return
        self.guests[g.name] = g
        if g.live:
            g.set_state("failed", 70, "the supervisor exited while the guest was running")

    def __iter__(self):
        return iter(list(self.guests.values()))

    def get(self, name):
        try:
            return self.guests[name]
        except KeyError:
            raise RequestFailed(errors.NO_SUCH_GUEST, f"no such guest: {name}") from None

    def add(self, config):
        if config.name in self.guests:
            raise RequestFailed(errors.BAD_STATE, f"guest {config.name} already exists (destroy it first)")
        d = os.path.join(self.root, config.name)
        if len(os.path.join(d, "console.sock")) > UNIX_PATH_MAX:
            raise RequestFailed(errors.BAD_ARGUMENT, f"runtime dir path is too long for unix sockets: {self.root}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        g = self.guests[config.name] = Guest(config, d)
        g.save()
        return g

    def remove(self, guest):
        del self.guests[guest.name]
        shutil.rmtree(guest.dir, ignore_errors=True)
