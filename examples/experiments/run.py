#!/usr/bin/env python3
"""SMP guest experiments: build a guest, run it with `hvctl run`, parse what it prints, tabulate.

    python3 examples/experiments/run.py spinlock      [--vcpus 1,2,4,8] [--iters K] [--trials T] [--plot out.png]
    python3 examples/experiments/run.py false_sharing [--vcpus 2]       [--iters K] [--trials T] [--plot out.png]
    python3 examples/experiments/run.py ipi           [--rounds M] [--flag-rounds M]  [--plot out.png]

Guests are freestanding C (the *.c files beside this script, sharing
common.h), compiled at run time into flat binaries.  They print `key=value`
lines through the debug page (0xFEBFF000, offset 1) and end the VM through it
(offset 0) with a status that says whether their own correctness check
passed; this runner fails loudly (exit status 1) when it did not.

Where the code runs matters on the project's machines (nested KVM, see
../../docs/kvm-notes.md): guest ring 0 is EMULATED (~1.6M instructions/s),
ring 3 runs natively.  So spinlock and false_sharing run in user64 (ring 3),
and the IPI experiment, which needs ring 0 for the LAPIC and an IDT, says
prominently that its numbers are the emulator's.  Time is measured in the
guest with rdtsc and converted with the TSC frequency (kHz) the hypervisor
passes raw guests in RDX.

Measurements are short trials, each started from a barrier, and the median
trial is reported: the machines are shared, and a trial during which the host
descheduled a vCPU thread is an outlier, not the answer.  HV_HVCTL=PATH runs
another checkout's hvctl.

Results: NAME.json (every row, the notes printed, parameters, host) and
NAME.csv (one line per row) in --out (default results/ beside this script),
and NAME.png there when matplotlib is installed (pip install 'pyhv[plot]');
--plot PNG asks for a plot explicitly and is refused at once, with that hint
and a non-zero status, without matplotlib.  --trace DIR records every VM exit
of every guest run (hvctl run --trace) and adds each run's exits by reason to
the JSON.
"""
import argparse
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
HVCTL = pathlib.Path(os.environ.get("HV_HVCTL", REPO / "bin" / "hvctl"))   # HV_HVCTL: another checkout's hvctl
CACHE = pathlib.Path(os.environ.get("HV_GUEST_CACHE", pathlib.Path(tempfile.gettempdir()) / "pyhv-guests"),
                     "experiments")
LOAD_ADDR = 0x100000

CFLAGS = ["-m64", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone", "-nostdlib",
          "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
          "-mgeneral-regs-only",        # no SSE: the ring-0 emulator need not know it; ring 3 does not need it
          "-Wall", "-Werror"]

# The start stub (common.h) lives in .text.start and must be at the load address,
# where every vCPU enters; .bss is emitted as zeros in the flat image.
LINKER_SCRIPT = f"""
ENTRY(_start)
SECTIONS {{
  . = {LOAD_ADDR:#x};
  .text : {{ *(.text.start) *(.text .text.*) }}
  .rodata : {{ *(.rodata .rodata.*) }}
  .data : {{ *(.data .data.*) *(.bss .bss.*) *(COMMON) }}
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame*) }}
}}
"""

USER64_NOTE = ("# measured code runs in ring 3 (hvctl --boot user64), natively on the host CPU (not emulated); "
               "time = rdtsc in the guest, converted to ns with the TSC frequency (kHz) the hypervisor passes "
               "in RDX at entry")
TSC_NOTE = "# TSC frequency from RDX: {khz} kHz{extra}"
RING0_BANNER = """\
###############################################################################
# WARNING: the IPI experiment runs in RING 0 (hvctl --boot raw64): it needs the
# LAPIC (ICR writes) and an IDT.  On these nested machines (kvm_pvm) guest ring
# 0 is EMULATED by KVM's instruction emulator (~1.6M instructions/s), so the IPI
# (and ring-0 flag) round trips below measure the emulator and the hypervisor's
# exit path, NOT interrupt hardware.  Only the ring-3 (user64) flag ping-pong
# runs natively.  Time = rdtsc in the guest, TSC frequency from RDX.
###############################################################################"""

