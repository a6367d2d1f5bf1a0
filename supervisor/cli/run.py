"""`hvctl run`: one guest in the foreground, no supervisor; the exit status is the guest's."""
import os
import sys

from pyhv.proto.errors import EXIT_OK, EXIT_STOPPED, EXIT_VM_FAILED, UserError
from pyhv.supervisor.cli.console import DETACH_KEY
from pyhv.supervisor.cli.options import add_run_options, config_from
from pyhv.supervisor.output_files import check_writable


def cmd_run(args):
    """On a terminal the guest gets it raw (its own echo, Ctrl-C, arrow keys) and Ctrl-] stops it."""
    if args.detach:
        return _detached(args)
    if args.name:
        raise UserError("--name: only with -d (a foreground guest has no name)")
    snapshot = None
    if args.restore:
        config, snapshot = _restored(args)
    else:
        config = config_from(args, "run")
    if args.stats_json:
        check_writable(args.stats_json, "--stats-json")
    from pyhv.vcpu_worker.runner import Foreground
    guest = Foreground(config, snapshot)
    tty = os.isatty(0)
    saved = None
    try:
        if tty:
            import termios
            import tty as ttymod
            saved = termios.tcgetattr(0)
            ttymod.setraw(0)
            guest.notices.append("Ctrl-] stops the guest")
        for line in guest.notices:
            print(f"hvctl: {line}\r", file=sys.stderr, flush=True)
        outcome = guest.run(escape=DETACH_KEY if tty else None)
        if args.stats_json:
            import json
            stats = guest.machine.stats()
            stats["outcome"] = {"status": outcome.status, "reason": outcome.reason}
            with open(args.stats_json, "w") as f:
                json.dump(stats, f, indent=2)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        guest.close()
    if tty and outcome.status == EXIT_STOPPED:
        print(f"\nhvctl: {outcome.reason}", file=sys.stderr)
    if outcome.status == EXIT_VM_FAILED:
        print(f"hvctl: VM failed: {outcome.reason}", file=sys.stderr)
    return outcome.status


def _detached(args):
    """`run -d`: the guest goes to the supervisor (create --start) under --name or a new name, which is printed."""
    from pyhv.proto import control as m
    from pyhv.supervisor.cli.client import request
    if args.restore:
        raise UserError("--restore: not with -d (`hvctl restore DIR --name NAME` gives the guest to the supervisor)")
    if args.stats_json:
        raise UserError("--stats-json: not with -d (`hvctl stats NAME --json` gives them while it runs)")
    name = args.name or f"run-{os.urandom(3).hex()}"
    request(args, m.Create(config_from(args, name), start=True), timeout=30.0)
    print(name)
    return EXIT_OK


GUEST_OPTIONS = ("kernel", "load_addr", "initrd", "cmdline", "mem", "vcpus", "pin", "compat")


def _restored(args):
    """(config, Snapshot) for `run --restore DIR`: the snapshot's guest, with --timeout if given."""
    from pyhv.devices.virtio.kinds import KINDS
    from pyhv.proto.guest import check
    from pyhv.proto.snapshot import Snapshot
    given = [o for o in GUEST_OPTIONS if getattr(args, o) is not None] + \
        [k.flag[2:] for k in KINDS.values() if k.own_option and getattr(args, f"device_{k.name}")] + \
        (["device"] if args.plugins else [])
    if given or args.boot != "linux":
        raise UserError(f"--restore: the guest comes from the snapshot; give no --{(given or ['boot'])[0]} "
                        f"(only --timeout, --gdb and --trace)")
    snapshot = Snapshot(args.restore)
    config = snapshot.config
    if args.timeout is not None:
        try:
            config = config.replace(timeout=float(args.timeout))
        except ValueError:
            raise UserError(f"--timeout: {args.timeout!r} is not a number of seconds") from None
    if args.gdb is not None:
        config = config.replace(gdb=args.gdb)
    if args.trace is not None:
        config = config.replace(trace=os.path.abspath(args.trace))
        check_writable(config.trace, "--trace")
    check(config)
    return config, snapshot


def add_commands(add):
    run = add("run", cmd_run, "boot one guest in the foreground; exit with its status")
    add_run_options(run)
    run.add_argument("-d", "--detach", action="store_true", help="hand the guest to the supervisor instead "
                     "(create --start) and print its name")
    run.add_argument("--name", help="with -d: the guest's name (default run-XXXXXX)")
    run.add_argument("--restore", metavar="DIR", help="continue the guest of this snapshot instead of booting "
                     "one (`hvctl snapshot`); only --timeout, --gdb and --trace apply")
    run.add_argument("--stats-json", metavar="FILE", help="write the VMM's counters (exits, time in guest/VMM) here at exit")
