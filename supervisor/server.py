"""The supervisor: a ZeroMQ ROUTER on RUNTIME/control.sock that runs guests, one handler per request type.

One thread, one EventLoop: requests from hvctl, the zygote's answers (a
Start is answered once its worker exists, so a burst of Starts is served
while the zygote forks), workers' device-service requests, and a TICK timer
that polls the workers (waitpid by pid for our children, forked by the
zygote or spawned directly, see spawn.py; a pidfd for the workers adopted
from an earlier supervisor, see procs.py) so a worker's exit is noticed
within TICK seconds.  Guests outlive the supervisor: a new one on the same
runtime dir adopts the workers and switches it finds running; SIGTERM and
StopSupervisor(force) stop the guests with it, StopSupervisor(leave_guests)
or a crash leave them running for the next one.  Requests are validated on
receipt; bad input gets an Error reply and never stops the loop.  `wait` and
`stop` replies are deferred until the guest ends; any request other than
Create, Start and Ping first waits for the starts in flight, so it sees
every earlier Start done.  Pause/resume/stop/stats are forwarded to the
guest's worker with a timeout.
"""
import fcntl
import os
import signal
import socket
import struct
import sys
import time
import traceback

import zmq

from pyhv.devices.loop import EventLoop
from pyhv.devices.virtio import kinds
from pyhv.proto import codec, control as m, sandbox
from pyhv.proto.errors import (EXIT_STOPPED, BadState, HostError, HvError, InternalError, PeerFailed, ProtocolError,
                               UserError, from_wire)
from pyhv.proto.messages import Error, Ok
from pyhv.proto.runtime import UNIX_PATH_MAX, RuntimeDir
from pyhv.supervisor import migration, procs, spawn
from pyhv.supervisor.config import validate
from pyhv.supervisor.registry import Registry
from pyhv.supervisor.services import ServiceLauncher
from pyhv.supervisor.stats import process_stats
from pyhv.supervisor.switches import Switches

TICK = 0.05             # seconds between worker polls
WORKER_TIMEOUT = 2.0    # a worker that does not answer a request within this is "not responding"
WORKER_RECONNECT_MS = 5  # ZeroMQ's retry of a connect to a worker socket not bound yet (its default: 100 ms)
SNAPSHOT_TIMEOUT = 600.0  # a snapshot writes the guest's RAM and disks: seconds per GiB on a slow disk
STOP_GRACE = 3.0        # seconds a worker gets to exit after Stop before SIGKILL
SWITCH_WATCH = 0.5      # seconds between checks of the net switch processes
MAX_REQUEST_FDS = 16    # with a request on hvctl.sock: an Immigrate's memfd and its disk images


WAIT_GRACE = 1.0        # a Wait with a timeout is forgotten this long after its client stopped listening


class AlreadyRunning(HvError):
    """Another supervisor holds this runtime dir."""


