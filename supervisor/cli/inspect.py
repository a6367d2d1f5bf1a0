"""Looking at guests: list, info, stats, top."""
import json

from pyhv.devices.virtio.kinds import kind as device_kind
from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_OK, HvError, PeerFailed
from pyhv.proto.messages import to_plain
from pyhv.supervisor.cli.client import iso_time, mib_text, request, size_text, table


def cmd_list(args):
    guests = request(args, m.List()).guests
    if args.json:
        print(json.dumps([g.to_json() for g in guests], indent=2))
        return EXIT_OK
    print(f"{'NAME':20} {'STATE':8} {'VCPUS':>5} {'MEM':>8} {'EXIT':>4}  PID")
    for g in guests:
        exit_status = "-" if g.exit_status is None else g.exit_status
        print(f"{g.name:20} {g.state:8} {g.vcpus:>5} {size_text(g.mem_bytes):>8} {exit_status:>4}  "
              f"{g.pids.get('worker', '-')}")
    return EXIT_OK


def cmd_info(args):
    from pyhv.vcpu_worker.compat import profile
    g = request(args, m.Info(args.name))
    compat = profile(g.config.compat).describe()
    if args.json:
        print(json.dumps({**g.to_json(), "compat_profile": compat}, indent=2))
        return EXIT_OK
    c = g.config
    rows = [("name", g.name), ("state", g.state),
            ("exit status", "-" if g.exit_status is None else g.exit_status), ("reason", g.reason or "-"),
            ("pids", " ".join(f"{k}={v}" for k, v in g.pids.items()) or "-"),
            ("kernel", c.kernel), ("boot", c.boot),
            ("load addr", "default" if c.load_addr is None else hex(c.load_addr)),
            ("initrd", c.initrd or "-"), ("cmdline", c.cmdline or "-"), ("mem", size_text(c.mem_bytes)),
            ("vcpus", c.vcpus), ("timeout", "-" if c.timeout is None else f"{c.timeout:g} s"),
            ("pin", ",".join(map(str, c.pin)) or "-"), ("gdb", c.gdb or "-"), ("console log", g.console_log),
            *((("trace", c.trace),) if c.trace else ()),
            *((device_kind(d.kind).flag.lstrip("-"), device_kind(d.kind).describe(d.options)) for d in c.devices),
            *(("device", p.describe()) for p in c.plugins),
            ("compat", compat["name"]),
            *((f"  {kind}", item) for kind in ("cpuid_masks", "kernel_args", "fixups") for item in compat[kind]),
            ("  syscall_hook", compat["syscall_hook"]),
            *(("device", _device_line(name, d)) for name, d in g.devices.items())]
    for k, v in rows:
        print(f"{k + ':':13} {v}")
    return EXIT_OK


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


def cmd_stats(args):
    symbols = None
    if args.symbols:
        from pyhv.supervisor.symbols import SymbolMap
        symbols = SymbolMap(args.symbols)
    stats = request(args, m.Stats(args.name)).stats
    if symbols is not None:
        for v in stats.get("vcpus", []):
            pos = v.get("position")
            if pos:
                pos["symbol"] = symbols.lookup(int(pos["rip"], 16))
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    print(stats_text(stats))
    return EXIT_OK


