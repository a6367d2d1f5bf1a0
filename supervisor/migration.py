"""Migration between the supervisors of two runtime dirs (`hvctl migrate`): the guest leaving, the guest arriving.

Both ways the commit is two-phase, so a guest never runs in two places and
never runs nowhere by accident:
  1. the target builds the guest from what it was sent and holds it
     (Prepared); until then, any failure on either side leaves the source
     as it was (running, or paused) and the target with nothing;
  2. the source, still holding its guest, says Commit: from the moment that
     is sent, the source never runs the guest again;
  3. the target runs it (or keeps it paused) and confirms; the source's
     worker is stopped ("migrated to DIR").
A target that never confirms leaves the outcome in doubt: the source keeps
its guest held (paused) and says so; the user resumes it if it does not run
under the target.  A target that gives up, times out or loses its
connection before Commit discards the guest: nothing of it is left there.

Without --copy (a hand-over, this machine only): the source's worker holds
the guest and writes its state (not its RAM) into a dir inside the
target's runtime dir; the RAM memfd itself goes to the target over its
hvctl.sock (SCM_RIGHTS, `Immigrate`), and the dialogue continues on that
connection.  With --copy: the target starts a receiver process
(supervisor/receiver.py) and answers where the source's worker connects;
the worker streams RAM while the guest runs, then what it dirtied while
held, then the state (vcpu_worker/migration.py); the dialogue runs on that
stream (proto/migration.py, docs/migration.md), and the receiver relays it
to its supervisor.
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from pyhv.devices.guest_memory import create_memfd, memfd_fits
from pyhv.devices.virtio import kinds
from pyhv.proto import codec, control as m, migration as mig, runtime
from pyhv.proto.errors import BadState, HostError, HvError, PeerFailed, ProtocolError, UserError
from pyhv.proto.messages import Error
from pyhv.proto.runtime import UNIX_PATH_MAX, RuntimeDir
from pyhv.supervisor import procs, spawn
from pyhv.supervisor.config import validate

ANSWER_TIMEOUT = 10.0       # for the target supervisor's answer to ReceiveGuest
PREPARE_TIMEOUT = 60.0      # for the target to hold the guest it was handed (its worker's start)
COMMIT_TIMEOUT = 30.0       # for the target to run it after Commit (its worker's Resume)
SNAPSHOT_TIMEOUT = 600.0    # for the source's worker to write the hand-over state
COPY_TIMEOUT = 3600.0       # for the source's worker to stream the guest (it bounds its own rounds and waits)
STREAM_SOCK = "stream.sock"


def _conn_recv(conn):
    """One message on a SEQPACKET connection between supervisors; None if the peer closed it."""
    try:
        data = conn.recv(codec.MAX_MESSAGE_BYTES + 1)
    except OSError:
        return None
    if not data:
        return None
    return codec.decode(data, m.CONTROL)


# --- the guest leaving ----------------------------------------------------------------------------------------------

def migrate(server, msg, envelope):
    """Move a running (or paused) guest to the supervisor of msg.to; answered with a MigrateReply."""
    g = server.registry.get(msg.name)
    server._need_state(g, "running", "paused")
    kinds.check_snapshottable(g.config.devices, g.name)     # a vhost-user back end's state (and RAM writes) are its own
    if g.mem_fd is None and not msg.copy:
        raise HostError(f"guest {g.name}'s RAM is out of this supervisor's reach (it adopted the guest and could "
                        f"not open the worker's memfd): it cannot be handed over; `migrate --copy` can move it")
    target = RuntimeDir(os.path.abspath(msg.to))
    if os.path.realpath(target.path) == os.path.realpath(server.dir):
        raise UserError(f"--to: {msg.to} is this supervisor's own runtime dir")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.connect(target.hvctl_sock)
    except OSError as e:
        conn.close()
        raise PeerFailed(f"--to: no supervisor is serving {msg.to} ({e.strerror}); start one with "
                         f"`hvctl --runtime-dir {msg.to} supervisor --detach`") from None
    move = Outgoing(server, g, target, conn, envelope, msg.copy)
    try:
        move.start()
    except BaseException:
        move.end()
        raise
    return None


class Outgoing:
    """A guest leaving this supervisor (g.moving meanwhile): the steps above, each answered by a callback."""

    def __init__(self, server, g, target, conn, envelope, copy):
        self.server, self.guest, self.target, self.conn, self.envelope = server, g, target, conn, envelope
        self.to = target.path
        self.copy = copy
        self.was_paused = g.state == "paused"
        self.committed = False          # Commit sent (hand-over): from then on we never run the guest
        self.held_at = None
        self.started = time.monotonic()
        self.incoming = None            # the hand-over's state dir in the target's runtime dir
        self.timer = None
        self.watching = False
        self.cancel = None              # ends the worker request in flight (its worker ended)
        self.done = False
        g.moving = self

    def start(self):
        g = self.guest
        if self.copy:                           # its disk images go over with their locks, as a hand-over's do
            images = self.server.services.images.get(g.name, {})
            self._send(m.ReceiveGuest(g.config, self.was_paused, images=list(images)), images.values())
            self._expect(m.ReceiveReady, self._ready, ANSWER_TIMEOUT)
            return
        try:
            self.incoming = tempfile.mkdtemp(prefix=self.target.incoming_prefix(g.name), dir=self.to)
        except OSError as e:
            raise PeerFailed(f"--to: cannot write into {self.to} ({e.strerror})") from None
        self.server._worker(g, m.SnapshotGuest(g.name, os.path.join(self.incoming, "state"), handover=True),
                            m.SnapshotReply, self.envelope, self._held, timeout=SNAPSHOT_TIMEOUT,
                            on_open=self._opened)

    # -- the connection to the target supervisor --------------------------------------------------------------------
    def _send(self, msg, fds=()):
        data, fds = codec.encode(msg, m.CONTROL), list(fds)
        if fds:
            socket.send_fds(self.conn, [data], fds)
        else:
            self.conn.send(data)

    def _expect(self, kind, then, timeout):
        """then(reply) once the target answers with a `kind`; its Error, silence or a closed connection fail."""
        loop = self.server.loop

        def answered():
            self._unwatch()
            try:
                reply = _conn_recv(self.conn)
            except ProtocolError as e:
                return self._lost(f"bad answer from the target: {e}", refused=False)
            if reply is None:
                return self._lost("the target's supervisor closed the connection", refused=False)
            if isinstance(reply, Error):
                return self._lost(reply.message, refused=True)
            if not isinstance(reply, kind):
                return self._lost(f"unexpected {reply.TYPE} from the target", refused=False)
            try:
                then(reply)
            except HvError as e:
                self._lost(str(e), refused=False)
        loop.add(self.conn, answered)
        self.watching = True
        self.timer = loop.call_at(time.monotonic() + timeout,
                                  lambda: self._lost(f"no answer from the target within {timeout:g} s",
                                                     refused=False))

    def _unwatch(self):
        if self.watching:
            self.server.loop.remove(self.conn)
            self.watching = False
        if self.timer is not None:
            self.server.loop.cancel(self.timer)
            self.timer = None

    def _lost(self, why, refused):
        """The target refused, went silent or away.  After Commit, only its refusal (it guarantees it discarded
        the guest and never ran it) lets ours go on; anything else is in doubt."""
        if self.done:
            return
        if self.committed and not refused:
            return self._in_doubt(why)
        self._failed(why)

    def _opened(self, finish):
        self.cancel = finish

    # -- hand-over ---------------------------------------------------------------------------------------------------
    def _held(self, reply):
        """The worker holds the guest and wrote its state: hand the state and the memfd over."""
        self.cancel = None
        if isinstance(reply, HvError):          # the worker let the guest go on as it was (or ended)
            return self._failed(str(reply), resume=False)
        self.held_at = time.monotonic() - reply.paused_for
        images = self.server.services.images.get(self.guest.name, {})     # the locks go with the guest
        try:
            self._send(m.Immigrate(os.path.join(self.incoming, "state"), self.was_paused, images=list(images)),
                       [self.guest.mem_fd, *images.values()])
        except OSError as e:
            return self._failed(f"cannot hand it over: {e.strerror}")
        self._expect(m.Prepared, self._prepared, PREPARE_TIMEOUT)
        return None

    def _prepared(self, reply):
        try:
            self._send(m.Commit(self.guest.name))
        except OSError as e:                    # not sent: the target cannot have run it
            return self._failed(f"cannot commit: {e.strerror}")
        self.committed = True
        self._expect(m.GuestInfo, lambda info: self._arrived(m.MigrateReply(
            outcome="done", downtime=time.monotonic() - self.held_at)), COMMIT_TIMEOUT)

    # -- copy --------------------------------------------------------------------------------------------------------
    def _ready(self, reply):
        """The target's receiver waits: let our worker stream the guest to it."""
        self._close_conn()
        g = self.guest
        try:
            self.server._worker(g, m.MigrateOut(g.name, reply.address, reply.token, to=self.to), m.MigrateReply,
                                self.envelope, self._copied, timeout=COPY_TIMEOUT, on_open=self._opened)
        except HvError as e:
            self._failed(str(e))

    def _copied(self, reply):
        self.cancel = None
        if isinstance(reply, HvError):          # refused before it began, or the worker is gone
            return self._failed(str(reply), resume=False)
        if reply.outcome == "done":
            return self._arrived(reply)
        if reply.outcome == "in-doubt":
            return self._in_doubt(reply.reason)
        return self._failed(reply.reason, resume=False)     # the worker let it go on as it was

    # -- outcomes ----------------------------------------------------------------------------------------------------
    def _arrived(self, reply):
        """The guest runs under the target: stop ours; the answer goes out once our worker has gone."""
        self.end()
        g = self.guest
        g.migrated_to = self.to                 # ours ends without an outcome of its own
        reply = reply.replace(to=self.to, copy=self.copy, seconds=time.monotonic() - self.started)

        def stopped(r):
            from pyhv.supervisor.server import STOP_GRACE
            if g.proc is None:
                return reply
            g.kill_at = time.monotonic() + (0.0 if isinstance(r, HvError) else STOP_GRACE)
            return self.server._defer(g, self.envelope, reply)
        self.server._worker_or(g, m.Stop(g.name), self.envelope, stopped)
        return None

    def _failed(self, why, resume=True):
        """The guest did not move: ours goes on as it was (a held hand-over is resumed here)."""
        if self.done:
            return None
        self.end()
        g = self.guest
        now = ("stays paused" if self.was_paused else "runs on") if g.proc is not None else f"is {g.state}"
        error = PeerFailed(f"migration of {g.name} to {self.to} failed: {why}; it {now} here")
        if self.was_paused or not resume or self.held_at is None or g.proc is None:
            self.server._reply(self.envelope, Error.of(error))
            return None
        self.server._worker_or(g, m.Resume(g.name), self.envelope, lambda r: Error.of(error))
        return None

    def _in_doubt(self, why):
        """Commit went out but the target never confirmed: the guest may run there, so it stays held here."""
        if self.done:
            return
        self.end()
        g = self.guest
        if g.live:
            g.set_state("paused")
        self.server._reply(self.envelope, Error.of(PeerFailed(
            f"migration of {g.name} to {self.to} is in doubt: {why}; {g.name} is held paused here: if it does not "
            f"run under {self.to}, `hvctl resume {g.name}` lets it go on here")))

    def worker_ended(self):
        """Our worker exited while the guest was moving (it ended itself, or was killed)."""
        if self.cancel is not None:             # its request's callback reports it
            self.cancel(PeerFailed(f"guest {self.guest.name} ended during its migration"))
        elif not self.done:
            if self.committed:
                self._in_doubt("the guest's worker here ended after the commit")
            else:
                self._failed("the guest ended during its migration", resume=False)

    def _close_conn(self):
        self._unwatch()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def end(self):
        """Once: no more watching; the connection closed (a target that has not had Commit discards); our dir
        in the target's runtime dir removed (a target that took the state moved it out)."""
        if self.done:
            return
        self.done = True
        self._close_conn()
        if self.incoming is not None:
            shutil.rmtree(self.incoming, ignore_errors=True)
        if self.guest.moving is self:
            self.guest.moving = None


