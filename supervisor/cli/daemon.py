"""`hvctl supervisor [--detach]`: run the supervisor of a runtime dir, in the foreground or as a daemon."""
import os
import subprocess
import time

from pyhv.proto import runtime
from pyhv.proto.errors import BadState, EXIT_OK, PeerFailed
from pyhv.supervisor.cli.client import request, runtime_dir, supervisor_alive

START_TIMEOUT = 10.0


def cmd_supervisor(args):
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
    os.makedirs(rd.path, exist_ok=True)
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


def add_commands(add):
    add("supervisor", cmd_supervisor, "run the supervisor (one per runtime dir)").add_argument(
        "--detach", action="store_true", help="run it in the background, logging to RUNTIME_DIR/supervisor.log")