class Server:
    def __init__(self, runtime_dir):
        self.runtime = RuntimeDir(runtime_dir)
        self.dir = self.runtime.path
        if len(self.runtime.control_sock) > UNIX_PATH_MAX:
            raise UserError(f"runtime dir path is too long for unix sockets: {self.dir}")
        self.runtime.make_private()
        self._lock = self._take_lock()
        migration.sweep(self.runtime)
        self.subscribers = []               # hvctl.sock connections that asked for Events
        self._open_calls = set()            # DEALER sockets of worker requests still waiting for a reply
        self._leave_guests = False          # set by StopSupervisor(leave_guests): the shutdown detaches
        self.ctx = zmq.Context()
        self.spawner = spawn.Spawner()
        self.switches = Switches(self.runtime)
        self._next_switch_watch = 0.0
        self.loop = EventLoop("supervisor")
        self.registry = Registry(self.runtime, on_change=self._publish, adopt=self._adopt)
        migration.forget_abandoned(self.registry)
        self._zygote_fd = None
        self._fds = []                      # fds that came with the request being handled
        self.handlers = {m.Ping: self.ping, m.Create: self.create, m.Start: self.start,
                         m.Stop: self.stop, m.Pause: self.pause, m.Resume: self.resume, m.CtrlAltDel: self.shutdown,
                         m.Events: self.events, m.SnapshotGuest: self.snapshot, m.RestoreGuest: self.restore,
                         m.Migrate: self.migrate, m.Immigrate: self.immigrate, m.ReceiveGuest: self.receive,
                         m.Destroy: self.destroy, m.List: self.list, m.Info: self.info,
                         m.Wait: self.wait, m.Stats: self.stats, m.StopSupervisor: self.stop_supervisor}

    def _take_lock(self):
        """One supervisor per runtime dir: an flock held for our lifetime (pid inside)."""
        fd = os.open(self.runtime.supervisor_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"a supervisor (pid {pid}) is already running on {self.dir}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _adopt(self, g, recorded):
        """A guest whose record says it runs (called by the registry as it loads): its worker, started by an
        earlier supervisor, is adopted if it still runs (the very process `recorded` names: procs.Adopted.find),
        with a new fd on its RAM; else the guest gets the outcome its worker left in result.json, or fails.
        A guest that was migrating here is not adopted (supervisor/migration.py abandon)."""
        if g.arriving:
            return migration.abandon(g, recorded)
        proc = procs.Adopted.find(recorded, lambda pid: procs.is_worker(pid, g.name))
        if proc is None:
            g.set_state(*spawn.read_outcome(g, None))
            print(f"supervisor: guest {g.name} ended while no supervisor was running: {g.state} "
                  f"({g.exit_status}, {g.reason})", file=sys.stderr, flush=True)
            return
        g.proc = proc
        g.mem_fd = procs.guest_memory(proc, g.config.mem_bytes)
        print(f"supervisor: adopted guest {g.name} ({g.state}, worker pid {proc.pid})"
              + ("" if g.mem_fd is not None else "; its RAM memfd could not be opened"), file=sys.stderr, flush=True)

    # --- the loop ----------------------------------------------------------

    def serve(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.loop.stop())
        try:
            os.unlink(self.runtime.control_sock)     # stale: the lock says nobody serves it
        except FileNotFoundError:
            pass
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.runtime.control_endpoint)
        os.chmod(self.runtime.control_sock, 0o600)     # with the 0700 dir: only our uid reaches it
        self.services = ServiceLauncher(self.runtime, self.registry)
        self.spawner.start()             # the zygote warms up while we already serve
        self.loop.add_socket(self.sock, self._on_request)
        try:
            os.unlink(self.runtime.hvctl_sock)
        except FileNotFoundError:
            pass
        self.seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.seq.bind(self.runtime.hvctl_sock)
        os.chmod(self.runtime.hvctl_sock, 0o600)
        self.seq.listen(128)
        self.loop.add(self.seq, self._accept_seq)
        self.loop.add(self.services.fileno(), self.services.serve)
        self.loop.every(TICK, self._watch)
        self._sync_zygote()
        sandbox.apply("supervisor")     # the union of every role's calls: they are all its descendants
        print(f"supervisor: pid {os.getpid()} serving {self.runtime.control_endpoint}", file=sys.stderr, flush=True)
        try:
            self.loop.run()
        except BaseException:
            self._leave_guests = True       # a crash is no decision to end the guests: the next supervisor adopts them
            raise
        finally:
            self._shutdown()

    def _sync_zygote(self):
        """Watch the current zygote's socket (it changes when a zygote is dropped and restarted)."""
        z = self.spawner.zygote
        fd = z.fileno() if z is not None else None
        if fd != self._zygote_fd:
            if self._zygote_fd is not None:
                self.loop.remove(self._zygote_fd)
            if fd is not None:
                self.loop.add(fd, self._on_zygote)
            self._zygote_fd = fd

    def _on_zygote(self):
        self.spawner.collect()
        self._sync_zygote()

    def _on_request(self):
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        # The envelope is everything up to the empty delimiter (a REQ's, or a pipelining client's request id
        # before it); a bare DEALER frame is answered bare.
        try:
            cut = frames.index(b"", 1) + 1
        except ValueError:
            cut = 1
        envelope, body = frames[:cut], frames[cut:]
        if len(body) != 1:
            return self._reply(envelope, Error.of(ProtocolError(f"expected one message frame, got {len(body)}")))
        self._handle(body[0], envelope)

    def _accept_seq(self):
        """hvctl's connections on hvctl.sock: one request each, answered (maybe later) on the same connection."""
        while True:
            try:
                conn, _ = self.seq.accept()
            except (BlockingIOError, InterruptedError):
                return
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid not in (os.getuid(), 0):
                print(f"supervisor: refused a connection on hvctl.sock from uid {uid}", file=sys.stderr, flush=True)
                conn.close()
                continue
            conn.setblocking(False)
            self.loop.add(conn, lambda conn=conn: self._on_seq(conn))

    def _on_seq(self, conn):
        self.loop.remove(conn)
        try:
            data, fds, _, _ = socket.recv_fds(conn, codec.MAX_MESSAGE_BYTES + 1, MAX_REQUEST_FDS)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        self._handle(data, conn, fds)

    def _handle(self, data, envelope, fds=()):
        """One request (bytes) from either socket; `envelope` is where its reply goes.  `fds` came with it (only
        an Immigrate takes one: its guest's RAM; any other is closed)."""
        self._fds = list(fds)
        try:
            msg = codec.decode(data, m.CONTROL)
            handler = self.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(f"{msg.TYPE} is not a request")
            if type(msg) not in (m.Create, m.Start, m.Ping):
                self.spawner.drain()
            reply = handler(msg, envelope)
        except HvError as e:
            reply = Error.of(e)
        except Exception as e:
            traceback.print_exc()
            reply = Error.of(InternalError(f"supervisor error: {type(e).__name__}: {e}"))
        for fd in self._fds:           # not taken by the handler
            os.close(fd)
        self._fds = []
        if reply is not None:          # None: deferred (wait/stop)
            self._reply(envelope, reply)

    def _reply(self, envelope, msg):
        """To a ZeroMQ peer (envelope frames), an hvctl connection (a socket, closed after the reply), or a
        function of ours (a migration's next step)."""
        if callable(envelope):
            envelope(msg)
            return
        data = codec.encode(msg, m.CONTROL)
        if isinstance(envelope, socket.socket):
            try:
                envelope.send(data)
            except OSError:
                pass                    # the client went away: nothing to tell
            envelope.close()
            return
        try:
            self.sock.send_multipart(envelope + [data], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def events(self, msg, envelope):
        if not isinstance(envelope, socket.socket):
            raise UserError(f"events are served on {self.runtime.hvctl_sock} (SOCK_SEQPACKET), not on ZeroMQ")
        try:
            envelope.send(codec.encode(Ok(), m.CONTROL))        # subscribed: what happens from now on is sent
        except OSError:
            envelope.close()
            return None
        self.subscribers.append(envelope)
        self.loop.add(envelope, lambda: self._unsubscribe(envelope))    # readable = the client closed it
        return None                             # no reply: Events follow on the connection

    def _unsubscribe(self, conn):
        if conn in self.subscribers:
            self.subscribers.remove(conn)
            self.loop.remove(conn)
            conn.close()

    def _publish(self, g, kind):
        """An Event to every subscriber; one that has gone or cannot keep up is dropped (never waited for)."""
        if not self.subscribers:
            return
        data = codec.encode(m.Event(g.name, kind, g.exit_status if kind in ("stopped", "failed") else None,
                                    g.reason if kind in ("stopped", "failed") else "", time.time()), m.CONTROL)
        for conn in list(self.subscribers):
            try:
                conn.send(data)
            except OSError:                     # EPIPE: gone; EAGAIN: 200 KB behind
                self._unsubscribe(conn)

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
        self._sync_zygote()
        self.services.watch()
        if now >= self._next_switch_watch:       # restart dead switches that running guests use
            self._next_switch_watch = now + SWITCH_WATCH
            self.switches.watch({s for g in self.registry if g.proc is not None for s in kinds.switches(g.config.devices)})

    def _finished(self, g, returncode):
        if g.migrated_to is not None:       # its worker was stopped once the guest ran on elsewhere
            outcome = ("stopped", EXIT_STOPPED, f"migrated to {g.migrated_to}")
            g.migrated_to = None
        else:
            outcome = spawn.read_outcome(g, returncode)
        proc, g.proc, g.kill_at, g.stop_reason = g.proc, None, None, None
        proc.close()
        g.set_state(*outcome)               # (saved without the worker's identity: it has gone)
        self.services.guest_ended(g.name)
        spawn.release_memory(g)
        info = g.info()
        for waiter in list(g.waiters):
            self._answer(g, waiter, info)
        migration.worker_ended(g)

    def _defer(self, g, envelope, reply=None, timeout=None):
        """Answer `envelope` once guest g has ended: with `reply`, or g's record then.  A client that goes away
        first is forgotten at once (an hvctl.sock connection that closes), or `timeout` s after it stopped
        listening (a ZeroMQ client, which cannot be seen going): requests nobody waits for must not pile up."""
        waiter = _Waiter(envelope, reply)
        g.waiters.append(waiter)
        if isinstance(envelope, socket.socket):      # it sends nothing more: readable means closed
            self.loop.add(envelope, lambda: self._answer(g, waiter, None))
        if timeout is not None:
            waiter.timer = self.loop.call_at(time.monotonic() + timeout + WAIT_GRACE,
                                             lambda: self._answer(g, waiter, None))
        return None

    def _answer(self, g, waiter, default):
        """Reply to a deferred request (waiter.reply, else `default`; None: forget it without a reply)."""
        if waiter not in g.waiters:
            return
        g.waiters.remove(waiter)
        if waiter.timer is not None:
            self.loop.cancel(waiter.timer)
        if isinstance(waiter.envelope, socket.socket):
            self.loop.remove(waiter.envelope)
        reply = waiter.reply if waiter.reply is not None else default
        if reply is not None:
            self._reply(waiter.envelope, reply)
        elif isinstance(waiter.envelope, socket.socket):
            waiter.envelope.close()

    def _leave(self, g):
        """Detach from a running guest as we exit: its record keeps the worker's identity for our successor."""
        error = Error.of(PeerFailed(f"the supervisor of {self.dir} stopped and left guest {g.name} running: "
                                    f"ask the next supervisor there"))
        for waiter in list(g.waiters):   # they wait for its end, which this supervisor will not see
            waiter.reply = None
            self._answer(g, waiter, error)
        g.proc.close()
        spawn.release_memory(g)         # the worker holds its own fd on the RAM
        print(f"supervisor: left guest {g.name} {g.state} (worker pid {g.proc.pid})", file=sys.stderr, flush=True)

    def _kill_now(self, g, reason):
        g.stop_reason = reason
        g.proc.kill()
        self._finished(g, g.proc.wait())

    def _shutdown(self):
        """Stop every guest with us, or (StopSupervisor(leave_guests)) leave them running for the next supervisor:
        their workers, device services and switches go on; a new supervisor adopts them."""
        self.spawner.drain()
        live = [g for g in self.registry if g.proc is not None]
        if self._leave_guests:
            for g in live:
                self._leave(g)
        else:
            for g in live:              # all signals first, then reap: no worker waits for another's turn
                g.stop_reason = "stopped: the supervisor shut down"
                g.proc.kill()
            for g in live:
                self._finished(g, g.proc.wait())
        self.spawner.close()
        self.services.close(kill=not self._leave_guests)
        self.switches.close(keep={s for g in live for s in kinds.switches(g.config.devices)}
                            if self._leave_guests else ())
        self.sock.close()
        self.seq.close()
        for path in (self.runtime.control_sock, self.runtime.hvctl_sock):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for sock in self._open_calls:
            sock.close()
        self.ctx.term()
        self.loop.close()
        print("supervisor: exited", file=sys.stderr, flush=True)

    # --- requests ------------------------------------------------------------

    def _worker(self, g, msg, expect, envelope, then, timeout=WORKER_TIMEOUT, on_open=None):
        """Forward `msg` to the guest's worker without blocking the loop (a hung worker must not hold up
        other clients).  When its reply of type `expect` arrives, `then(reply)` makes the answer to
        `envelope` (None: answered elsewhere); an HvError in its place (the worker's error, no answer
        within WORKER_TIMEOUT, a bad reply) is passed to `then` instead.  `on_open(finish)`: finish(HvError)
        ends the request early (its worker has gone)."""
        if g.proc is None or g.proc.poll() is not None:
            raise BadState(f"guest {g.name} is not running (state {g.state})")
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, WORKER_RECONNECT_MS)     # a worker still starting binds any moment
        sock.connect(g.files.worker_endpoint)
        sock.send_multipart([b"", codec.encode(msg, m.CONTROL)])
        call = {}
        self._open_calls.add(sock)

        def finish(result):
            if call.pop("open", None) is None:
                return
            self.loop.remove(sock)
            self.loop.cancel(call["timer"])
            self._open_calls.discard(sock)
            sock.close()
            try:
                answer = then(result)
            except HvError as e:
                answer = Error.of(e)
            except Exception as e:
                traceback.print_exc()
                answer = Error.of(InternalError(f"supervisor error: {type(e).__name__}: {e}"))
            if answer is not None:
                self._reply(envelope, answer)

        def on_reply():
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = codec.decode(frames[-1], m.CONTROL)
            except ProtocolError as e:
                return finish(PeerFailed(f"guest {g.name}: bad reply from worker: {e}"))
            if isinstance(reply, Error):
                return finish(PeerFailed(f"guest {g.name}: {from_wire(reply.kind, reply.message)}"))
            if not isinstance(reply, expect):
                return finish(PeerFailed(f"guest {g.name}: unexpected {reply.TYPE} reply from worker"))
            finish(reply)

        call["open"] = True
        call["timer"] = self.loop.call_at(time.monotonic() + timeout,
                                          lambda: finish(PeerFailed(f"guest {g.name}: worker not responding")))
        self.loop.add_socket(sock, on_reply)
        if on_open is not None:
            on_open(finish)
        return None

    def _need_state(self, g, *states):
        self._not_moving(g)
        if g.state not in states:
            raise BadState(f"guest {g.name} is {g.state}, not {' or '.join(states)}")

    def _not_moving(self, g):
        if g.moving is not None:
            raise BadState(f"guest {g.name} is being migrated: wait for that to finish")

    def ping(self, msg, envelope):
        return m.Pong(os.getpid(), self.dir)

    def stop_supervisor(self, msg, envelope):
        """End this supervisor once the reply is sent: its guests are stopped with it (force), or left running for
        the next supervisor of the runtime dir to adopt (leave_guests); with neither, refused while any runs."""
        if msg.force and msg.leave_guests:
            raise UserError("--force stops the guests, --leave-guests leaves them running: give one of them")
        live = [g.name for g in self.registry if g.proc is not None]     # (starts in flight are finished)
        if live and not (msg.force or msg.leave_guests):
            raise BadState(f"{len(live)} guest(s) still running ({', '.join(live[:5])}): stop them first, or "
                           f"`hvctl supervisor --stop --force` to stop them with it, or --leave-guests to leave "
                           f"them running for the next supervisor")
        self._leave_guests = msg.leave_guests
        self.loop.stop()
        return m.SupervisorStopping(os.getpid(), live, msg.leave_guests)

    def create(self, msg, envelope):
        validate(msg.config)
        g = self.registry.add(msg.config)
        if msg.start:                   # the reply comes when the worker is there; a refused start leaves nothing
            return self._forget_on_failure(g, lambda: self.start(m.Start(g.name), envelope))
        return g.info()

    def start(self, msg, envelope):
        g = self.registry.get(msg.name)
        if g.starting:
            raise BadState(f"guest {g.name} is being started")
        self._need_state(g, "created", "stopped", "failed")
        validate(g.config)              # the kernel file may have gone since create
        return self._launch(g, envelope)

    def _launch(self, g, envelope, prepare=None):
        """Start g's worker (its disk images locked and switches started first); the reply goes to `envelope` once
        it exists.  `prepare`: as Spawner.start_worker's."""
        def done(error, go=lambda: None):
            g.starting = False
            paused = g.restore is not None and g.restore[1]
            g.restore = None            # a later start boots afresh
            if error is not None:
                spawn.release_memory(g)
                self.services.release_images(g.name)
                self._reply(envelope, Error.of(InternalError(f"cannot start guest {g.name}: {error}")))
                return
            g.set_state("paused" if paused else "running")
            go()                        # the record holds its pid: it may run the guest; the reply comes after
            self._reply(envelope, g.info())

        self.services.open_images(g)    # UserError if another guest holds one: nothing has run
        try:
            for name in kinds.switches(g.config.devices):
                try:
                    self.switches.ensure(name)
                except OSError as e:
                    raise InternalError(f"cannot start switch {name} for guest {g.name}: {e}") from None
        except BaseException:
            self.services.release_images(g.name)
            raise
        g.starting = True
        self.spawner.start_worker(g, done, prepare)     # done() now (direct spawn) or when the zygote answers
        self._sync_zygote()
        return None

    def snapshot(self, msg, envelope):
        """The worker writes the snapshot (it has the guest's state); DIR is checked here first."""
        from pyhv.proto.snapshot import check_target
        g = self.registry.get(msg.name)
        self._need_state(g, "running", "paused")
        kinds.check_snapshottable(g.config.devices, g.name)
        if not os.path.isabs(msg.dir):
            raise UserError(f"snapshot directory {msg.dir!r} is not an absolute path")
        check_target(msg.dir)
        if msg.stop:
            g.stop_reason = "stopped after its snapshot"
        return self._worker(g, msg, m.SnapshotReply, envelope, lambda r: self._snapshotted(g, r, msg.stop, envelope),
                            timeout=SNAPSHOT_TIMEOUT)

    def _snapshotted(self, g, reply, stop, envelope):
        """The worker's answer; with --stop it is given once the worker has gone (as Stop's is), so the
        guest is `stopped` by the time the client hears."""
        if isinstance(reply, HvError):
            g.stop_reason = None
            raise reply
        if stop and g.proc is not None:
            g.kill_at = time.monotonic() + STOP_GRACE
            return self._defer(g, envelope, reply)
        return reply

    def restore(self, msg, envelope):
        """Check the snapshot's manifest and config, then start the guest: its state is checked and its RAM
        loaded into a new memfd (and checked) while its worker gets ready, before it may run; a corrupt state or
        RAM image fails the restore and forgets the guest."""
        from pyhv.devices.guest_memory import create_memfd
        from pyhv.proto import guest as guest_msgs
        from pyhv.proto.snapshot import Snapshot
        from pyhv.vcpu_worker.snapshot import private_disks
        if not os.path.isabs(msg.dir):
            raise UserError(f"snapshot directory {msg.dir!r} is not an absolute path")
        snap = Snapshot(msg.dir, state=False)          # its state and RAM are checked while the worker gets ready
        config = snap.config.replace(name=msg.name or snap.config.name)
        guest_msgs.check(config)
        if config.name in {g.name for g in self.registry}:
            raise BadState(f"guest {config.name} already exists (destroy it first, or restore with --name NEW)")
        config = _moved_nics(config, msg.nets)
        held = snap.disks()             # copied below; the other devices must exist on this host now
        validate(config.replace(devices=[d for name, _, d in kinds.named(config.devices) if name not in held]),
                 boot_files=False)
        try:
            mem_fd = create_memfd(config.mem_bytes, name=f"guest-ram-{config.name}")
        except OSError as e:
            raise HostError(f"cannot allocate {config.mem_bytes >> 20} MiB of guest RAM: {e.strerror}") from None
        try:
            g = self.registry.add(config)
        except BaseException:
            os.close(mem_fd)
            raise
        g.mem_fd = mem_fd

        def start():
            g.config = private_disks(snap, config, lambda device: g.files.file(f"disk-{device}"))
            g.save()
            g.restore = (snap.path, msg.paused)
            return self._launch(g, envelope, prepare=lambda: (snap.read_state(), snap.load_memory(mem_fd)))
        return self._forget_on_failure(g, start)

    def _forget_on_failure(self, g, start):
        """The rest of a restore or hand-over, `start()`; if it raises, guest g (just added) is forgotten again."""
        try:
            return start()
        except BaseException:
            spawn.release_memory(g)
            self.services.release_images(g.name)
            self.registry.remove(g, keep_logs=False)
            raise

    def migrate(self, msg, envelope):
        """Move a guest to the supervisor of another runtime dir (supervisor/migration.py)."""
        return migration.migrate(self, msg, envelope)

    def _worker_or(self, g, msg, envelope, then):
        """`_worker` (expecting Ok) from a loop callback: a worker that has just gone is `then`'s HvError too."""
        try:
            self._worker(g, msg, Ok, envelope, then)
        except HvError as e:
            self._reply(envelope, then(e))

    def immigrate(self, msg, envelope):
        """A guest handed over by another supervisor, its RAM the fd that came with the request."""
        return migration.immigrate(self, msg, envelope)

    def receive(self, msg, envelope):
        """Get ready for a guest another supervisor streams here (`migrate --copy`)."""
        return migration.receive(self, msg, envelope)

    def stop(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._not_moving(g)
        if g.state == "created":
            raise BadState(f"guest {g.name} has not been started")
        if g.proc is None:
            return g.info()             # already ended: nothing to do (as docker stop)
        g.stop_reason = "stopped by request"

        def sent(reply):
            if g.proc is not None:      # a hung worker is killed on the next tick
                g.kill_at = time.monotonic() + (0.0 if isinstance(reply, HvError) else STOP_GRACE)
        self._worker(g, m.Stop(g.name), Ok, envelope, sent)
        return self._defer(g, envelope)     # answered when the worker has gone

    def shutdown(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._need_state(g, "running")
        return self._worker(g, m.CtrlAltDel(g.name), m.CtrlAltDelReply, envelope, _or_raise)

    def pause(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._need_state(g, "running")
        return self._worker(g, m.Pause(g.name), Ok, envelope, lambda r: self._now(g, r, "paused"))

    def resume(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._need_state(g, "paused")
        return self._worker(g, m.Resume(g.name), Ok, envelope, lambda r: self._now(g, r, "running"))

    def _now(self, g, reply, state):
        """After the worker paused or resumed: the guest's new record (unless it ended meanwhile)."""
        _or_raise(reply)
        if g.live:
            g.set_state(state)
        return g.info()

    def destroy(self, msg, envelope):
        g = self.registry.get(msg.name)
        self._not_moving(g)
        if g.proc is not None:              # (starts in flight were finished before this request)
            if not msg.force:
                raise BadState(f"guest {g.name} is {g.state}: stop it first, or destroy it with --force")
            self._kill_now(g, "stopped by request (destroyed)")
        self.registry.remove(g, keep_logs=not msg.purge)
        return Ok()

    def list(self, msg, envelope):
        return m.GuestList([g.info() for g in self.registry])

    def info(self, msg, envelope):
        """The guest's record; for a running guest also its devices' health, asked of the worker
        (cheap: the worker answers from its own state, no device service is called)."""
        g = self.registry.get(msg.name)
        if g.proc is None or g.proc.poll() is not None:
            return self._info(g, None)
        return self._worker(g, m.DeviceStatus(g.name), m.StatsReply, envelope, lambda r: self._info(g, r))

    def _info(self, g, device_status):
        info = g.info()
        if isinstance(device_status, HvError):
            info.devices = {"worker": {"state": "not responding", "reason": str(device_status)}}
        elif device_status is not None:
            info.devices = device_status.stats
            info.pids.update({f"device:{n}": d["pid"] for n, d in info.devices.items()
                              if isinstance(d.get("pid"), int)})
        for name in kinds.switches(g.config.devices):
            status = info.devices[f"switch:{name}"] = self.switches.status(name)
            if g.proc is not None and status["pid"] is not None:
                info.pids[f"switch:{name}"] = status["pid"]
        return info

    def wait(self, msg, envelope):
        g = self.registry.get(msg.name)
        if g.state == "created":
            raise BadState(f"guest {g.name} has not been started")
        if g.proc is None:
            return g.info()
        if msg.timeout is not None and not msg.timeout >= 0:
            raise UserError(f"wait: timeout {msg.timeout} is not a number of seconds >= 0")
        return self._defer(g, envelope, timeout=None if msg.timeout == float("inf") else msg.timeout)

    def stats(self, msg, envelope):
        """The worker's counters, then its devices' pids (a second request), then every process's CPU/memory."""
        g = self.registry.get(msg.name)

        def with_host(stats, device_status):
            pids = {**self._info(g, device_status).pids, "supervisor": os.getpid()}   # worker, devices, switches
            if self.spawner.zygote_pid is not None:
                pids["zygote"] = self.spawner.zygote_pid
            return m.StatsReply({**stats, "host": process_stats(pids)})

        def counted(reply):
            stats = _or_raise(reply).stats
            if g.proc is None:
                return with_host(stats, None)
            return self._worker(g, m.DeviceStatus(g.name), m.StatsReply, envelope, lambda d: with_host(stats, d))
        return self._worker(g, m.Stats(g.name), m.StatsReply, envelope, counted)


class _Waiter:
    """A request answered when its guest ends (wait, stop, snapshot --stop, a migration's source)."""
    __slots__ = ("envelope", "reply", "timer")

    def __init__(self, envelope, reply):
        self.envelope, self.reply, self.timer = envelope, reply, None


def _moved_nics(config, ports):
    """`config` with its first NICs on `ports` (a clone's own switch or TAP); the MACs the guest knows stay."""
    nics = [i for i, d in enumerate(config.devices) if d.kind == "net"]
    if len(ports) > len(nics):
        raise UserError(f"--net: {len(ports)} ports given, the snapshot's guest has {len(nics)} NICs")
    devices = list(config.devices)
    for i, port in zip(nics, ports):
        kinds.kind("net").check_port(port, port)
        devices[i] = devices[i].replace(options={**devices[i].options, "port": port})
    return config.replace(devices=devices)


def _or_raise(reply):
    """A worker's reply, or the HvError that came in its place raised."""
    if isinstance(reply, HvError):
        raise reply
    return reply


class _LossyLog:
    """The supervisor's stderr (its log, in the runtime dir): a line it cannot write (a full disk) is lost, not
    raised into whatever was reporting."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def serve(runtime_dir):
    sys.stderr = _LossyLog(sys.stderr)
    Server(runtime_dir).serve()
