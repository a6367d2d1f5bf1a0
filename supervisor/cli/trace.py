"""`hvctl trace FILE`: what a guest's exits were (the `--trace` file): per reason, per vCPU, per port and address.

Needs no supervisor and no KVM: proto/trace.py reads and checks the file
(a truncated or corrupt one is one line and exit 2), and `--plot` draws with
matplotlib only if it is installed (supervisor/plot.py), checked before the
file is read.
"""
import json
import sys
import time

from pyhv.proto import trace as fmt
from pyhv.proto.errors import EXIT_OK, UserError
from pyhv.supervisor.cli.client import table


def cmd_trace(args):
    if args.top < 0:
        raise UserError(f"--top: {args.top} is not a number of rows >= 0")
    if args.plot:
        from pyhv.supervisor import plot
        plot.require(args.plot)
    trace = fmt.read(args.file, partial=args.partial)
    s = fmt.summary(trace)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(render(s, args.file, args.top))
    if args.plot:
        draw(trace, s, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if s["lost"]:
        print(f"hvctl: trace: {s['lost']} exit record(s) are missing from {args.file} (see above)", file=sys.stderr)
    return EXIT_OK


def _us(ns):
    return "-" if ns is None else f"{ns / 1000:,.2f}"


def _pct(part, whole):
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render(s, path, top=fmt.TOP):
    """The human summary."""
    total = s["total"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["start_unix_ns"] / 1e9))
    rate = "-" if s["exits_per_s"] is None else f"{s['exits_per_s']:,.0f}"
    out = [f"trace {path}: guest {s['guest'] or '?'}, {s['vcpus']} vCPU(s), from {when}",
           f"{total:,} exits in {s['duration_s']:.3f} s ({rate} exits/s); {s['in_c']:,} answered in the C loop "
           f"({_pct(s['in_c'], total)}), the rest in Python"]
    if s["partial"]:
        out.append(f"PARTIAL: {s['problem']}; the whole chunks before it are counted (the run may still be going)")
    elif s["lost"]:
        out.append(f"LOST: {s['lost']:,} record(s): {s['dropped']:,} not written ({s['write_error'] or 'write error'}), "
                   f"{s['unflushed']:,} still in a vCPU's buffer when the trace closed")
    else:
        out.append("every exit recorded (none lost)")
    if s.get("self_drains"):
        out.append(f"note: {s['self_drains']} time(s) a vCPU wrote its own trace buffer (the drainer fell behind), "
                   f"{s['self_drain_ns'] / 1e6:.1f} ms in all: the guest ran slower for it")
    if s.get("outcome"):
        out.append(f"the guest ended: {s['outcome']['status']} ({s['outcome']['reason']})")
    out += ["", table(("REASON", "EXITS", "%", "IN C", "VMM us/exit", "max us"),
                      [(name, f"{r['exits']:,}", _pct(r["exits"], total), f"{r['in_c']:,}", _us(r["vmm_ns_mean"]),
                        _us(r["vmm_ns_max"])) for name, r in s["reasons"].items()])]
    rows = []
    for v, p in s["per_vcpu"].items():
        span = (p.get("last_ns", 0) - p.get("first_ns", 0)) / 1e9
        rows.append((v, f"{p['exits']:,}", f"{p['exits'] / span:,.0f}" if span > 0 else "-",
                     "-" if p.get("in_guest") is None else f"{100 * p['in_guest']:.1f}%",
                     ", ".join(f"{k} {c:,}" for k, c in list(p["by_reason"].items())[:3])))
    out += ["", table(("VCPU", "EXITS", "EXITS/S", "IN GUEST", "TOP REASONS"), rows)]
    if s["ports"]:
        out += ["", table(("PORT", "EXITS", "OUT", "IN", "IN C", "VMM us/exit"),
                          [(p["port"], f"{p['exits']:,}", f"{p['writes']:,}", f"{p['exits'] - p['writes']:,}",
                            f"{p['in_c']:,}", _us(p["vmm_ns_mean"])) for p in s["ports"][:top]])]
        if len(s["ports"]) > top:
            out.append(f"({len(s['ports']) - top} more ports; --top N or --json shows them)")
    if s["addresses"]:
        out += ["", table(("MMIO ADDRESS", "EXITS", "WRITES", "READS", "VMM us/exit"),
                          [(a["address"], f"{a['exits']:,}", f"{a['writes']:,}", f"{a['exits'] - a['writes']:,}",
                            _us(a["vmm_ns_mean"])) for a in s["addresses"][:top]])]
        if len(s["addresses"]) > top:
            out.append(f"({len(s['addresses']) - top} more addresses; --top N or --json shows them)")
    return "\n".join(out)


