"""The supervisor: a ZeroMQ ROUTER loop on ipc://RUNTIME_DIR/control.sock that runs guests.

One thread.  Each turn of the loop answers the requests that arrived, takes
the zygote's answers (a Start is answered once its worker exists, so a
burst of Starts is served while the zygote forks) and polls the workers
(waitpid by pid: they are our children, forked by the zygote or spawned
directly, see spawn.py) so a worker's exit is noticed within TICK seconds.
Requests are validated on receipt; bad input gets an Error reply and never
stops the loop.  `wait` and `stop` replies are deferred until the guest
ends; any request other than Create, Start and Ping first waits for the
starts in flight, so it sees every earlier Start done.  Pause/resume/stop/stats are forwarded to the guest's
worker with a timeout.
"""
import fcntl
import os
import signal
import sys
import time
import traceback

import zmq

from pyhv.proto import codec, errors, messages as m
from pyhv.proto.client import Client
from pyhv.proto.errors import NotResponding, ProtocolError, RequestFailed
from pyhv.supervisor import spawn
from pyhv.supervisor.config import ConfigError, parse_net, validate
from pyhv.supervisor.registry import UNIX_PATH_MAX, Registry
from pyhv.supervisor.services import ServiceLauncher
from pyhv.supervisor.switches import Switches

TICK = 0.05             # seconds between worker polls
WORKER_TIMEOUT = 2.0    # a worker that does not answer a request within this is "not responding"
STOP_GRACE = 3.0        # seconds a worker gets to exit after Stop before SIGKILL
SWITCH_WATCH = 0.5      # seconds between checks of the net switch processes


class AlreadyRunning(RuntimeError):
    """Another supervisor holds this runtime dir."""


