"""Port-I/O exit rate: hvctl against the C reference, on the same raw64 guest.

The guest writes 'S' to COM1, then N times to one port, then 'E' to COM1 and
0 to the exit port.  The benchmark timestamps 'S' and 'E' as they arrive on
the child's stdout pipe, so the figure covers exactly the loop (no start-up
or tear-down) and is taken the same way for every case:
  - the C reference (bench/ref/kvm_loop.c), port 0x80;
  - hvctl, port 0x80: the POST port, absorbed by the C run loop (hv_kvm.c);
  - hvctl, port 0x3FF: COM1's scratch register, so every exit returns to
    Python and goes through the port bus to the 8250 model.
Cases are interleaved, repetition by repetition.
"""
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common

EXITS = 200_000
REPS = 5

GUEST = """
    mov $0x3f8, %dx
    mov $'S', %al
    out %al, %dx            /* marker: loop starts */
    mov ${n}, %ecx
    mov ${port}, %dx
1:  out %al, %dx
    dec %ecx
    jnz 1b
    mov $0x3f8, %dx
    mov $'E', %al
    out %al, %dx            /* marker: loop done */
    mov $0x501, %dx
    xor %eax, %eax
    out %al, %dx            /* exit status 0 */
2:  jmp 2b
"""


def loop_rate(timed, n):
    """Exits per second between the 'S' and 'E' markers."""
    s, e = timed.at(b"S"), timed.at(b"E")
    if s is None or e is None or e <= s:
        sys.exit(f"bench: markers missing from {timed.cmd}: {timed.stdout[:100]!r}")
    return n / (e - s)


def run(args):
    reps = args.reps or REPS
    ref = str(common.build_ref())
    post = common.guest(GUEST.format(n=EXITS, port=0x80))
    scratch = common.guest(GUEST.format(n=EXITS, port=0x3FF))
    cases = {
        "C reference, port 0x80": [ref, str(post)],
        "hvctl, port 0x80 (C loop)": common.hvctl_run(args, post),
        "hvctl, port 0x3FF (Python device)": common.hvctl_run(args, scratch),
    }
    samples = {case: [] for case in cases}
    self_timed = []
    for _ in range(reps):
        for case, cmd in cases.items():
            t = common.Timed(cmd).check(0)
            samples[case].append(loop_rate(t, EXITS))
            if cmd[0] == ref:   # kvm_loop's own figure: every exit of the run, first KVM_RUN to the end
                stats = dict(f.split("=") for f in t.stderr.split(":", 1)[1].split())
                self_timed.append(float(stats["exits_per_s"]))
    rows = []
    for case, cmd in cases.items():
        rows.append(common.row("exit_rate", case, samples[case], "exits/s", ref=rows[0] if rows else None,
                               exits=EXITS, cmd=cmd))
    rows[0]["self_timed_exits_per_s"] = common.median(self_timed)
    return rows


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
