"""Linux boot milestones: time from `hvctl run` to each kernel message, and what the VMM itself spent.

Boots the kernels that guests/fetch.sh leaves in $HV_ARTEFACTS (default
/var/cache/pyhv): our own (ELF vmlinux, busybox initramfs, runs to
`reboot -f`) and, with HV_BENCH_STOCK=1, Debian's stock cloud kernel
(bzImage, to `Run /init`; it takes 10+ minutes on nested hosts and its user
space cannot make system calls there).  Milestones are the
host times at which the kernel's lines arrive on the console pipe; the VMM
share comes from `hvctl run --stats-json` (exits and time between KVM_RUN
calls, summed over vCPUs).
"""
import json
import os
import pathlib
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))
MILESTONES = (
    ("first console output (Linux version)", b"Linux version"),   # printk flushes once ttyS0 registers
    ("SMP bring-up", b"smp: Brought up"),
    ("initramfs unpacked", b"Freeing initrd memory"),
    ("Run /init", b"Run /init as init process"),
    ("init ran", b"pyhv-init:"),
)
REPS = 1


def kernels(with_stock):
    """(name, kernel, initrd, cmdline, vcpus, timeout, expected status) for the artefacts present."""
    found = []
    own, initrd = ARTEFACTS / "own" / "vmlinux", ARTEFACTS / "initramfs.cpio"
    if own.exists() and initrd.exists():
        found.append(("own kernel", own, initrd, "console=ttyS0 pyhv.run=true", 2, 300, 0))
    stock = ARTEFACTS / "stock" / "vmlinuz"
    if with_stock and stock.exists() and initrd.exists():
        # Stock user space cannot make system calls here: stop at Run /init (the timeout ends it).
        found.append(("stock kernel", stock, initrd, "console=ttyS0", 2, 600, None))
    return found


def boot(args, kernel, initrd, cmdline, vcpus, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = pathlib.Path(tmp) / "stats.json"
        cmd = common.hvctl_cmd(args) + ["run", "--kernel", str(kernel), "--initrd", str(initrd),
                                        "--cmdline", cmdline, "--vcpus", str(vcpus), "--timeout", str(timeout),
                                        "--stats-json", str(stats_path)]
        t = common.Timed(cmd, stop_at=b"Run /init as init process" if "stock" in str(kernel) else None)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return t, stats


def run(args):
    reps = args.reps or REPS
    rows = []
    present = kernels(os.environ.get("HV_BENCH_STOCK") == "1")
    if not present:
        print(f"linux_boot: no kernels in {ARTEFACTS}; run guests/fetch.sh first", file=sys.stderr)
        return rows
    for name, kernel, initrd, cmdline, vcpus, timeout, status in present:
        times = {m: [] for m, _ in MILESTONES}
        vmm = []
        for _ in range(reps):
            t, stats = boot(args, kernel, initrd, cmdline, vcpus, timeout)
            if status is not None:
                t.check(status)
            for m, marker in MILESTONES:
                at = t.at(marker)
                if at is not None:
                    times[m].append(at)
            exits = sum(sum(v["exits"].values()) for v in stats.get("vcpus", []))
            ns_vmm = sum(v["ns_in_vmm"] for v in stats.get("vcpus", []))
            ns_guest = sum(v["ns_in_guest"] for v in stats.get("vcpus", []))
            vmm.append((exits, ns_vmm, ns_guest, t.elapsed))
        for m, _ in MILESTONES:
            if times[m]:
                rows.append(common.row("linux_boot", f"{name}: {m}", times[m], "s from exec", vcpus=vcpus))
        exits, ns_vmm, ns_guest, elapsed = vmm[-1]
        if exits:
            rows.append(common.row("linux_boot", f"{name}: exits (last run)", [exits], "exits",
                                   vmm_seconds=ns_vmm / 1e9, guest_seconds=ns_guest / 1e9, wall_seconds=elapsed))
            rows.append(common.row("linux_boot", f"{name}: VMM time per exit", [ns_vmm / exits / 1000], "µs/exit",
                                   vmm_share_of_vcpu_time=ns_vmm / max(ns_vmm + ns_guest, 1)))
    return rows


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
