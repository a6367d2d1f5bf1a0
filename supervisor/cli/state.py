"""Guest state commands: snapshot (a guest's complete state into a directory), restore (a guest from one), migrate."""
import os

from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_OK
from pyhv.supervisor.cli.client import request

SNAPSHOT_TIMEOUT = 660.0        # the supervisor gives the worker 600 s to write it
RESTORE_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 3700.0        # the supervisor gives a hand-over 600 s and a copy 3600 s, then the target's start


def cmd_snapshot(args):
    """Write NAME's state into DIR; it runs on (paused stays paused), or ends with --stop."""
    reply = request(args, m.SnapshotGuest(args.name, os.path.abspath(args.dir), stop=args.stop), timeout=SNAPSHOT_TIMEOUT)
    print(f"snapshot of {args.name} in {reply.dir}: {reply.bytes / (1 << 20):.1f} MiB, "
          f"guest held {reply.paused_for * 1000:.0f} ms")
    return EXIT_OK


def cmd_restore(args):
    """Define a guest from DIR and run it from exactly where the snapshot was taken; its name is printed."""
    g = request(args, m.RestoreGuest(os.path.abspath(args.dir), args.name, paused=args.paused, nets=args.net),
                timeout=RESTORE_TIMEOUT)
    print(g.name)
    return EXIT_OK


def cmd_migrate(args):
    """Move NAME to the supervisor of --to: its RAM changes hands (same machine), or with --copy is streamed while
    it runs, then what it dirtied while it is held; with --copy the figures follow."""
    r = request(args, m.Migrate(args.name, os.path.abspath(args.to), copy=args.copy), timeout=MIGRATE_TIMEOUT)
    line = f"{args.name} now runs under {os.path.abspath(args.to)}"
    if args.copy:
        line += (f" (RAM copied in {r.rounds} rounds{'' if r.converged else ' (the round limit)'}: "
                 f"{r.bytes / (1 << 20):.1f} MiB, {r.held_bytes / (1 << 20):.1f} MiB of it while held; "
                 f"downtime {r.downtime * 1000:.0f} ms, {r.seconds:.2f} s in all)")
    print(line)
    return EXIT_OK


def add_commands(add):
    snap = add("snapshot", cmd_snapshot, "write a guest's complete state into DIR (new or empty); it runs on",
               "name", "dir")
    snap.add_argument("--stop", action="store_true", help="end the guest once its snapshot is written")
    restore = add("restore", cmd_restore, "define a guest from snapshot DIR and run it from where it was taken", "dir")
    restore.add_argument("--name", help="the new guest's name (default: the snapshot's guest's; clones need one each)")
    restore.add_argument("--paused", action="store_true", help="hold it paused until `hvctl resume`")
    restore.add_argument("--net", action="append", default=[], metavar="tap:IFNAME|switch:NAME",
                         help="put the guest's next NIC on this port instead (repeatable, in NIC order; "
                              "its MAC stays what the guest knows)")
    mig = add("migrate", cmd_migrate, "move a running guest to the supervisor of another runtime dir", "name")
    mig.add_argument("--to", required=True, metavar="RUNTIME_DIR", help="the runtime dir of the supervisor to move to")
    mig.add_argument("--copy", action="store_true",
                     help="copy RAM over a stream while the guest runs, then what it dirtied while held "
                          "(the way between machines)")