def stats_text(stats):
    """`hvctl stats` as three tables: vCPUs, devices (their nonzero counters), host processes."""
    vcpus = []
    for v in stats.get("vcpus", []):
        pos = v.get("position") or {}
        where = f"{pos['rip']}{' ' + pos['symbol'] if pos.get('symbol') else ''} (ring {pos['cpl']})" if pos else "-"
        exits = sorted(v.get("exits", {}).items(), key=lambda kv: -kv[1])
        vcpus.append((str(v.get("index")), where, str(sum(n for _, n in exits)),
                      ", ".join(f"{k} {n}" for k, n in exits[:3]) or "-",
                      _seconds(v.get("ns_in_guest")), _seconds(v.get("ns_in_vmm")), str(v.get("host_tid", "-")),
                      _cpu_list(v.get("host_cpus"))))
    devices = []
    for name, counters in stats.get("devices", {}).items():
        own = {k: c for k, c in counters.items() if not isinstance(c, dict)}
        devices.append((name, "-", "-", _counters(own)))
        for sub, c in counters.items():          # the PCI functions; a service's own figures under "backend"
            if isinstance(c, dict):
                backend = c.get("backend", {})
                devices.append((f"  {sub}", str(backend.get("state", "in worker")), str(backend.get("pid", "-")),
                                _counters(_flat(c))))
    devices.append(("unclaimed", "-", "-",
                    _counters({k: stats[k] for k in ("pio_unclaimed", "mmio_unclaimed") if k in stats})))
    host = [(role, str(p["pid"]), f"{p['cpu_percent']:.1f}", f"{p['cpu_seconds']:.2f}", mib_text(p["rss"]),
             "-" if p["pss"] is None else mib_text(p["pss"])) for role, p in stats.get("host", {}).items()]
    parts = [table(("VCPU", "WHERE", "EXITS", "TOP EXITS", "GUEST S", "VMM S", "TID", "CPUS"), vcpus),
             table(("DEVICE", "STATE", "PID", "NONZERO COUNTERS (all of them: --json)"), devices),
             table(("PROCESS", "PID", "CPU%", "CPU S", "RSS", "PSS"), host)]
    t = stats.get("trace")
    if t:
        parts.append(f"trace {t['file']}: {t['records']} exits recorded, {t['written']} written, {t['pending']} "
                     f"buffered, {t['dropped']} dropped, {t['self_drains']} self-drains")
    return "\n\n".join(parts)


def _flat(counters, prefix=""):
    """{"backend": {"port": {"sent": 1}}} -> {"port.sent": 1}: a service's counters beside its transport's."""
    out = {}
    for k, v in counters.items():
        if isinstance(v, dict):
            out.update(_flat(v, "" if k == "backend" else f"{prefix}{k}."))
        elif k not in ("state", "pid", "paused"):
            out[prefix + k] = v
    return out


def _counters(counters):
    return ", ".join(f"{k} {v}" for k, v in counters.items() if v not in (0, None, False, "")) or "-"


def _seconds(ns):
    return "-" if ns is None else f"{ns / 1e9:.2f}"


def _cpu_list(cpus):
    """[0, 1, 2, 5] -> "0-2,5"."""
    if not cpus:
        return "-"
    runs, start = [], cpus[0]
    for a, b in zip(cpus, cpus[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)


def cmd_events(args):
    """Each guest change as it happens, one line (or one JSON object) each, until Ctrl-C or the supervisor ends."""
    from pyhv.proto.client import SeqClient
    from pyhv.supervisor.cli.client import require_supervisor
    rd = require_supervisor(args)
    wanted = set(args.names)
    try:
        _print_events(SeqClient(rd.hvctl_sock).stream(m.Events()), wanted, args.json)
    except PeerFailed:
        raise PeerFailed(f"the supervisor on {args.runtime_dir} went away") from None
    return EXIT_OK


def _print_events(events, wanted, as_json):
    for e in events:
        if wanted and e.name not in wanted:
            continue
        if as_json:
            print(json.dumps(to_plain(e)), flush=True)
        else:
            stamp = iso_time(e.time)
            status = "" if e.exit_status is None else f" {e.exit_status}"
            print(f"{stamp}  {e.name}  {e.kind}{status}{'  ' + e.reason if e.reason else ''}", flush=True)


def cmd_top(args):
    from pyhv.supervisor import top

    def fetch_stats(name):
        try:
            return request(args, m.Stats(name)).stats
        except HvError:
            return None          # it stopped between list and stats

    top.run(lambda: [g.to_json() for g in request(args, m.List()).guests], fetch_stats,
            interval=args.interval, iterations=args.iterations)
    return EXIT_OK


def add_commands(add):
    add("list", cmd_list, "all guests").add_argument("--json", action="store_true")
    add("info", cmd_info, "one guest: config, state, exit status, pids", "name").add_argument(
        "--json", action="store_true")
    stats = add("stats", cmd_stats, "where each vCPU is, exits per vCPU, device counters, host CPU/memory per "
                "process", "name")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--symbols", metavar="SYSTEM.MAP", help="name the function each vCPU is in, from the "
                       "guest kernel's System.map")
    events = add("events", cmd_events, "stream guest changes (created, running, paused, stopped, failed, "
                 "destroyed) as they happen")
    events.add_argument("names", nargs="*", metavar="NAME", help="only these guests")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    top = add("top", cmd_top, "a live, refreshing table of all guests (exits/s, guest time, CPU, memory)")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    top.add_argument("--iterations", "-n", type=int, metavar="N", help="stop after N refreshes")
