"""Graceful shutdown, as `hvctl shutdown` and `Guest.shutdown()` do it: Ctrl-Alt-Del, a wait, then (if asked) a stop."""
from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_TIMEOUT, BadState, NotResponding

DEFAULT_TIMEOUT = 60.0      # seconds: a Linux guest here syncs and reboots in a few; its kernel code is emulated


def shutdown(request, name, timeout=DEFAULT_TIMEOUT, force=False):
    """The guest's exit status once it has ended, or EXIT_TIMEOUT if it is still running after `timeout` s.

    `request(msg, timeout)` is the caller's way to the supervisor.  A guest
    with no keyboard driver listening (a raw guest) is refused with BadState,
    since nothing could make it stop; with `force` it is stopped instead (143),
    as is one that does not end within `timeout`.
    """
    if not request(m.CtrlAltDel(name), 30.0).listening:
        if not force:
            raise BadState(f"guest {name} has no keyboard driver listening for Ctrl-Alt-Del (yet: Linux sets "
                           f"it up a while into its boot; never: a raw guest): `hvctl stop {name}` ends it")
        return request(m.Stop(name), 30.0).exit_status
    try:
        return request(m.Wait(name, timeout=timeout), timeout).exit_status
    except NotResponding:
        if not force:
            return EXIT_TIMEOUT
        return request(m.Stop(name), 30.0).exit_status
