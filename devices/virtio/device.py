"""The virtio device contract: what every model implements, whatever transport and process it runs behind.

A model is the device half of a virtio device: it owns the virtqueues once
the driver has set them up, and the device-specific config space.  The
transport (devices/virtio/transport/) owns everything else: feature
negotiation, device status, queue registers, MSI-X, and where the eventfds
are registered with KVM.

* Static description, read once by the transport: `device_type`,
  `features` (must include VIRTIO_F_VERSION_1), `num_queues`,
  `queue_max_sizes`, `config_bytes()`.  A model that changes its config
  calls `events.config_changed(new_bytes)`.
* Lifecycle, called by the transport (or the proxy of a model in another
  process), never per request: `activate(mem, features, queues)` after
  DRIVER_OK, `reset()`, `pause()`/`resume()` (the data path stops; requests
  in hand are finished), `snapshot()` while paused and `restore(mem, state)`,
  `status()`, `counters()`, `close()`.  Every method a model does not
  implement fails loudly (Unsupported), as crosvm's VirtioDevice does: a
  device that cannot snapshot must not pretend to.
* The data path never involves the transport: the guest's notify write
  bumps the queue's notify eventfd (a KVM ioeventfd), the model drains the
  queue and writes the irq eventfd of the queue's MSI-X vector (a KVM
  irqfd) when `VirtQueue.needs_interrupt()` says so.  Both sets of eventfds
  come in one Eventfds, given at `attach`.
"""
import os

from pyhv.devices.virtio.queue import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC  # noqa: F401
from pyhv.proto.device_service import DeviceHealth
from pyhv.proto.errors import HvError

VIRTIO_F_VERSION_1 = 1 << 32
NO_VECTOR = 0xFFFF

# device types (virtio 1.x section 5)
VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_RNG = 1, 2, 3, 4


class Unsupported(HvError):
    """The device was asked for a lifecycle step it does not implement."""


class Eventfds:
    """One notify eventfd per queue (KVM ioeventfds) and one irq eventfd per MSI-X vector (KVM irqfds).

    Made once per device (by the worker's device manager, or from a service's
    inherited fds) and shared by the transport, which registers them with
    KVM, and the model, which polls one set and writes the other: a
    restarted service gets the very same ones.  Vector i is queue i's, the
    last one the config-change vector.
    """

    def __init__(self, notify, irq, owned=True):
        self.notify = list(notify)
        self.irq = list(irq)
        self.owned = owned

    @classmethod
    def create(cls, num_queues):
        new = lambda: os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # noqa: E731
        return cls([new() for _ in range(num_queues)], [new() for _ in range(num_queues + 1)])

    def notify_fd(self, queue):
        return self.notify[queue]

    def irq_fd(self, vector):
        """The irq eventfd of MSI-X `vector`, or None for NO_VECTOR (the queue cannot interrupt)."""
        return self.irq[vector] if vector < len(self.irq) else None

    def close(self):
        if self.owned:
            for fd in self.notify + self.irq:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.notify, self.irq = [], []


class TransportEvents:
    """What a model may tell its transport; all thread-safe, none blocks on the guest."""

    def config_changed(self, config):
        """The device-specific config is now `config` (bytes): cache it, interrupt the driver."""

    def needs_reset(self, reason):
        """The device hit an unrecoverable error: set DEVICE_NEEDS_RESET and interrupt the driver."""


class VirtioDevice:
    """The interface; see the module docstring.  Subclasses set the class attributes."""

    device_type = 0
    features = VIRTIO_F_VERSION_1
    num_queues = 0
    queue_max_sizes = ()
    name = "virtio"

    def __init__(self):
        self.events = TransportEvents()
        self.eventfds = None

    def attach(self, events, eventfds):
        """Called once by whoever wires the device: where config changes and fatal errors go, and its eventfds."""
        self.events = events
        self.eventfds = eventfds

    def config_bytes(self):
        return b""

    def config_write(self, offset, data):
        """A driver write to the device-specific config (already bounds-checked); default: ignored."""

    def _unsupported(self, what):
        raise Unsupported(f"{self.name} cannot {what}")

    def activate(self, mem, features, queues):
        """DRIVER_OK: start serving `queues` (QueueConfigs) over guest memory `mem` with the `features` negotiated.

        Raise QueueConfigError if a queue is unusable: the transport then sets DEVICE_NEEDS_RESET.
        """
        self._unsupported("be activated")

    def reset(self):
        """Stop touching guest memory and the queues; return when done (the transport then shows status 0)."""
        self._unsupported("reset")

    def pause(self):
        """Stop the data path, finishing requests in hand; return when nothing touches guest memory."""
        self._unsupported("pause")

    def resume(self):
        self._unsupported("resume")

    def snapshot(self):
        """The paused device's DeviceState (None if the driver has not activated it)."""
        self._unsupported("snapshot its state")

    def restore(self, mem, state, paused=False):
        """Continue from a DeviceState (the transport's registers are restored by the transport)."""
        self._unsupported("restore a state")

    def status(self):
        """DeviceHealth for `hvctl info`; a model in this process is running while it exists."""
        return DeviceHealth(state="running")

    def counters(self):
        return {}

    def close(self):
        self.reset()
