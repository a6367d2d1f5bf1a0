"""ServiceProxy: the worker's VirtioDevice for a model that runs in a device-service process (devices/virtio/service.py).

The transport sees an ordinary device; behind it each lifecycle call becomes
a request on the service's control socket (proto/device_service.py).  The
data path never comes here.  Who starts the process is the `launcher`'s
business (vcpu_worker/launchers.py: the supervisor for supervised guests,
the worker itself for `hvctl run`); this module starts nothing.

A launcher has `endpoints(device, incarnation)` -> (control, events) for the
proxy to bind, and `start(device, incarnation, fds)` -> a process handle
(`pid`, `pidfd`, `poll()`, `wait(timeout)`, `kill()`, `describe_exit()`,
`close()`).

File descriptors
----------------
The eventfds (one Eventfds per device, made by the device manager) exist
before the service does, because ZeroMQ cannot carry fds and a restarted
service must get the very same ones; the service also gets the guest RAM
memfd and the read end of a lifeline pipe (EOF = this process died: the
service exits, so services never outlive their worker).

Failure and restart
-------------------
A watcher thread (an EventLoop) polls the service's pidfd and its event
socket.  When the service dies (crash, kill -9, a call that timed out and got
it killed), `status()` says "failed" with the reason, and for kinds that
allow it a new incarnation is started with the same fds (at most
`max_restarts` within RESTART_WINDOW seconds).  If the driver had the device
running, the new service is given a DeviceState whose queues continue from
used.idx as found in guest RAM (paused, if the guest is): chains the dead
service had popped but not completed are served again, which is harmless for
reads and writes of a raw image (idempotent) and at worst a spurious
interrupt.  When restarts are exhausted (or the kind is not restartable) the
state stays "failed" and, if the driver had the device running, the
transport is told `needs_reset` (DEVICE_NEEDS_RESET plus a config-change
interrupt).  Control calls time out after `timeout` seconds; a service that
does not answer is killed, so `reset()` returns only when nothing touches
guest memory any more.  A launcher that raises LauncherAbsent (no supervisor
right now: it was killed or is being upgraded) is asked again every
LAUNCHER_RETRY seconds, for as long as it takes, without using up restarts:
the device is "failed" meanwhile, and continues once a supervisor is back.
"""
import os
import threading
import time

import zmq

from pyhv.devices.loop import EventLoop
from pyhv.devices.restarts import RestartPolicy
from pyhv.devices.virtio.device import VirtioDevice
from pyhv.devices.virtio.queue import QueueConfigError
from pyhv.proto import codec, device_service as ds
from pyhv.proto.errors import HvError, PeerFailed, ProtocolError, from_wire
from pyhv.proto.messages import Error, Ok

RESTART_WINDOW = 60.0
LAUNCHER_RETRY = 0.5                # seconds between asks while nobody can start a service (no supervisor)
REAP_WAIT = 5.0                     # a dead service the supervisor has not reaped yet (it does every 50 ms; a
                                    # debugger attached to the service delays it): wait this long for its status
UNIX_PATH_MAX = 107                 # sun_path minus its NUL


class LauncherAbsent(PeerFailed):
    """Nobody can start a service right now (the supervisor is being restarted): ask again later."""


class ServiceRefused(HvError):
    """The service answered with an Error (a bad request); it keeps running."""


class ServiceGone(PeerFailed):
    """The service is dead, died during the request, or did not answer (and was killed)."""


