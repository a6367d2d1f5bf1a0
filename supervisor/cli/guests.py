"""Guest lifecycle commands: create, start, stop, pause, resume, destroy, wait."""
import sys

from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, EXIT_VM_FAILED, NotResponding, UserError
from pyhv.supervisor.cli.client import request
from pyhv.supervisor.cli.options import add_run_options, config_from

LIFECYCLE_TIMEOUT = 30.0


def cmd_create(args):
    request(args, m.Create(config_from(args, args.name), start=args.start), timeout=LIFECYCLE_TIMEOUT)
    return EXIT_OK


def cmd_destroy(args):
    names = _names(args)
    for name in names:
        request(args, m.Destroy(name, force=args.force, purge=args.purge), timeout=LIFECYCLE_TIMEOUT)
    return EXIT_OK


def _names(args):
    """The guest named, or with --all every guest the supervisor has."""
    if args.all == bool(args.name):
        raise UserError(f"{args.command}: name a guest or give --all")
    return [g.name for g in request(args, m.List()).guests] if args.all else [args.name]


def _simple(msg_class):
    def cmd(args):
        request(args, msg_class(args.name), timeout=LIFECYCLE_TIMEOUT)
        return EXIT_OK
    return cmd


def cmd_shutdown(args):
    """Ctrl-Alt-Del, then the guest's own exit status; 124 with one line if it still runs after --timeout."""
    from pyhv.supervisor.shutdown import shutdown
    if not args.timeout >= 0:
        raise UserError(f"--timeout: {args.timeout:g} is not a number of seconds >= 0")
    status = shutdown(lambda msg, t: request(args, msg, timeout=t), args.name, args.timeout, args.force)
    if status == EXIT_TIMEOUT:
        print(f"hvctl: guest {args.name} still running {args.timeout:g} s after Ctrl-Alt-Del "
              f"(`hvctl stop {args.name}` ends it; --force does that itself)", file=sys.stderr)
    return status


def cmd_wait(args):
    if bool(args.all) == bool(args.name):
        raise UserError("wait: name a guest or give --all")
    if args.timeout is not None and not args.timeout >= 0:
        raise UserError(f"--timeout: {args.timeout:g} is not a number of seconds >= 0")
    if args.all:
        return _wait_all(args)
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


def _wait_all(args):
    """Every running guest to its end, then a table of statuses; exit 0 if all ended 0, else the first other one."""
    import time
    from pyhv.supervisor.cli.client import table
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    names = [g.name for g in request(args, m.List()).guests if g.state in ("running", "paused")]
    if not names:
        print("no guest is running")
        return EXIT_OK
    rows, worst = [], EXIT_OK
    for name in names:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            g = request(args, m.Wait(name), timeout=left)
            status, reason = g.exit_status, g.reason
        except NotResponding:
            status, reason = EXIT_TIMEOUT, "still running"
        rows.append((name, str(status), reason))
        if status != EXIT_OK and worst == EXIT_OK:
            worst = status
    print(table(("NAME", "STATUS", "REASON"), rows))
    return worst
def cmd_apply(args):
    """Create and start every guest of a spec file; with --wait, wait for them all and print their statuses."""
    from pyhv.supervisor import fleet
    from pyhv.supervisor.api import Client
    from pyhv.supervisor.cli.client import require_supervisor, table
    require_supervisor(args)
    with Client(args.runtime_dir, timeout=LIFECYCLE_TIMEOUT) as hv:
        guests = fleet.apply(hv, args.file)
        print(f"{len(guests)} guest(s) created and started")
        if not args.wait:
            return EXIT_OK
        statuses = hv.wait_all(guests, timeout=args.timeout)
        infos = {g.name: g for g in hv.list()}
        rows = [(name, str(s), infos[name].reason if name in infos else "") for name, s in statuses.items()]
    print(table(("NAME", "STATUS", "REASON"), rows))
    bad = [s for s in statuses.values() if s != EXIT_OK]
    return bad[0] if bad else EXIT_OK


def add_commands(add):
    create = add("create", cmd_create, "define a guest (state: created)", "name")
    add_run_options(create)
    create.add_argument("--start", action="store_true", help="and start it, in the same request")
    for name, msg in (("start", m.Start), ("stop", m.Stop), ("pause", m.Pause), ("resume", m.Resume)):
        add(name, _simple(msg), f"{name} a guest", "name")
    shutdown = add("shutdown", cmd_shutdown, "ask the guest to power off (Ctrl-Alt-Del on its keyboard) and wait "
                   "for it; exit with its status", "name")
    shutdown.add_argument("--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds "
                          "(default 60): status 124")
    shutdown.add_argument("--force", "-f", action="store_true", help="then stop it hard (143), and at once if "
                          "no keyboard driver listens")
    destroy = add("destroy", cmd_destroy, "forget a guest that is not running (its logs are kept in "
                  "RUNTIME_DIR/logs/NAME)")
    destroy.add_argument("name", nargs="?")
    destroy.add_argument("--all", action="store_true", help="every guest")
    destroy.add_argument("--force", "-f", action="store_true", help="stop a running or paused guest first")
    destroy.add_argument("--purge", action="store_true", help="delete its logs too")
    wait = add("wait", cmd_wait, "block until the guest stops; exit with its status (124 on --timeout)")
    wait.add_argument("name", nargs="?")
    wait.add_argument("--all", action="store_true", help="every running guest, then a table of statuses")
    wait.add_argument("--timeout", type=float, metavar="S")
    apply = add("apply", cmd_apply, "create and start every guest of a spec file (TOML or JSON; see docs/api.md)",
                "file")
    apply.add_argument("--wait", action="store_true", help="then wait for them all and print their statuses")
    apply.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds")
