"""`hvctl guests fetch|list`: the Linux guest artefacts, built by the fetcher that ships with pyhv (guests/fetch.sh)."""
import os
import subprocess
import sys

from pyhv import guests
from pyhv.proto.errors import EXIT_ERROR, EXIT_OK, UserError


def cmd_fetch(args):
    """Runs fetch.sh with this environment's Python; every step prints a line, downloads and the kernel
    build a percentage.  apt-get needs root for the build tools and the package lists."""
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs: {args.jobs} is not a number of jobs >= 1")
    env = dict(os.environ, HV_ARTEFACTS=args.dir, PYTHON=sys.executable)
    if args.force:
        env["HV_FETCH_FORCE"] = "1"
    if args.jobs:
        env["HV_JOBS"] = str(args.jobs)
    status = subprocess.call(["bash", guests.FETCH], env=env)
    return EXIT_OK if status == 0 else EXIT_ERROR


def cmd_list(args):
    """Which artefacts are there, with the command line that boots our kernel."""
    for rel, what in guests.ARTEFACTS:
        path = os.path.join(args.dir, rel)
        size = f"{os.path.getsize(path) / 1e6:5.1f} MB" if os.path.isfile(path) else "missing "
        print(f"{size}  {path}\n          {what}")
    if not all(os.path.isfile(os.path.join(args.dir, rel)) for rel, _ in guests.ARTEFACTS):
        print(f"(hvctl guests fetch --dir {args.dir} builds the missing ones)")
    print(f"a shell: hvctl run --kernel {args.dir}/own/vmlinux --initrd {args.dir}/initramfs.cpio "
          f"--cmdline console=ttyS0")
    return EXIT_OK


def add_commands(add):
    p = add("guests", None, "the Linux guest artefacts: fetch (download and build them), list")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    for name, func, help in (("fetch", cmd_fetch, "download Debian's kernel and busybox, build our kernel and the "
                              "initramfs (minutes the first time; cached after)"),
                             ("list", cmd_list, "the artefacts and where they are")):
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--dir", default=guests.artefacts_dir(), metavar="DIR",
                        help=f"where they go (env HV_ARTEFACTS; default {guests.DEFAULT_DIR})")
        sp.set_defaults(func=func)
    fetch = sub.choices["fetch"]
    fetch.add_argument("--force", action="store_true", help="rebuild our kernel and the initramfs")
    fetch.add_argument("--jobs", type=int, metavar="N", help="parallel compile jobs (default: CPUs + 1)")
