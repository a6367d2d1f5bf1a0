"""The control channel: hvctl -> supervisor requests and replies, and the guest-control ones supervisor -> worker."""
from pyhv.proto.guest import GuestConfig
from pyhv.proto.messages import Channel, Error, Message, Ok, message, to_plain

STATES = ("created", "running", "paused", "stopped", "failed")

CONTROL = Channel("control", Ok, Error)


@message
class GuestInfo(Message):
    """A guest as the supervisor sees it (reply to Create/Start/Stop/Info/Wait...)."""
    name: str
    state: str                       # one of STATES
    vcpus: int
    mem_bytes: int
    exit_status: int | None          # None until stopped/failed
    reason: str                      # why it stopped, or ""
    pids: dict[str, int]             # process role -> pid, e.g. {"worker": 1234}
    config: GuestConfig
    console_log: str                 # path of the console log file
    console_sock: str                # unix socket for `hvctl console`
    devices: dict = dict             # running guests: device name -> {state, pid, restarts, reason}; switches too

    def to_json(self):
        """The object `hvctl info/list --json` prints (interface.md)."""
        return to_plain(self)


# --- requests (hvctl -> supervisor; the guest-control ones also supervisor -> worker) ---

@CONTROL
class Ping(Message):
    """Is a supervisor (or worker) answering on this socket?"""


@CONTROL
class Create(Message):
    """Define a guest; with start, start it too (the reply waits for the worker, as Start's does)."""
    config: GuestConfig
    start: bool = False


@CONTROL
class Start(Message):
    name: str


@CONTROL
class Stop(Message):
    """End the guest: status 143 "stopped by request"."""
    name: str


@CONTROL
class Events(Message):
    """Subscribe (on RUNTIME/hvctl.sock): an Event on this connection for every change, until it closes."""


@CONTROL
class Event(Message):
    """A guest changed: kind is "created", a state of STATES, or "destroyed"; time is the Unix time."""
    name: str
    kind: str
    exit_status: int | None
    reason: str
    time: float


@CONTROL
class CtrlAltDel(Message):
    """Ask the guest to power off (`hvctl shutdown`): Ctrl-Alt-Del on its keyboard; Wait for the end."""
    name: str


@CONTROL
class CtrlAltDelReply(Message):
    """listening: a keyboard driver took the keys (False: nothing was pressed; a raw guest has none)."""
    listening: bool


@CONTROL
class SnapshotGuest(Message):
    """Write the guest's complete state into `dir` (absolute; absent or empty), then let it run on (stop: end it)."""
    name: str
    dir: str
    stop: bool = False
    handover: bool = False           # a migration's: state only (RAM stays in the memfd), the guest stays held


@CONTROL
class Migrate(Message):
    """Move the guest to the supervisor of runtime dir `to` on this machine (reply: MigrateReply): its RAM handed
    over, not copied; with copy, streamed while the guest runs (docs/migration.md)."""
    name: str
    to: str
    copy: bool = False


@CONTROL
class Immigrate(Message):
    """Supervisor -> supervisor, on hvctl.sock with the guest's RAM memfd attached: take the guest whose hand-over
    state is in `dir` (inside the receiver's runtime dir).  Two-phase: the reply is Prepared once its worker holds
    it; then Commit on the same connection runs it (paused: keeps it paused) and is answered with GuestInfo.  A
    connection closed before Commit (or an Error reply) leaves nothing there and the guest never ran there.
    After the memfd come the fds of its disk images (locked), one per device named in `images`."""
    dir: str
    paused: bool = False
    images: list[str] = list


@CONTROL
class Prepared(Message):
    """Supervisor -> supervisor: the guest handed over exists here, held; it runs only on Commit."""
    name: str


@CONTROL
class Commit(Message):
    """Supervisor -> supervisor, after Prepared: the source has let the guest go for good; run it."""
    name: str


