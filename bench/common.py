"""Shared by the benchmarks: the C reference build, guest images, timed child processes, tables and JSON.

A benchmark module defines `run(args) -> list[dict]`; each dict is one
result row: bench, case, value (the median), unit, samples, and vs_ref (value
divided by the C reference's value for the same measurement, when there is
one).  Figures are printed, never compared with thresholds.
"""
import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests" / "support"))
import guestbuild  # noqa: E402

CACHE = pathlib.Path(os.environ.get("HV_BENCH_CACHE", pathlib.Path(tempfile.gettempdir()) / "pyhv-bench"))
DEFAULT_JSON = BENCH / "results" / "latest.json"

# Children cache bytecode like a normal install, but under CACHE rather than in the source tree.  Some
# environments (the project's machines) set PYTHONDONTWRITEBYTECODE=1, which makes every hvctl start
# compile the project from source: about 50 ms more to the first byte.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
CHILD_ENV.setdefault("PYTHONPYCACHEPREFIX", str(CACHE / "pycache"))


# -- building -----------------------------------------------------------------

def build_ref(name="kvm_loop"):
    """Compile bench/ref/NAME.c with gcc -O2 into the cache (keyed by source hash); returns the binary."""
    src = BENCH / "ref" / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = CACHE / f"{name}-{digest}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"bench: cannot build {src}:\n{r.stderr}")
        os.replace(tmp, out)
    return out


def guest(source):
    """A raw64 flat binary from assembly source (tests/support/guestbuild.py, cached)."""
    return guestbuild.build_asm(source, "raw64")


# -- the commands under test ----------------------------------------------------

def hvctl_cmd(args):
    """`hvctl` as a user runs it: --hvctl if given, else from PATH, else bin/hvctl."""
    if getattr(args, "hvctl", None):
        return shlex.split(args.hvctl)
    found = shutil.which("hvctl")
    return [found] if found else [sys.executable, str(REPO / "bin" / "hvctl")]


def hvctl_run(args, image, timeout=300):
    return hvctl_cmd(args) + ["run", "--boot", "raw64", "--kernel", str(image), "--timeout", str(timeout)]


class Timed:
    """One child run: stdout chunks with their arrival times (seconds after just before exec)."""

    def __init__(self, cmd, stop_at=None, env=None):
        """With `stop_at`, the child is ended once that byte string has arrived (its status is then ignored);
        `env` adds to the children's environment."""
        self.cmd = cmd
        self.chunks = []
        seen = b""
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**CHILD_ENV, **(env or {})})
        fd = p.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            t = time.perf_counter() - t0
            if not data:
                break
            self.chunks.append((t, data))
            if stop_at is not None:
                seen = (seen + data)[-4096:]
                if stop_at in seen:
                    p.terminate()
                    stop_at = None
        self.stderr = p.stderr.read().decode(errors="replace")
        self.status = p.wait()
        self.elapsed = time.perf_counter() - t0
        self.stdout = b"".join(d for _, d in self.chunks)

    def at(self, needle):
        """When `needle` (bytes, possibly split across reads) had fully arrived, or None."""
        buf = bytearray()
        for t, data in self.chunks:
            start = max(0, len(buf) - len(needle) + 1)
            buf += data
            if buf.find(needle, start) >= 0:
                return t
        return None

    def check(self, status=0):
        if self.status != status:
            sys.exit(f"bench: {shlex.join(self.cmd)} exited {self.status} (expected {status}); "
                     f"stdout {self.stdout[-200:]!r}; stderr: {self.stderr.strip()[-2000:]}")
        return self


# -- results --------------------------------------------------------------------

def median(xs):
    return statistics.median(xs)


def row(bench, case, samples, unit, ref=None, **extra):
    """A result row; `ref` is the reference row whose value this one is divided by for vs_ref."""
    value = median(samples)
    return {"bench": bench, "case": case, "value": value, "unit": unit, "samples": samples,
            "vs_ref": value / ref["value"] if ref else None, **extra}


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def print_table(rows, out=sys.stdout):
    head = ("bench", "case", "median", "unit", "vs C", "n")
    lines = [head] + [(r["bench"], r["case"], _fmt(r["value"]), r["unit"],
                       "-" if r["vs_ref"] is None else f"{r['vs_ref']:.2f}x", str(len(r["samples"])))
                      for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print("  ".join(c.rjust(w) if i in (2, 4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))),
              file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _read(path, default=""):
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return default


def machine():
    """What these figures were measured on."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    mem_kb = next((int(l.split()[1]) for l in _read("/proc/meminfo").splitlines() if l.startswith("MemTotal")), 0)
    kvm = [m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.isdir(f"/sys/module/{m}")]
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "kvm_modules": kvm,
        "loadavg": _read("/proc/loadavg").split()[:3],
        "python_env": {k: v for k, v in os.environ.items() if k.startswith("PYTHON")},
        "child_env": {k: v for k, v in CHILD_ENV.items() if k.startswith("PYTHON")},
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource").strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path, rows):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, help="repetitions per case (each benchmark has its own default)")
    p.add_argument("--hvctl", metavar="CMD", help="the hvctl command to time (default: hvctl from PATH)")
    p.add_argument("--json", metavar="PATH", help="write the results and the machine description here "
                   "(python -m bench: default bench/results/latest.json)")
    return p


def report(rows, args):
    print_table(rows)
    print(f"hvctl = {shlex.join(hvctl_cmd(args))}")
    if args.json:
        write_json(args.json, rows)


def main(run, description):
    """Entry point of `python bench/NAME.py`."""
    args = parser(description).parse_args()
    report(run(args), args)
