"""`hvctl supervisor [--detach]`: run the supervisor of a runtime dir, in the foreground or as a daemon."""
import os
import subprocess
import time

from pyhv.proto import runtime
from pyhv.proto.errors import BadState, EXIT_OK, PeerFailed
from pyhv.supervisor.cli.client import request, runtime_dir, supervisor_alive

START_TIMEOUT = 10.0


def cmd_supervisor(args):
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
    """End the supervisor: refused while guests run (they would end with it) unless --force stops them."""
    import signal
    from pyhv.proto.control import List, Ping
    rd = runtime_dir(args)
    pid = request(args, Ping(), timeout=5.0).pid
    live = [g.name for g in request(args, List()).guests if g.state in ("running", "paused")]
    if live and not args.force:
        raise BadState(f"{len(live)} guest(s) still running ({', '.join(live[:5])}): stop them first, or "
                        f"`hvctl supervisor --stop --force` to stop them with it")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + START_TIMEOUT
    while supervisor_alive(rd.control_sock):
        if time.monotonic() > deadline:
            raise PeerFailed(f"the supervisor (pid {pid}) did not exit within {START_TIMEOUT:g} s")
        time.sleep(0.05)
    print(f"supervisor (pid {pid}) on {rd.path} stopped" + (f" with {len(live)} guest(s)" if live else ""))
    return EXIT_OK


def add_commands(add):
    p = add("supervisor", cmd_supervisor, "run the supervisor (one per runtime dir)")
    p.add_argument("--detach", action="store_true", help="run it in the background, logging to RUNTIME_DIR/supervisor.log")
    p.add_argument("--stop", action="store_true", help="end the running supervisor (refused while guests run)")
    p.add_argument("--force", action="store_true", help="with --stop: stop its running guests too")