@CONTROL
class ReceiveGuest(Message):
    """Supervisor -> supervisor (`migrate --copy`), on hvctl.sock: make ready to receive guest `config` over a
    migration stream (proto/migration.py) and answer ReceiveReady; paused: it arrives paused.  With it come the
    fds of its disk images (locked), one per device named in `images`: on this machine the locks go over with
    the guest, as a hand-over's do."""
    config: GuestConfig
    paused: bool = False
    images: list[str] = list


@CONTROL
class ReceiveReady(Message):
    """Where the source's worker connects ("unix:PATH") and the token its Hello must carry."""
    address: str
    token: str


@CONTROL
class MigrateOut(Message):
    """Supervisor -> worker (`migrate --copy`): stream the guest to the receiver at `address`, presenting `token`;
    the reply (MigrateReply) comes once the outcome is known.  After "done" the guest stays held here until Stop
    (or, if none comes, ends itself: "migrated to `to`")."""
    name: str
    address: str
    token: str
    to: str = ""


@CONTROL
class MigrateReply(Message):
    """How a migration went.  outcome: "done", "failed" (the guest goes on here as it was: reason says why) or
    "in-doubt" (the target may run it: held here, reason says why).  With copy: passes over RAM while the guest
    ran, bytes of RAM sent (held_bytes of them while it was held), whether the last pass got small before the
    round limit; downtime and seconds: how long the guest was held, and the whole migration took."""
    outcome: str
    copy: bool = False
    to: str = ""
    reason: str = ""
    rounds: int = 0
    bytes: int = 0
    held_bytes: int = 0
    converged: bool = True
    downtime: float = 0.0
    seconds: float = 0.0


@CONTROL
class SnapshotReply(Message):
    """Where the snapshot is, how many bytes it holds, and for how long the guest was held (seconds)."""
    dir: str
    bytes: int
    paused_for: float


@CONTROL
class RestoreGuest(Message):
    """Define guest `name` (None: the snapshot's) from snapshot `dir` and run it from there (paused: held).

    nets: a new port (tap:IFNAME or switch:NAME) for the guest's first NICs, in order; their MACs stay."""
    dir: str
    name: str | None = None
    paused: bool = False
    nets: list[str] = list


@CONTROL
class Pause(Message):
    name: str


@CONTROL
class Resume(Message):
    name: str


@CONTROL
class Destroy(Message):
    """Forget a guest that is not running (force: stop it first); its logs are kept unless purge."""
    name: str
    force: bool = False
    purge: bool = False


@CONTROL
class List(Message):
    """All guests (reply: GuestList)."""


@CONTROL
class Info(Message):
    name: str


@CONTROL
class Wait(Message):
    """Reply (GuestInfo) deferred until the guest is stopped or failed.  With `timeout` (seconds) the client
    stops listening after that long, and the supervisor forgets the request then too."""
    name: str
    timeout: float | None = None


@CONTROL
class StopSupervisor(Message):
    """End the supervisor (reply: SupervisorStopping).  Refused while guests run unless `force` (they are
    stopped) or `leave_guests` (they run on, for the next supervisor of the runtime dir to adopt)."""
    force: bool = False
    leave_guests: bool = False


@CONTROL
class Stats(Message):
    name: str


@CONTROL
class DeviceStatus(Message):
    """Supervisor -> worker: each device's state, pid, restarts and failure reason (reply: StatsReply)."""
    name: str


# --- replies ---------------------------------------------------------------

@CONTROL
class Pong(Message):
    pid: int
    runtime_dir: str


@CONTROL
class SupervisorStopping(Message):
    """The supervisor ends once this is sent; `guests` were running (stopped by force, or left running)."""
    pid: int
    guests: list[str]
    left_running: bool


@CONTROL
class GuestList(Message):
    guests: list[GuestInfo]


@CONTROL
class StatsReply(Message):
    """The worker's counters, plus host CPU/memory added by the supervisor."""
    stats: dict


CONTROL(GuestInfo)      # also a reply in its own right
