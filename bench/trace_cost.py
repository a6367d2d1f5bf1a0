"""What exit tracing costs: exits/s with --trace off and on, beside the C reference, and how fast the drainer writes.

Part 1, the exit rate (bench/exit_rate.py's guest and markers, 200,000
port writes between 'S' and 'E'), cases interleaved repetition by
repetition in one run:
  - the C reference (bench/ref/kvm_loop.c), port 0x80;
  - hvctl, port 0x80 (answered in the C loop), tracing off, then --trace FILE;
  - hvctl, port 0x3FF (COM1's scratch register, a Python device), off and on.
"off" is the loop's one `hv_vcpu.trace != NULL` test; its figure against the
C reference is the one bench/exit_rate.py has always printed.  Each traced
run's file is read back (proto/trace.py) and must hold every exit.

Part 2, what a record costs the vCPU thread (the producer alone, filling a
ring big enough for all, the drainer idle), and the drain rate: the real
producer, rings, drainer and file writer
(hv_trace_fill, no KVM) with 1 and 2 producer threads going flat out, to
a file in the bench cache and to /dev/null: records/s and MB/s from the
first record to the end record, and how often a producer had to write its
own chunks because the drainer fell behind.
"""
import os
import pathlib
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common
from bench.exit_rate import EXITS, GUEST, loop_rate

REPS = 5
DRAIN_RECORDS = 2_000_000          # per producer thread: 64 MB each


def traced_exits(path, port):
    """(exits in the trace, records lost, self-drains, mean ns the VMM kept the vCPU out per exit on `port`)."""
    from pyhv.proto import trace
    s = trace.summary(trace.read(path))
    vmm = next(p["vmm_ns_mean"] for p in s["ports"] if p["port"] == f"0x{port:x}")
    return s["total"], s["lost"], s["self_drains"], vmm


def exit_rates(args, reps):
    ref = str(common.build_ref())
    post = common.guest(GUEST.format(n=EXITS, port=0x80))
    scratch = common.guest(GUEST.format(n=EXITS, port=0x3FF))
    tfile = common.CACHE / f"trace-cost-{os.getpid()}.trace"
    cases = {
        "C reference, port 0x80": [ref, str(post)],
        "hvctl, port 0x80 (C loop), tracing off": common.hvctl_run(args, post),
        "hvctl, port 0x80 (C loop), --trace": common.hvctl_run(args, post) + ["--trace", str(tfile)],
        "hvctl, port 0x3FF (Python device), tracing off": common.hvctl_run(args, scratch),
        "hvctl, port 0x3FF (Python device), --trace": common.hvctl_run(args, scratch) + ["--trace", str(tfile)],
    }
    samples = {case: [] for case in cases}
    drains = {case: [] for case in cases}
    vmm_ns = {case: [] for case in cases}
    for _ in range(reps):
        for case, cmd in cases.items():
            samples[case].append(loop_rate(common.Timed(cmd).check(0), EXITS))
            if "--trace" in cmd:
                total, lost, self_drains, vmm = traced_exits(tfile, 0x80 if "0x80" in case else 0x3FF)
                if lost or total < EXITS:
                    sys.exit(f"bench: the trace of {case} holds {total} exits, {lost} lost")
                drains[case].append(self_drains)
                vmm_ns[case].append(vmm)
    tfile.unlink(missing_ok=True)
    rows = []
    for case, cmd in cases.items():
        off = next((r for r in rows if r["case"] == case.replace("--trace", "tracing off")), None)
        row = common.row("trace_cost", case, samples[case], "exits/s", ref=rows[0] if rows else None,
                         exits=EXITS, cmd=cmd)
        if off is not None:
            row["vs_tracing_off"] = row["value"] / off["value"]
            row["self_drains"] = drains[case]
            row["vmm_ns_per_exit"] = common.median(vmm_ns[case])   # the trace's own figure, recording included
        rows.append(row)
    return rows


