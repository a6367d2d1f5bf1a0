"""A request/reply client with a timeout, for hvctl -> supervisor and supervisor -> worker.

Each request uses a fresh DEALER socket (empty delimiter frame, so REP and
ROUTER peers both understand it) and closes it afterwards: a late reply to a
timed-out request can never be mistaken for the answer to the next one.
"""
import zmq

from proto import codec, messages
from proto.errors import NotResponding, ProtocolError, RequestFailed


class Client:
    def __init__(self, endpoint, timeout=5.0, context=None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()

    def request(self, msg, timeout=None):
        """The reply message to `msg`; raises NotResponding, RequestFailed (an Error reply), ProtocolError."""
        timeout = self.timeout if timeout is None else timeout
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
            sock.connect(self.endpoint)
            sock.send_multipart([b"", codec.encode(msg)])
            if not sock.poll(None if timeout is None else int(timeout * 1000)):
                raise NotResponding(f"no answer from {self.endpoint} within {timeout:g} s")
            frames = sock.recv_multipart()
        finally:
            sock.close()
        if len(frames) != 2 or frames[0] != b"":
            raise ProtocolError(f"reply has {len(frames)} frames, expected 2")
        reply = codec.decode(frames[1])
        if isinstance(reply, messages.Error):
            raise RequestFailed(reply.kind, reply.message)
        return reply
