"""The device-service contract: what a worker and a device-service process say to each other, and how one is spawned.

Three channels:
* SERVICE: worker -> service requests on a PAIR socket (one request, one
  reply, in order) and service -> worker events on PUSH/PULL.  A virtio
  model's whole lifecycle travels here: Describe, ConfigWrite, Activate,
  Reset, PauseDevice, ResumeDevice, Snapshot, Restore, GetCounters, Shutdown.
* SPAWN: worker -> supervisor on RUNTIME/services.sock, one SpawnService per
  connection with the fds in SCM_RIGHTS, named by role (ServiceFds).  The
  worker names only the device; the supervisor derives what the service
  does from the guest's own config, so a worker cannot ask for more.
* SPEC: the ServiceSpec a service process is started with (`--spec`).
Queue settings have one shape, QueueConfig, from the transport's registers
to the VirtQueue; QueueState adds a queue's position, DeviceState a model's.
ZeroMQ carries no fds: eventfds are named by index (queue index for the
notify eventfd, MSI-X vector for the irq eventfd).
"""
from pyhv.proto.messages import Channel, Error, Message, Ok, message

MAX_CONTROL_BYTES = 64 << 10

SERVICE = Channel("device-service", Ok, Error)
SPAWN = Channel("spawn", Error)
SPEC = Channel("service-spec")


# --- one virtqueue, as the driver configured it --------------------------------------

@message
class QueueConfig(Message):
    """An enabled virtqueue: guest-physical ring addresses (untrusted) and its MSI-X vector (0xFFFF: none)."""
    index: int
    size: int
    desc: int
    driver: int
    device: int
    vector: int = 0xFFFF


@message
class QueueState(Message):
    """A queue's position: chains up to last_avail_idx were taken, up to used_idx returned."""
    config: QueueConfig
    last_avail_idx: int
    used_idx: int
    notify: bool = True              # available-buffer notifications wanted
    broken: bool = False             # the driver broke the avail ring: needs a reset


@message
class DeviceState(Message):
    """A virtio model's state between processes or in a snapshot: features, queue positions, its own state."""
    features: int
    queues: list[QueueState]
    model: dict = dict               # plain values only (the model's snapshot())


@message
class DeviceHealth(Message):
    """What `hvctl info` shows of one device."""
    state: str                       # starting | running | failed | stopped
    pid: int | None = None
    restarts: int = 0
    reason: str = ""
    paused: bool = False


# --- worker -> service -------------------------------------------------------------

@SERVICE
class Describe(Message):
    """The static description, read once when the transport is built."""


@SERVICE
class Description(Message):
    device_type: int
    features: int
    num_queues: int
    queue_max_sizes: list[int]
    config: bytes
    name: str


@SERVICE
class ConfigWrite(Message):
    offset: int
    data: bytes


@SERVICE
class Activate(Message):
    features: int
    queues: list[QueueConfig]


@SERVICE
class Reset(Message):
    """Stop touching guest memory and forget the queues."""


@SERVICE
class PauseDevice(Message):
    """Stop the data path (requests in hand are finished) and keep the queues."""


@SERVICE
class ResumeDevice(Message):
    pass


@SERVICE
class Snapshot(Message):
    """The paused model's DeviceState (reply: StateReply)."""


@SERVICE
class StateReply(Message):
    state: DeviceState | None        # None: the driver has not activated the device


@SERVICE
class Restore(Message):
    """Continue from `state` (a snapshot, or used.idx positions after a restart); paused if asked."""
    state: DeviceState
    paused: bool = False


@SERVICE
class GetCounters(Message):
    pass


@SERVICE
class Counters(Message):
    counters: dict


@SERVICE
class Shutdown(Message):
    pass


# --- service -> worker (events socket) ---------------------------------------------

@SERVICE
class ConfigChanged(Message):
    config: bytes


@SERVICE
class NeedsReset(Message):
    reason: str


REQUESTS = (Describe, ConfigWrite, Activate, Reset, PauseDevice, ResumeDevice, Snapshot, Restore, GetCounters,
            Shutdown)
EVENTS = (ConfigChanged, NeedsReset)


# --- starting a service ------------------------------------------------------------

@message
class ServiceFds(Message):
    """The fds a service is given, by role: numbers in the receiving process (or positions in SCM_RIGHTS)."""
    mem: int                         # guest RAM memfd
    lifeline: int                    # read end of a pipe: EOF means the worker is gone
    notify: list[int]                # one per queue: the KVM ioeventfds
    irq: list[int]                   # one per MSI-X vector: the KVM irqfds
    image: int | None = None         # a disk's image, opened and locked by whoever starts the service

    def all(self):
        return [self.mem, self.lifeline, *self.notify, *self.irq] + ([] if self.image is None else [self.image])

    def renumbered(self, fds):
        """The same roles over `fds`, where this message holds positions into that list."""
        return ServiceFds(fds[self.mem], fds[self.lifeline], [fds[i] for i in self.notify],
                          [fds[i] for i in self.irq], None if self.image is None else fds[self.image])

    @classmethod
    def positions(cls, notify, irq):
        """Roles as positions in the order `all()` lists them."""
        return cls(0, 1, list(range(2, 2 + notify)), list(range(2 + notify, 2 + notify + irq)))


@SPEC
class ServiceSpec(Message):
    """What a device-service process runs: a kind from devices/virtio/kinds.py with its host-side options."""
    kind: str
    name: str                        # the device's name in the guest, e.g. virtio-blk0
    mem_size: int
    control: str                     # ZeroMQ endpoints the worker bound
    events: str
    options: dict[str, str]
    fds: ServiceFds


@SPAWN
class SpawnService(Message):
    """Worker -> supervisor (fds in SCM_RIGHTS): start incarnation N of the service of a device of this guest."""
    guest: str
    device: str
    incarnation: int
    fds: ServiceFds                  # positions in the SCM_RIGHTS array


@SPAWN
class ServiceSpawned(Message):
    """Reply to SpawnService; the service's pidfd travels with it (SCM_RIGHTS)."""
    pid: int
