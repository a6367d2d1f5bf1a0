"""Snapshot and restore: bytes written and time held, restore to the first guest instruction, clones, a Linux shell.

One supervisor (zygote on) on a fresh runtime dir; everything goes through
the Python API (pyhv.Client), so no hvctl start-up is in the figures.
The raw guest (raw64, C) first writes one byte to each page of TOUCH MiB of
its RAM, prints "T", then sleeps in HLT between the ticks of its LAPIC timer
(1 ms, periodic; 10 ms for the clones, as Linux's HZ=100) and prints a
line after each (every 25th for the clones): idle, yet it shows at once
whether it runs (and that its LAPIC timer survived the snapshot).
  - snapshot: of a 128 MiB and a 1 GiB guest that touched nothing, and of a
    1 GiB guest that touched half its RAM (512 MiB): how long the guest was
    held (the worker's figure, pause to resume) and the bytes the snapshot
    holds (its files' allocated blocks).
  - restore: from sending RestoreGuest to the worker starting the guest's
    vCPU threads ("first instruction": the wall-clock time its log gives;
    KVM_RUN follows within a thread start), and to the first byte on the
    new guest's console ("first output": the guest prints at its next
    tick, within 1 ms, and this bench polls the log every 0.2 ms), beside a
    cold start of the same guest (Create --start to its "T"). RAM
    is loaded eagerly, while the worker (the zygote's spare, when one is
    ready) reads the snapshot's state and before it may run, so "fully
    loaded" is the RestoreGuest reply, also shown.
  - clones: 20 and 100 guests restored from one 128 MiB snapshot at once
    (requests pipelined): seconds until every one is running, its guest-RAM
    PSS, and the MemAvailable drop per clone, beside the same number of cold
    starts.
  - migrate: a 256 MiB guest, idle or rewriting 64 MiB of its RAM, moved to
    a second supervisor, its RAM handed over and with --copy (streamed while
    it runs, then what it dirtied while held), the two in one run: the
    downtime is the gap between its last console line under the source and
    its first under the target (console.times; one line per 1 ms tick, so
    the figure includes up to 1 ms of tick); the whole migrate request; for
    --copy the passes over RAM, the MiB sent (and of them while held) and
    the worker's own downtime figure (held until the target confirmed).
  - linux: our kernel (2 vCPUs, virtio disk and net) snapshotted at its shell
    prompt; restore to the answer of `echo` typed at the console, beside its
    cold boot to the prompt.  Skipped if the guest artefacts are missing
    (`hvctl guests fetch`).
Every restored guest's console is checked to continue the dots.
"""
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common, stress

REPS = 3
MiB = 1 << 20
ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))

GUEST = r"""
#define TOUCH_MIB %d
#define PRINT_EVERY %d
#define BUSY %d
#define TICK_US %d
#define LAPIC 0xFEE00000UL
#define TIMER_VECTOR 0x40
static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %%0, %%1" :: "a"(v), "Nd"(port)); }
static inline void lapic(unsigned reg, unsigned v) { *(volatile unsigned *)(LAPIC + reg) = v; }
static unsigned long idt[2 * 256] __attribute__((aligned(16)));
volatile unsigned long ticks;
void timer_isr(void), spurious_isr(void);
__asm__(".globl timer_isr\ntimer_isr:\n push %%rax\n incq ticks(%%rip)\n mov $0xFEE000B0, %%eax\n movl $0, (%%rax)\n"
        " pop %%rax\n iretq\n"
        ".globl spurious_isr\nspurious_isr:\n iretq\n");
static void gate(int vector, void (*handler)(void)) {
    unsigned long a = (unsigned long)handler;
    unsigned short cs;
    __asm__ volatile("mov %%%%cs, %%0" : "=r"(cs));
    idt[2 * vector] = (a & 0xFFFF) | (unsigned long)cs << 16 | 0x8EUL << 40 | ((a >> 16) & 0xFFFF) << 48;
    idt[2 * vector + 1] = a >> 32;
}
long guest_main(long index, long count, long tsc_khz) {
    volatile char *ram = (volatile char *)0x400000;
    for (long page = 0; page < TOUCH_MIB * 256L; page++)
        ram[page * 4096] = 1;
    struct __attribute__((packed)) { unsigned short limit; unsigned long base; } idtr = {sizeof idt - 1, (unsigned long)idt};
    gate(TIMER_VECTOR, timer_isr);
    gate(0xFF, spurious_isr);
    __asm__ volatile("lidt %%0" :: "m"(idtr));
    lapic(0xF0, 0x1FF);                        /* software-enable, spurious vector 0xFF */
    lapic(0x3E0, 0x3);                         /* divide by 16: 62.5 MHz on KVM's 1 GHz APIC bus */
    lapic(0x320, TIMER_VECTOR | 1 << 17);      /* periodic */
    lapic(0x380, 62 * TICK_US + TICK_US / 2);  /* 62.5 counts per microsecond */
    outb(0x3f8, 'T');
    __asm__ volatile("sti");
    for (unsigned long seen = 0, page = 0;;) {
        if (BUSY)                              /* dirty its pages while it waits */
            while (ticks == seen) {
                ram[page * 4096]++;
                page = (page + 1) %% (TOUCH_MIB * 256L);
            }
        else
            while (ticks == seen)
                __asm__ volatile("hlt");       /* asleep in KVM until the next tick: an idle guest costs no CPU */
        seen = ticks;
        if (seen %% PRINT_EVERY == 0) {
            outb(0x3f8, '.');
            outb(0x3f8, '\n');               /* a line: console.times gives each one its wall-clock time */
        }
    }
}
"""


