"""The virtio device-model interface: what a backend (rng, blk, net, ...) implements, independent of the transport.

A backend is the device half of a virtio device: it owns the virtqueues once
the driver has set them up, and the device-specific config space.  The
transport (vcpu_worker/virtio_pci.py) owns everything else: feature
negotiation, device status, queue registers, MSI-X, and the eventfds.

Split of work
-------------
* Static description, read once by the transport when the device is built:
  `device_type`, `features` (64-bit; must include VIRTIO_F_VERSION_1),
  `num_queues`, `queue_max_sizes`, and `config_bytes()` (the device-specific
  config space).  The transport caches the config bytes and answers driver
  reads from the cache; when the device changes its config it calls the
  transport's `config_changed(new_bytes)` (see `attach`), which updates the
  cache, bumps config_generation and raises the config-change interrupt.
* Control calls, made by the transport on the config path (never per
  request): `config_write(offset, data)`, `activate(mem, features, queues)`
  after DRIVER_OK, and `reset()`.
* The data path never involves the transport: the guest's queue notify
  write bumps `QueueConfig.notify_fd` (a KVM ioeventfd), the backend drains
  the queue, and writes `QueueConfig.irq_fd` (a KVM irqfd bound to the
  queue's MSI-X vector) when `VirtQueue.needs_interrupt()` says so.

Processes
---------
Today a backend runs in the worker, on its own thread (`ThreadedBackend`).
Later it runs in a device-service process: the transport's calls become
messages and the fds in a `QueueConfig` travel by SCM_RIGHTS, which is why a
QueueConfig splits into a plain dict plus a list of fds (`to_wire` /
`from_wire`).  The fds are the transport's: a backend borrows them from
`activate` until `reset` returns (an in-process backend must not close
them; a service closes its received duplicates).
"""
import os
import select
import threading

from pyhv.devices.virtio.queue import ChainError, QueueConfigError, QueueFatal, VirtQueue

VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

# device types (virtio 1.x section 5)
VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_RNG = 1, 2, 3, 4


class QueueConfig:
    """One enabled virtqueue as the driver configured it, plus its eventfds.

    `desc`/`driver`/`device`: guest-physical addresses of the descriptor
    table, available (driver) ring and used (device) ring; untrusted (the
    backend's VirtQueue validates them).  `irq_fd` is None when the driver
    gave the queue no MSI-X vector (VIRTIO_MSI_NO_VECTOR): the device then
    has no way to interrupt (no INTx) and the driver must poll.
    A plain class, not a dataclass: importing dataclasses costs ~11 ms of
    `hvctl run` start-up here.
    """
    FIELDS = ("index", "size", "desc", "driver", "device", "notify_fd", "irq_fd", "vector")
    __slots__ = FIELDS

    def __init__(self, index, size, desc, driver, device, notify_fd, irq_fd, vector=0xFFFF):
        self.index, self.size, self.desc, self.driver, self.device = index, size, desc, driver, device
        self.notify_fd, self.irq_fd, self.vector = notify_fd, irq_fd, vector

    def __eq__(self, other):
        return type(other) is QueueConfig and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)

    def __repr__(self):
        return "QueueConfig(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS) + ")"

    def to_wire(self, fds):
        """A plain dict for a message; appends the fds to `fds` and names them by position."""
        d = {f: getattr(self, f) for f in self.FIELDS}
        d["notify_fd"] = len(fds)
        fds.append(self.notify_fd)
        if self.irq_fd is not None:
            d["irq_fd"] = len(fds)
            fds.append(self.irq_fd)
        return d

    @classmethod
    def from_wire(cls, d, fds):
        """Inverse of to_wire, with `fds` as received (SCM_RIGHTS keeps their order); ValueError if malformed."""
        if not isinstance(d, dict) or set(d) != set(cls.FIELDS):
            raise ValueError(f"bad queue config {d!r}")
        for f in cls.FIELDS:
            v = d[f]
            if not (type(v) is int and v >= 0 or f == "irq_fd" and v is None):
                raise ValueError(f"queue config field {f}={v!r} is not a non-negative int")
        for f in ("notify_fd", "irq_fd"):
            if d[f] is not None and d[f] >= len(fds):
                raise ValueError(f"queue config {f} names fd #{d[f]} of {len(fds)} received")
        d = dict(d)
        d["notify_fd"] = fds[d["notify_fd"]]
        if d["irq_fd"] is not None:
            d["irq_fd"] = fds[d["irq_fd"]]
        return cls(**d)


class TransportEvents:
    """What a backend may tell its transport (the worker); all thread-safe, none blocks on the guest."""

    def config_changed(self, config):
        """The device-specific config is now `config` (bytes): cache it, interrupt the driver."""

    def needs_reset(self, reason):
        """The device hit an unrecoverable error: set DEVICE_NEEDS_RESET and interrupt the driver."""


