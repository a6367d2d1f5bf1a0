"""The guest registry: each guest's config, state, exit status, processes and runtime files.

States: created -> running <-> paused -> stopped | failed (and back to running
on start).  Each guest's record is saved to its guest.json on every change,
with the identity of its worker while one runs (supervisor/procs.py), so a
restarted supervisor still lists the guests it had and finds the workers of
those still running: the registry hands each live record to `adopt`.
"""
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

from pyhv.devices.virtio import kinds
from pyhv.proto import codec
from pyhv.proto.control import GuestInfo
from pyhv.proto.errors import BadState, EXIT_VM_FAILED, HostError, HvError, NoSuchGuest, UserError
from pyhv.proto.guest import GuestConfig
from pyhv.proto.messages import to_plain
from pyhv.proto.runtime import UNIX_PATH_MAX, check_switch_socket


@dataclass
class Guest:
    config: GuestConfig
    files: object                     # its proto.runtime.GuestDir
    state: str = "created"
    exit_status: int | None = None
    reason: str = ""
    proc: object = None               # spawn.WorkerProcess or procs.Adopted while a worker runs (pid, poll, kill...)
    starting: bool = False            # a Start is waiting for the zygote's answer
    mem_fd: int | None = None
    migrated_to: str | None = None    # set once the guest runs under another supervisor: its worker ends here
    moving: object = None             # a migration in flight, out or in (supervisor/migration.py)
    arriving: bool = False            # migrated here, not yet committed: saved, so no successor adopts it
    restore: tuple | None = None      # (snapshot dir, paused) for the next worker only: its RAM is in mem_fd already
    stop_reason: str | None = None    # set by stop/shutdown: a worker exit then means "stopped", not "failed"
    kill_at: float | None = None      # monotonic time at which the worker gets SIGKILL
    waiters: list = field(default_factory=list)   # requests answered when the guest ends (server._Waiter)
    on_change: object = None          # on_change(guest, kind): the registry's listener (events)

    @property
    def name(self):
        return self.config.name

    @property
    def dir(self):
        return self.files.path

    @property
    def live(self):
        """Has a worker process (running or paused)."""
        return self.state in ("running", "paused")

    def info(self):
        return GuestInfo(
            name=self.name, state=self.state, vcpus=self.config.vcpus,
            mem_bytes=self.config.mem_bytes, exit_status=self.exit_status, reason=self.reason,
            pids={"worker": self.proc.pid} if self.proc else {},
            config=self.config, console_log=self.files.console_log, console_sock=self.files.console_sock)

    def set_state(self, state, exit_status=None, reason=""):
        """The new state holds in memory even when it cannot be saved (logged; a later save catches up):
        a full disk must not stop the supervisor from tracking its guests."""
        self.state, self.exit_status, self.reason = state, exit_status, reason
        try:
            self.save()
        except HostError as e:
            print(f"supervisor: {e}", file=sys.stderr, flush=True)
        if self.on_change is not None:
            self.on_change(self, state)

    def save(self):
        """Write guest.json (atomically); HostError if the host refuses (ENOSPC...), the old record kept."""
        record = {"config": to_plain(self.config), "state": self.state,
                  "exit_status": self.exit_status, "reason": self.reason,
                  "worker": self.proc.identity if self.proc is not None else None,
                  **({"arriving": True} if self.arriving else {})}
        tmp = self.files.record + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self.files.record)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise HostError(f"cannot save guest {self.name}'s record in {self.files.path}: "
                            f"{e.strerror or e}") from None


def _config_from_record(plain):
    """A GuestConfig from guest.json, including records written before devices were DeviceSpecs."""
    plain = dict(plain)
    if "devices" not in plain:
        devices = ([{"kind": "rng", "options": {}}] if plain.pop("rng", False) else [])
        for d in plain.pop("disks", []):
            path, _, opt = d.rpartition(",")
            devices.append({"kind": "blk", "options": {"path": path, "ro": "1"} if opt == "ro" else {"path": d}})
        if plain.pop("vconsole", False):
            devices.append({"kind": "console", "options": {}})
        for n in plain.pop("nets", []):
            port, _, mac = n.partition(",mac=")
            devices.append({"kind": "net", "options": {"port": port, "mac": mac}})
        plain["devices"] = devices
    return codec.from_plain(GuestConfig, plain)


class Registry:
    def __init__(self, runtime, on_change=None, adopt=None):
        """`on_change(guest, kind)` hears of every guest created, changing state or destroyed; `adopt(guest,
        worker)` gets each guest whose record says it runs, with its worker's recorded identity (or None)."""
        self.runtime = runtime             # proto.runtime.RuntimeDir
        self.on_change = on_change
        self.adopt = adopt
        os.makedirs(runtime.guests, exist_ok=True)
        self.guests = {}
        self.reserved = set()              # names of guests being migrated here, not yet added
        for name in sorted(os.listdir(runtime.guests)):
            self._load(name)

    def _load(self, name):
        files = self.runtime.guest(name)
        try:
            with open(files.record) as f:
                record = json.load(f)
            g = Guest(_config_from_record(record["config"]), files, record["state"],
                      record["exit_status"], record["reason"])
        except (OSError, ValueError, TypeError, KeyError, HvError) as e:
            print(f"supervisor: ignoring unreadable guest record in {files.path}: {e}", file=sys.stderr)
            return
        self.guests[g.name] = g
        g.on_change = self._changed
        g.arriving = record.get("arriving") is True
        if g.live and self.adopt is not None:
            self.adopt(g, record.get("worker"))
        elif g.live:
            g.set_state("failed", EXIT_VM_FAILED, "the supervisor exited while the guest was running")

    def __iter__(self):
        return iter(list(self.guests.values()))

    def get(self, name):
        try:
            return self.guests[name]
        except KeyError:
            raise NoSuchGuest(f"no such guest: {name}") from None

    def add(self, config):
        if config.name in self.guests:
            raise BadState(f"guest {config.name} already exists (destroy it first)")
        if config.name in self.reserved:
            raise BadState(f"guest {config.name} is being migrated here")
        files = self.runtime.guest(config.name)
        if len(files.longest_socket()) > UNIX_PATH_MAX:
            raise UserError(f"runtime dir path is too long for unix sockets: {self.runtime.path}")
        for switch in kinds.switches(config.devices):
            check_switch_socket(self.runtime.path, switch)
        shutil.rmtree(files.path, ignore_errors=True)
        g = Guest(config, files, on_change=self._changed)
        try:
            os.makedirs(files.path)
            g.save()
        except (OSError, HostError) as e:
            shutil.rmtree(files.path, ignore_errors=True)
            raise HostError(f"cannot create guest {config.name}: {getattr(e, 'strerror', None) or e}") from None
        self.guests[config.name] = g
        self._changed(g, "created")
        return g

    def _changed(self, guest, kind):
        if self.on_change is not None:
            self.on_change(guest, kind)

    def remove(self, guest, keep_logs=True):
        """Forget the guest and its files; its console and worker logs go to RUNTIME/logs/NAME unless not kept."""
        del self.guests[guest.name]
        if keep_logs:
            kept = self.runtime.kept_logs(guest.name)
            shutil.rmtree(kept, ignore_errors=True)
            os.makedirs(kept, exist_ok=True)
            for path in (guest.files.console_log, guest.files.console_times, guest.files.worker_log):
                try:
                    os.replace(path, os.path.join(kept, os.path.basename(path)))
                except FileNotFoundError:
                    pass
        shutil.rmtree(guest.dir, ignore_errors=True)
        self._changed(guest, "destroyed")