def image(touch_mib, print_every=1, busy=False, tick_us=1000):
    """The guest, printing a line every `print_every` ticks of `tick_us`; its ticks and console output cost
    CPU, nothing else does unless `busy`: then it rewrites its touched pages all the time."""
    return str(common.guestbuild.build_c(GUEST % (touch_mib, print_every, int(busy), tick_us)))


def console_size(sup, name):
    try:
        return os.stat(os.path.join(sup.dir, "guests", name, "console.log")).st_size
    except FileNotFoundError:
        return 0


def wait_console(sup, name, predicate, timeout=60):
    path = os.path.join(sup.dir, "guests", name, "console.log")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        if predicate(data):
            return data
        if time.monotonic() > deadline:
            sys.exit(f"snapshot bench: guest {name}: console {data[-200:]!r} after {timeout} s")
        time.sleep(0.0002)


def ok(reply, what):
    if type(reply).__name__ == "Error":
        sys.exit(f"snapshot bench: {what}: {reply.message}")
    return reply


def du(path):
    return sum(os.stat(os.path.join(path, f)).st_blocks * 512 for f in os.listdir(path))


class Bench:
    def __init__(self, args):
        self.sup = stress.Supervisor(args, "1")
        self.m = self.sup.m
        self.work = tempfile.mkdtemp(prefix="hv-snapbench-", dir="/tmp")
        self.n = 0

    def close(self):
        self.sup.stop()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.sup.dir, ignore_errors=True)

    def name(self, what):
        self.n += 1
        return f"{what}-{self.n}"

    def request(self, msg, timeout=120):
        return ok(self.sup.pipe.request(msg, timeout=timeout), type(msg).__name__)

    def cold(self, img, mem):
        """Start a guest; (name, seconds from Create to its "T")."""
        from pyhv.proto.guest import GuestConfig
        name = self.name("g")
        t0 = time.perf_counter()
        self.request(self.m.Create(GuestConfig(name=name, kernel=img, boot="raw64", mem_bytes=mem, timeout=600.0),
                                   start=True))
        wait_console(self.sup, name, lambda d: b"T" in d, timeout=120)
        return name, time.perf_counter() - t0

    def snapshot(self, name, stop=False):
        path = os.path.join(self.work, self.name("s"))
        reply = self.request(self.m.SnapshotGuest(name, path, stop=stop), timeout=600)
        return path, reply.paused_for, du(path)

    def restore(self, path, output=True):
        """(name, seconds to the reply, seconds to its first console byte: None unless `output`)."""
        name = self.name("r")
        self.sent_at = time.time()
        t0 = time.perf_counter()
        self.request(self.m.RestoreGuest(path, name))
        replied = time.perf_counter() - t0
        if not output:                      # a shell at its prompt says nothing until asked
            return name, replied, None
        wait_console(self.sup, name, lambda d: len(d) > 0)
        first = time.perf_counter() - t0
        return name, replied, first

    def running(self, name):
        """Seconds from the last restore's request to its worker starting the vCPU threads (the worker's log)."""
        path = os.path.join(self.sup.dir, "guests", name, "worker.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(path) as f:
                for line in f:
                    if line.startswith("worker: vCPUs started at "):
                        return float(line.split()[-1]) - self.sent_at
            time.sleep(0.01)
        sys.exit(f"snapshot bench: {path} does not say when the vCPUs started")

    def check_dots(self, name):
        data = wait_console(self.sup, name, lambda d: len(d) >= 20)
        if set(data[:20]) != {ord("."), ord("\n")}:
            sys.exit(f"snapshot bench: restored guest {name} printed {data[:40]!r}, not the dots it was printing")

    def destroy(self, *names):
        for name in names:
            self.request(self.m.Destroy(name=name, force=True, purge=True))


def raw_rows(b, reps):
    rows = []
    for label, mem, touch in (("128 MiB idle", 128 * MiB, 0), ("1 GiB idle", 1024 * MiB, 0),
                              ("1 GiB, 512 MiB touched", 1024 * MiB, 512)):
        img = image(touch)
        held, size, replied, running, first, cold = [], [], [], [], [], []
        for _ in range(reps):
            src, boot = b.cold(img, mem)
            cold.append(boot * 1000)
            path, h, s = b.snapshot(src)
            held.append(h * 1000)
            size.append(s / MiB)
            name, rep, fst = b.restore(path)
            replied.append(rep * 1000)
            first.append(fst * 1000)
            running.append(b.running(name) * 1000)
            b.check_dots(name)
            b.destroy(src, name)
            shutil.rmtree(path)
        rows.append(common.row("snapshot", f"{label}: guest held", held, "ms"))
        rows.append(common.row("snapshot", f"{label}: snapshot size", size, "MiB"))
        ref = common.row("snapshot", f"{label}: cold start to first output (ref)", cold, "ms")
        rows.append(common.row("snapshot", f"{label}: restore to first instruction (vCPUs started)", running, "ms",
                               ref=ref))
        rows.append(common.row("snapshot", f"{label}: restore to first output", first, "ms", ref=ref))
        rows.append(common.row("snapshot", f"{label}: restore, RAM fully loaded", replied, "ms", ref=ref))
        rows.append(ref)
    return rows


def clone_rows(b, counts=(20, 100)):
    rows = []
    img = image(0, print_every=25, tick_us=10_000)   # Linux's HZ=100 tick, a line every 250 ms: 100 clones of
    #                                                 the 1 ms printer would be 100,000 wake-ups and 200,000 exits/s
    src, _ = b.cold(img, 128 * MiB)
    path, _, _ = b.snapshot(src, stop=True)
    for n in counts:
        for how in ("restore", "cold"):
            from pyhv.proto.guest import GuestConfig
            before = stress.mem_available()
            names = [b.name(how) for _ in range(n)]
            t0 = time.perf_counter()
            for name in names:
                if how == "restore":
                    b.sup.pipe.send(b.m.RestoreGuest(path, name))
                else:
                    b.sup.pipe.send(b.m.Create(GuestConfig(name=name, kernel=img, boot="raw64", mem_bytes=128 * MiB,
                                                           timeout=600.0), start=True))
            infos = [ok(b.sup.pipe.recv(timeout=300), how) for _ in names]
            elapsed = time.perf_counter() - t0
            for name in names:
                wait_console(b.sup, name, lambda d: d.count(b"\n") >= (1 if how == "restore" else 2), timeout=120)
            drop = (before - stress.mem_available()) / n / MiB
            mem = stress.memory_of([i.pids["worker"] for i in infos])
            pss = [v["ram_pss"] / MiB for v in mem.values()]
            case = f"{n} {'clones of one snapshot' if how == 'restore' else 'cold starts (ref)'}"
            rows.append(common.row("snapshot", f"{case}: until all run", [elapsed], "s"))
            rows.append(common.row("snapshot", f"{case}: guest RAM PSS each", pss, "MiB"))
            rows.append(common.row("snapshot", f"{case}: MemAvailable drop each", [drop], "MiB"))
            b.destroy(*names)
    b.destroy(src)
    return rows


def linux_rows(b):
    """Our kernel to its shell prompt, snapshot, restore: time to the answer of a console command."""
    kernel, initrd = ARTEFACTS / "own" / "vmlinux", ARTEFACTS / "initramfs.cpio"
    if not kernel.exists() or not initrd.exists():
        print("snapshot bench: no Linux artefacts (hvctl guests fetch): Linux rows skipped", file=sys.stderr)
        return []
    from pyhv.proto import guest as g
    from pyhv.devices.virtio.kinds import specs_from_options
    disk = os.path.join(b.work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    devices = specs_from_options({"blk": [disk], "net": ["switch:benchlan"]})
    name = b.name("linux")
    t0 = time.perf_counter()
    b.request(b.m.Create(g.GuestConfig(name=name, kernel=str(kernel), initrd=str(initrd), vcpus=2, timeout=900.0,
                                       cmdline="console=ttyS0", devices=devices), start=True))
    wait_console(b.sup, name, lambda d: b"starting a shell" in d, timeout=600)
    boot = time.perf_counter() - t0
    time.sleep(3)                                    # the prompt
    path, held, size = b.snapshot(name, stop=True)
    answers = []
    for i in range(3):
        t0 = time.perf_counter()
        clone, _, _ = b.restore(path, output=False)
        info = b.request(b.m.Info(clone))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(info.console_sock)
            s.sendall(f"echo answer-$((40+{i}))\n".encode())
            wait_console(b.sup, clone, lambda d: f"answer-{40 + i}\r\n".encode() in d, timeout=60)
        answers.append(time.perf_counter() - t0)
        b.destroy(clone)
    b.destroy(name)
    ref = common.row("snapshot", "Linux cold boot to shell prompt (ref)", [boot], "s")
    return [common.row("snapshot", "Linux at its prompt: snapshot held", [held * 1000], "ms"),
            common.row("snapshot", "Linux at its prompt: snapshot size", [size / MiB], "MiB"),
            common.row("snapshot", "Linux restored: console answer after restore", answers, "s", ref=ref), ref]


def line_times(sup, name):
    """The wall-clock time of each console line of guest `name` (console.times, proto/console_times.py)."""
    from pyhv.proto.console_times import RECORD
    with open(os.path.join(sup.dir, "guests", name, "console.times"), "rb") as f:
        data = f.read()
    return [RECORD.unpack_from(data, i)[1] for i in range(0, len(data) - RECORD.size + 1, RECORD.size)]


def migration_rows(b, args, reps):
    """Downtime: the source's last console line to the target's first (the guest prints one every 1 ms)."""
    target = stress.Supervisor(args, "1")
    rows = []
    try:
        for label, touch, busy in (("256 MiB idle", 0, False), ("256 MiB busy (rewriting 64 MiB)", 64, True)):
            img = image(touch, busy=busy)
            for copy in (False, True):
                down, took, held, rounds, sent, held_sent = [], [], [], [], [], []
                for _ in range(reps):
                    name, _ = b.cold(img, 256 * MiB)
                    wait_console(b.sup, name, lambda d: d.count(b"\n") >= 50)
                    t0 = time.perf_counter()
                    reply = b.request(b.m.Migrate(name, target.dir, copy=copy), timeout=600)
                    took.append((time.perf_counter() - t0) * 1000)
                    wait_console(target, name, lambda d: d.count(b"\n") >= 20)
                    down.append((line_times(target, name)[0] - line_times(b.sup, name)[-1]) * 1000)
                    held.append(reply.downtime * 1000)
                    rounds.append(reply.rounds)
                    sent.append(reply.bytes / MiB)
                    held_sent.append(reply.held_bytes / MiB)
                    b.destroy(name)
                    ok(target.pipe.request(b.m.Destroy(name=name, force=True, purge=True)), "Destroy")
                case = f"migrate{' --copy' if copy else ''} {label}"
                rows.append(common.row("snapshot", f"{case}: downtime (last line there to first here)", down, "ms"))
                rows.append(common.row("snapshot", f"{case}: held until the target confirmed", held, "ms"))
                rows.append(common.row("snapshot", f"{case}: migrate request", took, "ms"))
                if copy:
                    rows.append(common.row("snapshot", f"{case}: passes over RAM while it ran", rounds, ""))
                    rows.append(common.row("snapshot", f"{case}: RAM sent", sent, "MiB"))
                    rows.append(common.row("snapshot", f"{case}: RAM sent while held", held_sent, "MiB"))
    finally:
        target.stop()
        shutil.rmtree(target.dir, ignore_errors=True)
    return rows


CASES = ("snapshot", "migrate", "clones", "linux")


def run(args):
    b = Bench(args)
    only = set(args.only.split(",")) if getattr(args, "only", None) else set(CASES)
    try:
        reps = args.reps or REPS
        return ((raw_rows(b, reps) if "snapshot" in only else []) +
                (migration_rows(b, args, reps) if "migrate" in only else []) +
                (clone_rows(b) if "clones" in only else []) + (linux_rows(b) if "linux" in only else []))
    finally:
        b.close()


def main():
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--only", metavar="CASES", help=f"comma-separated, of {','.join(CASES)} (default: all)")
    args = p.parse_args()
    common.report(run(args), args)


if __name__ == "__main__":
    main()
