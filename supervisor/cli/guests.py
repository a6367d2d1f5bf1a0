"""Guest lifecycle commands: create, start, stop, pause, resume, destroy, wait."""
import sys

from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, EXIT_VM_FAILED, NotResponding, UserError
from pyhv.supervisor.cli.client import request
from pyhv.supervisor.cli.options import add_run_options, config_from

LIFECYCLE_TIMEOUT = 30.0


def cmd_create(args):
    request(args, m.Create(config_from(args, args.name)))
    return EXIT_OK


def _simple(msg_class):
    def cmd(args):
        request(args, msg_class(args.name), timeout=LIFECYCLE_TIMEOUT)
        return EXIT_OK
    return cmd


def cmd_wait(args):
    if args.timeout is not None and not args.timeout >= 0:
        raise UserError(f"--timeout: {args.timeout:g} is not a number of seconds >= 0")
    try:
        g = request(args, m.Wait(args.name), timeout=args.timeout)
    except NotResponding:
        if args.timeout is not None:
            print(f"hvctl: guest {args.name} still running after {args.timeout:g} s", file=sys.stderr)
            return EXIT_TIMEOUT
        raise
    if g.state == "failed" or g.exit_status in (EXIT_USAGE, EXIT_VM_FAILED):   # interface.md: with a reason
        print(f"hvctl: guest {g.name}: {g.reason}", file=sys.stderr)
    return g.exit_status


def add_commands(add):
    add_run_options(add("create", cmd_create, "define a guest (state: created)", "name"))
    for name, msg in (("start", m.Start), ("stop", m.Stop), ("pause", m.Pause), ("resume", m.Resume),
                      ("destroy", m.Destroy)):
        add(name, _simple(msg), f"{name} a guest", "name")
    add("wait", cmd_wait, "block until the guest stops; exit with its status (124 on --timeout)",
        "name").add_argument("--timeout", type=float, metavar="S")
