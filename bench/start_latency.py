"""Start latency: from exec of the command to the first byte the guest writes to COM1.

Timed in this process with time.perf_counter() just before Popen and when the
byte arrives on the child's stdout pipe; median of N interleaved runs after one
untimed warm-up run of each case (page cache, bytecode cache).  Cases:
  - the C reference (bench/ref/kvm_loop.c) on the same raw64 guest: the floor
    set by KVM itself (VM, memory, irqchip, vCPU creation);
  - `hvctl run --boot raw64 --kernel IMG`, the command found in PATH (or
    --hvctl CMD), as a user runs it;
  - bare Python writing one byte: the interpreter's own start-up.
"""
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common

REPS = 15

GUEST = """
    mov $0x3f8, %dx
    mov $'X', %al
    out %al, %dx
    mov $0x501, %dx
    xor %eax, %eax
    out %al, %dx
1:  jmp 1b
"""


def run(args):
    reps = args.reps or REPS
    image = common.guest(GUEST)
    cases = {"C reference": [str(common.build_ref()), str(image)],
             "hvctl run": common.hvctl_run(args, image),
             "bare python3, one byte": [sys.executable, "-c", "import os; os.write(1, b'X')"]}
    first = {case: [] for case in cases}
    total = {case: [] for case in cases}
    for cmd in cases.values():
        common.Timed(cmd).check(0)
    for _ in range(reps):
        for case, cmd in cases.items():
            t = common.Timed(cmd).check(0)
            first[case].append(t.at(b"X"))
            total[case].append(t.elapsed)
    rows = []
    for case, cmd in cases.items():
        rows.append(common.row("start_latency", case, [x * 1000 for x in first[case]], "ms to 1st byte",
                               ref=rows[0] if rows else None,
                               exec_to_exit_ms=common.median(total[case]) * 1000, cmd=cmd))
    return rows


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