STATUS_OK_BASE = 100          # guests end with 100 + vCPU count (102 for the two-vCPU ping-pongs) on success
STATUS_NAMES = {0: "reset/triple fault", 1: "correctness check failed", 2: "a round trip got stuck",
                3: "guest exception", 4: "bad vCPU count", 70: "VM failure", 124: "timeout"}


class ExperimentError(RuntimeError):
    pass


# -- building and running guests ---------------------------------------------

def build_guest(source, mode, defines=()):
    """Compile examples/experiments/<source> into a flat binary for `mode`; returns its path (cached)."""
    src = (HERE / source).read_text()
    header = (HERE / "common.h").read_text()
    defs = [f"-D{d}" for d in defines]
    key = "\0".join([src, header, LINKER_SCRIPT, mode, *CFLAGS, *defs])
    out = CACHE / f"{pathlib.Path(source).stem}-{mode}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "link.ld").write_text(LINKER_SCRIPT)
        steps = [["gcc", *CFLAGS, *defs, "-I", str(HERE), "-c", str(HERE / source), "-o", "g.o"],
                 ["ld", "-m", "elf_x86_64", "-static", "-T", "link.ld", "-o", "g.elf", "g.o"],
                 ["objcopy", "-O", "binary", "g.elf", "g.bin"]]
        for cmd in steps:
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if r.returncode:
                raise ExperimentError(f"building {source} failed: {' '.join(cmd)}\n{r.stderr}")
        os.replace(tmp / "g.bin", out)
    return out


def host_cpus():
    return sorted(os.sched_getaffinity(0))


def pin_for(vcpus, policy):
    """The --pin argument for `vcpus` vCPUs, or None.

    auto: one distinct host CPU per vCPU when there are enough, else no pinning
    (the host scheduler time-shares the oversubscribed vCPUs); cycle: vCPU i on
    the i-th available CPU modulo their number; none; or an explicit list."""
    cpus = host_cpus()
    if policy == "none":
        return None
    if policy == "auto":
        return ",".join(map(str, cpus[:vcpus])) if vcpus <= len(cpus) else None
    if policy == "cycle":
        return ",".join(map(str, cpus))
    return policy


TRACE_DIR = []          # main's --trace DIR: every guest run is traced into it
TRACES = []             # per traced run: its file and what `hvctl trace` says of it


