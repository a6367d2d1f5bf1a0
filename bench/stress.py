"""Stress: N guests created and started as fast as the supervisor goes, with the zygote and without (HV_ZYGOTE=0).

For each mode, a supervisor on a fresh runtime dir (started as a user starts
it: `hvctl supervisor`), one untimed warm-up guest, then N raw64 guests of
--mem each (default 100 x 32 MiB) through the protocol client, pipelined on
one socket: all Create requests, then all Start requests.  Each guest computes
FNV-1a-64 over its index (patched into its image), prints
`g <index> <sum>` (hex), sets up an IDT, the PIC and the UART's receive
interrupt and sleeps in `hlt` (no host CPU) until a byte arrives on its
console; then it prints `ok` and exits with status ((sum >> 8) & 63) + 1.
Measured:
  - created+started/s: N / (first Create sent -> last Start reply);
  - guests up/s: N / (first Create sent -> the last guest's line in its console
    log), i.e. until every guest really runs its code;
  - max running at once: `list` polled during the run (all guests wait, so
    all N must be running together);
  - memory per guest: while all N sit idle in hlt, each worker's PSS
    (psutil memory_full_info) minus the PSS of its guest-RAM memfd mapping
    (from /proc/PID/smaps: the pages the guest and the VMM touched; they are
    guest RAM, not overhead).  With the zygote, a second figure adds the
    zygote's own PSS divided by N (what the shared pages cost in all).  The
    drop in MemAvailable per guest is shown too: it includes the kernel's
    memory for each VM (not in any PSS) and the touched guest RAM;
  - every guest's final state, exit status and console output, checked
    exactly; a wrong one is a failure and is printed.
--kill K (chaos): once all guests are up, SIGKILL K random workers; the
killed guests must end `failed` (status 70), every other one must finish
with its exact output and status, and the supervisor must keep serving (a
Ping, and one more guest created, started and checked afterwards).
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common

GUESTS = 100
MEM = "32M"
ROUNDS = 16                 # FNV rounds over the index: a few thousand instructions (CPL0 is emulated here)
GUEST_TIMEOUT = 300         # every guest's --timeout: nothing outlives a broken run
UP_TIMEOUT = 240            # seconds for all N guests to print their line
MODES = {"zygote": "1", "direct": "0"}      # name -> HV_ZYGOTE
TARGETS = {"rate": 20.0, "pss_mib": 20.0}      # and: all N guests running at once, all completing
MAGIC = 0x5453455254534856  # "VHSTRTST" in the image: index, flags, rounds follow
FLAG_WAIT = 1

GUEST = r"""
/* params (patched per guest by the host): magic, index, flags, rounds */
_start:
    mov $0x1ff000, %rsp
    mov params+8(%rip), %r12        /* index */
    mov params+24(%rip), %rcx       /* rounds */
    movabs $0xcbf29ce484222325, %rax
    movabs $0x100000001b3, %r9
1:  mov %r12, %rdx
    mov $8, %r8d
2:  movzbl %dl, %r10d
    xor %r10, %rax
    imul %r9, %rax
    shr $8, %rdx
    dec %r8d
    jnz 2b
    dec %rcx
    jnz 1b
    mov %rax, %r13                  /* the sum */
    mov %rax, %r14
    shr $8, %r14
    and $63, %r14
    inc %r14                        /* the status */
    testb $1, params+16(%rip)
    jz report

    /* IDT: vectors 0-31 -> exception, 32-47 -> irq */
    lea idt(%rip), %rdi
    lea exception(%rip), %rsi
    mov $32, %ebx
3:  call set_gate
    dec %ebx
    jnz 3b
    lea irq(%rip), %rsi
    mov $16, %ebx
4:  call set_gate
    dec %ebx
    jnz 4b
    lidt idtr(%rip)
    /* PIC: ICW1-4, vectors 0x20/0x28, only IRQ 4 unmasked */
    mov $0x11, %al
    out %al, $0x20
    out %al, $0xa0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xa1
    mov $0x04, %al
    out %al, $0x21
    mov $0x02, %al
    out %al, $0xa1
    mov $0x01, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xef, %al
    out %al, $0x21
    mov $0xff, %al
    out %al, $0xa1
    /* UART: receive-data interrupt, OUT2 (the PC's IRQ enable) */
    mov $0x3f9, %dx
    mov $0x01, %al
    out %al, %dx
    mov $0x3fc, %dx
    mov $0x0b, %al
    out %al, %dx

