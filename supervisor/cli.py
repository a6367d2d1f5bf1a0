"""hvctl: the command line for running guests in the foreground and managing supervised ones.

`hvctl run` needs no supervisor and must start fast: zmq, msgpack and psutil
are imported only inside the commands that talk to a supervisor.  Every user
error ends with one line on stderr and exit status 2 (bad arguments or files)
or 1 (unknown guest, no supervisor, wrong state); never a traceback.
"""
import argparse
import json
import os
import sys
import time

import pyhv
from pyhv.supervisor.config import ConfigError, build_config, default_runtime_dir

PROG = "hvctl"
COMMANDS = ("run", "supervisor", "create", "start", "stop", "pause", "resume", "destroy", "list", "info",
            "wait", "logs", "console", "stats", "top", "snapshot", "restore")
NOT_IMPLEMENTED = "snapshot/restore is not implemented yet"


class UsageError(Exception):
    """Bad command-line usage: one line, exit 2."""


class Fail(Exception):
    """A command failed: print `hvctl: MESSAGE` and exit with `status`."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class TimedOut(Fail):
    """The supervisor is there but did not answer in time."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


# --- talking to the supervisor ---------------------------------------------

def _sock_path(args):
    return os.path.join(os.path.abspath(args.runtime_dir), "control.sock")


def _supervisor_alive(path):
    """Does something accept connections on the control socket? (cheap, no zmq)"""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(args, msg, timeout=10.0):
    """The supervisor's reply to `msg`, or Fail with a one-line reason."""
    from pyhv.proto.client import Client
    from pyhv.proto.errors import NotResponding, ProtocolError, RequestFailed
    path = _sock_path(args)
    if not _supervisor_alive(path):
        raise Fail(f"no supervisor is running on {args.runtime_dir} (start one with `hvctl supervisor --detach`)")
    try:
        return Client("ipc://" + path).request(msg, timeout=timeout, alive=lambda: _supervisor_alive(path))
    except RequestFailed as e:
        raise Fail(str(e), e.exit_status) from None
    except NotResponding:
        if _supervisor_alive(path):
            raise TimedOut(f"the supervisor on {args.runtime_dir} is not responding") from None
        raise Fail(f"the supervisor on {args.runtime_dir} went away") from None
    except ProtocolError as e:
        raise Fail(f"bad reply from the supervisor: {e}") from None


# --- commands ----------------------------------------------------------------

def _config(args, name):
    return build_config(name, args.kernel, boot=args.boot, load_addr=args.load_addr, initrd=args.initrd,
                        cmdline=args.cmdline, mem=args.mem, vcpus=args.vcpus, disks=args.disk,
                        timeout=args.timeout, pin=args.pin, compat=args.compat, rng=args.rng,
                        vconsole=args.vconsole, nets=args.net)


def cmd_run(args):
    config = _config(args, "run")
    from pyhv.vcpu_worker.runner import run_foreground
    return run_foreground(config, stats_path=args.stats_json)


def cmd_supervisor(args):
    if args.detach:
        return _detach(args)
    from pyhv.supervisor.server import AlreadyRunning, Server
    try:
        server = Server(args.runtime_dir)
    except AlreadyRunning as e:
        raise Fail(str(e)) from None
    except OSError as e:
        raise Fail(f"cannot use runtime dir {args.runtime_dir}: {e.strerror or e}") from None
    server.serve()
    return 0


def _detach(args):
    """Start the supervisor as a daemon (own session, log in RUNTIME_DIR/supervisor.log)."""
    import subprocess
    from pyhv.supervisor.spawn import child_env
    from pyhv.proto import messages as m
    path = _sock_path(args)
    if _supervisor_alive(path):
        pong = request(args, m.Ping(), timeout=2.0)
        raise Fail(f"a supervisor (pid {pong.pid}) is already running on {args.runtime_dir}")
    os.makedirs(args.runtime_dir, exist_ok=True)
    log = os.path.join(args.runtime_dir, "supervisor.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pyhv.supervisor.cli", "supervisor",
                                 "--runtime-dir", os.path.abspath(args.runtime_dir)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=child_env(), cwd="/")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise Fail(f"the supervisor did not start: {lines[-1]}")
        if _supervisor_alive(path):
            print(f"supervisor running (pid {proc.pid}) on {os.path.abspath(args.runtime_dir)}")
            return 0
        time.sleep(0.05)
    raise Fail(f"the supervisor did not start within 10 s (see {log})")


def cmd_create(args):
    from pyhv.proto import messages as m
    request(args, m.Create(_config(args, args.name)))
    return 0


