"""Control-plane errors: what went wrong between two processes, and what the user should do.

`Error.kind` values travel in Error replies; `EXIT_STATUS` maps them to the
exit status hvctl uses (interface.md: unknown guest 1, bad arguments 2).
"""

NO_SUCH_GUEST = "no-such-guest"   # the name is not in the registry
BAD_ARGUMENT = "bad-argument"     # a config or argument the user can fix
BAD_STATE = "bad-state"           # the guest exists but cannot do that now
WORKER = "worker"                 # the guest's worker did not answer or failed
PROTOCOL = "protocol"             # the request itself was malformed
INTERNAL = "internal"             # a bug on the answering side (details in its log)

KINDS = (NO_SUCH_GUEST, BAD_ARGUMENT, BAD_STATE, WORKER, PROTOCOL, INTERNAL)
EXIT_STATUS = {BAD_ARGUMENT: 2}   # every other kind: 1


class ProtocolError(ValueError):
    """Bytes that are not a valid message of this protocol version (one-line message)."""


class NotResponding(TimeoutError):
    """The peer did not answer within the timeout: it is not running or is hung."""


class RequestFailed(RuntimeError):
    """A request cannot be done: raised by a handler to send an Error reply, and by
    the client when it receives one.  `kind` is one of KINDS."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind

    @property
    def exit_status(self):
        return EXIT_STATUS.get(self.kind, 1)