def run_guest(image, mode, vcpus, pin=None, timeout=60):
    """Run the guest with `hvctl run`; returns (exit status, stdout text, stderr text)."""
    cmd = [sys.executable, "-S", str(HVCTL), "run", "--boot", mode, "--kernel", str(image),
           "--vcpus", str(vcpus), "--timeout", str(timeout)]
    if pin:
        cmd += ["--pin", pin]
    trace = None
    if TRACE_DIR:
        trace = TRACE_DIR[0] / f"{len(TRACES):03d}-{pathlib.Path(image).stem.split('-')[0]}-{mode}-{vcpus}.trace"
        cmd += ["--trace", str(trace)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        raise ExperimentError(f"hvctl run did not return within {timeout + 30} s: {' '.join(cmd)}") from None
    if trace is not None:
        TRACES.append(trace_summary(trace, mode, vcpus))
    return r.returncode, r.stdout, r.stderr


def trace_summary(path, mode, vcpus):
    """What a run's exit trace says (exits by reason and per vCPU), for the JSON results."""
    import json
    r = subprocess.run([sys.executable, "-S", str(HVCTL), "trace", "--json", str(path)], capture_output=True,
                       text=True, timeout=120)
    if r.returncode:
        return {"file": str(path), "mode": mode, "vcpus": vcpus, "error": r.stderr.strip()}
    s = json.loads(r.stdout)
    return {"file": str(path), "mode": mode, "vcpus": vcpus, "total": s["total"], "exits_per_s": s["exits_per_s"],
            "by_reason": s["by_reason"], "by_vcpu": s["by_vcpu"], "by_port": s["by_port"],
            "by_address": s["by_address"], "lost": s["lost"]}


def parse_lines(text, tag):
    """Each line starting with `tag` as a dict of its key=value pairs (ints where they are ints)."""
    rows = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] != tag:
            continue
        row = {}
        for w in words[1:]:
            k, _, v = w.partition("=")
            row[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
        rows.append(row)
    return rows


def expect_status(what, status, want, out, err):
    if status != want:
        why = STATUS_NAMES.get(status, "unexpected status")
        raise ExperimentError(f"{what}: guest exit status {status} ({why}), expected {want}\n"
                              f"--- guest output ---\n{out}--- hvctl stderr ---\n{err}")


def check_ring(what, row, want):
    """The guest reports the CPL it measured at (CS & 3); make sure it is the one we claim."""
    if row.get("ring") != want:
        raise ExperimentError(f"{what}: the guest reports it ran at ring {row.get('ring')}, expected ring {want}")


def ns(cycles, khz):
    """TSC cycles -> nanoseconds (None if the TSC frequency is unknown)."""
    return cycles * 1e6 / khz if khz else None


def tsc_note(khz):
    return TSC_NOTE.format(khz=khz, extra="" if khz else " (unknown: times are reported in TSC cycles only)")


def host_note():
    cpus = host_cpus()
    load = os.getloadavg()[0]
    note = (f"# host: {len(cpus)} CPUs available ({','.join(map(str, cpus))}), 1-min load average {load:.2f}; "
            f"hypervisor: {HVCTL}")
    if load > 0.5 * len(cpus):
        note += (f"\n# NOTE: the host is busy (load {load:.2f} on {len(cpus)} CPUs): other processes take CPU time "
                 f"from the vCPU threads, so contended numbers are noisy: trials are short and the median trial is reported")
    return note


def oversubscription_note(vcpus):
    cores = len(host_cpus())
    if max(vcpus) <= cores:
        return None
    over = [n for n in vcpus if n > cores]
    return (f"# NOTE: the host has {cores} CPUs available; runs with N = {', '.join(map(str, over))} vCPUs "
            f"OVERSUBSCRIBE it: vCPU threads time-share host CPUs, a lock holder or a waiter can be "
            f"descheduled for a whole host time slice (ms), and spinning waiters burn that slice. "
            f"Those points measure the host scheduler as much as the lock.")


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def table(headers, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# -- experiments -------------------------------------------------------------

def median(xs):
    xs = sorted(xs)
    return xs[(len(xs) - 1) // 2] if xs else None      # lower median: always one measured trial


def spinlock(vcpus=(1, 2, 4, 8), iters=20_000, trials=21, warmup=1000, pin="auto", timeout=120, log=print):
    """Test-and-test-and-set spinlock contention curve; returns one dict per vCPU count."""
    if log:
        log(USER64_NOTE)
        log(host_note())
        note = oversubscription_note(vcpus)
        if note:
            log(note)
    image = build_guest("spinlock.c", "user64", [f"ITERS={iters}", f"TRIALS={trials}", f"WARMUP={warmup}"])
    results = []
    for n in vcpus:
        p = pin_for(n, pin)
        status, out, err = run_guest(image, "user64", n, p, timeout)
        expect_status(f"spinlock with {n} vCPUs", status, STATUS_OK_BASE + n, out, err)
        head = parse_lines(out, "spinlock")
        tr = parse_lines(out, "spinlock_trial")
        if len(head) != 1 or len(tr) != trials:
            raise ExperimentError(f"spinlock with {n} vCPUs: unexpected guest output:\n{out}")
        h = head[0]
        check_ring("spinlock", h, 3)
        want = n * (warmup + trials * iters)
        if h["counter"] != h["expected"] or h["expected"] != want:
            raise ExperimentError(f"spinlock with {n} vCPUs: counter {h['counter']} != {n} x ({warmup} + "
                                  f"{trials} x {iters}) = {want}: the lock did not exclude")
        khz = h["tsc_khz"]
        if log and not results:
            log(tsc_note(khz))
        acq = n * iters                                   # acquisitions per trial
        cyc = [t["span"] / acq for t in tr]               # wall cycles per acquisition, per trial
        row = {"vcpus": n, "iters": iters, "trials": trials, "pin": p or "none",
               "oversubscribed": n > len(host_cpus()), "counter": h["counter"], "expected": h["expected"],
               "tsc_khz": khz, "trial_cycles_per_acq": cyc,
               "cycles_per_acq": median(cyc), "cycles_per_acq_min": min(cyc), "cycles_per_acq_max": max(cyc),
               "concurrency": median([t["busy"] / t["span"] for t in tr if t["span"]]),
               "vcpu_cycles_per_pair": median([t["busy"] / acq for t in tr])}
        row["ns_per_acq"] = ns(row["cycles_per_acq"], khz)
        row["ns_per_acq_min"] = ns(row["cycles_per_acq_min"], khz)
        row["ns_per_acq_max"] = ns(row["cycles_per_acq_max"], khz)
        row["acq_per_s"] = 1e9 / row["ns_per_acq"] if row["ns_per_acq"] else None
        row["vcpu_ns_per_pair"] = ns(row["vcpu_cycles_per_pair"], khz)
        results.append(row)
        if log:
            log(f"  N={n}: counter == {n} x ({warmup} + {trials} x {iters}) = {want} (verified), pin={row['pin']}")
    if log:
        log(f"# spinlock: TTAS (lock xchg, then spin on a load with pause), critical section = one shared counter "
            f"increment; {trials} trials of {iters:,} lock/unlock pairs per vCPU, each from a barrier")
        log("# ns/acq = trial wall time (first vCPU start to last vCPU end) / acquisitions in the trial: median "
            "trial, and the best-worst range; acq/s from the median; vCPU ns/pair = a vCPU's own loop time per "
            "pair (includes its waiting); overlap = mean number of vCPUs inside their loop (N = fully concurrent)")
        log(table(["vCPUs", "oversub", "pin", "acq/s", "ns/acq", "best-worst ns/acq", "cyc/acq", "vCPU ns/pair",
                   "overlap", "counter"],
                  [[str(r["vcpus"]), "YES" if r["oversubscribed"] else "no", r["pin"],
                    fmt(r["acq_per_s"], ",.0f"), fmt(r["ns_per_acq"]),
                    f"{fmt(r['ns_per_acq_min'])}-{fmt(r['ns_per_acq_max'])}",
                    f"{r['cycles_per_acq']:.1f}", fmt(r["vcpu_ns_per_pair"]), f"{r['concurrency']:.2f}",
                    str(r["counter"])] for r in results]))
        for r in results:
            if r["oversubscribed"]:
                how = ("the vCPUs' loops mostly ran one after another, with gaps while descheduled vCPUs waited "
                       "for a host CPU" if r["concurrency"] < 1.5 else
                       "the vCPUs' loops overlapped, time-sharing the host CPUs (waiters spin while the holder "
                       "may be descheduled)")
                log(f"  N={r['vcpus']} (oversubscribed): overlap {r['concurrency']:.2f}: {how}; a vCPU's own loop "
                    f"took {fmt(r['vcpu_ns_per_pair'])} ns/pair, the wall cost per acquisition was "
                    f"{fmt(r['ns_per_acq'])} ns")
    return results


def false_sharing(vcpus=(2,), iters=100_000, trials=21, pin="auto", timeout=120, log=print):
    """Per-vCPU counters in one cache line vs padded apart; one dict per (vCPU count, op, layout)."""
    if log:
        log(USER64_NOTE)
        log(host_note())
        note = oversubscription_note(vcpus)
        if note:
            log(note)
    image = build_guest("false_sharing.c", "user64", [f"ITERS={iters}", f"TRIALS={trials}"])
    results = []
    for n in vcpus:
        p = pin_for(n, pin)
        status, out, err = run_guest(image, "user64", n, p, timeout)
        head = parse_lines(out, "false_sharing")
        if status == 1 and head:
            raise ExperimentError(f"false_sharing with {n} vCPUs: {head[0].get('bad_counts')} trial(s) ended with "
                                  f"a counter != {iters}\n{out}")
        expect_status(f"false_sharing with {n} vCPUs", status, STATUS_OK_BASE + n, out, err)
        tr = parse_lines(out, "false_sharing_trial")
        if len(head) != 1 or head[0]["bad_counts"] != 0 or len(tr) != 6 * trials:
            raise ExperimentError(f"false_sharing with {n} vCPUs: unexpected guest output:\n{out}")
        check_ring("false_sharing", head[0], 3)
        khz = head[0]["tsc_khz"]
        if log and not results:
            log(tsc_note(khz))
        rows = []
        for op, layout in dict.fromkeys((t["op"], t["layout"]) for t in tr):
            ts = [t for t in tr if (t["op"], t["layout"]) == (op, layout)]
            # a trial counts when the vCPUs' loops overlapped: on average >= 90% of them (or of the host CPUs,
            # when oversubscribed) inside their loop
            conc = [t for t in ts if t["span"] and t["busy"] / t["span"] >= 0.9 * min(n, len(host_cpus()))]
            use = conc or ts
            cyc = [t["busy"] / n / iters for t in use]     # mean over vCPUs of own loop time per increment
            rows.append({"vcpus": n, "op": op, "layout": layout, "stride": ts[0]["stride"], "pin": p or "none",
                         "oversubscribed": n > len(host_cpus()), "tsc_khz": khz, "iters": iters,
                         "trials": len(ts), "concurrent_trials": len(conc), "counts_ok": True,
                         "cycles_per_inc": median(cyc), "cycles_per_inc_min": min(cyc),
                         "ns_per_inc": ns(median(cyc), khz), "ns_per_inc_min": ns(min(cyc), khz)})
        for row in rows:
            base = next(r for r in rows if r["op"] == row["op"] and r["layout"] == "padded128")
            # without a trial where the vCPUs ran together, a same-line row shows no contention: no ratio then
            row["ratio"] = (row["cycles_per_inc"] / base["cycles_per_inc"]
                            if n == 1 or (row["concurrent_trials"] and base["concurrent_trials"]) else None)
        results += rows
    if log:
        log(f"# false_sharing: each vCPU increments its own counter, op=plain (load, add, store) or op=locked "
            f"(lock add); layouts: same_line = 8-byte stride (one 64-byte line), padded64 = one line each, "
            f"padded128 = 128-byte stride (also defeats the adjacent-line prefetcher)")
        log(f"# {trials} trials of {iters:,} increments per vCPU per row, each from a barrier, every counter verified "
            f"= {iters:,}; ns/inc = a vCPU's own loop time / {iters:,}, averaged over vCPUs: median (and best) of "
            f"the trials in which the vCPUs' loops overlapped (conc. trials: mean number of vCPUs inside their loop "
            f">= 90% of min(N, host CPUs)); ratio = median / median of padded128, same op")
        log(table(["vCPUs", "pin", "op", "layout", "stride", "ns/inc", "best ns/inc", "cyc/inc", "ratio",
                   "conc. trials"],
                  [[str(r["vcpus"]), r["pin"], r["op"], r["layout"], str(r["stride"]), fmt(r["ns_per_inc"], ".2f"),
                    fmt(r["ns_per_inc_min"], ".2f"), f"{r['cycles_per_inc']:.2f}",
                    "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                    f"{r['concurrent_trials']}/{r['trials']}"] for r in results]))
        for n in vcpus:
            for op in ("plain", "locked"):
                same = next((r for r in results if (r["vcpus"], r["op"], r["layout"]) == (n, op, "same_line")), None)
                if same and same["ratio"] is not None:
                    log(f"  N={n} op={op}: counters in one cache line cost {same['ratio']:.2f}x the padded "
                        f"(128-byte) layout")
                elif same:
                    base = next(r for r in results if (r["vcpus"], r["op"], r["layout"]) == (n, op, "padded128"))
                    log(f"  N={n} op={op}: NO RATIO: the vCPUs' loops overlapped in {same['concurrent_trials']}/"
                        f"{same['trials']} same_line and {base['concurrent_trials']}/{base['trials']} padded128 "
                        f"trials (the host did not run them together); rerun with more --trials or on a quieter "
                        f"host")
    return results


def ipi(rounds=40, trials=5, flag_rounds=5000, flag_trials=21, flag_ring0_rounds=40, flag_ring0_trials=5,
        pin="auto", timeout=120, log=print):
    """LAPIC IPI round trips (ring 0, emulated) next to shared-memory flag ping-pongs; returns one dict per row."""
    if log:
        log(RING0_BANNER)
        log(host_note())
    p = pin_for(2, pin)
    results = []
    runs = [  # (guest tag, boot mode, source, defines, description, ring, round trips per trial, trials)
        ("ipi", "raw64", "ipi.c", ["WAIT_HLT=1"], "LAPIC IPI, both sides wait in sti;hlt", 0, rounds, trials),
        ("ipi", "raw64", "ipi.c", ["WAIT_SPIN=1"], "LAPIC IPI, both sides spin with IF=1", 0, rounds, trials),
        ("flag_pingpong", "raw64", "flag_pingpong.c", ["WARMUP=10"], "shared-memory flags, spin", 0,
         flag_ring0_rounds, flag_ring0_trials),
        ("flag_pingpong", "user64", "flag_pingpong.c", [], "shared-memory flags, spin", 3, flag_rounds, flag_trials)]
    for tag, mode, source, defines, what, ring, n_rounds, n_trials in runs:
        image = build_guest(source, mode, [*defines, f"ROUNDS={n_rounds}", f"TRIALS={n_trials}"])
        status, out, err = run_guest(image, mode, 2, p, timeout)
        head = parse_lines(out, tag)
        guest = head[0] if len(head) == 1 else {}
        tr = parse_lines(out, tag + "_trial")
        want = n_rounds * n_trials
        row = {"kind": tag, "what": what, "mode": mode, "ring": ring, "emulated": ring == 0,
               "status": status, "round_trips": want, "rounds_per_trial": n_rounds, "trials": n_trials,
               "completed": guest.get("completed", 0), "tsc_khz": guest.get("tsc_khz", 0), "pin": p or "none",
               "guest": guest, "trial_cycles": [t["cycles"] for t in tr], "output": out.strip(),
               "stderr": err.strip()}
        for key in ("pings", "pongs", "stray", "wait", "apic_id0", "apic_id1"):
            if key in guest:
                row[key] = guest[key]
        if guest:
            check_ring(f"{tag} ({mode})", guest, ring)
        row["ok"] = status == 102 and row["completed"] == want and len(tr) == n_trials
        if tag == "ipi" and row["ok"]:
            # each round trip = one ping handled on vCPU 1 + one pong on vCPU 0 (warm-up included)
            row["ok"] = row["pings"] == row["pongs"] >= want
        khz = row["tsc_khz"]
        per_rt = [c / n_rounds for c in row["trial_cycles"]] if row["ok"] else []
        row["cycles_per_round_trip"] = median(per_rt)
        row["cycles_per_round_trip_min"] = min(per_rt) if per_rt else None
        row["ns_per_round_trip"] = ns(row["cycles_per_round_trip"], khz) if per_rt else None
        row["ns_per_round_trip_min"] = ns(row["cycles_per_round_trip_min"], khz) if per_rt else None
        results.append(row)
        if log and len(results) == 1:
            log(tsc_note(khz))
        if log and not row["ok"]:
            log(f"# {tag} ({mode}, {what}) did NOT complete: exit status {status} "
                f"({STATUS_NAMES.get(status, 'unexpected')}); guest said: {out.strip() or '(nothing)'}; "
                f"hvctl stderr: {err.strip() or '(nothing)'}")
    if log:
        log("# us/round trip: median trial (and best trial) of `trials` trials, each timed on vCPU 0 with rdtsc; "
            "stray = interrupts on vectors nobody sent (PIC/PIT leaking through: should be 0)")
        log(table(["experiment", "boot", "ring", "executed", "round trips", "us/rt median", "us/rt best",
                   "cycles/rt", "what"],
                  [[r["kind"], r["mode"], str(r["ring"]), "EMULATED" if r["emulated"] else "native",
                    f"{r['completed']}/{r['round_trips']} ({r['trials']}x{r['rounds_per_trial']})",
                    fmt(r["ns_per_round_trip"] and r["ns_per_round_trip"] / 1000, ".3f"),
                    fmt(r["ns_per_round_trip_min"] and r["ns_per_round_trip_min"] / 1000, ".3f"),
                    fmt(r["cycles_per_round_trip"], ",.0f"),
                    r["what"] + (f"; stray={r['stray']}" if "stray" in r else "")]
                   for r in results]))
        by = {(r["kind"], r["mode"], r.get("wait")): r for r in results if r["ok"]}
        native = by.get(("flag_pingpong", "user64", None))
        for key, label in ((("ipi", "raw64", "hlt"), "IPI (hlt, emulated ring 0)"),
                           (("ipi", "raw64", "spin"), "IPI (spin, emulated ring 0)"),
                           (("flag_pingpong", "raw64", None), "flag ping-pong (emulated ring 0)")):
            if native and key in by and native["ns_per_round_trip"]:
                log(f"  {label} is {by[key]['ns_per_round_trip'] / native['ns_per_round_trip']:,.0f}x the native "
                    f"ring-3 flag ping-pong")
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise ExperimentError("ipi: some ping-pongs did not complete (see above): "
                              + "; ".join(f"{r['kind']}/{r['mode']}/{r['what']}: status {r['status']}" for r in failed))
    return results


# -- results: JSON, CSV, PNG ----------------------------------------------------

def plotting():
    """pyhv's plot helper (supervisor/plot.py), from this checkout if pyhv is not installed where we run."""
    try:
        from pyhv.supervisor import plot
    except ImportError:
        sys.path.insert(0, str(REPO))
        from pyhv.supervisor import plot
    return plot


def plot(name, results, path):
    """Draw `results` of experiment `name` into PNG `path` (matplotlib must be importable: plotting().require)."""
    if any(r.get(k) is None for r in results for k in ("acq_per_s", "ns_per_inc") if k in r):
        print(f"# no TSC frequency: no plot written to {path}")
        return False
    p = plotting()
    if name == "spinlock":
        fig, (a, b) = p.figure(1, 2, size=(10, 4))
        xs = [r["vcpus"] for r in results]
        a.plot(xs, [r["acq_per_s"] / 1e6 for r in results], "o-")
        a.set_xlabel("vCPUs"), a.set_ylabel("acquisitions / s (millions)"), a.set_title("throughput")
        b.plot(xs, [r["ns_per_acq"] for r in results], "o-")
        b.set_xlabel("vCPUs"), b.set_ylabel("ns / acquisition (wall)"), b.set_title("cost per acquisition")
        b.set_yscale("log")
        cores = len(host_cpus())
        if max(xs) > cores:
            for ax in (a, b):
                ax.axvspan(cores + 0.5, max(xs) + 0.5, color="red", alpha=0.1,
                           label=f"oversubscribed (> {cores} host CPUs)")
                ax.legend(fontsize=8)
        title = "TTAS spinlock, user64 (ring 3, native), rdtsc"
    elif name == "false_sharing":
        fig, (ax,) = p.figure(size=(8, 4))
        labels = list(dict.fromkeys(f"{r['op']}\n{r['vcpus']} vCPUs" for r in results))
        layouts = list(dict.fromkeys(r["layout"] for r in results))
        width = 0.8 / len(layouts)
        for j, layout in enumerate(layouts):
            vals = {f"{r['op']}\n{r['vcpus']} vCPUs": r["ns_per_inc"] for r in results if r["layout"] == layout}
            ax.bar([i + j * width for i in range(len(labels))], [vals.get(lab, 0) for lab in labels], width,
                   label=layout)
        ax.set_xticks([i + width * (len(layouts) - 1) / 2 for i in range(len(labels))], labels)
        ax.set_ylabel("ns / increment (median trial)"), ax.legend()
        title = "false sharing, user64 (ring 3, native), rdtsc"
    else:
        fig, (ax,) = p.figure(size=(8, 4))
        ok = [r for r in results if r["ok"] and r["ns_per_round_trip"]]
        ax.barh([f"{r['kind']} ring {r['ring']}\n{r['what']}" for r in ok],
                [r["ns_per_round_trip"] / 1000 for r in ok],
                color=["tab:red" if r["emulated"] else "tab:green" for r in ok])
        ax.set_xscale("log"), ax.set_xlabel("us per round trip (log)")
        title = "round trips: red = ring 0 EMULATED, green = ring 3 native"
    p.save(fig, path, title=title)
    print(f"# plot written to {path}")
    return True


CSV_SKIP = ("output", "stderr")      # the guests' whole output: in the JSON only


def write_results(name, results, out, notes, args):
    """OUT/NAME.json (every row, the notes printed, the parameters, the host) and OUT/NAME.csv (scalar columns)."""
    import csv
    import datetime
    import json
    out.mkdir(parents=True, exist_ok=True)
    doc = {"experiment": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": {"cpus": host_cpus(), "loadavg": os.getloadavg(), "hvctl": str(HVCTL)},
           "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
           "notes": notes, "results": results, "traces": TRACES}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    columns = list(dict.fromkeys(k for r in results for k, v in r.items()
                                 if k not in CSV_SKIP and (v is None or isinstance(v, (int, float, str, bool)))))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    print(f"# results written to {out / (name + '.json')} and {out / (name + '.csv')}")


# -- command line ------------------------------------------------------------

def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=("spinlock", "false_sharing", "ipi"))
    ap.add_argument("--vcpus", type=_ints, help="comma-separated vCPU counts (spinlock default 1,2,4,8; "
                                                "false_sharing default 2; ipi always uses 2)")
    ap.add_argument("--iters", type=int, help="per-vCPU operations per trial (spinlock default 20000, "
                                              "false_sharing 100000)")
    ap.add_argument("--trials", type=int, default=21, help="spinlock, false_sharing: trials per point, each from a "
                                                          "barrier; the median is reported (default 21)")
    ap.add_argument("--rounds", type=int, default=40,
                    help="ipi: IPI round trips per trial (ring 0, emulated; default 40; --trials applies to "
                         "spinlock/false_sharing and the user64 flag ping-pong; IPI and ring-0 flag runs use 5)")
    ap.add_argument("--flag-rounds", type=int, default=5000,
                    help="ipi: user64 flag round trips per trial (default 5000)")
    ap.add_argument("--flag-ring0-rounds", type=int, default=40,
                    help="ipi: raw64 (ring 0, emulated) flag round trips per trial (default 40)")
    ap.add_argument("--pin", default="auto", help="auto (distinct host CPUs when N <= CPUs, else unpinned), "
                                                  "cycle, none, or a CPU list for hvctl --pin")
    ap.add_argument("--timeout", type=int, default=120, help="hvctl --timeout per guest run (s)")
    ap.add_argument("--out", metavar="DIR", type=pathlib.Path, default=HERE / "results",
                    help="write NAME.json and NAME.csv here, and NAME.png when matplotlib is installed "
                         "(default: results/ beside this script)")
    ap.add_argument("--plot", metavar="PNG", help="write the plot here (needs matplotlib: refused at once "
                                                  "without it)")
    ap.add_argument("--trace", metavar="DIR", type=pathlib.Path,
                    help="record every VM exit of each guest run into DIR (hvctl run --trace; `hvctl trace FILE` "
                         "reads one); the JSON results get each run's exits by reason")
    args = ap.parse_args(argv)
    png = args.plot
    try:
        if png:
            plotting().require(png)                     # before minutes of experiments, not after
        elif _have_matplotlib():
            png = str(args.out / f"{args.name}.png")
    except Exception as e:                              # PlotUnavailable (exit 1), UserError (2): one line
        print(f"run.py: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 1)
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        TRACE_DIR.append(args.trace)
    notes = []

    def log(line):
        notes.append(line)
        print(line)

    try:
        if args.name == "spinlock":
            res = spinlock(args.vcpus or (1, 2, 4, 8), args.iters or 20_000, args.trials, pin=args.pin,
                           timeout=args.timeout, log=log)
        elif args.name == "false_sharing":
            res = false_sharing(args.vcpus or (2,), args.iters or 100_000, args.trials, pin=args.pin,
                                timeout=args.timeout, log=log)
        else:
            if args.vcpus and args.vcpus != [2]:
                print("# ipi: uses exactly 2 vCPUs; --vcpus ignored", file=sys.stderr)
            res = ipi(args.rounds, 5, args.flag_rounds, args.trials, args.flag_ring0_rounds, 5, pin=args.pin,
                      timeout=args.timeout, log=log)
    except ExperimentError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    write_results(args.name, res, args.out, notes, args)
    if png:
        plot(args.name, res, png)
    else:
        print(f"# no plot: matplotlib is not installed ({plotting().INSTALL})")
    print("# result: OK (guest correctness checks passed)")
    return 0


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