# --- the guest arriving ---------------------------------------------------------------------------------------------

def _tombstone(g):
    """The record a guest that migrated away left here: its return may replace it."""
    return g.state == "stopped" and g.proc is None and g.moving is None and g.reason.startswith("migrated to ")


def _may_arrive(server, name):
    """BadState unless a guest `name` may arrive here: the name is free, or held by a migrated guest's record."""
    if name in server.registry.reserved:
        raise BadState(f"guest {name} is being migrated here already")
    g = server.registry.guests.get(name)
    if g is not None and not _tombstone(g):
        raise BadState(f"guest {name} already exists under {server.dir}")


class Incoming:
    """A guest arriving here: built from what came, held (g.moving) until the source commits, or discarded."""

    def __init__(self, server, config, paused, on_discard=None):
        self.server, self.config, self.paused = server, config, paused
        self.guest = None
        self.mem_fd = None
        self.images = {}                # device name -> image fd handed over (locked by the source), ours
        self.on_discard = on_discard    # what else to tell or clean when the guest is discarded
        self.done = False

    def prepare(self, mem_fd, state_dir, then):
        """Add the guest (RAM in `mem_fd`, ours now; state in `state_dir`, moved into its dir) and start its
        worker held; then(None) once it is, or then(HvError) (discarded then)."""
        server = self.server
        server.registry.reserved.discard(self.config.name)
        old = server.registry.guests.get(self.config.name)
        if old is not None and _tombstone(old):       # back where it was before: its logs are kept
            server.registry.remove(old, keep_logs=True)
        g = self.guest = server.registry.add(self.config)
        g.moving, g.arriving = self, True           # saved with the worker's identity: no successor adopts it
        g.mem_fd, self.mem_fd = mem_fd, None
        state = g.files.file("handover")
        shutil.move(state_dir, state)
        g.restore = (state, True)              # held: it runs on Commit
        images, self.images = self.images, {}
        server.services.open_images(g, images)  # the source's locks, not new ones (its services still run)

        def launched(reply):                   # its worker exists; it answers once it holds the guest
            if isinstance(reply, Error):
                return failed(reply.message)
            try:
                server._worker(g, m.Ping(), m.Pong, lambda r: None, ready, timeout=PREPARE_TIMEOUT)
            except HvError as e:
                failed(str(e))

        def ready(reply):
            if isinstance(reply, HvError):
                return failed(f"its worker here did not take it: {reply}")
            if not self.done:
                then(None)

        def failed(why):
            if not self.done:
                self.discard(f"cannot start it here: {why}")
                then(PeerFailed(why))
        server._launch(g, launched)

    def commit(self, then):
        """The source let the guest go: run it (unless it came paused); then(GuestInfo) either way."""
        g = self.guest
        self.done = True
        g.moving, g.arriving = None, False
        try:
            g.save()                            # before it runs: from now on it is ours to keep
        except HostError as e:
            print(f"supervisor: guest {g.name} arrived: {e}", file=sys.stderr, flush=True)
        if self.paused or g.proc is None:
            then(g.info())
            return

        def resumed(reply):
            if isinstance(reply, HvError):
                print(f"supervisor: guest {g.name} arrived but did not resume: {reply}", file=sys.stderr, flush=True)
            elif g.live:
                g.set_state("running")
            return then(g.info())
        self.server._worker_or(g, m.Resume(g.name), lambda r: None, resumed)

    def worker_ended(self):
        self.discard("its worker here ended before the commit")

    def discard(self, why):
        """Leave nothing: the worker killed, the guest forgotten (no logs kept), its RAM closed."""
        if self.done:
            return
        self.done = True
        server, g = self.server, self.guest
        print(f"supervisor: discarding guest {self.config.name} migrated in: {why}", file=sys.stderr, flush=True)
        if g is None:
            server.registry.reserved.discard(self.config.name)
        else:
            g.moving = None
            if g.proc is not None:
                server._kill_now(g, f"discarded: {why}")
            spawn.release_memory(g)
            server.services.release_images(g.name)      # our fds: the source's services keep its locks
            if server.registry.guests.get(g.name) is g:
                server.registry.remove(g, keep_logs=False)
        for fd in ([self.mem_fd] if self.mem_fd is not None else []) + list(self.images.values()):
            os.close(fd)
        self.mem_fd, self.images = None, {}
        if self.on_discard is not None:
            self.on_discard(why)


