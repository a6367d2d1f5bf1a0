"""Request/reply clients with a timeout: over ZeroMQ (supervisor -> worker, anyone -> supervisor) and over a plain
unix SOCK_SEQPACKET socket (hvctl -> supervisor: no ZeroMQ to import, ~20 ms less per command).

Each request uses a fresh socket and closes it afterwards: a late reply to a
timed-out request can never be mistaken for the answer to the next one.  A
ZeroMQ request is a DEALER with an empty delimiter frame (REP and ROUTER
peers both understand it); a seqpacket request is one message on its own
connection, answered by one message.
"""
import socket
import time

from pyhv.proto import codec
from pyhv.proto.control import CONTROL
from pyhv.proto.errors import HvError, NotResponding, PeerFailed, ProtocolError, from_wire
from pyhv.proto.messages import Error, Ok


DEFAULT = object()


class Client:
    def __init__(self, endpoint, timeout=5.0, context=None, channel=CONTROL):
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel = channel
        import zmq                          # here: the seqpacket client below must not pay for it
        self._zmq = zmq
        self._ctx = context or zmq.Context.instance()

    def request(self, msg, timeout=DEFAULT, alive=None):
        """The reply message to `msg`; raises NotResponding, ProtocolError, or the HvError an Error reply names.

        timeout=None waits forever; then `alive()` is asked every second and a
        False answer (the peer is gone) raises NotResponding.
        """
        zmq = self._zmq
        timeout = self.timeout if timeout is DEFAULT else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
            sock.connect(self.endpoint)
            sock.send_multipart([b"", codec.encode(msg, self.channel)])
            while True:
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if sock.poll(max(0, int(left * 1000))):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise NotResponding(f"no answer from {self.endpoint} within {timeout:g} s")
                if alive is not None and not alive():
                    raise NotResponding(f"{self.endpoint} went away")
            frames = sock.recv_multipart()
        finally:
            sock.close()
        if len(frames) != 2 or frames[0] != b"":
            raise ProtocolError(f"reply has {len(frames)} frames, expected 2")
        reply = codec.decode(frames[1], self.channel)
        if isinstance(reply, Error):
            raise from_wire(reply.kind, reply.message)
        return reply


class SeqClient:
    """One request per connection on a unix SOCK_SEQPACKET socket (the supervisor's RUNTIME/hvctl.sock)."""

    def __init__(self, path, timeout=5.0, channel=CONTROL):
        self.path, self.timeout, self.channel = path, timeout, channel

    def request(self, msg, timeout=DEFAULT):
        """The reply to `msg`; NotResponding after `timeout` s (None: wait for ever), PeerFailed if the peer
        closes the connection without answering, or the HvError an Error reply names."""
        timeout = self.timeout if timeout is DEFAULT else timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            try:
                s.connect(self.path)
                s.settimeout(timeout)
                s.send(codec.encode(msg, self.channel))
                data = s.recv(codec.MAX_MESSAGE_BYTES)
            except TimeoutError:
                raise NotResponding(f"no answer from {self.path} within {timeout:g} s") from None
            except OSError as e:
                raise PeerFailed(f"{self.path}: {e.strerror or e}") from None
        if not data:
            raise PeerFailed(f"{self.path} went away without an answer")
        return self._decode(data)

    def stream(self, msg, timeout=None):
        """The messages the peer sends on one connection after `msg`, as a generator.  The peer confirms the
        subscription with Ok before this returns, so nothing after it is missed; NotResponding if a message
        takes longer than `timeout` s (None: wait for ever), PeerFailed once the peer closes.  Closing the
        generator closes the connection."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.send(codec.encode(msg, self.channel))
            data = s.recv(codec.MAX_MESSAGE_BYTES)
            if not data:
                raise PeerFailed(f"{self.path} went away without an answer")
            if not isinstance(self._decode(data), Ok):
                raise ProtocolError(f"{self.path} did not confirm the subscription")
            s.settimeout(timeout)
        except TimeoutError:
            s.close()
            raise NotResponding(f"no answer from {self.path} within {self.timeout:g} s") from None
        except OSError as e:
            s.close()
            raise PeerFailed(f"{self.path}: {e.strerror or e}") from None
        except HvError:
            s.close()
            raise
        return self._messages(s, timeout)

    def _messages(self, s, timeout):
        with s:
            try:
                while data := s.recv(codec.MAX_MESSAGE_BYTES):
                    yield self._decode(data)
            except TimeoutError:
                raise NotResponding(f"nothing from {self.path} within {timeout:g} s") from None
            except OSError as e:
                raise PeerFailed(f"{self.path}: {e.strerror or e}") from None
        raise PeerFailed(f"{self.path} went away")

    def _decode(self, data):
        reply = codec.decode(data, self.channel)
        if isinstance(reply, Error):
            raise from_wire(reply.kind, reply.message)
        return reply
