"""How a device-service process gets started: by the worker itself (`hvctl run`) or by the supervisor.

Supervised guests have their services started by the supervisor (issue 3: the
supervisor spawns and watches every process of a guest).  The worker still
owns the fds a service needs (the KVM ioeventfds/irqfds it registered, the
memfd, the lifeline pipe), so it sends them to the supervisor over a unix
SEQPACKET socket (RUNTIME/services.sock, SCM_RIGHTS) with a SpawnService
message; the supervisor checks that the request comes from that guest's
worker (SO_PEERCRED), starts `python -m pyhv.devices.service` with those fds and
answers with the pid and a pidfd for it.  The worker watches the service
through the pidfd (it is not the parent, so it cannot wait for it) and
signals it through the pidfd too (no pid-reuse race); the supervisor reaps
it and logs its exit status.
"""
import array
import os
import select
import socket
import subprocess
import sys

from pyhv.proto import codec, messages as m
from pyhv.proto.errors import ProtocolError

SERVICE_ARGV = [sys.executable, "-m", "pyhv.devices.service"]
MAX_FDS = 64
REPLY_BYTES = 4096


class LaunchError(OSError):
    """The service could not be started (the message says why)."""


def local(args, fds, cwd, env):
    """Start the service as a child of this process (standalone `hvctl run`, tests)."""
    return subprocess.Popen(SERVICE_ARGV + list(args), pass_fds=fds, start_new_session=True, cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


class ForeignProcess:
    """A service someone else (the supervisor) is the parent of: watched and signalled through a pidfd.

    Mirrors the parts of Popen that RemoteBackend uses; `returncode` becomes
    EXITED once the process has ended (its status is the supervisor's).
    """
    EXITED = "exited"

    def __init__(self, pid, pidfd):
        self.pid, self.pidfd, self.returncode = pid, pidfd, None

    def poll(self):
        if self.returncode is None and select.select([self.pidfd], [], [], 0)[0]:
            self.returncode = self.EXITED
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"service pid {self.pid}", timeout)
            self.returncode = self.EXITED
        return self.returncode


class SupervisorLauncher:
    """Asks the supervisor at `sock_path` to start services for guest `guest`."""

    def __init__(self, sock_path, guest, timeout=10.0):
        self.sock_path, self.guest, self.timeout = sock_path, guest, timeout

    def __call__(self, args, fds, cwd=None, env=None):
        msg = codec.encode(m.SpawnService(self.guest, list(args), list(fds)))
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.sock_path)
                s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                data, anc, _, _ = s.recvmsg(REPLY_BYTES, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
            except OSError as e:
                raise LaunchError(f"the supervisor did not start the service: {e}") from None
        got = [fd for level, kind, raw in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in array.array("i", raw[:len(raw) - len(raw) % 4])]
        try:
            reply = codec.decode(data, expect=(m.ServiceSpawned, m.Error))
        except ProtocolError as e:
            for fd in got:
                os.close(fd)
            raise LaunchError(f"bad reply from the supervisor: {e}") from None
        if isinstance(reply, m.Error) or len(got) != 1:
            for fd in got:
                os.close(fd)
            raise LaunchError(f"the supervisor refused to start the service: "
                              f"{reply.message if isinstance(reply, m.Error) else 'no pidfd in its reply'}")
        return ForeignProcess(reply.pid, got[0])
