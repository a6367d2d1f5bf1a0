"""ThreadedBackend: a virtio model that serves its queues from one thread, an EventLoop on the notify eventfds.

Subclasses implement `process(index, queue)`: drain the VirtQueue (pop,
serve, put) and return; the base class sends the interrupt when
`needs_interrupt()` says so, returns bad chains (ChainError) with length 0,
and turns QueueFatal into `events.needs_reset`.  A model whose host side
supplies input (console, net) names the queue it fills in
`host_input_queue` and calls `host_input_arrived()` from any thread: that
queue is then served without waiting for a guest kick.  Model-specific state
goes through `model_state()` / `restore_model_state(state)`.

Pause parks the loop (after the callback it is in), so a paused model
touches no guest memory and its queues keep their positions; snapshot reads
those positions; restore rebuilds the queues from them.  After activate,
resume and restore every queue is served once: the driver may have kicked
while nobody listened (before DRIVER_OK, or while a dead service was being
replaced).
"""
import os
import threading

from pyhv.devices.loop import EventLoop
from pyhv.devices.virtio.device import VirtioDevice
from pyhv.devices.virtio.queue import ChainError, QueueConfigError, QueueFatal, VirtQueue
from pyhv.proto.device_service import DeviceState


class ThreadedBackend(VirtioDevice):
    host_input_queue = None

    def __init__(self):
        super().__init__()
        self._host_input_fd = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                               if self.host_input_queue is not None else None)
        self._loop = None
        self._thread = None
        self._queues = []           # [(QueueConfig, VirtQueue)]
        self._lock = threading.Lock()
        self.negotiated = 0
        self.notifications = 0      # eventfd wake-ups (each may cover several guest kicks)
        self.kicks = 0              # guest notify writes, summed from the eventfd counters
        self.interrupts = 0
        self.chain_errors = 0
        self.fatal_errors = 0

    # -- lifecycle ------------------------------------------------------------------------
    def activate(self, mem, features, queues):
        self._start(features, [(qc, lambda qc=qc: VirtQueue.from_config(mem, qc, features)) for qc in queues])

    def restore(self, mem, state, paused=False):
        self.restore_model_state(state.model)
        self._start(state.features, [(qs.config, lambda qs=qs: VirtQueue.restore(mem, qs, state.features))
                                     for qs in state.queues], paused)

    def _start(self, features, makers, paused=False):
        with self._lock:
            if self._loop is not None:
                raise QueueConfigError("activate twice without reset")
            built = []
            try:
                for qc, make in makers:
                    built.append((qc, make()))
            except QueueConfigError:
                for _, vq in built:
                    vq.close()
                raise
            self.negotiated = features
            self._queues = built
            loop = self._loop = EventLoop(f"{self.name}-queues")
            for qc, vq in built:
                loop.add(self.eventfds.notify_fd(qc.index), lambda qc=qc, vq=vq: self._kicked(qc, vq))
            if self._host_input_fd is not None:
                for qc, vq in built:
                    if qc.index == self.host_input_queue:
                        loop.add(self._host_input_fd, lambda qc=qc, vq=vq: self._host_input(qc, vq))
            if paused:
                loop.pause()
            else:
                loop.call_soon(self._serve_all)
            self._thread = loop.start()

    def _serve_all(self):
        for qc, vq in self._queues:
            self._serve(qc, vq)

    def pause(self):
        with self._lock:
            if self._loop is not None:
                self._loop.pause()

    def resume(self):
        with self._lock:
            if self._loop is not None and self._loop.paused:
                self._loop.call_soon(self._serve_all)
                self._loop.resume()

    @property
    def paused(self):
        return self._loop is not None and self._loop.paused

    def snapshot(self):
        with self._lock:
            if self._loop is None:
                return None
            if not self._loop.paused:
                raise QueueConfigError(f"{self.name}: snapshot of a running device (pause it first)")
            return DeviceState(features=self.negotiated, queues=[vq.state(qc) for qc, vq in self._queues],
                               model=self.model_state())

    def reset(self):
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None:
                return
            loop.stop()
            if self._thread is not threading.current_thread():
                self._thread.join()
            loop.close()
            for _, vq in self._queues:
                vq.close()
            self._queues = []

    def model_state(self):
        """The model's own state beyond its queues (plain values); none by default."""
        return {}

    def restore_model_state(self, state):
        """Take what model_state() returned."""

    # -- the loop's thread ----------------------------------------------------------------
    def _kicked(self, qc, vq):
        try:
            count = os.eventfd_read(self.eventfds.notify_fd(qc.index))
        except BlockingIOError:
            return
        self.kicks += count
        self.notifications += 1
        self._serve(qc, vq)

    def _host_input(self, qc, vq):
        try:
            os.eventfd_read(self._host_input_fd)
        except BlockingIOError:
            return
        self._serve(qc, vq)

    def host_input_arrived(self):
        """Wake the loop to serve `host_input_queue` (any thread; a no-op once closed)."""
        fd = self._host_input_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass                      # closed under us: the device is gone

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
        except Exception as e:      # a model bug: this queue stops and the driver is told, the thread lives on
            self.fatal_errors += 1
            vq.broken = True
            self.events.needs_reset(f"queue {qc.index}: {type(e).__name__}: {e}")
            return
        if vq.used_idx != before and vq.needs_interrupt():
            fd = self.eventfds.irq_fd(qc.vector)
            if fd is not None:
                self.interrupts += 1
                os.eventfd_write(fd, 1)

    def pop(self, vq):
        """vq.pop(), returning malformed chains with length 0 (counted) until a good one or None."""
        while True:
            try:
                return vq.pop()
            except ChainError as e:
                self.chain_errors += 1
                vq.put(e.head, 0)

    def process(self, index, vq):
        raise NotImplementedError(f"{type(self).__name__} must implement process()")

    def counters(self):
        return {"notifications": self.notifications, "kicks": self.kicks, "interrupts": self.interrupts,
                "chain_errors": self.chain_errors, "fatal_errors": self.fatal_errors}

    def close(self):
        self.reset()
        fd, self._host_input_fd = self._host_input_fd, None
        if fd is not None:
            os.close(fd)
