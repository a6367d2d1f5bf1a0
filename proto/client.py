"""A request/reply client with a timeout, for hvctl -> supervisor and supervisor -> worker.

Each request uses a fresh DEALER socket (empty delimiter frame, so REP and
ROUTER peers both understand it) and closes it afterwards: a late reply to a
timed-out request can never be mistaken for the answer to the next one.
"""
import time

import zmq

from pyhv.proto import codec
from pyhv.proto.control import CONTROL
from pyhv.proto.errors import NotResponding, ProtocolError, from_wire
from pyhv.proto.messages import Error


DEFAULT = object()


class Client:
    def __init__(self, endpoint, timeout=5.0, context=None, channel=CONTROL):
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel = channel
        self._ctx = context or zmq.Context.instance()

    def request(self, msg, timeout=DEFAULT, alive=None):
        """The reply message to `msg`; raises NotResponding, ProtocolError, or the HvError an Error reply names.

        timeout=None waits forever; then `alive()` is asked every second and a
        False answer (the peer is gone) raises NotResponding.
        """
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
