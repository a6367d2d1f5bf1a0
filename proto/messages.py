"""Control messages: one typed class per message that crosses a ZeroMQ socket.

Every message is a dataclass with a `TYPE` name; `proto.codec` turns it into
msgpack and back, checking each field against the annotations here.  Field
annotations are therefore the wire schema: use only str, int, float, bool,
dict, list[...], X | None and other message classes.  No msgpack/zmq import
here: `hvctl run` imports this module and must start fast.
"""
from dataclasses import asdict, dataclass, field
from typing import ClassVar

MESSAGES = {}   # TYPE -> class

BOOT_MODES = ("linux", "raw16", "raw32", "raw64", "user64")
STATES = ("created", "running", "paused", "stopped", "failed")
DEFAULT_MEM_BYTES = 128 << 20


def message(cls):
    """Make `cls` a dataclass message and register it under its class name."""
    cls = dataclass(cls)
    cls.TYPE = cls.__name__
    MESSAGES[cls.TYPE] = cls
    return cls


# --- guest description -----------------------------------------------------

@message
class GuestConfig:
    """Everything needed to build one guest (the options of `hvctl run`/`create`)."""
    TYPE: ClassVar[str]
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
class GuestInfo:
    """A guest as the supervisor sees it (reply to Create/Start/Stop/Info/Wait...)."""
    TYPE: ClassVar[str]
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
class Ping:
    """Is a supervisor (or worker) answering on this socket?"""
    TYPE: ClassVar[str]


@message
class Create:
    TYPE: ClassVar[str]
    config: GuestConfig


@message
class Start:
    TYPE: ClassVar[str]
    name: str


@message
class Stop:
    """End the guest: Outcome 143 "stopped by request"."""
    TYPE: ClassVar[str]
    name: str


@message
class Pause:
    TYPE: ClassVar[str]
    name: str


@message
class Resume:
    TYPE: ClassVar[str]
    name: str


@message
class Destroy:
    """Stop the guest if needed and forget it (runtime files included)."""
    TYPE: ClassVar[str]
    name: str


@message
class List:
    TYPE: ClassVar[str]


@message
class Info:
    TYPE: ClassVar[str]
    name: str


@message
class Wait:
    """Reply (GuestInfo) deferred until the guest is stopped or failed."""
    TYPE: ClassVar[str]
    name: str


@message
class Stats:
    TYPE: ClassVar[str]
    name: str


# --- replies ---------------------------------------------------------------

@message
class Ok:
    TYPE: ClassVar[str]


@message
class Error:
    """A request failed; `kind` is one of proto.errors.KINDS, `message` one line for the user."""
    TYPE: ClassVar[str]
    kind: str
    message: str


@message
class Pong:
    TYPE: ClassVar[str]
    pid: int
    runtime_dir: str


@message
class GuestList:
    TYPE: ClassVar[str]
    guests: list[GuestInfo]


@message
class StatsReply:
    """Machine.stats() from the worker, plus host CPU/memory added by the supervisor."""
    TYPE: ClassVar[str]
    stats: dict
