"""CLI rate: guests created and started per second by parallel `hvctl create --start` clients, beside the Python API.

One supervisor (`hvctl supervisor`, zygote on) on a fresh runtime dir, one
untimed warm-up guest, then per repetition N raw64 guests (the stress guest
of bench/stress.py, which prints its line and exits) in two ways, one after
the other on the same supervisor:
  - CLI: P client slots, each running `hvctl create NAME --kernel IMG --boot
    raw64 --start` for its share of the N names, one process per guest, as a
    shell loop or a CI script does; timed from the first exec to the last
    client's exit (every guest then exists and has started);
  - API: the same N guests through `pyhv.Client`, every Create and then every
    Start pipelined on one socket; timed from the first request to the last
    reply.  This is the reference: the supervisor's own rate, with no client
    start-up in it.
Each repetition's guests are destroyed before the next.  Every guest's
console line and exit status is checked after each run.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common, stress

GUESTS = 24
CLIENTS = 8
REPS = 3


def _cli_round(args, sup, paths, names, clients):
    """Seconds for `clients` parallel slots to run one `hvctl create --start` per guest."""
    base = common.hvctl_cmd(args) + ["--runtime-dir", sup.dir]
    todo = list(zip(names, paths))
    running, failures = [], []
    t0 = time.perf_counter()
    while todo or running:
        while todo and len(running) < clients:
            name, path = todo.pop(0)
            cmd = base + ["create", name, "--kernel", path, "--boot", "raw64", "--mem", "32M",
                          "--timeout", "120", "--start"]
            running.append((name, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE, env=common.CHILD_ENV)))
        name, p = running[0]
        _, err = p.communicate()
        running.pop(0)
        if p.returncode:
            failures.append(f"{name}: hvctl exited {p.returncode}: {err.decode(errors='replace').strip()}")
    elapsed = time.perf_counter() - t0
    if failures:
        sys.exit("cli_rate: " + "; ".join(failures))
    return elapsed


def _api_round(sup, paths, names):
    """Seconds for the same guests through the Python API, pipelined on one socket."""
    from pyhv.proto.guest import GuestConfig
    m = sup.m
    t0 = time.perf_counter()
    for name, path in zip(names, paths):
        sup.pipe.send(m.Create(GuestConfig(name=name, kernel=path, boot="raw64", mem_bytes=32 << 20,
                                           timeout=120.0)))
    for name in names:
        sup.pipe.send(m.Start(name=name))
    replies = [sup.pipe.recv() for _ in range(2 * len(names))]
    elapsed = time.perf_counter() - t0
    bad = [r for r in replies if type(r).__name__ == "Error"]
    if bad:
        sys.exit(f"cli_rate: the API refused: {bad[0]}")
    return elapsed


def _check_and_destroy(sup, indices, names):
    """Wait for every guest, compare its console and status with what it must print, destroy it."""
    m = sup.m
    for i, name in zip(indices, names):
        reply = sup.pipe.request(m.Wait(name=name), timeout=130)
        want_out, want_status = stress.expected(i, wait=False)
        got = stress._console(sup.dir, name)
        status = getattr(reply, "exit_status", None)
        if status != want_status or got != want_out:
            sys.exit(f"cli_rate: guest {name}: status {status} output {got!r}, expected {want_status} {want_out!r}")
        sup.pipe.request(m.Destroy(name=name, purge=True))


def run(args):
    reps = args.reps or REPS
    n = getattr(args, "guests", None) or GUESTS
    clients = getattr(args, "clients", None) or CLIENTS
    workdir = tempfile.mkdtemp(prefix="hv-clirate-", dir="/tmp")
    sup = stress.Supervisor(args, "1")
    try:
        indices = list(range(n + 1))
        images = stress.images(indices, workdir, wait=False)
        warm = [stress.guest_name(n)]
        _api_round(sup, [images[n]], warm)
        _check_and_destroy(sup, [n], warm)
        cli, api = [], []
        for rep in range(reps):
            for way, times in (("cli", cli), ("api", api)):
                names = [f"{way}{rep}-{i:03d}" for i in range(n)]
                paths = [images[i] for i in range(n)]
                if way == "cli":
                    times.append(n / _cli_round(args, sup, paths, names, clients))
                else:
                    times.append(n / _api_round(sup, paths, names))
                _check_and_destroy(sup, range(n), names)
    finally:
        sup.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sup.dir, ignore_errors=True)
    ref = common.row("cli_rate", f"API, {n} guests pipelined", api, "guests/s")
    return [common.row("cli_rate", f"CLI, {n} guests / {clients} clients", cli, "guests/s", ref=ref), ref]


def main():
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--guests", type=int, default=GUESTS, help=f"guests per run (default {GUESTS})")
    p.add_argument("--clients", type=int, default=CLIENTS, help=f"parallel hvctl clients (default {CLIENTS})")
    args = p.parse_args()
    common.report(run(args), args)


if __name__ == "__main__":
    main()
