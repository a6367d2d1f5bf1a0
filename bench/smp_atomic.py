"""SMP correctness and cost at scale: N vCPUs add to one shared counter with locked instructions.

Uses tests/support/guests/atomic_counter.c (vCPU 0 checks the total and exits with
100 + N if it is exact).  user64 runs natively in ring 3; raw64 runs in ring
0, which nested hosts emulate, so it does far fewer iterations.  The figure
is wall time from exec to exit and locked adds per second; correctness is
the exit status.  There is no C reference for this one.
"""
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common

SOURCE = (common.REPO / "tests" / "support" / "guests" / "atomic_counter.c").read_text()
CASES = (("user64", 2, 1_000_000), ("user64", 64, 10_000), ("raw64", 64, 1_000))
REPS = 3


def run(args):
    rows = []
    for mode, vcpus, iterations in CASES:
        image = common.guestbuild.build_c(SOURCE, mode, cflags=(f"-DITERATIONS={iterations}",))
        cmd = common.hvctl_cmd(args) + ["run", "--boot", mode, "--kernel", str(image), "--vcpus", str(vcpus),
                                        "--timeout", "300"]
        rates, seconds = [], []
        for _ in range(args.reps or REPS):
            t = common.Timed(cmd).check(100 + vcpus)           # exits 100+N only if the total is exact
            assert t.stdout == f"{vcpus * iterations}\n".encode(), t.stdout
            seconds.append(t.elapsed)
            rates.append(vcpus * iterations / t.elapsed)
        rows.append(common.row("smp_atomic", f"{mode}, {vcpus} vCPUs x {iterations:,} adds: exact",
                               rates, "adds/s (incl. boot)", wall_seconds=common.median(seconds)))
    return rows


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