def immigrate(server, msg, conn):
    """A guest handed over by another supervisor (no --copy): its RAM is the fd that came with the request.
    Prepared once its worker holds it; Commit on the same connection runs it."""
    from pyhv.proto.snapshot import Snapshot
    if not isinstance(conn, socket.socket):
        raise ProtocolError("Immigrate comes on hvctl.sock")
    if len(server._fds) != 1 + len(msg.images):
        raise ProtocolError("Immigrate comes on hvctl.sock with the guest's RAM memfd and one fd per image it names")
    if os.path.dirname(os.path.dirname(os.path.realpath(msg.dir))) != os.path.realpath(server.dir):
        raise UserError(f"a hand-over is taken only from inside {server.dir}, not {msg.dir}")
    snap = Snapshot(msg.dir, handover=True)
    config = snap.config
    _may_arrive(server, config.name)
    if not memfd_fits(server._fds[0], config.mem_bytes):
        raise UserError(f"the RAM handed over is not the {config.mem_bytes >> 20} MiB guest {config.name} has")
    validate(config, boot_files=False)
    images = _images(config, msg.images, server._fds[1:])
    loop = server.loop
    timer = []

    def reply(msg, close=True):
        server._reply(conn, msg) if close else conn.send(codec.encode(msg, m.CONTROL))

    def gone(why):                          # discarded: the source hears why (if it still listens)
        if timer:
            loop.cancel(timer.pop())
        loop.remove(conn)
        server._reply(conn, Error.of(PeerFailed(f"guest {config.name} was not taken: {why}")))

    inc = Incoming(server, config, msg.paused, on_discard=gone)

    def prepared(error):
        if error is not None:
            return None                     # discarded, and said so
        try:
            reply(m.Prepared(config.name), close=False)
        except OSError:
            return inc.discard("the source went away")
        loop.add(conn, commit)
        timer.append(loop.call_at(time.monotonic() + PREPARE_TIMEOUT + COMMIT_TIMEOUT,
                                  lambda: inc.discard("no Commit from the source in time")))

    def commit():
        loop.remove(conn)
        if timer:
            loop.cancel(timer.pop())
        try:
            answer = _conn_recv(conn)
        except ProtocolError:
            answer = None
        if not isinstance(answer, m.Commit) or answer.name != config.name:
            return inc.discard("the source did not commit")
        inc.commit(lambda info: server._reply(conn, info))

    inc.mem_fd, inc.images, server._fds = server._fds[0], images, []     # ours from here on
    try:
        inc.prepare(inc.mem_fd, snap.path, prepared)
    except BaseException:
        inc.on_discard = None               # the error itself is the answer
        inc.discard("it could not be added here")
        raise
    return None


