"""Control messages: one typed class per message that crosses a ZeroMQ socket.

Every message is a Message subclass with a `TYPE` name; `proto.codec` turns it into
msgpack and back, checking each field against the annotations here.  Field
annotations are therefore the wire schema: use only str, int, float, bool,
dict, list[...], X | None and other message classes.  No msgpack/zmq import
here: `hvctl run` imports this module and must start fast.
"""
MESSAGES = {}   # TYPE -> class

BOOT_MODES = ("linux", "raw16", "raw32", "raw64", "user64")
COMPAT_PROFILES = ("nested", "none")
STATES = ("created", "running", "paused", "stopped", "failed")
DEFAULT_MEM_BYTES = 128 << 20


class Message:
    """Base of every message: construction, equality and repr from the class's field annotations.

    Not dataclasses: generating 18 of them (and importing inspect) took
    longer than booting a guest, and `hvctl run` imports this module.
    """
    TYPE = None
    FIELDS = ()          # field names in order, set by @message
    DEFAULTS = {}        # name -> default value, or a factory for list/dict defaults

    def __init__(self, *args, **kwargs):
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{self.TYPE} takes at most {len(self.FIELDS)} positional fields")
        values = dict(zip(self.FIELDS, args))
        for k, v in kwargs.items():
            if k not in self.FIELDS or k in values:
                raise TypeError(f"{self.TYPE}: unexpected or repeated field {k!r}")
            values[k] = v
        for name in self.FIELDS:
            if name not in values:
                if name not in self.DEFAULTS:
                    raise TypeError(f"{self.TYPE}: missing field {name!r}")
                default = self.DEFAULTS[name]
                values[name] = default() if callable(default) else default
            setattr(self, name, values[name])

    def __eq__(self, other):
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __repr__(self):
        return f"{self.TYPE}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


def fields(msg_or_cls):
    """Field names of a message class or instance, in declaration order."""
    return msg_or_cls.FIELDS


def to_plain(value):
    """Messages (nested too) to plain dicts and lists, for msgpack and JSON."""
    if isinstance(value, Message):
        return {n: to_plain(getattr(value, n)) for n in value.FIELDS}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def message(cls):
    """Register `cls` (TYPE = its class name); its annotations are its fields, class attributes its defaults."""
    annotations = cls.__dict__.get("__annotations__", {})
    cls.FIELDS = tuple(annotations)
    cls.DEFAULTS = {n: cls.__dict__[n] for n in cls.FIELDS if n in cls.__dict__}
    for n in cls.DEFAULTS:
        delattr(cls, n)
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
    disks: list[str] = list          # factory: a fresh list per instance
    timeout: float | None = None     # seconds; past it the guest ends with 124
    pin: list[int] = list            # host CPUs; vCPU i runs on pin[i % len(pin)]; empty: unpinned
    compat: str = "nested"           # compatibility profile: "nested" (default) or "none"
    rng: bool = False                # a virtio-rng PCI device (virtio-pci, MSI-X)
    vconsole: bool = False           # a virtio-console PCI device (/dev/hvc0), host side on a unix socket
    nets: list[str] = list           # virtio-net NICs: "tap:IFNAME,mac=MAC" or "switch:NAME,mac=MAC"


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


@message
class SpawnService(Message):
    """Worker -> supervisor on RUNTIME/services.sock, with the fds in SCM_RIGHTS: start a device service.

    `args` are `python -m pyhv.devices.service` options; the fd-valued ones
    (--mem-fd, --lifeline, --notify-fds, --irq-fds) name the worker's fd
    numbers, `fds` lists those numbers in the order the fds were sent.
    """
    guest: str
    args: list[str]
    fds: list[int]


@message
class ServiceSpawned(Message):
    """Reply to SpawnService; the service's pidfd travels with it (SCM_RIGHTS)."""
    pid: int


@message
class DeviceStatus(Message):
    """Supervisor -> worker: each device service's state, pid, restarts and failure reason (StatsReply)."""
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