def record_cost(n=DRAIN_RECORDS):
    """ns per record of the producer alone: `n` records into a ring that holds them all, no drainer running."""
    from pyhv.vcpu_worker._kvm import ffi, lib
    from pyhv.vcpu_worker.trace import CHUNK_RECORDS, Tracer

    class Vcpu:
        def __init__(self, index):
            self.index, self.state = index, ffi.new("struct hv_vcpu *")

    v = Vcpu(0)
    tracer = Tracer(os.devnull, [v], {"guest": "bench", "tsc_khz": 0}, ring_chunks=n // CHUNK_RECORDS + 2,
                    log=lambda line: None)
    rec = ffi.new("struct hv_trace_rec *", {"reason": lib.KVM_EXIT_IO, "addr": 0x80, "size": 1, "count": 1})
    lib.hv_trace_fill(v.state.trace, rec, n)              # touch the ring's pages first (a guest's ring stays warm)
    tracer.drain()
    t0 = time.perf_counter()
    lib.hv_trace_fill(v.state.trace, rec, n)
    elapsed = time.perf_counter() - t0
    end = tracer.close({0})
    if end["vcpus"][0]["self_drains"]:
        sys.exit("bench: the producer-only case drained (the ring was too small)")
    return elapsed / n * 1e9


def drain_rate(path, producers, n=DRAIN_RECORDS):
    """(records/s, self-drains) of `producers` threads each putting `n` records through a Tracer writing `path`."""
    from pyhv.vcpu_worker._kvm import ffi, lib
    from pyhv.vcpu_worker.trace import Tracer

    class Vcpu:
        def __init__(self, index):
            self.index, self.state = index, ffi.new("struct hv_vcpu *")

    vcpus = [Vcpu(i) for i in range(producers)]
    tracer = Tracer(str(path), vcpus, {"guest": "bench", "tsc_khz": 0}, log=lambda line: None)
    rec = ffi.new("struct hv_trace_rec *", {"reason": lib.KVM_EXIT_IO, "addr": 0x80, "size": 1, "count": 1,
                                             "flags": lib.HV_TRACE_WRITE | lib.HV_TRACE_IN_C})
    threads = [threading.Thread(target=lib.hv_trace_fill, args=(v.state.trace, rec, n)) for v in vcpus]
    tracer.start()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = tracer.close({v.index for v in vcpus})
    elapsed = time.perf_counter() - t0
    if any(r["written"] != n for r in end["vcpus"]):
        sys.exit(f"bench: the drain benchmark lost records: {end['vcpus']}")
    return producers * n / elapsed, sum(r["self_drains"] for r in end["vcpus"])


def drain_rates(reps):
    rows = [common.row("trace_drain", "recording one exit (producer only, ring not drained)",
                       [record_cost() for _ in range(reps)], "ns")]
    tfile = common.CACHE / f"trace-drain-{os.getpid()}.trace"
    common.CACHE.mkdir(parents=True, exist_ok=True)
    for producers in (1, 2):
        for where, path in (("file", tfile), ("/dev/null", os.devnull)):
            rates, drains = [], []
            for _ in range(reps):
                rate, self_drains = drain_rate(path, producers)
                rates.append(rate)
                drains.append(self_drains)
            row = common.row("trace_drain", f"{producers} producer(s) -> {where}", rates, "records/s",
                             records=producers * DRAIN_RECORDS, self_drains=drains)
            row["mb_per_s"] = row["value"] * 32 / 1e6
            row["ns_per_record"] = 1e9 / row["value"] * producers
            rows.append(row)
    tfile.unlink(missing_ok=True)
    return rows


def run(args):
    reps = args.reps or REPS
    rows = exit_rates(args, reps)
    rows += drain_rates(max(1, reps // 2))
    return rows


def report(rows, args):
    common.print_table(rows)
    for r in rows:
        if "vs_tracing_off" in r:
            print(f"{r['case']}: {r['vs_tracing_off']:.2f}x of tracing off; the trace says the VMM kept the vCPU "
                  f"out {r['vmm_ns_per_exit']:,.0f} ns per exit (recording included); self-drains per run "
                  f"{r['self_drains']}")
        if "mb_per_s" in r:
            print(f"drain, {r['case']}: {r['value']:,.0f} records/s = {r['mb_per_s']:,.0f} MB/s "
                  f"({r['ns_per_record']:.0f} ns per record per producer); self-drains per run {r['self_drains']}")


if __name__ == "__main__":
    a = common.parser(__doc__.split("\n")[0]).parse_args()
    out = run(a)
    report(out, a)
    print(f"hvctl = {' '.join(common.hvctl_cmd(a))}")
    if a.json:
        common.write_json(a.json, out)