def draw(trace, s, path):
    """Exit rate over time by reason and by vCPU, and the time the VMM took per exit, as one PNG."""
    from pyhv.supervisor import plot
    width, by_reason, by_vcpu = fmt.timeline(trace)
    fig, (rate, vcpus, hist) = plot.figure(3, 1, size=(10, 10))
    xs = [i * width for i in range(len(next(iter(by_reason.values()), [])))]
    for name, series in sorted(by_reason.items(), key=lambda kv: -sum(kv[1])):
        rate.plot(xs, series, label=name, linewidth=1)
    rate.set_xlabel("seconds since the first exit"), rate.set_ylabel("exits/s"), rate.legend(fontsize=8)
    rate.set_title(f"exit rate by reason ({width * 1e3:.3g} ms bins)")
    if len(by_vcpu) <= 8:
        for v, series in sorted(by_vcpu.items()):
            vcpus.plot(xs, series, label=f"vCPU {v}", linewidth=1)
        vcpus.set_ylabel("exits/s"), vcpus.legend(fontsize=8)
    elif by_vcpu:
        grid = [by_vcpu.get(v, [0.0] * len(xs)) for v in range(trace.vcpus)]
        im = vcpus.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                          extent=(0, len(xs) * width, -0.5, trace.vcpus - 0.5))
        vcpus.set_ylabel("vCPU"), fig.colorbar(im, ax=vcpus, label="exits/s")
    vcpus.set_xlabel("seconds since the first exit"), vcpus.set_title("exit rate by vCPU")
    times = fmt.vmm_times(trace)
    positive = [d for ds in times.values() for d in ds if d > 0]
    if positive:
        lo, hi = max(1, min(positive)), max(positive)
        edges = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else [lo * 0.9, lo * 1.1]
        for name, ds in sorted(times.items(), key=lambda kv: -len(kv[1]))[:6]:
            hist.hist([d / 1000 for d in ds if d > 0], bins=[e / 1000 for e in edges], histtype="step", label=name)
        hist.set_xscale("log"), hist.set_yscale("log"), hist.legend(fontsize=8)
    hist.set_xlabel("us outside the guest after an exit (VMM handling)"), hist.set_ylabel("exits")
    hist.set_title("how long each exit kept the vCPU out of the guest")
    plot.save(fig, path, title=f"pyhv trace of {s['guest'] or '?'}: {s['total']:,} exits, {s['vcpus']} vCPU(s)")


def add_commands(add):
    p = add("trace", cmd_trace, "summarise an exit trace written by run/create --trace: exits per reason, per vCPU, "
            "per port and address", "file")
    p.add_argument("--json", action="store_true", help="one JSON object (total, by_reason, by_vcpu, by_port, ...)")
    p.add_argument("--plot", metavar="PNG", help="also draw the exit rate over time and the VMM's time per exit "
                   "(needs matplotlib: pip install 'pyhv[plot]')")
    p.add_argument("--top", type=int, default=fmt.TOP, metavar="N", help=f"ports and addresses to list "
                   f"(default {fmt.TOP})")
    p.add_argument("--partial", action="store_true", help="read a trace that is still being written (or whose "
                   "writer was killed) up to its last whole chunk")
