"""Control messages: one typed class per message that crosses a ZeroMQ socket.

Every message is a dataclass with a `TYPE` name; `proto.codec` turns it into
msgpack and back, checking each field against the annotations here.  Field
annotations are therefore the wire schema: use only str, int, float, bool,
dict, list[...], X | None and other message classes.  No msgpack/zmq import
here: `hvctl run` imports this module and must start fast.
"""
from dataclasses import asdict, dataclass, field

MESSAGES = {}   # TYPE -> class

BOOT_MODES = ("linux", "raw16", "raw32", "raw64", "user64")
STATES = ("created", "running", "paused", "stopped", "failed")
DEFAULT_MEM_BYTES = 128 << 20


class Message:
    """Base of every message: equality and repr by fields (generated per class only for __init__,
    which keeps importing this module cheap for `hvctl run`)."""
    TYPE = None

    def __eq__(self, other):
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __repr__(self):
        return f"{self.TYPE}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def message(cls):
    """Make `cls` a dataclass message (TYPE = its class name) and register it."""
    cls = dataclass(cls, eq=False, repr=False)
    cls.TYPE = cls.__name__
    MESSAGES[cls.TYPE] = cls
    return cls


# --- guest description -----------------------------------------------------

@message
class GuestConfig(Message):
    """Everything needed to build one guest (the options of `hvctl run`/`create`)."""
    name: str
    kernel: str                      # absolute path, checked readable before use
    boot: str = "linux"              # one of BOOT_MODES
    load_addr: int | None = None     # None: 0x7C00 for raw16, 0x100000 otherwise
    initrd: str | None = None
    cmdline: str = ""
    mem_bytes: int = DEFAULT_MEM_BYTES
    vcpus: int = 1
    disks: list[str] = field(default_factory=list)
    timeout: float | None = None     # seconds; past it the guest ends with 124


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

    def to_json(self):
        """The object `hvctl info/list --json` prints (interface.md)."""
        return asdict(self)


# --- requests (hvctl -> supervisor; the guest-control ones also supervisor -> worker) ---

@message
class Ping(Message):
    """Is a supervisor (or worker) answering on this socket?"""


@message
class Create(Message):
    config: GuestConfig


@message
class Start(Message):
    name: str


@message
class Stop(Message):
    """End the guest: Outcome 143 "stopped by request"."""
    name: str


@message
class Pause(Message):
    name: str


@message
class Resume(Message):
    name: str


@message
class Destroy(Message):
    """Stop the guest if needed and forget it (runtime files included)."""
    name: str


@message
class List(Message):
    """All guests (reply: GuestList)."""


@message
class Info(Message):
    name: str


@message
class Wait(Message):
    """Reply (GuestInfo) deferred until the guest is stopped or failed."""
    name: str


@message
class Stats(Message):
    name: str


# --- replies ---------------------------------------------------------------

@message
class Ok(Message):
    """The request was done; nothing to report."""


@message
class Error(Message):
    """A request failed; `kind` is one of proto.errors.KINDS, `message` one line for the user."""
    kind: str
    message: str


@message
class Pong(Message):
    pid: int
    runtime_dir: str


@message
class GuestList(Message):
    guests: list[GuestInfo]


@message
class StatsReply(Message):
    """Machine.stats() from the worker, plus host CPU/memory added by the supervisor."""
    stats: dict