report:                             /* "g IIIIIIIIIIIIIIII SSSSSSSSSSSSSSSS\n" */
    mov $'g', %al
    call putc
    mov $' ', %al
    call putc
    mov %r12, %rdi
    call puthex
    mov $' ', %al
    call putc
    mov %r13, %rdi
    call puthex
    mov $'\n', %al
    call putc
    testb $1, params+16(%rip)
    jz done
    sti
5:  hlt                             /* in the kernel, no exit: wait for IRQ 4 */
    jmp 5b

irq:
    mov $0x3f8, %dx
    in %dx, %al                     /* take the byte */
    mov $'o', %al
    call putc
    mov $'k', %al
    call putc
    mov $'\n', %al
    call putc
done:
    mov %r14d, %eax
    mov $0x501, %dx
    out %al, %dx
6:  jmp 6b

exception:
    mov $'!', %al
    call putc
    mov $'E', %al
    call putc
    mov $'\n', %al
    call putc
    mov $99, %al
    mov $0x501, %dx
    out %al, %dx
7:  jmp 7b

set_gate:                           /* rdi: gate (advanced by 16), rsi: handler */
    mov %rsi, %rax
    mov %ax, (%rdi)
    mov %cs, %ax
    mov %ax, 2(%rdi)
    movw $0x8e00, 4(%rdi)           /* present, DPL0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    movl $0, 12(%rdi)
    add $16, %rdi
    ret

putc:                               /* al to COM1 */
    mov $0x3f8, %dx
    out %al, %dx
    ret

puthex:                             /* rdi as 16 hex digits */
    mov $16, %ecx
8:  rol $4, %rdi
    mov %edi, %eax
    and $15, %eax
    cmp $10, %al
    jb 9f
    add $('a' - 10 - '0'), %al
9:  add $'0', %al
    call putc
    dec %ecx
    jnz 8b
    ret

.balign 16
idtr:
    .word 48 * 16 - 1
    .quad idt
.balign 16
params:
    .quad 0x5453455254534856
    .quad 0                         /* index */
    .quad 0                         /* flags: bit 0 = wait for a console byte */
    .quad 1                         /* rounds */
.balign 16
idt:
    .skip 48 * 16
"""
LINE_BYTES = len("g 0000000000000000 0000000000000000\n")


# -- guests ---------------------------------------------------------------------

def checksum(index, rounds=ROUNDS):
    """What the guest computes: FNV-1a-64 over the index's 8 little-endian bytes, `rounds` times."""
    h = 0xcbf29ce484222325
    for _ in range(rounds):
        for b in index.to_bytes(8, "little"):
            h = ((h ^ b) * 0x100000001b3) & 0xFFFF_FFFF_FFFF_FFFF
    return h


def expected(index, wait=True, rounds=ROUNDS):
    """(console output, exit status) of guest `index`."""
    h = checksum(index, rounds)
    return f"g {index:016x} {h:016x}\n" + ("ok\n" if wait else ""), ((h >> 8) & 63) + 1


def images(indices, outdir, wait=True, rounds=ROUNDS):
    """{index: path} of the stress guest patched with each index."""
    base = common.guest(GUEST).read_bytes()
    off = base.index(struct.pack("<Q", MAGIC))
    paths = {}
    for i in indices:
        img = bytearray(base)
        struct.pack_into("<QQQ", img, off + 8, i, FLAG_WAIT if wait else 0, rounds)
        path = os.path.join(outdir, f"stress-{i}.bin")
        with open(path, "wb") as f:
            f.write(img)
        paths[i] = path
    return paths


def guest_name(i):
    return f"s{i:04d}"


# -- talking to the supervisor ------------------------------------------------------

class Pipe:
    """The supervisor through the Python API's Client (many requests in flight on one socket); an error comes
    back as an Error value, which the benchmark reports instead of stopping."""

    def __init__(self, runtime_dir):
        import collections
        from pyhv import Client
        self.client = Client(runtime_dir)
        self.pending = collections.deque()

    def send(self, msg):
        self.pending.append(self.client.send(msg))

    def recv(self, timeout=60.0):
        """The reply to the oldest request not yet received."""
        from pyhv.proto.errors import HvError, NotResponding
        from pyhv.proto.messages import Error
        req_id = self.pending.popleft()
        try:
            return self.client.receive(req_id, timeout)
        except NotResponding as e:
            raise TimeoutError(str(e)) from None
        except HvError as e:
            return Error.of(e)

    def request(self, msg, timeout=60.0):
        self.send(msg)
        return self.recv(timeout)

    def close(self):
        self.client.close()