# --- copy: the target's receiver ------------------------------------------------------------------------------------

def receive(server, msg, envelope):
    """Get ready for a guest streamed here (`migrate --copy`): its RAM memfd, a receiver process listening for the
    source's worker; answered with where it connects and the token it presents."""
    from pyhv.proto import guest as guest_msgs
    config = msg.config
    guest_msgs.check(config)
    _may_arrive(server, config.name)
    validate(config, boot_files=False)
    if len(server._fds) != len(msg.images):
        raise ProtocolError("ReceiveGuest comes on hvctl.sock with one fd per image it names")
    images = _images(config, msg.images, server._fds)
    try:
        incoming = tempfile.mkdtemp(prefix=server.runtime.incoming_prefix(config.name), dir=server.dir)
    except OSError as e:
        raise HostError(f"cannot make a place for guest {config.name} in {server.dir}: {e.strerror}") from None
    inc = Incoming(server, config, msg.paused)
    inc.images, server._fds = images, []        # ours from here on (closed if it is discarded)
    pieces = []
    try:
        path = os.path.join(incoming, STREAM_SOCK)
        if len(path) > UNIX_PATH_MAX:
            raise UserError(f"runtime dir path is too long for unix sockets: {server.dir}")
        inc.mem_fd = create_memfd(config.mem_bytes, name=f"guest-ram-{config.name}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        pieces.append(listener)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        pieces.append(theirs)
        fds = (inc.mem_fd, listener.fileno(), theirs.fileno())
        proc = subprocess.Popen(runtime.python_module("supervisor.receiver") + [
            "--mem-fd", str(fds[0]), "--listen-fd", str(fds[1]), "--control-fd", str(fds[2])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=fds, start_new_session=True,
            env=runtime.child_env(), cwd=incoming)
    except OSError as e:
        _clean(pieces, incoming, inc)
        raise HostError(f"cannot start a receiver for guest {config.name}: {e.strerror or e}") from None
    except BaseException:
        _clean(pieces, incoming, inc)
        raise
    for p in pieces:
        p.close()
    token = secrets.token_hex(16)
    receiver = Receiving(server, inc, proc, ours, incoming)
    try:
        receiver.send(mig.Expect(token, config, os.path.join(incoming, "state")))
    except OSError as e:
        inc.discard(f"its receiver did not start ({e.strerror})")
        raise HostError(f"cannot start a receiver for guest {config.name}") from None
    server.registry.reserved.add(config.name)
    return m.ReceiveReady(f"unix:{path}", token)


def _clean(pieces, incoming, inc):
    for p in pieces:
        p.close()
    inc.discard("its receiver could not be started")
    shutil.rmtree(incoming, ignore_errors=True)


def _images(config, names, fds):
    """{device: fd} of the disk images handed over with a guest, each checked to be that device's image."""
    devices = {name: (k, d.options) for name, k, d in kinds.named(config.devices)}
    images = dict(zip(names, fds))
    for name, fd in images.items():
        if name not in devices or not devices[name][0].is_image(devices[name][1], fd):
            raise UserError(f"the image handed over as {name!r} is not a disk of guest {config.name}")
    return images


class Receiving:
    """The supervisor's side of one receiver process: what it reports becomes the Incoming guest's steps."""

    def __init__(self, server, inc, proc, ctl, incoming):
        self.server, self.inc, self.proc, self.ctl, self.incoming = server, inc, proc, ctl, incoming
        inc.on_discard = self.end
        server.loop.add(ctl, self._on_message)

    def send(self, msg):
        self.ctl.send(codec.encode(msg, mig.RECEIVER))

    def _on_message(self):
        try:
            data = self.ctl.recv(codec.MAX_MESSAGE_BYTES + 1)
            msg = codec.decode(data, mig.RECEIVER, expect=(mig.Received, mig.Commit, mig.Abort)) if data else None
        except (OSError, ProtocolError) as e:
            return self.inc.discard(f"bad word from its receiver: {e}")
        if msg is None:
            return self.inc.discard("its receiver ended") if not self.inc.done else self.end(None)
        if isinstance(msg, mig.Abort):
            return self.inc.discard(msg.reason)
        if isinstance(msg, mig.Received):
            if self.inc.guest is not None:
                return self.inc.discard("its receiver reported twice")
            try:
                self.inc.prepare(self.inc.mem_fd, os.path.join(self.incoming, "state"), self._prepared)
            except (HvError, OSError) as e:
                self.inc.discard(f"it could not be added here: {e}")
            return None
        if self.inc.guest is None or self.inc.done:
            return self.inc.discard("its receiver committed out of turn")
        self.inc.commit(lambda info: self._tell(mig.Committed()))
        self.end(None, keep_receiver=True)

    def _prepared(self, error):
        self._tell(mig.Prepared() if error is None else mig.Abort(str(error)))

    def _tell(self, msg):
        try:
            self.send(msg)
        except OSError:
            if not self.inc.done:
                self.inc.discard("its receiver went away")

    def end(self, why, keep_receiver=False):
        """Stop listening to the receiver (reaped once it exits); the incoming dir goes."""
        shutil.rmtree(self.incoming, ignore_errors=True)
        if keep_receiver:                       # it still sends Committed; its end is noticed then
            return
        self.server.loop.remove(self.ctl)
        self.ctl.close()
        self.proc.kill()                        # done or gone already; a stuck one has nothing left to do
        self.proc.wait()


def abandon(g, recorded):
    """(A supervisor starting, as it loads its registry) a guest that was migrating here when the supervisor before
    died, before the source's Commit: it never ran here and may run there, so its held worker is killed, not
    adopted, and the guest is forgotten (forget_abandoned)."""
    proc = procs.Adopted.find(recorded, lambda pid: procs.is_worker(pid, g.name))
    if proc is not None:
        proc.kill()
        proc.close()
    print(f"supervisor: discarded guest {g.name}: it was migrating here, uncommitted, when the supervisor "
          f"before ended", file=sys.stderr, flush=True)


def forget_abandoned(registry):
    for g in registry:
        if g.arriving:
            registry.remove(g, keep_logs=False)


def sweep(runtime_dir):
    """Remove what migrations in flight left when their supervisor died (their receivers died with it)."""
    for leaf in os.listdir(runtime_dir.path):
        if leaf.startswith(runtime_dir.INCOMING):
            shutil.rmtree(runtime_dir.file(leaf), ignore_errors=True)


def worker_ended(g):
    """The supervisor's hook: a guest's worker exited while it was moving."""
    if g.moving is not None:
        g.moving.worker_ended()
