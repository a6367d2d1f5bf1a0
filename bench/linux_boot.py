"""Linux boots and system calls: time from `hvctl run` to each kernel message, what the VMM spent, and what a system call costs.

Boots the kernels that guests/fetch.sh leaves in $HV_ARTEFACTS (default
/var/cache/pyhv), 2 vCPUs each, to `reboot -f`:
- our own (Debian's source, no patch of ours; on nested hosts its system
  calls go through the VMM's SYSCALL hook, vcpu_worker/syscall_hook.py);
- with HV_BENCH_STOCK=1, Debian's stock cloud kernel with
  stock-initramfs.cpio (its own virtio modules, loaded by init): milestones to
  `Run /init`, to its first user-space line and to the modules loaded (it
  takes 10+ minutes on nested hosts).
Milestones are the host times at which the lines arrive on the console pipe;
the VMM share and the debug exits (the hook's breakpoint on the #PF entry)
come from `hvctl run --stats-json`.

System-call cost: bench/guests/syscall_loop.c makes N getppid() calls in our
kernel's user space.  With HV_BENCH_PATCHED_KERNEL=PATH (a kernel built with
the guest patch the hook replaced: `git show 8b83ca0:guests/linux/syscall-hook.patch`)
the same runs there with the hook off (HV_SYSCALL_HOOK=off), side by side.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))
OWN_MILESTONES = (
    ("first console output (Linux version)", b"Linux version"),   # printk flushes once ttyS0 registers
    ("SMP bring-up", b"smp: Brought up"),
    ("initramfs unpacked", b"Freeing initrd memory"),
    ("Run /init", b"Run /init as init process"),
    ("init ran", b"pyhv-init:"),
)
STOCK_MILESTONES = (
    ("first console output (Linux version)", b"Linux version"),
    ("SMP bring-up", b"smp: Brought up"),
    ("Run /init", b"Run /init as init process"),
    ("first user-space line", b"pyhv-init:"),
    ("its virtio modules loaded", b"pyhv-init: modules loaded"),
    ("init ran its command", b"pyhv-init: exit status"),
)
SYSCALLS = 20000
REPS = 1


def boot(args, kernel, initrd, cmdline, vcpus=2, timeout=900, env=None):
    """One `hvctl run` to its end: (Timed, stats)."""
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = pathlib.Path(tmp) / "stats.json"
        cmd = common.hvctl_cmd(args) + ["run", "--kernel", str(kernel), "--initrd", str(initrd),
                                        "--cmdline", cmdline, "--vcpus", str(vcpus), "--timeout", str(timeout),
                                        "--stats-json", str(stats_path)]
        t = common.Timed(cmd, env=env)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return t, stats


def exit_rows(name, t, stats, vcpus):
    """The VMM's share, and the hook's breakpoint exits per second of boot."""
    per = stats.get("vcpus", [])
    exits = sum(sum(v["exits"].values()) for v in per)
    debug = sum(v["exits"].get("DEBUG", 0) for v in per)
    ns_vmm = sum(v["ns_in_vmm"] for v in per)
    ns_guest = sum(v["ns_in_guest"] for v in per)
    rows = []
    if exits:
        rows.append(common.row("linux_boot", f"{name}: exits (last run)", [exits], "exits", vcpus=vcpus,
                               vmm_seconds=ns_vmm / 1e9, guest_seconds=ns_guest / 1e9, wall_seconds=t.elapsed))
        rows.append(common.row("linux_boot", f"{name}: VMM time per exit", [ns_vmm / exits / 1000], "µs/exit",
                               vmm_share_of_vcpu_time=ns_vmm / max(ns_vmm + ns_guest, 1)))
    hook = stats.get("syscall_hook")
    if hook:
        rows.append(common.row("linux_boot", f"{name}: debug exits per second of boot", [debug / t.elapsed],
                               "exits/s", debug_exits=debug, syscalls=hook["syscalls"], faults=hook["faults"],
                               rearms=hook["rearms"], steps=hook["steps"], wall_seconds=t.elapsed))
    return rows


def boots(args, with_stock):
    rows = []
    initrd = ARTEFACTS / "initramfs.cpio"
    cases = [("own kernel", ARTEFACTS / "own" / "vmlinux", initrd, OWN_MILESTONES, 900)]
    if with_stock:
        cases.append(("stock kernel", ARTEFACTS / "stock" / "vmlinuz", ARTEFACTS / "stock-initramfs.cpio",
                      STOCK_MILESTONES, 2400))
    for name, kernel, initrd, milestones, timeout in cases:
        if not (kernel.exists() and initrd.exists()):
            print(f"linux_boot: {kernel} or {initrd} missing; run guests/fetch.sh first", file=sys.stderr)
            continue
        times = {m: [] for m, _ in milestones}
        for _ in range(args.reps or REPS):
            t, stats = boot(args, kernel, initrd, "console=ttyS0 pyhv.run=true", timeout=timeout)
            t.check(0)
            for m, marker in milestones:
                at = t.at(marker)
                if at is not None:
                    times[m].append(at)
        for m, _ in milestones:
            if times[m]:
                rows.append(common.row("linux_boot", f"{name}: {m}", times[m], "s from exec", vcpus=2))
        rows += exit_rows(name, t, stats, 2)
    return rows


def syscall_loop_initramfs():
    """Our busybox initramfs plus /bin/syscall_loop (built here, freestanding), in the bench cache."""
    src = common.BENCH / "guests" / "syscall_loop.c"
    busybox = ARTEFACTS / "busybox"
    common.CACHE.mkdir(parents=True, exist_ok=True)
    prog = common.CACHE / "syscall_loop"
    r = subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-fno-stack-protector", "-o", str(prog), str(src)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench: cannot build {src}:\n{r.stderr}")
    sys.path.insert(0, str(common.REPO / "guests"))
    import initramfs
    out = common.CACHE / "syscall-loop-initramfs.cpio"
    initramfs.busybox_initramfs(str(busybox), str(common.REPO / "guests" / "linux" / "init.sh"),
                                [(str(prog), "bin/syscall_loop", 0o755)]).write(str(out))
    return out


def syscall_cost(args):
    """µs per getppid() in user space: through the VMM's hook, and (if given) with the guest patch instead."""
    own = ARTEFACTS / "own" / "vmlinux"
    if not (own.exists() and (ARTEFACTS / "busybox").exists()):
        return []
    initrd = syscall_loop_initramfs()
    cases = [("VMM SYSCALL hook (own kernel, unpatched)", own, {})]
    patched = os.environ.get("HV_BENCH_PATCHED_KERNEL")
    if patched:
        cases.append(("guest patch (hook off)", pathlib.Path(patched), {"HV_SYSCALL_HOOK": "off"}))
    rows = []
    for name, kernel, env in cases:
        samples = []
        for _ in range(args.reps or REPS):
            t, stats = boot(args, kernel, initrd, f'console=ttyS0 pyhv.run="syscall_loop {SYSCALLS}"',
                            vcpus=1, env=env)
            t.check(0)
            m = re.search(rb"syscall_loop: (\d+) calls in (\d+) ns", t.stdout)
            if m is None:
                sys.exit(f"bench: no syscall_loop result from {kernel}: {t.stdout[-500:]!r}")
            samples.append(int(m.group(2)) / int(m.group(1)) / 1000)
        row = common.row("linux_boot", f"system call (getppid) in user space: {name}", samples, "µs/call",
                         calls=SYSCALLS)
        rows.append(row)
    if len(rows) == 2:      # the guest patch as the reference: VMM path / guest patch
        rows[0]["vs_ref"] = rows[0]["value"] / rows[1]["value"]
    return rows


def run(args):
    if not (ARTEFACTS / "own" / "vmlinux").exists():
        print(f"linux_boot: no kernels in {ARTEFACTS}; run guests/fetch.sh first", file=sys.stderr)
        return []
    return syscall_cost(args) + boots(args, os.environ.get("HV_BENCH_STOCK") == "1")


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