class Supervisor:
    """`hvctl supervisor` on a fresh runtime dir, with HV_ZYGOTE set."""

    def __init__(self, args, zygote, rundir=None):
        self.dir = rundir or tempfile.mkdtemp(prefix="hv-stress-", dir="/tmp")
        self.log_path = os.path.join(self.dir, "supervisor.log")
        env = dict(common.CHILD_ENV, HV_ZYGOTE=zygote)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(common.hvctl_cmd(args) + ["supervisor", "--runtime-dir", self.dir],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.endpoint = "ipc://" + os.path.join(self.dir, "control.sock")
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(self.dir, "control.sock")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the supervisor did not start (see {self.log_path})")
            time.sleep(0.02)
        self.pipe = Pipe(self.dir)
        from pyhv.proto import control as m
        self.m = m
        self.pipe.request(m.Ping(), timeout=30)

    def stop(self):
        """SIGTERM; the pids of processes that outlived it (should be none)."""
        self.pipe.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n=5):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read().strip().splitlines()[-n:]
        except OSError:
            return []


# -- measurements -------------------------------------------------------------------

def _smaps_memfd(pid):
    """(Pss, Rss) in bytes of the guest-RAM memfd mappings of `pid`."""
    pss = rss = 0
    in_ram = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if not first.endswith(":"):             # a mapping header: "start-end perms ... path"
                    in_ram = "memfd:guest-ram-" in line
                elif in_ram and first == "Pss:":
                    pss += int(line.split()[1]) * 1024
                elif in_ram and first == "Rss:":
                    rss += int(line.split()[1]) * 1024
    except OSError:
        return None
    return pss, rss


