"""A migration's receiver (`hvctl migrate --copy`): one stream from the source's worker into a guest's RAM memfd.

The target's supervisor starts it (supervisor/migration.py) for each
guest coming in, with three fds: the guest's new RAM memfd, the listening
unix socket the source's worker connects to, and its end of a SEQPACKET
control pair (messages of proto/migration.py's RECEIVER channel).  It runs
in a process of its own so the supervisor's loop never waits for the
transfer, and so a receiver that dies takes nothing else with it: its
supervisor sees the control pair close and discards the guest.

    control: Expect (token, config, state dir)
    stream:  preamble, Hello, pages and rounds, state, Done  -> RAM in the memfd, the state written (a hand-over dir)
    control: Received -> Prepared (the guest exists there, held) or Abort
    stream:  Prepared -> Commit (or Abort, or the end: discard)
    control: Commit -> Committed
    stream:  Committed, and exit 0

Any failure: Abort on both (as far as they still listen), exit 1.
"""
import argparse
import ctypes
import signal
import socket
import sys

from pyhv.proto import codec, migration as mig
from pyhv.proto.errors import HvError, one_line
from pyhv.proto.snapshot import Writer

ACCEPT_TIMEOUT = 30.0       # for the source's worker to connect after the supervisor answered ReceiveReady
PREPARE_TIMEOUT = 120.0     # for the supervisor to build the guest, held
COMMIT_TIMEOUT = 60.0       # for the source's Commit after Prepared
CONTROL_BYTES = 1 << 20


class Control:
    """The supervisor's end of the work: one message each way at a time."""

    def __init__(self, fd):
        self.sock = socket.socket(fileno=fd)

    def send(self, msg):
        self.sock.send(codec.encode(msg, mig.RECEIVER))

    def recv(self, timeout, expect):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(CONTROL_BYTES)
        except socket.timeout:
            raise mig.MigrationError(f"the target's supervisor did not answer within {timeout:g} s") from None
        if not data:
            raise mig.MigrationError("the target's supervisor went away")
        msg = codec.decode(data, mig.RECEIVER, expect=(expect, mig.Abort))
        if isinstance(msg, mig.Abort):
            raise mig.MigrationError(msg.reason)
        return msg


def receive(control, listener, mem_fd):
    """The whole dialogue; returns once the target has the guest (Committed sent), or raises."""
    expect = control.recv(None, mig.Expect)
    stream = None
    try:
        listener.settimeout(ACCEPT_TIMEOUT)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise mig.MigrationError(f"the source did not connect within {ACCEPT_TIMEOUT:g} s") from None
        listener.close()
        conn.settimeout(mig.STREAM_TIMEOUT)
        stream = mig.Stream(conn)
        r = mig.Receiver(stream, mem_fd, expect)
        r.hello()
        state = r.receive()
        writer = Writer(expect.state_dir, durable=False)
        try:
            writer.state(state)
            writer.commit(expect.config, handover=True)
        except BaseException:
            writer.abort()
            raise
        control.send(mig.Received(r.rounds, r.bytes))
        control.recv(PREPARE_TIMEOUT, mig.Prepared)
        stream.send_msg(mig.Prepared())
        stream.settimeout(COMMIT_TIMEOUT)
        stream.recv_msg(mig.Commit)
        control.send(mig.Commit())
        control.recv(None, mig.Committed)      # the supervisor answers once the guest runs (or stays paused)
        stream.send_msg(mig.Committed())
    except (HvError, OSError) as e:
        abort = mig.Abort(one_line(e))
        if stream is not None:
            _quietly(stream.send_msg, abort)
        _quietly(control.send, abort)
        raise
    finally:
        if stream is not None:
            stream.close()


def _quietly(send, msg):
    """Tell a peer that may have gone already."""
    try:
        send(msg)
    except (HvError, OSError):
        pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyhv.supervisor.receiver", description=__doc__.splitlines()[0])
    p.add_argument("--mem-fd", type=int, required=True)
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    args = p.parse_args(argv)
    PR_SET_PDEATHSIG = 1                    # nobody else could use what we receive
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    control = Control(args.control_fd)
    try:
        receive(control, socket.socket(fileno=args.listen_fd), args.mem_fd)
    except (HvError, OSError) as e:
        print(f"receiver: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
