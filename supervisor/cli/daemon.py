"""`hvctl supervisor [--detach]`: run the supervisor of a runtime dir, in the foreground or as a daemon."""
import subprocess
import time

from pyhv.proto import runtime
from pyhv.proto.errors import BadState, EXIT_OK, PeerFailed
from pyhv.supervisor.cli.client import request, runtime_dir, supervisor_alive

START_TIMEOUT = 10.0


def cmd_supervisor(args):
    if args.leave_guests and not args.stop:
        from pyhv.proto.errors import UserError
        raise UserError("--leave-guests goes with --stop")
    if args.stop:
        return _stop(args)
    if args.detach:
        return _detach(args)
    from pyhv.supervisor.server import Server
    try:
        server = Server(args.runtime_dir)
    except OSError as e:
        raise PeerFailed(f"cannot use runtime dir {args.runtime_dir}: {e.strerror or e}") from None
    server.serve()
    return EXIT_OK


def _detach(args):
    """Start the supervisor as a daemon (own session, log in RUNTIME_DIR/supervisor.log)."""
    from pyhv.proto.control import Ping
    rd = runtime_dir(args)
    if supervisor_alive(rd.control_sock):
        pong = request(args, Ping(), timeout=2.0)
        raise BadState(f"a supervisor (pid {pong.pid}) is already running on {args.runtime_dir}")
    rd.make_private()
    with open(rd.supervisor_log, "ab") as out:
        proc = subprocess.Popen(runtime.python_module("supervisor.cli") + ["supervisor", "--runtime-dir", rd.path],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=runtime.child_env(), cwd="/")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(rd.supervisor_log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise PeerFailed(f"the supervisor did not start: {lines[-1]}")
        if supervisor_alive(rd.control_sock):
            print(f"supervisor running (pid {proc.pid}) on {rd.path}")
            return EXIT_OK
        time.sleep(0.05)
    raise PeerFailed(f"the supervisor did not start within {START_TIMEOUT:g} s (see {rd.supervisor_log})")


def _stop(args):
    """End the supervisor: refused while guests run, unless --force (they are stopped with it) or --leave-guests
    (they run on; the next supervisor of the runtime dir adopts them)."""
    from pyhv.proto.control import StopSupervisor
    from pyhv.proto.errors import UserError
    if args.force and args.leave_guests:
        raise UserError("--force stops the guests, --leave-guests leaves them running: give one of them")
    rd = runtime_dir(args)
    reply = request(args, StopSupervisor(force=args.force, leave_guests=args.leave_guests), timeout=60.0)
    deadline = time.monotonic() + START_TIMEOUT
    while runtime.pid_alive(reply.pid) or supervisor_alive(rd.control_sock):
        if time.monotonic() > deadline:
            raise PeerFailed(f"the supervisor (pid {reply.pid}) did not exit within {START_TIMEOUT:g} s")
        time.sleep(0.05)
    n = len(reply.guests)
    if not n:
        print(f"supervisor (pid {reply.pid}) on {rd.path} stopped")
    elif reply.left_running:
        print(f"supervisor (pid {reply.pid}) on {rd.path} stopped; {n} guest(s) left running for the next "
              f"supervisor ({', '.join(reply.guests[:5])})")
    else:
        print(f"supervisor (pid {reply.pid}) on {rd.path} stopped with {n} guest(s)")
    return EXIT_OK


def add_commands(add):
    p = add("supervisor", cmd_supervisor, "run the supervisor (one per runtime dir)")
    p.add_argument("--detach", action="store_true", help="run it in the background, logging to RUNTIME_DIR/supervisor.log")
    p.add_argument("--stop", action="store_true",
                   help="end the running supervisor (refused while guests run, unless --force or --leave-guests)")
    p.add_argument("--force", action="store_true", help="with --stop: stop its running guests too")
    p.add_argument("--leave-guests", action="store_true",
                   help="with --stop: leave its guests running; the next supervisor on this runtime dir adopts them "
                        "(to upgrade or restart the supervisor)")