class VirtioBackend:
    """The interface; see the module docstring.  Subclasses set the class attributes."""

    device_type = 0
    features = VIRTIO_F_VERSION_1
    num_queues = 0
    queue_max_sizes = ()
    name = "virtio"

    def __init__(self):
        self.events = TransportEvents()

    def attach(self, events):
        """Called once by the transport: where config changes and fatal errors go."""
        self.events = events

    def config_bytes(self):
        return b""

    def config_write(self, offset, data):
        """A driver write to the device-specific config (already bounds-checked); default: ignored."""

    def activate(self, mem, features, queues):
        """DRIVER_OK: start serving `queues` (list of QueueConfig) over guest memory `mem`.

        `features` is the negotiated set.  Raise QueueConfigError if a queue is
        unusable: the transport then sets DEVICE_NEEDS_RESET.
        """
        raise NotImplementedError

    def reset(self):
        """Stop touching guest memory and the queues; return when done (the transport then shows status 0)."""
        raise NotImplementedError

    def counters(self):
        return {}

    def close(self):
        self.reset()


class ThreadedBackend(VirtioBackend):
    """A backend that serves its queues from one thread: poll() on the notify eventfds.

    Subclasses implement `process(index, queue)`: drain the VirtQueue (pop,
    serve, put) and return; the base class sends the interrupt if
    `needs_interrupt()` says so, returns bad chains (ChainError) with length
    0, and turns QueueFatal into `events.needs_reset`.  A subclass whose host
    side supplies input (console, net) names the queue it fills in
    `host_input_queue` and calls `host_input_arrived()` from any thread: the
    queue is then served without waiting for a guest kick.
    """
    host_input_queue = None

    def __init__(self):
        super().__init__()
        self._host_input_fd = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                               if self.host_input_queue is not None else None)
        self._thread = None
        self._stop_fd = None
        self._queues = []           # [(QueueConfig, VirtQueue)]
        self._lock = threading.Lock()
        self.notifications = 0      # eventfd wake-ups (each may cover several guest kicks)
        self.kicks = 0              # guest notify writes, summed from the eventfd counters
        self.interrupts = 0
        self.chain_errors = 0
        self.fatal_errors = 0

    def make_queue(self, mem, features, qc):
        return VirtQueue(mem, qc.size, qc.desc, qc.driver, qc.device,
                         event_idx=bool(features & VIRTIO_F_RING_EVENT_IDX),
                         indirect=bool(features & VIRTIO_F_RING_INDIRECT_DESC))

    def activate(self, mem, features, queues):
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("activate twice without reset")
            built = []
            try:
                for qc in queues:
                    built.append((qc, self.make_queue(mem, features, qc)))
            except QueueConfigError:
                for _, vq in built:
                    vq.close()
                raise
            self.negotiated = features
            self._queues = built
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-backend", daemon=True)
            self._thread.start()

    def reset(self):
        with self._lock:
            t, self._thread = self._thread, None
            if t is None:
                return
            os.eventfd_write(self._stop_fd, 1)
            if t is not threading.current_thread():
                t.join()
            os.close(self._stop_fd)
            self._stop_fd = None
            for _, vq in self._queues:
                vq.close()
            self._queues = []

    def host_input_arrived(self):
        """Wake the backend thread to serve `host_input_queue` (any thread; a no-op once closed)."""
        fd = self._host_input_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass                      # closed under us: the device is gone

    def host_wakeups(self):
        """{eventfd: queue index}: host-side events that should serve a queue (e.g. console input)."""
        if self._host_input_fd is None:
            return {}
        return {self._host_input_fd: self.host_input_queue}

    def _run(self):
        poller = select.poll()
        by_fd = {}                  # eventfd -> (queue config, queue, counts as a guest kick)
        for qc, vq in self._queues:
            by_fd[qc.notify_fd] = (qc, vq, True)
        for fd, index in self.host_wakeups().items():
            for qc, vq in self._queues:
                if qc.index == index:
                    by_fd[fd] = (qc, vq, False)
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        stop_fd = self._stop_fd
        poller.register(stop_fd, select.POLLIN)
        # The driver may have kicked before DRIVER_OK (or before a service restart): drain once.
        for qc, vq in self._queues:
            self._serve(qc, vq)
        while True:
            for fd, _ in poller.poll():
                if fd == stop_fd:
                    return
                try:
                    count = os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                qc, vq, guest_kick = by_fd[fd]
                if guest_kick:
                    self.kicks += count
                    self.notifications += 1
                self._serve(qc, vq)

    def _serve(self, qc, vq):
        if vq.broken:
            return
        before = vq.used_idx
        try:
            self.process(qc.index, vq)
        except QueueFatal as e:
            self.fatal_errors += 1
            self.events.needs_reset(f"queue {qc.index}: {e}")
            return
        if vq.used_idx != before and vq.needs_interrupt() and qc.irq_fd is not None:
            self.interrupts += 1
            os.eventfd_write(qc.irq_fd, 1)

    def pop(self, vq):
        """vq.pop(), returning malformed chains with length 0 (counted) until a good one or None."""
        while True:
            try:
                return vq.pop()
            except ChainError as e:
                self.chain_errors += 1
                vq.put(e.head, 0)

    def process(self, index, vq):
        raise NotImplementedError

    def counters(self):
        return {"notifications": self.notifications, "kicks": self.kicks, "interrupts": self.interrupts,
                "chain_errors": self.chain_errors, "fatal_errors": self.fatal_errors}

    def close(self):
        self.reset()
        fd, self._host_input_fd = self._host_input_fd, None
        if fd is not None:
            os.close(fd)
