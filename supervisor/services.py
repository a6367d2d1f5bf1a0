"""Device services of supervised guests: started here at their worker's request, reaped and logged here.

A worker asks on RUNTIME/services.sock (unix SEQPACKET: one SpawnService
message with its fds in SCM_RIGHTS per connection; see
devices/virtio/launch.py for why the fds come from the worker).  A request
is served only if its sender is the running worker of the guest it names
(SO_PEERCRED), its options are `pyhv.devices.service` options, and every fd
option names one of the fds it sent.  The service starts in its own session
with the guest's worker log as stderr; the reply carries its pid and a
pidfd.  Its exit status goes to the supervisor's log.  Services also exit by
themselves when their worker dies (the lifeline pipe), and whatever is left
when a guest ends is killed.
"""
import array
import os
import signal
import socket
import subprocess
import sys

from pyhv.proto import codec, messages as m
from pyhv.proto.errors import ProtocolError
from pyhv.supervisor.spawn import REPO_ROOT, child_env

MAX_REQUEST = 64 << 10
MAX_FDS = 64
DEVICES = ("rng", "blk", "console", "net")
FD_OPTIONS = ("--mem-fd", "--lifeline")
FD_LIST_OPTIONS = ("--notify-fds", "--irq-fds")
VALUE_OPTIONS = ("--device", "--mem-size", "--control", "--events", "--disk", "--console-sock", "--console-log",
                 "--net", "--mac", "--switch-dir", "--switch-name") + FD_OPTIONS + FD_LIST_OPTIONS


class BadRequest(ValueError):
    """A SpawnService that is refused; the message goes back in the Error reply."""


class ServiceLauncher:
    def __init__(self, runtime_dir, registry):
        self.registry = registry
        self.path = os.path.join(runtime_dir, "services.sock")
        try:
            os.unlink(self.path)        # stale: the supervisor lock says nobody serves it
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(64)
        self.procs = {}                 # guest name -> [Popen]
        self.started = self.refused = 0

    def fileno(self):
        return self.sock.fileno()

    def serve(self):
        """Answer every pending connection (called when the listening socket is readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                conn.settimeout(2.0)
                self._serve_one(conn)

    def _serve_one(self, conn):
        fds = []
        try:
            data, anc, _, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * MAX_FDS), socket.MSG_CMSG_CLOEXEC)
            fds = [fd for level, kind, raw in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", raw[:len(raw) - len(raw) % 4])]
            reply_fds = []
            try:
                msg = codec.decode(data, expect=m.SpawnService)
                pid, pidfd = self._spawn(conn, msg, fds)
                reply, reply_fds = m.ServiceSpawned(pid), [pidfd]
            except (ProtocolError, BadRequest, OSError) as e:
                self.refused += 1
                reply = m.Error("bad-argument", f"cannot start the device service: {e}")
                print(f"supervisor: refused a device service request: {e}", file=sys.stderr, flush=True)
            try:
                conn.sendmsg([codec.encode(reply)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", reply_fds))] if reply_fds else [])
            finally:
                for fd in reply_fds:
                    os.close(fd)
        except OSError:
            pass                        # the worker went away mid-request: its restart logic asks again
        finally:
            for fd in fds:
                os.close(fd)

    def _spawn(self, conn, msg, fds):
        g = self._guest_of(conn, msg.guest)
        if len(msg.fds) != len(fds):
            raise BadRequest(f"{len(fds)} fds received, the request names {len(msg.fds)}")
        mine = dict(zip(msg.fds, fds))                  # worker's number -> ours
        args = _checked_args(msg.args, mine)
        with open(g.path("worker.log"), "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "pyhv.devices.service", *args], pass_fds=fds,
                                 start_new_session=True, cwd=REPO_ROOT, env=child_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        self.procs.setdefault(g.name, []).append(p)
        self.started += 1
        return p.pid, os.pidfd_open(p.pid)

    def _guest_of(self, conn, name):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        try:
            g = self.registry.get(name)
        except Exception:
            raise BadRequest(f"no guest {name!r}") from None
        if g.proc is None or g.proc.pid != pid:
            raise BadRequest(f"pid {pid} is not the worker of guest {name}")
        return g

    def watch(self):
        """Reap ended services and log how they ended."""
        for name, procs in list(self.procs.items()):
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
                print(f"supervisor: device service pid {p.pid} of guest {name} {how}", file=sys.stderr, flush=True)
            if not procs:
                del self.procs[name]

    def guest_ended(self, name):
        """The guest's worker is gone: its services must go too (they normally already have)."""
        for p in self.procs.get(name, []):
            if p.poll() is None:
                p.kill()
        for p in self.procs.get(name, []):
            p.wait()
        self.watch()

    def close(self):
        for name in list(self.procs):
            self.guest_ended(name)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _checked_args(args, mine):
    """The service's options with the worker's fd numbers replaced by ours; BadRequest if anything is off."""
    if len(args) % 2 or len(args) > 64:
        raise BadRequest("options must be NAME VALUE pairs")
    out = []
    seen = set()
    for name, value in zip(args[::2], args[1::2]):
        if name not in VALUE_OPTIONS or name in seen:
            raise BadRequest(f"option {name!r} is not allowed (or repeated)")
        seen.add(name)
        if name in FD_OPTIONS:
            value = str(_fd(value, mine))
        elif name in FD_LIST_OPTIONS:
            value = ",".join(str(_fd(v, mine)) for v in value.split(",") if v)
        elif name == "--device" and value not in DEVICES:
            raise BadRequest(f"unknown device {value!r}")
        out += [name, value]
    if "--device" not in seen:
        raise BadRequest("no --device")
    return out


def _fd(text, mine):
    try:
        return mine[int(text)]
    except (ValueError, KeyError):
        raise BadRequest(f"fd {text!r} was not sent with the request") from None
