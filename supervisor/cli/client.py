"""The client half of every supervisor command: one request to RUNTIME/control.sock, its reply or one HvError."""
import socket

from pyhv.proto.errors import NotResponding, PeerFailed, ProtocolError
from pyhv.proto.runtime import RuntimeDir


class NoSupervisor(PeerFailed):
    """Nobody serves the runtime dir's control socket."""


def runtime_dir(args):
    return RuntimeDir(args.runtime_dir)


def supervisor_alive(path):
    """Does something accept connections on the control socket? (cheap, no zmq)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(args, msg, timeout=10.0):
    """The supervisor's reply to `msg`; NoSupervisor, NotResponding, PeerFailed or the HvError it replied."""
    from pyhv.proto.client import Client
    rd = runtime_dir(args)
    path = rd.control_sock
    if not supervisor_alive(path):
        raise NoSupervisor(f"no supervisor is running on {args.runtime_dir} "
                           f"(start one with `hvctl supervisor --detach`)")
    try:
        return Client(rd.control_endpoint).request(msg, timeout=timeout, alive=lambda: supervisor_alive(path))
    except NotResponding:
        if supervisor_alive(path):
            raise NotResponding(f"the supervisor on {args.runtime_dir} is not responding") from None
        raise PeerFailed(f"the supervisor on {args.runtime_dir} went away") from None
    except ProtocolError as e:
        raise PeerFailed(f"bad reply from the supervisor: {e}") from None


def size_text(n):
    """128M, 1G, ... for exact sizes; the byte count otherwise."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def mib_text(n):
    return f"{n / (1 << 20):.1f}M"

