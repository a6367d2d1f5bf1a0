"""RemoteBackend: a VirtioBackend in the worker whose device model runs in a device-service process.

The transport (vcpu_worker/virtio_pci.py) sees an ordinary backend; behind it
each control call becomes a request to `python -m pyhv.devices.service` (see that
module for the process and its messages).  The data path never comes here.

File descriptors
----------------
The eventfds are created HERE, before the service is spawned, because
ZeroMQ cannot carry fds and a restarted service must get the very same ones:
one notify eventfd per queue and one irq eventfd per MSI-X vector
(num_queues + 1, the transport's layout: one per queue plus config).  The
transport takes them through `transport_eventfds()` instead of making its
own (integration patch), registers them with KVM (ioeventfd / irqfd), and an
Activate names them by index.  The service also inherits the guest RAM
memfd and the read end of a lifeline pipe (EOF = this process died: the
service exits, so services never outlive their worker even though they run
in their own session).  Who starts the process is the `launcher`'s business
(devices/virtio/launch.py): the supervisor for supervised guests, this
process for `hvctl run`; either way the same fds are handed over.

Failure and restart
-------------------
A watcher thread polls the service's pidfd and its event socket.  When the
service dies (crash, kill -9, a control call that timed out and got it
killed), `counters()` reports state "failed" with the reason, and, for
models that allow it (rng and blk are both stateless beyond the rings), a
new service is started with the same fds (at most `max_restarts` within
RESTART_WINDOW seconds).  If the device was active, the new service is
activated with `resume=True`: every queue continues from used.idx as found
in guest RAM, so chains the dead service had popped but not completed are
served again.
What the guest sees: requests in flight stall for the restart time (~0.2 s
here, a Python start-up) and then complete normally; a request the old
service had already carried out may be carried out twice, which is harmless
for reads and writes of a raw image (idempotent), and at worst a spurious
interrupt.  No error is reported for a successful restart.  When restarts
are exhausted (or the model is not restartable) the state stays "failed"
and, if the driver had the device running, the transport is told
`needs_reset`: DEVICE_NEEDS_RESET plus a configuration-change interrupt.
Linux does not recover a virtio-blk device from that by itself; its requests
on the dead queue stay pending (the guest sees a hung disk, not corruption).

Control calls time out after `timeout` seconds; a service that does not
answer is killed (SIGKILL) and restarted, which also guarantees that
`reset()` returns only when nothing touches guest memory any more.
"""
import collections
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import zmq

import pyhv
from pyhv.devices import service as S
from pyhv.devices.virtio import launch
from pyhv.devices.virtio.backend import VirtioBackend
from pyhv.devices.virtio.queue import QueueConfigError
from pyhv.proto.errors import ProtocolError

ROOT = pyhv.import_root()
RESTART_WINDOW = 60.0


class RemoteError(RuntimeError):
    """The service refused a request (its one-line Error), died, or did not answer."""


class ServiceRefused(RemoteError):
    """The service answered with an Error (bad request); it keeps running."""


class ServiceGone(RemoteError):
    """The service is dead, died during the request, or did not answer (and was killed)."""


