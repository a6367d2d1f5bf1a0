"""`hvctl run`: one guest in the foreground, no supervisor; the exit status is the guest's."""
import sys

from pyhv.proto.errors import EXIT_VM_FAILED
from pyhv.supervisor.cli.options import add_run_options, config_from


def cmd_run(args):
    config = config_from(args, "run")
    from pyhv.vcpu_worker.runner import Foreground
    guest = Foreground(config)
    try:
        for line in guest.notices:
            print(f"hvctl: {line}", file=sys.stderr, flush=True)
        outcome = guest.run()
        if args.stats_json:
            import json
            stats = guest.machine.stats()
            stats["outcome"] = {"status": outcome.status, "reason": outcome.reason}
            with open(args.stats_json, "w") as f:
                json.dump(stats, f, indent=2)
    finally:
        guest.close()
    if outcome.status == EXIT_VM_FAILED:
        print(f"hvctl: VM failed: {outcome.reason}", file=sys.stderr)
    return outcome.status


def add_commands(add):
    run = add("run", cmd_run, "boot one guest in the foreground; exit with its status")
    add_run_options(run)
    run.add_argument("--stats-json", metavar="FILE", help="write the VMM's counters (exits, time in guest/VMM) here at exit")
