"""Errors and exit statuses: one root (HvError), a class per way a request can fail, every status a named constant.

Every error pyhv raises on purpose is an HvError; its message is one line
that tells the user what to do, its `exit_status` is what hvctl exits with
and its `kind` is what travels in an Error reply, so the client raises the
same class the server did (`from_wire`).  Anything else that escapes a
handler is a bug: it is reported as INTERNAL, never as the user's fault.
"""

# Exit statuses (interface.md: hvctl run / hvctl wait, and every command's errors).
EXIT_OK = 0                 # the guest reset or powered off; a command succeeded
EXIT_ERROR = 1              # no such guest, no supervisor, wrong state, a peer that failed
EXIT_USAGE = 2              # bad arguments or unusable files: nothing was changed
EXIT_VM_FAILED = 70         # the VM failed (emulation failure, failed entry, worker crash)
EXIT_TIMEOUT = 124          # the guest ran past --timeout (or `wait --timeout` ran out)
EXIT_INTERRUPTED = 130      # Ctrl-C on hvctl itself
EXIT_STOPPED = 143          # hvctl stop: "stopped by request"

# Wire kinds of Error replies.
NO_SUCH_GUEST = "no-such-guest"
BAD_ARGUMENT = "bad-argument"
BAD_STATE = "bad-state"
WORKER = "worker"
PROTOCOL = "protocol"
INTERNAL = "internal"
HOST = "host"
KINDS = (NO_SUCH_GUEST, BAD_ARGUMENT, BAD_STATE, WORKER, PROTOCOL, INTERNAL, HOST)


class HvError(Exception):
    """The root of pyhv's errors: a one-line message for the user, an exit status, a wire kind."""
    kind = INTERNAL
    exit_status = EXIT_ERROR


class UserError(HvError):
    """Bad input the user can fix (an option, a file, a name): exit 2, nothing changed."""
    kind = BAD_ARGUMENT
    exit_status = EXIT_USAGE


class NoSuchGuest(HvError):
    """The named guest is not in the registry."""
    kind = NO_SUCH_GUEST


class BadState(HvError):
    """The guest exists but cannot do that now (not running, already exists, being started)."""
    kind = BAD_STATE


class PeerFailed(HvError):
    """A process we asked did not answer, answered badly, or died (the supervisor, a worker, a service)."""
    kind = WORKER


class NotResponding(PeerFailed):
    """The peer did not answer within the timeout: it is not running or is hung."""


class ProtocolError(HvError):
    """Bytes that are not a valid message of this protocol version (one-line message)."""
    kind = PROTOCOL


class InternalError(HvError):
    """A bug on the answering side; the details are in its log."""
    kind = INTERNAL


class HostError(HvError):
    """The host refused what the request needed (a full disk, a limit): that request failed, nothing else did."""
    kind = HOST


class StateError(UserError):
    """Saved state (a snapshot, or what a restarted service is given) that does not fit the device it is for."""


def state_bytes(value, what):
    """`value` if saved state holds bytes there, else StateError (bytes(n) of an int would allocate n bytes)."""
    if not isinstance(value, (bytes, bytearray)):
        raise StateError(f"saved {what} is {type(value).__name__}, not bytes")
    return bytes(value)


class VmFailure(HvError):
    """The VM cannot be built or has failed: exit 70 with the reason."""
    kind = INTERNAL
    exit_status = EXIT_VM_FAILED


_BY_KIND = {NO_SUCH_GUEST: NoSuchGuest, BAD_ARGUMENT: UserError, BAD_STATE: BadState, WORKER: PeerFailed,
            PROTOCOL: ProtocolError, INTERNAL: InternalError, HOST: HostError}


def from_wire(kind, message):
    """The HvError an Error reply of `kind` stands for (unknown kinds are internal errors)."""
    return _BY_KIND.get(kind, InternalError)(message)


def one_line(e, limit=300):
    """An exception as one line of at most `limit` characters (for replies and logs)."""
    s = " ".join(str(e).split())
    return s[:limit] or type(e).__name__
