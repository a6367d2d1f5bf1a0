"""The guest options `hvctl run` and `create` share, and the GuestConfig they make; device options come from the kinds table."""
from pyhv.devices.virtio.kinds import KINDS
from pyhv.proto.errors import UserError
from pyhv.proto.guest import BOOT_MODES, COMPAT_PROFILES
from pyhv.supervisor.config import build_config


def add_run_options(p):
    p.add_argument("--kernel", metavar="PATH", help="guest image (bzImage/ELF vmlinux, or a flat binary)")
    p.add_argument("--boot", default="linux", choices=BOOT_MODES, help="boot protocol (default: linux)")
    p.add_argument("--load-addr", metavar="ADDR", help="raw image load address (default 0x7C00 raw16, 0x100000 others)")
    p.add_argument("--initrd", metavar="PATH")
    p.add_argument("--cmdline", metavar="TEXT", help="kernel command line")
    p.add_argument("--mem", metavar="SIZE", help="guest RAM, e.g. 128M or 1G (default 128M)")
    p.add_argument("--vcpus", metavar="N", help="number of vCPUs (default 1, at most 64)")
    p.add_argument("--timeout", metavar="SECONDS", help="end the guest with status 124 after this long")
    p.add_argument("--pin", metavar="CPUS", help="pin vCPU threads to host CPUs, e.g. 0,1 (vCPU i -> i-th CPU, cycling)")
    p.add_argument("--trace", metavar="FILE", help="record every VM exit to FILE (`hvctl trace FILE` summarises it)")
    p.add_argument("--compat", choices=COMPAT_PROFILES,
                   help="compatibility profile for nested KVM hosts (default: nested; see hvctl info)")
    p.add_argument("--device", dest="plugins", action="append", default=[], metavar="MODULE:CLASS[,KEY=VALUE...]",
                   help="a device plugin: a Python class serving ports or MMIO, or a virtio device model, in a "
                        "process of its own (docs/plugins.md); repeatable")
    p.add_argument("--gdb", metavar="tcp:HOST:PORT", help="a GDB stub listens there; the vCPUs wait for its client "
                   "before their first instruction (docs/debugging.md)")
    for k in (k for k in KINDS.values() if k.own_option):
        dest = f"device_{k.name}"
        if k.metavar is None:
            p.add_argument(k.flag, dest=dest, action="store_true", help=k.help)
        elif k.max_count > 1:
            p.add_argument(k.flag, dest=dest, action="append", default=[], metavar=k.metavar, help=k.help)
        else:
            p.add_argument(k.flag, dest=dest, metavar=k.metavar, help=k.help)


def config_from(args, name):
    if args.kernel is None:
        raise UserError(f"the following arguments are required: --kernel (see hvctl {args.command} --help)")
    devices = {k.name: getattr(args, f"device_{k.name}") for k in KINDS.values() if k.own_option}
    return build_config(name, args.kernel, boot=args.boot, load_addr=args.load_addr, initrd=args.initrd,
                        cmdline=args.cmdline, mem=args.mem, vcpus=args.vcpus, timeout=args.timeout, pin=args.pin,
                        compat=args.compat, devices=devices, plugins=args.plugins, gdb=args.gdb, trace=args.trace)