class ServiceProxy(VirtioDevice):
    def __init__(self, kind, name, mem, eventfds, launcher, timeout=5.0, start_timeout=20.0, max_restarts=5,
                 restart_delay=0.0):
        super().__init__()
        self.kind = kind                    # a devices.virtio.kinds.Kind
        self.device = name
        self.mem = mem
        self.eventfds = eventfds
        self.launcher = launcher
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.restart_delay = restart_delay
        self._restarts = RestartPolicy(limit=max_restarts, window=RESTART_WINDOW)
        self.restartable = kind.restartable
        self._life_r, self._life_w = os.pipe2(os.O_CLOEXEC)
        self._ctx = zmq.Context()
        self._lock = threading.RLock()     # one control exchange / restart at a time
        self._proc = self._ctl = self._evt = None
        self._incarnation = 0
        self._active = None                # (features, [QueueConfig]) while the driver runs it
        self._paused = False
        self._closed = False
        self._given_up = False
        self.state = "starting"
        self.reason = ""
        self.failures = self.restarts = 0
        self.control_timeouts = self.config_write_errors = 0
        self.events_received = 0
        self._last_counters = {}
        self._loop = EventLoop(f"{name}-watch")
        try:
            self._start()
            d = self._description
            nq = len(eventfds.notify)
            if d.num_queues != nq or len(d.queue_max_sizes) != nq:
                raise ServiceGone(f"{name} service describes {d.num_queues} queues, expected {nq}")
        except BaseException:
            if self._proc is not None:
                with self._lock:
                    self._reap()
            self._teardown()
            raise
        self.device_type, self.features, self.num_queues = d.device_type, d.features, d.num_queues
        self.queue_max_sizes = tuple(d.queue_max_sizes)
        self.name = d.name
        self._config = d.config
        self._watch_incarnation()
        self._watcher = self._loop.start()

    @property
    def pid(self):
        p = self._proc
        return p.pid if p is not None else None

    # -- process management (lock held) ----------------------------------------------------
    def _start(self):
        """Spawn a new incarnation and describe it."""
        self._incarnation += 1
        n = self._incarnation
        ctl_ep, evt_ep = self.launcher.endpoints(self.device, n)
        self._ctl = self._socket(zmq.PAIR, ctl_ep)
        self._evt = self._socket(zmq.PULL, evt_ep)
        fds = ds.ServiceFds(self.mem.fd, self._life_r, self.eventfds.notify, self.eventfds.irq)
        try:
            self._proc = self.launcher.start(self.device, n, fds)      # an HvError or OSError if refused
        except BaseException as e:
            self._ctl.close()
            self._evt.close()
            self._ctl = self._evt = None
            if isinstance(e, LauncherAbsent):
                self._incarnation -= 1          # nothing was started: the next ask reuses its endpoints
            raise
        self._description = self._call(ds.Describe(), ds.Description, timeout=self.start_timeout)
        self.state = "running"

    def _socket(self, kind, endpoint):
        if endpoint.startswith("ipc://") and len(endpoint) - len("ipc://") > UNIX_PATH_MAX:
            raise ServiceGone(f"{self.device}: socket path {endpoint[6:]} is longer than a unix socket allows "
                              f"({UNIX_PATH_MAX}): use a shorter runtime dir")
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, ds.MAX_CONTROL_BYTES)
        s.bind(endpoint)                  # the service connects
        return s

    def _watch_incarnation(self):
        """Point the watcher at the current incarnation's pidfd and event socket (its own thread, or before start)."""
        proc, evt = self._proc, self._evt
        if proc is not None:
            self._loop.add(proc.pidfd, lambda: self._service_died(proc))
            self._loop.add_socket(evt, lambda: self._events(evt))

    def _unwatch(self, proc, evt):
        if proc is not None:
            self._loop.remove(proc.pidfd)
        if evt is not None:
            self._loop.remove(evt)

    def _reap(self, describe=False):
        """The incarnation is dead (or must be): kill, wait, close its sockets; how it ended (if `describe`:
        that may wait for its parent to reap it)."""
        proc = self._proc
        if proc is None:
            return "not running"
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        how = proc.describe_exit() if describe else None     # before close(): it may ask the pidfd
        proc.close()
        for s in (self._ctl, self._evt):
            if s is not None:
                s.close()
        self._proc = self._ctl = self._evt = None
        return how

    def _call(self, msg, expect, timeout=None):
        """One request/reply.  ServiceRefused on an Error reply, ServiceGone on death or timeout."""
        with self._lock:
            ctl, proc = self._ctl, self._proc
            if ctl is None:
                raise ServiceGone(f"{self.device} service is not running ({self.reason or self.state})")
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            data = codec.encode(msg, ds.SERVICE)
            # A PAIR socket with no peer (a service that died, or never connected) blocks a send for good:
            # wait for room, or the service's death, or the deadline, as for the reply.
            while True:
                try:
                    ctl.send(data, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self._wait_for(ctl, zmq.POLLOUT, proc, deadline, f"died before it took {msg.TYPE}",
                                   f"did not take {msg.TYPE} within {self.timeout:g} s (not connected)",
                                   f"did not take {msg.TYPE}")
            self._wait_for(ctl, zmq.POLLIN, proc, deadline, f"died during {msg.TYPE}",
                           f"no reply to {msg.TYPE} within {self.timeout:g} s", f"did not answer {msg.TYPE}")
            try:
                reply = codec.decode(ctl.recv(), ds.SERVICE, expect=(expect, Error), max_bytes=ds.MAX_CONTROL_BYTES)
            except ProtocolError as e:
                self._kill(f"bad reply to {msg.TYPE}: {e}")
                raise ServiceGone(f"{self.device} service sent a bad reply: {e}") from None
            if isinstance(reply, Error):
                raise ServiceRefused(f"{self.device} service: {from_wire(reply.kind, reply.message)}")
            return reply

    def _wait_for(self, ctl, event, proc, deadline, died, late, gave_up):
        """Until `ctl` is ready for `event` (lock held); ServiceGone if the service dies first (`died`) or the
        deadline passes (it is killed: `late` is the reason kept, `gave_up` the error)."""
        poller = zmq.Poller()
        poller.register(ctl, event)
        poller.register(proc.pidfd, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
            if ready.get(ctl, 0) & event:
                return
            if proc.pidfd in ready:
                raise ServiceGone(f"{self.device} service {died}")
            if left <= 0:
                self.control_timeouts += 1
                self._kill(late)
                raise ServiceGone(f"{self.device} service {gave_up}")

    def _kill(self, reason):
        """Make the current incarnation die now; the watcher notices through its pidfd."""
        self.reason = reason
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    # -- the watcher's thread ----------------------------------------------------------------
    def _events(self, evt):
        """Every event the service has sent (its own thread only: _reap, which closes `evt`, runs there too)."""
        while evt is self._evt:
            try:
                data = evt.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:                     # the transport's lock may be held by a caller of ours: so not under _lock
                msg = codec.decode(data, ds.SERVICE, expect=ds.EVENTS, max_bytes=ds.MAX_CONTROL_BYTES)
            except ProtocolError:
                continue
            self.events_received += 1
            if isinstance(msg, ds.ConfigChanged):
                self._config = msg.config
                self.events.config_changed(msg.config)
            else:
                self.events.needs_reset(msg.reason)

    def _service_died(self, proc):
        if self._closed or proc is not self._proc:
            return
        evt = self._evt
        self._events(evt)                    # the events it sent before dying still count
        reaped = getattr(proc, "reaped_status", None)
        if reaped is not None and proc.poll() is not None:
            reaped(REAP_WAIT)                # how it ended (e.g. SIGSYS), known before the lock is taken
        give_up = None
        with self._lock:
            if self._closed or proc is not self._proc:
                return
            self._unwatch(proc, evt)
            why = self._reap(describe=True)
            if self.reason.startswith(("no reply", "bad reply")):
                why = f"{self.reason} ({why})"
            self.reason = why
            self.failures += 1
            self.state = "failed"
            if not self.restartable or self._restarts.exhausted():
                give_up = f"{self.name}: {why}; not restarted"
            else:
                self._restarts.record()
        if give_up is None:
            if self.restart_delay:
                time.sleep(self.restart_delay)
            self._restart()
            return
        self._give_up(give_up)

    def _restart(self):
        """Start the next incarnation and give it the running device's state (the watcher's thread)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._start()
                self.restarts += 1
                if self._active is not None:
                    self._call(ds.Restore(state=self._resume_state(), paused=self._paused), Ok)
                self._watch_incarnation()
                return
            except LauncherAbsent as e:
                self.state, self.reason = "failed", f"waiting to be restarted: {e}"
                self._loop.call_at(time.monotonic() + LAUNCHER_RETRY, self._restart)
                return
            except (HvError, OSError) as e:
                self.reason = f"restart failed: {e}"
                if self._proc is not None:       # the new one failed at once: the watcher sees it die
                    self._watch_incarnation()
                    self._kill(self.reason)
                    return
                self.state = "failed"
        self._give_up(f"{self.name}: {self.reason}")

    def _give_up(self, give_up):
        with self._lock:
            self.reason = give_up
            self._given_up = True
            active, self._active = self._active, None
        if active is not None:
            self.events.needs_reset(give_up)

    def _resume_state(self):
        """The running device's state for a new incarnation: every queue from used.idx as found in guest RAM."""
        features, queues = self._active
        states = []
        for qc in queues:
            used = self.mem.read_u16(qc.device + 2) if self.mem.contains(qc.device, 4) else 0
            states.append(ds.QueueState(config=qc, last_avail_idx=used, used_idx=used))
        return ds.DeviceState(features=features, queues=states)

    # -- VirtioDevice -------------------------------------------------------------------------
    def config_bytes(self):
        return self._config

    def config_write(self, offset, data):
        try:
            self._call(ds.ConfigWrite(offset=offset, data=bytes(data)), Ok)
        except HvError:
            self.config_write_errors += 1

    def activate(self, mem, features, queues):
        with self._lock:
            if self._given_up:
                raise QueueConfigError(f"{self.name} has failed: {self.reason}")
            try:
                self._call(ds.Activate(features=features, queues=list(queues)), Ok)
            except ServiceRefused as e:
                raise QueueConfigError(str(e)) from None     # the service refused the queues
            except ServiceGone:
                pass    # dead or restarting: the restart restores it (from used.idx)
            self._active = (features, list(queues))

    def _lifecycle(self, msg, what):
        try:
            self._call(msg, Ok)
        except HvError:
            self._kill(f"{what} failed: {self.reason or 'no reply'}")   # the restart puts it right

    def pause(self):
        """Stop the service's data path (it finishes the requests it holds) until resume()."""
        with self._lock:
            if self._paused:
                return
            self._paused = True
            if self._active is not None and self._ctl is not None:
                self._lifecycle(ds.PauseDevice(), "pause")

    def resume(self):
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            if self._active is not None and self._ctl is not None:
                self._lifecycle(ds.ResumeDevice(), "resume")

    @property
    def paused(self):
        return self._paused

    def snapshot(self):
        return self._call(ds.Snapshot(), ds.StateReply).state

    def restore(self, mem, state, paused=False):
        with self._lock:
            self._call(ds.Restore(state=state, paused=paused), Ok)
            self._active = (state.features, [q.config for q in state.queues])
            self._paused = paused

    def reset(self):
        with self._lock:
            self._active = None
            if self._ctl is None:
                return                    # dead: nothing touches guest memory
            try:
                self._call(ds.Reset(), Ok)
            except HvError:
                self._kill(f"reset failed: {self.reason or 'no reply'}")
                if self._proc is not None:
                    self._proc.wait()     # dead for sure before we return; the watcher restarts it

    def status(self):
        return ds.DeviceHealth(state=self.state, pid=self.pid, restarts=self.restarts, reason=self.reason,
                               paused=self._paused)

    def counters(self):
        c = {"state": self.state, "pid": self.pid, "restarts": self.restarts, "failures": self.failures,
             "paused": self._paused, "control_timeouts": self.control_timeouts}
        if self.reason:
            c["reason"] = self.reason
        if self.state == "running" and self._lock.acquire(timeout=self.timeout):
            try:
                self._last_counters = self._call(ds.GetCounters(), ds.Counters,
                                                 timeout=min(self.timeout, 2.0)).counters
            except HvError:
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
                    self._last_counters = self._call(ds.GetCounters(), ds.Counters,
                                                     timeout=min(self.timeout, 2.0)).counters
                    self._call(ds.Shutdown(), Ok, timeout=min(self.timeout, 2.0))
                    self._proc.wait(timeout=2.0)
                except (HvError, TimeoutError):
                    pass
        # The watcher polls the event socket and pidfd that _reap closes: stop it first.
        self._loop.stop()
        if self._watcher is not threading.current_thread():
            self._watcher.join(5)
        with self._lock:
            self._reap()
            self.state = "stopped"
        self._teardown()

    def _teardown(self):
        for fd in (self._life_r, self._life_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._loop.close()
        self._ctx.term()