class Server:
    def __init__(self, runtime_dir):
        self.dir = os.path.abspath(runtime_dir)
        self.sock_path = os.path.join(self.dir, "control.sock")
        if len(self.sock_path) > UNIX_PATH_MAX:
            raise ConfigError(f"runtime dir path is too long for unix sockets: {self.dir}")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = self._take_lock()
        self.registry = Registry(self.dir)
        self.ctx = zmq.Context()
        self.spawner = spawn.Spawner()
        self.switches = Switches(self.dir)
        self._next_switch_watch = 0.0
        self.running = True
        self.handlers = {m.Ping: self.ping, m.Create: self.create, m.Start: self.start,
                         m.Stop: self.stop, m.Pause: self.pause, m.Resume: self.resume,
                         m.Destroy: self.destroy, m.List: self.list, m.Info: self.info,
                         m.Wait: self.wait, m.Stats: self.stats}

    def _take_lock(self):
        """One supervisor per runtime dir: an flock held for our lifetime (pid inside)."""
        fd = os.open(os.path.join(self.dir, "supervisor.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"a supervisor (pid {pid}) is already running on {self.dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    # --- the loop ----------------------------------------------------------

    def serve(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "running", False))
        try:
            os.unlink(self.sock_path)     # stale: the lock says nobody serves it
        except FileNotFoundError:
            pass
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("ipc://" + self.sock_path)
        self.services = ServiceLauncher(self.dir, self.registry)
        self.spawner.start()             # the zygote warms up while we already serve
        print(f"supervisor: pid {os.getpid()} serving ipc://{self.sock_path}", file=sys.stderr, flush=True)
        try:
            while self.running:
                items = [(self.sock, zmq.POLLIN), (self.services.fileno(), zmq.POLLIN)]
                zfd = self.spawner.fileno()
                if zfd is not None:
                    items.append((zfd, zmq.POLLIN))
                ready = zmq.zmq_poll(items, int(TICK * 1000))
                if any(s is self.sock for s, _ in ready):
                    while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self._on_frames(self.sock.recv_multipart())
                if zfd is not None and any(s == zfd for s, _ in ready):
                    self.spawner.collect()
                if any(s == self.services.fileno() for s, _ in ready):
                    self.services.serve()
                self._watch()
        finally:
            self._shutdown()

    def _on_frames(self, frames):
        envelope, body = frames[:1], frames[1:]
        if body and body[0] == b"":
            envelope, body = envelope + [b""], body[1:]
        try:
            if len(body) != 1:
                raise ProtocolError(f"expected one message frame, got {len(body)}")
            msg = codec.decode(body[0])
            handler = self.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(f"{msg.TYPE} is not a request")
            if type(msg) not in (m.Create, m.Start, m.Ping):
                self.spawner.drain()
            reply = handler(msg, envelope)
        except ProtocolError as e:
            reply = m.Error(errors.PROTOCOL, str(e))
        except RequestFailed as e:
            reply = m.Error(e.kind, str(e))
        except Exception as e:
            traceback.print_exc()
            reply = m.Error(errors.INTERNAL, f"supervisor error: {type(e).__name__}: {e}")
        if reply is not None:          # None: deferred (wait/stop)
            self._reply(envelope, reply)

    def _reply(self, envelope, msg):
        try:
            self.sock.send_multipart(envelope + [codec.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass                        # the client went away: nothing to tell

    def _watch(self):
        """Notice worker exits; SIGKILL workers that outlived their stop grace."""
        now = time.monotonic()
        for g in self.registry:
            if g.proc is None:
                continue
            rc = g.proc.poll()
            if rc is not None:
                self._finished(g, rc)
            elif g.kill_at is not None and now >= g.kill_at:
                g.proc.kill()
                g.kill_at = None
        self.spawner.watch()
        self.services.watch()
        if now >= self._next_switch_watch:       # restart dead switches that running guests use
            self._next_switch_watch = now + SWITCH_WATCH
            self.switches.watch({s for g in self.registry if g.proc is not None for s in _switch_names(g.config)})

    def _finished(self, g, returncode):
        g.set_state(*spawn.read_outcome(g, returncode))
        g.proc, g.kill_at, g.stop_reason = None, None, None
        self.services.guest_ended(g.name)
        spawn.release_memory(g)
        info = g.info()
        for envelope in g.waiters:
            self._reply(envelope, info)
        g.waiters.clear()

    def _kill_now(self, g, reason):
        g.stop_reason = reason
        g.proc.kill()
        self._finished(g, g.proc.wait())

    def _shutdown(self):
        self.spawner.drain()
        live = [g for g in self.registry if g.proc is not None]
        for g in live:                  # all signals first, then reap: no worker waits for another's turn
            g.stop_reason = "stopped: the supervisor shut down"
            g.proc.kill()
        for g in live:
            self._finished(g, g.proc.wait())
        self.spawner.close()
        self.services.close()
        self.switches.close()
        self.sock.close()
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        self.ctx.term()
        print("supervisor: exited", file=sys.stderr, flush=True)

    # --- requests ------------------------------------------------------------

    def _worker(self, g, msg, expect=m.Ok):
        """Forward `msg` to the guest's worker; its reply (of type `expect`), or RequestFailed."""
        if g.proc is None or g.proc.poll() is not None:
            raise RequestFailed(errors.BAD_STATE, f"guest {g.name} is not running (state {g.state})")
        try:
            reply = Client(g.control, WORKER_TIMEOUT, self.ctx).request(msg)
        except NotResponding:
            raise RequestFailed(errors.WORKER, f"guest {g.name}: worker not responding") from None
        except RequestFailed as e:
            raise RequestFailed(errors.WORKER, f"guest {g.name}: {e}") from None
        except ProtocolError as e:
            raise RequestFailed(errors.WORKER, f"guest {g.name}: bad reply from worker: {e}") from None
        if not isinstance(reply, expect):
            raise RequestFailed(errors.WORKER, f"guest {g.name}: unexpected {reply.TYPE} reply from worker")
        return reply

    def _need_state(self, g, *states):
        if g.state not in states:
            raise RequestFailed(errors.BAD_STATE, f"guest {g.name} is {g.state}, not {' or '.join(states)}")

    def ping(self, msg, envelope):
        return m.Pong(os.getpid(), self.dir)

    def create(self, msg, envelope):
        try:
            validate(msg.config)
        except ConfigError as e:
            raise RequestFailed(errors.BAD_ARGUMENT, str(e)) from None
        return self.registry.add(msg.config).info()

    def start(self, msg, envelope):
        g = self.registry.get(msg.name)
        if g.starting:
            raise RequestFailed(errors.BAD_STATE, f"guest {g.name} is being started")
        self._need_state(g, "created", "stopped", "failed")
        try:
            validate(g.config)          # the kernel file may have gone since create
        except ConfigError as e:
            raise RequestFailed(errors.BAD_ARGUMENT, str(e)) from None

        def done(error):
            g.starting = False
            if error is not None:
                self._reply(envelope, m.Error(errors.INTERNAL, f"cannot start guest {g.name}: {error}"))
                return
            g.set_state("running")
            self._reply(envelope, g.info())

        for name in _switch_names(g.config):
            try:
                self.switches.ensure(name)
            except OSError as e:
                raise RequestFailed(errors.INTERNAL, f"cannot start switch {name} for guest {g.name}: {e}") from None
        g.starting = True
        self.spawner.start_worker(g, done)      # done() now (direct spawn) or when the zygote answers
        return None

    def stop(self, msg, envelope):
        g = self.registry.get(msg.name)
        if g.proc is None:
            return g.info()             # already not running: nothing to do
        g.stop_reason = "stopped by request"
        try:
            self._worker(g, m.Stop(g.name))
            g.kill_at = time.monotonic() + STOP_GRACE
        except RequestFailed:
            g.kill_at = time.monotonic()     # worker hung: kill it on the next tick
        g.waiters.append(envelope)
        return None

    def pause(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._need_state(g, "running")
        self._worker(g, m.Pause(g.name))
        g.set_state("paused")
        return g.info()

    def resume(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._need_state(g, "paused")
        self._worker(g, m.Resume(g.name))
        g.set_state("running")
        return g.info()

    def destroy(self, msg, envelope):
        g = self.registry.get(msg.name)
        if g.proc is not None:
            self._kill_now(g, "stopped by request (destroyed)")
        self.registry.remove(g)
        return m.Ok()

    def list(self, msg, envelope):
        return m.GuestList([g.info() for g in self.registry])

    def info(self, msg, envelope):
        """The guest's record; for a running guest also its devices' health, asked of the worker
        (cheap: the worker answers from its own state, no device service is called)."""
        g = self.registry.get(msg.name)
        info = g.info()
        if g.proc is not None and g.proc.poll() is None:
            try:
                devices = self._worker(g, m.DeviceStatus(g.name), m.StatsReply).stats
            except RequestFailed as e:
                devices = {"worker": {"state": "not responding", "reason": str(e)}}
            info.devices = devices
            info.pids.update({f"device:{n}": d["pid"] for n, d in devices.items() if isinstance(d.get("pid"), int)})
        for name in _switch_names(g.config):
            info.devices[f"switch:{name}"] = self.switches.status(name)
        return info

    def wait(self, msg, envelope):
        g = self.registry.get(msg.name)
        if g.state == "created":
            raise RequestFailed(errors.BAD_STATE, f"guest {g.name} has not been started")
        if g.proc is None:
            return g.info()
        g.waiters.append(envelope)
        return None

    def stats(self, msg, envelope):
        g = self.registry.get(msg.name)
        stats = dict(self._worker(g, m.Stats(g.name), m.StatsReply).stats)
        pids = {"worker": g.proc.pid, "supervisor": os.getpid()}
        if self.spawner.zygote_pid is not None:
            pids["zygote"] = self.spawner.zygote_pid
        stats["host"] = spawn.process_stats(pids)
        return m.StatsReply(stats)


def _switch_names(config):
    return [name for kind, name, _ in map(parse_net, config.nets) if kind == "switch"]


def serve(runtime_dir):
    Server(runtime_dir).serve()
