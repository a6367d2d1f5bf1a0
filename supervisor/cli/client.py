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


def require_supervisor(args):
    """NoSupervisor unless a supervisor serves the runtime dir; its RuntimeDir."""
    rd = runtime_dir(args)
    if not supervisor_alive(rd.control_sock):
        raise NoSupervisor(f"no supervisor is running on {args.runtime_dir} "
                           f"(start one with `hvctl supervisor --detach`)")
    return rd


def request(args, msg, timeout=10.0):
    """The supervisor's reply to `msg` (over RUNTIME/hvctl.sock: no ZeroMQ to import); NoSupervisor,
    NotResponding, PeerFailed or the HvError it replied."""
    from pyhv.proto.client import SeqClient
    rd = runtime_dir(args)
    try:
        return SeqClient(rd.hvctl_sock).request(msg, timeout=timeout)
    except PeerFailed as e:
        require_supervisor(args)
        if "went away" in str(e):
            raise PeerFailed(f"the supervisor on {args.runtime_dir} went away") from None
        raise
    except NotResponding:
        raise NotResponding(f"the supervisor on {args.runtime_dir} is not responding") from None
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


def table(columns, rows):
    """Rows of strings under their column names, each column as wide as its widest cell."""
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def iso_time(t):
    """2026-12-02T13:37:42.123: a Unix time as local time to the millisecond."""
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