def memory_of(pids):
    """{pid: {"pss", "uss", "ram_pss", "ram_rss", "overhead"}} (bytes) for live processes."""
    import psutil
    out = {}
    for pid in pids:
        try:
            full = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        ram = _smaps_memfd(pid)
        if ram is None:
            continue
        out[pid] = {"pss": full.pss, "uss": full.uss, "ram_pss": ram[0], "ram_rss": ram[1],
                    "overhead": full.pss - ram[0]}
    return out


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _console(rundir, name):
    try:
        with open(os.path.join(rundir, "guests", name, "console.log"), "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _release(info):
    """Send one byte to the guest's console; the open socket (closed by the caller later)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(info.console_sock)
    s.sendall(b"\n")
    return s


# -- one scenario -----------------------------------------------------------------------

def scenario(args, mode, n, mem, kill=0, rounds=ROUNDS, say=print, keep=False,
             guest_timeout=GUEST_TIMEOUT, up_timeout=UP_TIMEOUT, kill_zygote=False):
    """Run N guests under a supervisor in `mode` ("zygote" or "direct"); a dict of figures and failures.

    res["failures"] lists every check that went wrong (one line each); the
    runtime dir is removed unless something failed or `keep`.
    """
    sup = Supervisor(args, MODES[mode])
    m = sup.m
    res = {"mode": mode, "guests": n, "mem": mem, "kill": kill, "failures": [], "dir": sup.dir}
    fail = res["failures"].append
    workdir = os.path.join(sup.dir, "images")
    os.makedirs(workdir)
    from pyhv.supervisor.config import build_config
    try:
        # warm-up: the zygote's imports, page cache, bytecode; not timed
        warm = images([n], workdir, wait=False, rounds=rounds)[n]
        if not _one_guest(sup, "warmup", warm, n, rounds, fail):
            say(f"  [{mode}] warm-up guest failed")
        paths = images(range(n), workdir, wait=True, rounds=rounds)
        configs = [build_config(guest_name(i), paths[i], boot="raw64", mem=mem, timeout=str(guest_timeout))
                   for i in range(n)]
        avail0 = mem_available()

        t0 = time.perf_counter()
        for c in configs:
            sup.pipe.send(m.Create(c))
        for c in configs:
            sup.pipe.send(m.Start(c.name))
        zygote_at_start = zygote_pid(sup.proc.pid)
        for k in range(2 * n):
            r = sup.pipe.recv(120)
            if isinstance(r, m.Error):
                fail(f"request failed: {r.kind}: {r.message}")
            if kill_zygote and k == n + n // 2:
                if zygote_at_start:
                    os.kill(zygote_at_start, signal.SIGKILL)
                    say(f"  [{mode}] killed the zygote (pid {zygote_at_start}) after {n // 2} starts")
                else:
                    fail("--kill-zygote: no zygote to kill")
        t_started = time.perf_counter()
        res["create_start_s"] = t_started - t0
        res["rate"] = n / res["create_start_s"]

        # until every guest printed its line; poll `list` meanwhile
        up, max_running, deadline = set(), 0, time.monotonic() + up_timeout
        next_list = 0.0
        while len(up) < n and time.monotonic() < deadline:
            for i in range(n):
                if i not in up:
                    try:
                        if os.stat(os.path.join(sup.dir, "guests", guest_name(i), "console.log")).st_size >= LINE_BYTES:
                            up.add(i)
                    except FileNotFoundError:
                        pass
            if time.monotonic() >= next_list:
                guests = sup.pipe.request(m.List()).guests
                max_running = max(max_running, sum(g.state == "running" for g in guests))
                next_list = time.monotonic() + 0.2
            if len(up) < n:
                time.sleep(0.01)
        t_up = time.perf_counter()
        res["up_s"] = t_up - t0
        res["up_rate"] = len(up) / res["up_s"]
        if len(up) < n:
            fail(f"only {len(up)} of {n} guests printed their line within {up_timeout} s")
        guests = {g.name: g for g in sup.pipe.request(m.List()).guests}
        running = [g for g in guests.values() if g.state == "running"]
        res["max_running"] = max(max_running, len(running))
        res["running_at_up"] = len(running)

        # memory while all guests sit idle in hlt
        time.sleep(0.5)
        pids = {g.pids["worker"]: g.name for g in running if "worker" in g.pids}
        mems = memory_of(pids)
        res["avail_drop_per_guest"] = (avail0 - mem_available()) / n
        if mems:
            vals = list(mems.values())
            res["pss_overhead_mean"] = sum(v["overhead"] for v in vals) / len(vals)
            res["pss_overhead_max"] = max(v["overhead"] for v in vals)
            res["uss_mean"] = sum(v["uss"] - v["ram_rss"] for v in vals) / len(vals)
            res["ram_touched_mean"] = sum(v["ram_rss"] for v in vals) / len(vals)
            res["pss_sampled"] = len(vals)
        zpid = zygote_pid(sup.proc.pid)
        res["zygote_pid"] = zpid
        if zpid:
            z = memory_of([zpid]).get(zpid)
            if z and mems:
                res["zygote_pss"] = z["pss"]
                res["pss_overhead_incl_zygote"] = res["pss_overhead_mean"] + z["pss"] / len(mems)
        res["workers_from_zygote"] = sum(1 for pid in pids if _parent(pid) == sup.proc.pid and
                                         _forked_marker(sup.dir, pids[pid]))

        # chaos: SIGKILL K random workers
        killed = set()
        if kill:
            victims = random.sample(sorted(pids), min(kill, len(pids)))
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
                killed.add(pids[pid])
            say(f"  [{mode}] killed {len(killed)} workers: {', '.join(sorted(killed))}")
            pong = sup.pipe.request(m.Ping(), timeout=10)
            if not isinstance(pong, m.Pong):
                fail(f"supervisor did not answer Ping after the kills: {pong}")

        # release the survivors, then wait for everyone
        socks = []
        for i in range(n):
            g = guests.get(guest_name(i))
            if g is None or g.name in killed or g.state != "running":
                continue
            try:
                socks.append(_release(g))
            except OSError as e:
                fail(f"{g.name}: cannot reach its console: {e}")
        for i in range(n):
            sup.pipe.send(m.Wait(guest_name(i)))
        ends = {}
        for _ in range(n):
            r = sup.pipe.recv(guest_timeout + 30)
            if isinstance(r, m.Error):
                fail(f"wait failed: {r.kind}: {r.message}")
            else:
                ends[r.name] = r
        res["done_s"] = time.perf_counter() - t0
        for s in socks:
            s.close()

        ok = 0
        for i in range(n):
            name = guest_name(i)
            g = ends.get(name)
            if g is None:
                continue
            if name in killed:
                if (g.state, g.exit_status) != ("failed", 70) or "SIGKILL" not in g.reason:
                    fail(f"{name} (killed): {g.state} {g.exit_status} {g.reason!r}, expected failed 70 SIGKILL")
                continue
            text, status = expected(i, wait=True, rounds=rounds)
            out = _console(sup.dir, name)
            if (g.state, g.exit_status) != ("stopped", status) or out != text:
                fail(f"{name}: {g.state} {g.exit_status} {g.reason!r} output {out!r}; expected stopped {status} {text!r}")
            else:
                ok += 1
        res["completed_ok"] = ok
        res["expected_ok"] = n - len(killed)

        # still serving: one more guest after everything
        if not _one_guest(sup, "after", warm, n, rounds, fail):
            fail("the supervisor could not run a guest after the stress")
        res["zygote_drops"] = _log_count(sup, "spawned directly")
        # nothing left behind: the supervisor's only children now are its zygote and the zygote's spare worker
        # (stray zombies are reaped)
        deadline = time.monotonic() + 10
        while True:
            ours = {zygote_pid(sup.proc.pid), *named_children(sup.proc.pid, "hv-spare")}
            extra = [p for p in _children(sup.proc.pid) if p not in ours]
            if not extra or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if extra:
            fail(f"the supervisor still has children besides its zygote: "
                 f"{[(p, (_read_stat(p) or [b'?'])[0].decode()) for p in extra]}")
    finally:
        worker_pids = _children(sup.proc.pid)
        spares = named_children(sup.proc.pid, "hv-spare")
        sup.stop()
        deadline = time.monotonic() + 5      # a spare goes at EOF from its zygote, a moment after the supervisor
        while any(_exists(p) for p in spares) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = [p for p in worker_pids if _exists(p)]
        if left:
            fail(f"processes outlived the supervisor: {left}")
        if not keep and not res["failures"]:
            shutil.rmtree(sup.dir, ignore_errors=True)
    return res


def _one_guest(sup, name, path, index, rounds, fail):
    from pyhv.supervisor.config import build_config
    m = sup.m
    for msg in (m.Create(build_config(name, path, boot="raw64", mem="16M", timeout="60")), m.Start(name),
                m.Wait(name)):
        r = sup.pipe.request(msg, timeout=90)
        if isinstance(r, m.Error):
            fail(f"{name}: {msg.TYPE}: {r.kind}: {r.message}")
            return False
    text, status = expected(index, wait=False, rounds=rounds)
    out = _console(sup.dir, name)
    if (r.state, r.exit_status, out) != ("stopped", status, text):
        fail(f"{name}: {r.state} {r.exit_status} {r.reason!r} output {out!r}; expected stopped {status} {text!r}")
        return False
    return True


def _read_stat(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def _parent(pid):
    fields = _read_stat(pid)
    return int(fields[1]) if fields else None


def _exists(pid):
    fields = _read_stat(pid)
    return fields is not None and fields[0] != b"Z"


def _children(ppid):
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == ppid]


def zygote_pid(sup_pid):
    """The supervisor's zygote: its child named hv-zygote (forked workers keep the zygote's cmdline)."""
    found = named_children(sup_pid, "hv-zygote")
    return found[0] if found else None


def named_children(sup_pid, comm):
    """The live children of `sup_pid` whose /proc comm is `comm` (hv-zygote, hv-spare)."""
    out = []
    for pid in _children(sup_pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == comm and _exists(pid):
                    out.append(pid)
        except OSError:
            pass
    return out


def _forked_marker(rundir, name):
    try:
        with open(os.path.join(rundir, "guests", name, "worker.log")) as f:
            return "forked from zygote" in f.read()
    except OSError:
        return False


def _log_count(sup, words):
    try:
        with open(sup.log_path, errors="replace") as f:
            return sum(words in line for line in f)
    except OSError:
        return 0


# -- report --------------------------------------------------------------------------

def _mib(x):
    return None if x is None else x / (1 << 20)


FIGURES = [
    # key, label, unit, target text, convert
    ("rate", "created+started", "guests/s", f">= {TARGETS['rate']:g}", float),
    ("up_rate", "guests up (line printed)", "guests/s", "-", float),
    ("max_running", "max running at once", "guests", "all N", float),
    ("workers_from_zygote", "workers forked by the zygote", "guests", "-", float),
    ("completed_ok", "completed with exact output", "guests", "all not killed", float),
    ("pss_overhead_mean", "PSS/guest beyond guest RAM", "MiB", f"< {TARGETS['pss_mib']:g}", _mib),
    ("pss_overhead_incl_zygote", "  same + zygote PSS / N", "MiB", f"< {TARGETS['pss_mib']:g}", _mib),
    ("pss_overhead_max", "  worst worker", "MiB", "-", _mib),
    ("uss_mean", "USS/guest beyond guest RAM", "MiB", "-", _mib),
    ("ram_touched_mean", "guest RAM touched", "MiB", "-", _mib),
    ("avail_drop_per_guest", "MemAvailable drop/guest", "MiB", "-", _mib),
    ("create_start_s", "first Create -> last Start reply", "s", "-", float),
    ("up_s", "first Create -> all guests up", "s", "-", float),
]


def rows_of(results):
    rows = []
    for res in results:
        for key, label, unit, target, conv in FIGURES:
            v = res.get(key)
            if v is None:
                continue
            v = conv(v)
            rows.append({"bench": "stress", "case": f"{res['mode']}: {label}", "value": v, "unit": unit,
                         "samples": [v], "vs_ref": None, "target": target, "guests": res["guests"],
                         "mem": res["mem"], "kill": res["kill"], "failures": len(res["failures"])})
    return rows


def print_side_by_side(results, out=sys.stdout):
    modes = [r["mode"] + (" (HV_ZYGOTE=0)" if r["mode"] == "direct" else "") for r in results]
    lines = [("figure", "unit", "target", *modes)]
    for key, label, unit, target, conv in FIGURES:
        vals = []
        for r in results:
            v = r.get(key)
            if v is not None:
                v = conv(v)
            vals.append("-" if v is None else str(int(v)) if float(v).is_integer() else f"{v:.3g}")
        if any(v != "-" for v in vals):
            lines.append((label, unit, target, *vals))
    lines.append(("failures", "", "0", *(str(len(r["failures"])) for r in results)))
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    for k, l in enumerate(lines):
        print("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(l, widths))), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def run(args):
    n = getattr(args, "guests", None) or GUESTS
    mem = getattr(args, "mem", None) or MEM
    kill = getattr(args, "kill", 0) or 0
    kill_zygote = getattr(args, "kill_zygote", False)
    modes = getattr(args, "modes", None) or list(MODES)
    results = []
    for mode in modes:
        print(f"stress: {mode}: {n} guests x {mem}" + (f", killing {kill}" if kill else ""), file=sys.stderr, flush=True)
        res = scenario(args, mode, n, mem, kill, say=lambda s: print(s, file=sys.stderr, flush=True),
                       keep=getattr(args, "keep", False), kill_zygote=kill_zygote and mode == "zygote")
        for f in res["failures"]:
            print(f"  FAIL [{mode}] {f}", file=sys.stderr)
        if res["failures"]:
            print(f"  (runtime dir kept: {res['dir']})", file=sys.stderr)
        results.append(res)
    print(file=sys.stderr)
    print_side_by_side(results, sys.stderr)
    print("memory: PSS of each worker minus the PSS of its guest-RAM memfd mapping (/proc/PID/smaps), "
          "measured while all guests sit idle in hlt", file=sys.stderr)
    return rows_of(results)


def main():
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--guests", type=int, default=GUESTS, help=f"number of guests (default {GUESTS})")
    p.add_argument("--mem", default=MEM, help=f"guest RAM each (default {MEM})")
    p.add_argument("--kill", type=int, default=0, metavar="K", help="chaos: SIGKILL K random workers once all are up")
    p.add_argument("--kill-zygote", action="store_true",
                   help="chaos: SIGKILL the zygote halfway through the Start burst (its starts must fall back)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                   help="comma-separated: zygote,direct (default both)")
    p.add_argument("--keep", action="store_true", help="keep the runtime dirs")
    args = p.parse_args()
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    rows = run(args)
    if args.json:
        common.write_json(args.json, rows)
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