def _simple(msg_name):
    def cmd(args):
        from pyhv.proto import messages as m
        request(args, getattr(m, msg_name)(args.name), timeout=30.0)
        return 0
    return cmd


def cmd_list(args):
    from pyhv.proto import messages as m
    guests = request(args, m.List()).guests
    if args.json:
        print(json.dumps([g.to_json() for g in guests], indent=2))
        return 0
    print(f"{'NAME':20} {'STATE':8} {'VCPUS':>5} {'MEM':>8} {'EXIT':>4}  PID")
    for g in guests:
        exit_status = "-" if g.exit_status is None else g.exit_status
        print(f"{g.name:20} {g.state:8} {g.vcpus:>5} {_size(g.mem_bytes):>8} {exit_status:>4}  "
              f"{g.pids.get('worker', '-')}")
    return 0


def _size(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def cmd_info(args):
    from pyhv.proto import messages as m
    from pyhv.vcpu_worker.compat import profile
    g = request(args, m.Info(args.name))
    compat = profile(g.config.compat).describe()
    if args.json:
        print(json.dumps({**g.to_json(), "compat_profile": compat}, indent=2))
        return 0
    c = g.config
    rows = [("name", g.name), ("state", g.state),
            ("exit status", "-" if g.exit_status is None else g.exit_status), ("reason", g.reason or "-"),
            ("pids", " ".join(f"{k}={v}" for k, v in g.pids.items()) or "-"),
            ("kernel", c.kernel), ("boot", c.boot),
            ("load addr", "default" if c.load_addr is None else hex(c.load_addr)),
            ("initrd", c.initrd or "-"), ("cmdline", c.cmdline or "-"), ("mem", _size(c.mem_bytes)),
            ("vcpus", c.vcpus), ("timeout", "-" if c.timeout is None else f"{c.timeout:g} s"),
            ("pin", ",".join(map(str, c.pin)) or "-"), ("console log", g.console_log),
            *(("disk", d) for d in c.disks), *(("net", n) for n in c.nets),
            ("compat", compat["name"]),
            *((f"  {kind}", item) for kind in ("cpuid_masks", "kernel_args", "fixups") for item in compat[kind]),
            *(("device", _device_line(name, d)) for name, d in g.devices.items())]
    for k, v in rows:
        print(f"{k + ':':13} {v}")
    return 0


def _device_line(name, d):
    """'virtio-blk0: running (pid 123)' or 'virtio-rng: failed: why', for info."""
    line = f"{name}: {d.get('state', '?')}"
    if d.get("pid"):
        line += f" (pid {d['pid']})"
    if d.get("restarts"):
        line += f", {d['restarts']} restart(s)"
    if d.get("reason"):
        line += f": {d['reason']}"
    return line


def cmd_wait(args):
    from pyhv.proto import messages as m
    try:
        g = request(args, m.Wait(args.name), timeout=args.timeout)
    except TimedOut:
        if args.timeout is not None:
            print(f"{PROG}: guest {args.name} still running after {args.timeout:g} s", file=sys.stderr)
            return 124
        raise
    if g.state == "failed" or g.exit_status in (2, 70):      # interface.md: these come with a reason
        print(f"{PROG}: guest {g.name}: {g.reason}", file=sys.stderr)
    return g.exit_status


def cmd_logs(args):
    from pyhv.proto import messages as m
    g = request(args, m.Info(args.name))
    out = sys.stdout.buffer
    try:
        f = open(g.console_log, "rb")
    except FileNotFoundError:
        if not args.follow or g.state not in ("running", "paused"):
            return 0
        f = None
    last_check = time.monotonic()
    while True:
        if f is None and os.path.exists(g.console_log):
            f = open(g.console_log, "rb")
        data = f.read() if f else b""
        if data:
            out.write(data)
            out.flush()
        if not args.follow or g.state not in ("running", "paused"):
            break
        if not data:
            time.sleep(0.1)
        if time.monotonic() - last_check > 0.3:
            g = request(args, m.Info(args.name))   # read once more after it stopped
            last_check = time.monotonic()
    return 0


def cmd_console(args):
    import select
    import socket
    from pyhv.proto import messages as m
    g = request(args, m.Info(args.name))
    if g.state not in ("running", "paused"):
        raise Fail(f"guest {g.name} is {g.state}: no console to attach to")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(g.console_sock)
    except OSError as e:
        raise Fail(f"cannot attach to the console of {g.name}: {e.strerror}") from None
    fd_in = sys.stdin.fileno()
    tty = os.isatty(fd_in)
    if tty:
        import termios
        import tty as ttymod
        saved = termios.tcgetattr(fd_in)
        ttymod.setraw(fd_in)
        print(f"[attached to {g.name}; Ctrl-] detaches]\r", file=sys.stderr)
    try:
        while True:
            ready, _, _ = select.select([s, fd_in], [], [])
            if s in ready:
                data = s.recv(4096)
                if not data:
                    break
                os.write(1, data)
            if fd_in in ready:
                data = os.read(fd_in, 4096)
                if not data or b"\x1d" in data:
                    if data:
                        s.sendall(data.split(b"\x1d")[0])
                    break
                s.sendall(data)
    except OSError:
        pass
    finally:
        s.close()
        if tty:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
            print(f"\n[detached from {g.name}]", file=sys.stderr)
    return 0


def cmd_stats(args):
    from pyhv.proto import messages as m
    symbols = None
    if args.symbols:
        from pyhv.supervisor.symbols import SymbolError, SymbolMap
        try:
            symbols = SymbolMap(args.symbols)
        except SymbolError as e:
            raise Fail(str(e), 2) from None
    stats = request(args, m.Stats(args.name)).stats
    if symbols is not None:
        for v in stats.get("vcpus", []):
            pos = v.get("position")
            if pos:
                pos["symbol"] = symbols.lookup(int(pos["rip"], 16))
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    for v in stats.get("vcpus", []):
        exits = ", ".join(f"{k} {n}" for k, n in sorted(v.get("exits", {}).items(), key=lambda kv: -kv[1]))
        pos = v.get("position")
        where = ""
        if pos:
            sym = f" {pos['symbol']}" if pos.get("symbol") else ""
            where = f"at rip {pos['rip']}{sym} (ring {pos['cpl']}); "
        print(f"vcpu {v.get('index')}: {where}exits: {exits or '-'}")
        times = {k: v[k] for k in ("ns_in_guest", "ns_in_vmm") if k in v}
        if times:
            print("  " + ", ".join(f"{k} {n}" for k, n in times.items()))
    for name, counters in stats.get("devices", {}).items():
        print(f"device {name}: " + ", ".join(f"{k} {n}" for k, n in counters.items()))
    for k in ("pio_unclaimed", "mmio_unclaimed"):
        if k in stats:
            print(f"{k}: {stats[k]}")
    for role, p in stats.get("host", {}).items():
        pss = "-" if p["pss"] is None else _size_approx(p["pss"])
        print(f"{role} (pid {p['pid']}): cpu {p['cpu_percent']}% ({p['cpu_seconds']} s), "
              f"rss {_size_approx(p['rss'])}, pss {pss}")
    return 0


def cmd_top(args):
    from pyhv.proto import messages as m
    from pyhv.supervisor import top

    def fetch_stats(name):
        try:
            return request(args, m.Stats(name)).stats
        except Fail:
            return None          # it stopped between list and stats

    top.run(lambda: [g.to_json() for g in request(args, m.List()).guests], fetch_stats,
            interval=args.interval, iterations=args.iterations)
    return 0


def _size_approx(n):
    return f"{n / (1 << 20):.1f}M"


def cmd_not_implemented(args):
    raise Fail(NOT_IMPLEMENTED, 2)


# --- argument parsing --------------------------------------------------------

def _add_run_options(p):
    p.add_argument("--kernel", required=True, metavar="PATH", help="guest image (bzImage/ELF vmlinux, or a flat binary)")
    p.add_argument("--boot", default="linux", choices=("linux", "raw16", "raw32", "raw64", "user64"),
                   help="boot protocol (default: linux)")
    p.add_argument("--load-addr", metavar="ADDR", help="raw image load address (default 0x7C00 raw16, 0x100000 others)")
    p.add_argument("--initrd", metavar="PATH")
    p.add_argument("--cmdline", metavar="TEXT", help="kernel command line")
    p.add_argument("--mem", metavar="SIZE", help="guest RAM, e.g. 128M or 1G (default 128M)")
    p.add_argument("--vcpus", metavar="N", help="number of vCPUs (default 1, at most 64)")
    p.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]", help="add a virtio-blk PCI device backed by a raw image file "
                   "(repeatable; ,ro: read-only); each device model runs in its own process")
    p.add_argument("--timeout", metavar="SECONDS", help="end the guest with status 124 after this long")
    p.add_argument("--pin", metavar="CPUS", help="pin vCPU threads to host CPUs, e.g. 0,1 (vCPU i -> i-th CPU, cycling)")
    p.add_argument("--compat", choices=("nested", "none"),
                   help="compatibility profile for nested KVM hosts (default: nested; see hvctl info)")
    p.add_argument("--rng", action="store_true", help="add a virtio-rng PCI device (entropy from the host)")
    p.add_argument("--net", action="append", default=[], metavar="tap:IFNAME|switch:NAME[,mac=MAC]",
                   help="add a virtio-net PCI device (repeatable): on a host TAP interface, or on the virtual "
                        "switch NAME that connects the guests of one supervisor (runtime dir) without host networking")
    p.add_argument("--vconsole", action="store_true",
                   help="add a virtio-console PCI device (/dev/hvc0 in the guest); its host side is a unix socket "
                        "(vconsole.sock in the guest's runtime dir, or a temp dir for run; see stats)")


