"""Device-plugin accesses: what a guest port access costs when a plugin in its own process answers it.

The same marker-timed raw64 loop as bench/exit_rate.py (N port accesses
between 'S' and 'E' on COM1), on:
  - the C reference (bench/ref/kvm_loop.c), port 0x80;
  - hvctl, port 0x3FF: COM1's scratch register, a Python device in the worker;
  - hvctl, port 0x300 written / read: bench/sink_plugin.py behind `--device`,
    one SEQPACKET round trip to the plugin's process per access;
  - the same with 2 vCPUs, each doing N accesses at once (their exits/s summed:
    each vCPU has its own socket, the plugin serves one access at a time).
Cases are interleaved, repetition by repetition.
"""
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common
from bench.exit_rate import GUEST, loop_rate

EXITS = 20_000
REPS = 5
SINK = f"{common.BENCH / 'sink_plugin.py'}:Sink"

# Every vCPU loops; vCPU 0 waits for the others (a counter in RAM) before its 'E'.
SMP_GUEST = """
    lea done(%rip), %r8
    test %rdi, %rdi
    jnz 3f
    mov $0x3f8, %dx
    mov $'S', %al
    out %al, %dx
3:  mov ${n}, %ecx
    mov ${port}, %dx
1:  {op}
    dec %ecx
    jnz 1b
    lock incl (%r8)
    test %rdi, %rdi
    jnz 4f
2:  cmp %esi, (%r8)
    jne 2b
    mov $0x3f8, %dx
    mov $'E', %al
    out %al, %dx
    mov $0x501, %dx
    xor %eax, %eax
    out %al, %dx
4:  jmp 4b
    .balign 8
done: .long 0
"""


def run(args):
    reps = args.reps or REPS
    ref = str(common.build_ref())
    out_op, in_op = "out %al, %dx", "in %dx, %al"
    images = {
        "post": common.guest(GUEST.format(n=EXITS, port=0x80)),
        "scratch": common.guest(GUEST.format(n=EXITS, port=0x3FF)),
        "plugin-out": common.guest(GUEST.format(n=EXITS, port=0x300)),
        "plugin-in": common.guest(GUEST.replace("1:  out %al, %dx", f"1:  {in_op}").format(n=EXITS, port=0x300)),
        "plugin-smp": common.guest(SMP_GUEST.format(n=EXITS, port=0x300, op=out_op)),
    }
    plugin = ["--device", SINK]
    cases = {
        "C reference, port 0x80": ([ref, str(images["post"])], EXITS),
        "hvctl, Python device in the worker (port 0x3FF)": (common.hvctl_run(args, images["scratch"]), EXITS),
        "hvctl, plugin process, port writes": (common.hvctl_run(args, images["plugin-out"]) + plugin, EXITS),
        "hvctl, plugin process, port reads": (common.hvctl_run(args, images["plugin-in"]) + plugin, EXITS),
        "hvctl, plugin process, writes from 2 vCPUs (sum)":
            (common.hvctl_run(args, images["plugin-smp"]) + plugin + ["--vcpus", "2"], 2 * EXITS),
    }
    samples = {case: [] for case in cases}
    for _ in range(reps):
        for case, (cmd, n) in cases.items():
            samples[case].append(loop_rate(common.Timed(cmd).check(0), n))
    rows = []
    for case, (cmd, n) in cases.items():
        rows.append(common.row("plugin_rate", case, samples[case], "exits/s", ref=rows[0] if rows else None,
                               exits=n, cmd=cmd))
    for r in rows:
        r["us_per_access"] = round(1e6 / r["value"], 2)
    return rows


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