class RemoteBackend(VirtioBackend):
    """A virtio device whose model runs in `python -m pyhv.devices.service --device DEVICE`.

    `mem` is the worker's GuestMemory (its memfd and size are handed to the
    service); `disk` is "PATH[,ro]" for blk; `extra_args` are more service
    options (e.g. --console-sock PATH for console), given to every incarnation.
    """

    def __init__(self, device, mem, disk=None, timeout=5.0, start_timeout=20.0, max_restarts=5,
                 restart_delay=0.0, runtime_dir=None, extra_args=(), launcher=None):
        super().__init__()
        cls = S.model_class(device)
        self.device = device
        self.disk = disk
        self.extra_args = list(extra_args)
        self.launcher = launcher            # None: spawn services as our children (see launch.py)
        self.mem_fd, self.mem_size = mem.fd, mem.size
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.restart_delay = restart_delay
        self.restartable = S.RESTARTABLE.get(device, False)
        nq = cls.num_queues
        self.notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq)]
        self.irq_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq + 1)]
        self._life_r, self._life_w = os.pipe2(os.O_CLOEXEC)
        self._dir = tempfile.mkdtemp(prefix=f"pyhv-{device}-", dir=runtime_dir)
        self._ctx = zmq.Context()
        self._lock = threading.RLock()     # one control exchange / restart at a time
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._proc = self._pidfd = self._ctl = self._evt = None
        self._incarnation = 0
        self._active = None               # (features, [wire queue dicts]) while the driver runs it
        self._paused = False              # the guest is paused: the service holds no queues
        self._restart_times = collections.deque()
        self._closed = False
        self._given_up = False
        self._watcher = None
        self.state = "starting"
        self.reason = ""
        self.failures = self.restarts = 0
        self.control_timeouts = self.config_write_errors = 0
        self.events_received = 0
        self._last_counters = {}
        try:
            self._start()
            d = self._description
        except BaseException:
            if self._proc is not None:
                self._reap()
            self._teardown_fds()
            raise
        if d.num_queues != nq or len(d.queue_max_sizes) != nq:
            self.close()
            raise RemoteError(f"{device} service describes {d.num_queues} queues, expected {nq}")
        self.device_type, self.features, self.num_queues = d.device_type, d.features, d.num_queues
        self.queue_max_sizes = tuple(d.queue_max_sizes)
        self.name = d.name
        self.restartable = self.restartable and d.restartable
        self._config = d.config
        self._watcher = threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True)
        self._watcher.start()

    # -- for the transport (integration patch) ----------------------------------------
    def transport_eventfds(self):
        """(notify fds, one per queue; irq fds, one per MSI-X vector): the transport registers these."""
        return list(self.notify_fds), list(self.irq_fds)

    @property
    def pid(self):
        p = self._proc
        return p.pid if p is not None else None

    # -- process management -------------------------------------------------------------
    def _start(self):
        """Spawn a new incarnation and describe it (lock held or during construction)."""
        self._incarnation += 1
        n = self._incarnation
        ctl_ep = f"ipc://{self._dir}/ctl-{n}.sock"
        evt_ep = f"ipc://{self._dir}/evt-{n}.sock"
        args = ["--device", self.device, "--mem-size", str(self.mem_size), "--mem-fd", str(self.mem_fd),
                "--control", ctl_ep, "--events", evt_ep,
                "--notify-fds", ",".join(map(str, self.notify_fds)),
                "--irq-fds", ",".join(map(str, self.irq_fds)), "--lifeline", str(self._life_r)]
        if self.disk:
            args += ["--disk", self.disk]
        args += self.extra_args
        fds = [self.mem_fd, self._life_r, *self.notify_fds, *self.irq_fds]
        if self.launcher is None:
            env = dict(os.environ)
            env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            proc = launch.local(args, fds, cwd=str(ROOT), env=env)
            self._pidfd = os.pidfd_open(proc.pid)
        else:
            proc = self.launcher(args, fds)          # LaunchError (an OSError) if refused
            self._pidfd = proc.pidfd
        self._proc = proc
        self._ctl = self._socket(zmq.PAIR, ctl_ep)
        self._evt = self._socket(zmq.PULL, evt_ep)
        self._description = self._call(S.Describe(), S.Description, timeout=self.start_timeout)
        self.state = "running"

    def _socket(self, kind, endpoint):
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, S.MAX_CONTROL_BYTES)
        s.bind(endpoint)                  # the service connects (see devices/service.py)
        return s

    def _reap(self):
        """The incarnation is dead (or must be): kill, wait, close its sockets; the reason."""
        proc = self._proc
        if proc is None:
            return "not running"
        if proc.poll() is None:
            self._signal_kill()
        rc = proc.wait()
        for s in (self._ctl, self._evt):
            if s is not None:
                s.close()
        os.close(self._pidfd)
        self._proc = self._pidfd = self._ctl = self._evt = None
        if rc == launch.ForeignProcess.EXITED:
            return f"service pid {proc.pid} ended (its exit status is in the supervisor's log)"
        if rc < 0:
            try:
                return f"service pid {proc.pid} killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"service pid {proc.pid} killed by signal {-rc}"
        return f"service pid {proc.pid} exited with status {rc}"

    def _call(self, msg, expect, timeout=None):
        """One request/reply (lock held).  RemoteError on an Error reply, death or timeout."""
        with self._lock:
            ctl, pidfd = self._ctl, self._pidfd
            if ctl is None:
                raise ServiceGone(f"{self.device} service is not running ({self.reason or self.state})")
            ctl.send(S.encode(msg))
            poller = zmq.Poller()
            poller.register(ctl, zmq.POLLIN)
            poller.register(pidfd, zmq.POLLIN)
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while True:
                left = deadline - time.monotonic()
                ready = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
                if ctl in ready:
                    break
                if pidfd in ready:
                    raise ServiceGone(f"{self.device} service died during {msg.TYPE}")
                if left <= 0:
                    self.control_timeouts += 1
                    self._kill(f"no reply to {msg.TYPE} within {self.timeout:g} s")
                    raise ServiceGone(f"{self.device} service did not answer {msg.TYPE}")
            try:
                reply = S.decode(ctl.recv(), expect=(expect, S.Error))
            except ProtocolError as e:
                self._kill(f"bad reply to {msg.TYPE}: {e}")
                raise ServiceGone(f"{self.device} service sent a bad reply: {e}") from None
            if isinstance(reply, S.Error):
                raise ServiceRefused(f"{self.device} service: {reply.message}")
            return reply

    def _kill(self, reason):
        """Make the current incarnation die now; the watcher notices through its pidfd."""
        self.reason = reason
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._signal_kill()

    def _signal_kill(self):
        """SIGKILL through the pidfd: right even for a service the supervisor is the parent of."""
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass

    def _watch(self):
        while True:
            with self._lock:
                evt, pidfd = self._evt, self._pidfd
            poller = zmq.Poller()
            poller.register(self._stop_fd, zmq.POLLIN)
            if evt is not None:
                poller.register(evt, zmq.POLLIN)
                poller.register(pidfd, zmq.POLLIN)
            ready = dict(poller.poll(None if evt is not None else 1000))
            if self._stop_fd in ready:
                return
            if evt is not None and evt in ready:
                self._drain_events(evt)
            if evt is not None and pidfd in ready:
                self._drain_events(evt)
                self._service_died()

    def _drain_events(self, evt):
        while True:
            with self._lock:
                if evt is not self._evt:
                    return
                try:
                    data = evt.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
            try:                         # the transport's lock may be held by a caller of ours:
                msg = S.decode(data, expect=(S.ConfigChanged, S.NeedsReset))   # so not under _lock
            except ProtocolError:
                continue
            self.events_received += 1
            if isinstance(msg, S.ConfigChanged):
                self._config = msg.config
                self.events.config_changed(msg.config)
            else:
                self.events.needs_reset(msg.reason)

    def _service_died(self):
        give_up = None
        with self._lock:
            if self._closed:
                return
            why = self._reap()
            if self.reason.startswith(("no reply", "bad reply")):
                why = f"{self.reason} ({why})"
            self.reason = why
            self.failures += 1
            self.state = "failed"
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW:
                self._restart_times.popleft()
            if not self.restartable or len(self._restart_times) >= self.max_restarts:
                give_up = f"{self.name}: {why}; not restarted"
            else:
                self._restart_times.append(now)
        if give_up is None:
            if self.restart_delay:
                time.sleep(self.restart_delay)
            with self._lock:
                if self._closed:
                    return
                try:
                    self._start()
                    self.restarts += 1
                    if self._active is not None and not self._paused:
                        features, queues = self._active
                        self._call(S.Activate(features=features, queues=queues, resume=True), S.Ok)
                    return
                except (RemoteError, OSError) as e:
                    # the new one failed at once: the watcher sees its pidfd, or we kill it now
                    self.reason = f"restart failed: {e}"
                    if self._proc is not None:
                        self._kill(self.reason)
                        return
                    self.state = "failed"
                    give_up = f"{self.name}: {self.reason}"
        with self._lock:
            self.reason = give_up
            self._given_up = True
            active, self._active = self._active, None
        if active is not None:
            self.events.needs_reset(give_up)

    # -- VirtioBackend --------------------------------------------------------------------
    def config_bytes(self):
        return self._config

    def config_write(self, offset, data):
        try:
            self._call(S.ConfigWrite(offset=offset, data=bytes(data)), S.Ok)
        except RemoteError:
            self.config_write_errors += 1

    def activate(self, mem, features, queues):
        wire = []
        for qc in queues:
            if qc.notify_fd not in self.notify_fds or (qc.irq_fd is not None and qc.irq_fd not in self.irq_fds):
                raise QueueConfigError(f"queue {qc.index}: the transport did not use the backend's eventfds")
            wire.append(S.WireQueue(index=qc.index, size=qc.size, desc=qc.desc, driver=qc.driver,
                                    device=qc.device, notify_fd=self.notify_fds.index(qc.notify_fd),
                                    irq_fd=None if qc.irq_fd is None else self.irq_fds.index(qc.irq_fd),
                                    vector=qc.vector))
        with self._lock:
            if self._given_up:
                raise QueueConfigError(f"{self.name} has failed: {self.reason}")
            try:
                self._call(S.Activate(features=features, queues=wire), S.Ok)
            except ServiceRefused as e:
                raise QueueConfigError(str(e)) from None     # the service refused the queues
            except ServiceGone:
                pass    # dead or restarting: the restart activates it (from used.idx)
            self._active = (features, wire)

    def pause(self):
        """Stop the service's data path (it finishes the requests it holds) until resume().

        The service forgets the queues (a Reset); resume() activates them again
        from used.idx, which is exact because nothing is in flight then.  The
        transport's state is untouched: the driver sees nothing but a delay.
        """
        with self._lock:
            if self._paused:
                return
            self._paused = True
            if self._active is None or self._ctl is None:
                return
            try:
                self._call(S.Reset(), S.Ok)
            except RemoteError:
                self._kill(f"pause failed: {self.reason or 'no reply'}")

    def resume(self):
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            if self._active is None or self._ctl is None:
                return
            features, queues = self._active
            try:
                self._call(S.Activate(features=features, queues=queues, resume=True), S.Ok)
            except RemoteError:
                self._kill(f"resume failed: {self.reason or 'no reply'}")   # the restart activates it

    @property
    def paused(self):
        return self._paused

    def reset(self):
        with self._lock:
            self._active = None
            if self._ctl is None:
                return                    # dead: nothing touches guest memory
            try:
                self._call(S.Reset(), S.Ok)
            except RemoteError:
                self._kill(f"reset failed: {self.reason or 'no reply'}")
                proc = self._proc
                if proc is not None:
                    proc.wait()           # dead for sure before we return; the watcher restarts it

    def counters(self):
        c = {"state": self.state, "pid": self.pid, "restarts": self.restarts, "failures": self.failures,
             "paused": self._paused,
             "control_timeouts": self.control_timeouts}
        if self.reason:
            c["reason"] = self.reason
        if self.state == "running" and self._lock.acquire(timeout=self.timeout):
            try:
                self._last_counters = self._call(S.GetCounters(), S.Counters, timeout=min(self.timeout, 2.0)).counters
            except RemoteError:
                pass
            finally:
                self._lock.release()
        c.update({k: v for k, v in self._last_counters.items() if k not in c})
        return c

    def close(self):
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._active = None
            if self._ctl is not None:
                try:                      # the last counters stay readable after close
                    self._last_counters = self._call(S.GetCounters(), S.Counters,
                                                     timeout=min(self.timeout, 2.0)).counters
                    self._call(S.Shutdown(), S.Ok, timeout=min(self.timeout, 2.0))
                    self._proc.wait(timeout=2.0)
                except (RemoteError, subprocess.TimeoutExpired):
                    pass
        # The watcher polls the event socket and pidfd that _reap closes: stop it first.
        os.eventfd_write(self._stop_fd, 1)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        with self._lock:
            self._reap()
            self.state = "stopped"
        self._teardown_fds()

    def _teardown_fds(self):
        for fd in (*self.notify_fds, *self.irq_fds, self._life_r, self._life_w, self._stop_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.notify_fds, self.irq_fds = [], []
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