def _command_in(argv):
    """The subcommand named in argv (skipping --runtime-dir DIR), or None."""
    args = iter(argv)
    for a in args:
        if a == "--runtime-dir":
            next(args, None)
        elif not a.startswith("-"):
            return a
    return None


def build_parser(only=None):
    """The hvctl parser; with `only`, just that subcommand (argparse with all 18 costs ~30 ms of start-up)."""
    help = "supervisor runtime dir (env HV_RUNTIME_DIR; default $XDG_RUNTIME_DIR/pyhv or /tmp/pyhv-UID)"
    common = Parser(add_help=False)     # lets --runtime-dir also follow the command
    common.add_argument("--runtime-dir", metavar="DIR", default=argparse.SUPPRESS, help=help)
    p = Parser(prog=PROG, description="Run KVM guests in the foreground, or manage them through a supervisor.")
    p.add_argument("--runtime-dir", metavar="DIR", default=default_runtime_dir(), help=help)
    p.add_argument("--version", action="version", version=f"{PROG} (pyhv) {pyhv.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    class Skipped:
        def add_argument(self, *a, **k):
            return None

    def add(name, func, help, *positional):
        if only is not None and name != only:
            return Skipped()
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        for arg in positional:
            sp.add_argument(arg)
        sp.set_defaults(func=func)
        return sp

    def _run_options(p):
        if not isinstance(p, Skipped):
            _add_run_options(p)

    run = add("run", cmd_run, "boot one guest in the foreground; exit with its status")
    _run_options(run)
    run.add_argument("--stats-json", metavar="FILE", help="write the VMM's counters (exits, time in guest/VMM) here at exit")
    add("supervisor", cmd_supervisor, "run the supervisor (one per runtime dir)").add_argument(
        "--detach", action="store_true", help="run it in the background, logging to RUNTIME_DIR/supervisor.log")
    _run_options(add("create", cmd_create, "define a guest (state: created)", "name"))
    for name, msg in (("start", "Start"), ("stop", "Stop"), ("pause", "Pause"),
                      ("resume", "Resume"), ("destroy", "Destroy")):
        add(name, _simple(msg), f"{name} a guest", "name")
    add("list", cmd_list, "all guests").add_argument("--json", action="store_true")
    add("info", cmd_info, "one guest: config, state, exit status, pids", "name").add_argument(
        "--json", action="store_true")
    add("wait", cmd_wait, "block until the guest stops; exit with its status (124 on --timeout)",
        "name").add_argument("--timeout", type=float, metavar="S")
    add("logs", cmd_logs, "the guest's console output so far", "name").add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the guest stops")
    add("console", cmd_console, "attach the console interactively (Ctrl-] detaches)", "name")
    stats = add("stats", cmd_stats, "where each vCPU is, exits per vCPU, device counters, host CPU/memory per "
                "process", "name")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--symbols", metavar="SYSTEM.MAP", help="name the function each vCPU is in, from the "
                       "guest kernel's System.map")
    top = add("top", cmd_top, "a live, refreshing table of all guests (exits/s, guest time, CPU, memory)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    top.add_argument("--iterations", "-n", type=int, metavar="N", help="stop after N refreshes")
    add("snapshot", cmd_not_implemented, "(not implemented yet)", "name", "dir")
    add("restore", cmd_not_implemented, "(not implemented yet)", "dir").add_argument("--name")
    return p


def main(argv=None):
    try:
        argv = sys.argv[1:] if argv is None else argv
        command = _command_in(argv)
        known = command in COMMANDS
        args = build_parser(command if known else None).parse_args(argv)
        status = args.func(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        status = 2
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        status = 2
    except Fail as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        status = e.status
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        status = 0
    except ImportError as e:          # a clone without setup.sh, or a broken environment
        print(f"{PROG}: cannot import {e.name or e}: pyhv is not fully installed here "
              f"(run `bash setup.sh` in the checkout, or pip install it)", file=sys.stderr)
        status = 1
    except OSError as e:              # the environment, not a bug: still one line
        print(f"{PROG}: {e}", file=sys.stderr)
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
