"""The zygote: workers are forked from it yet are the supervisor's children; its death or theirs spares the rest.

Guests are bench/stress.py's: each prints `g <index> <sum>`, sleeps in hlt
until a byte arrives on its console, prints `ok` and exits with a status
derived from the sum.  Every guest has --timeout; every hvctl call has the
subprocess timeout of Supervisor.hvctl.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from hv import Supervisor, needs_kvm, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from bench import stress  # noqa: E402

pytestmark = needs_kvm


@pytest.fixture
def images(tmp_path):
    return stress.images(range(8), str(tmp_path), wait=True)


def make_sup(zygote="1"):
    old = os.environ.get("HV_ZYGOTE")
    os.environ["HV_ZYGOTE"] = zygote          # the supervisor subprocess inherits it
    try:
        return Supervisor()
    finally:
        if old is None:
            del os.environ["HV_ZYGOTE"]
        else:
            os.environ["HV_ZYGOTE"] = old


@pytest.fixture
def sup():
    s = make_sup()
    yield s
    s.stop()
    shutil.rmtree(s.dir, ignore_errors=True)


def ppid(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def zygote_pid(sup):
    """The supervisor's live zygote: its child named hv-zygote (workers keep the zygote's cmdline)."""
    return stress.zygote_pid(sup.proc.pid)


def launch(sup, images, i, name=None):
    name = name or f"g{i}"
    sup.hvctl("create", name, "--kernel", images[i], "--boot", "raw64", "--mem", "32M", "--timeout", "60", check=0)
    sup.hvctl("start", name, check=0)
    info = sup.info(name)
    log = info["console_log"]
    wait_for(lambda: os.path.exists(log) and os.path.getsize(log) >= stress.LINE_BYTES, timeout=30)
    return info


def release(info):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(info["console_sock"])
        s.sendall(b"\n")
        time.sleep(0.1)


def check_done(sup, name, i):
    text, status = stress.expected(i, wait=True)
    sup.hvctl("wait", name, "--timeout", "30", check=status)
    assert sup.hvctl("logs", name, check=0).stdout == text
    info = sup.info(name)
    assert (info["state"], info["exit_status"], info["pids"]) == ("stopped", status, {})


def fd_targets(pid):
    """The sockets and pipes `pid` has open (socket:[inode], pipe:[inode])."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            out.add(target)
    return out


def worker_log(info):
    with open(os.path.join(os.path.dirname(info["console_log"]), "worker.log")) as f:
        return f.read()


def test_workers_are_forked_by_the_zygote_and_are_the_supervisors_children(sup, images):
    wait_for(lambda: zygote_pid(sup))
    z = zygote_pid(sup)
    infos = [launch(sup, images, i) for i in range(3)]
    for i, info in enumerate(infos):
        pid = info["pids"]["worker"]
        assert ppid(pid) == sup.proc.pid                     # re-parented: the supervisor reaps it
        assert f"pid {pid} forked from zygote pid {z}" in worker_log(info)
        with open(f"/proc/{pid}/comm") as f:
            assert f.read().strip() == f"hvw-g{i}"
        assert os.getsid(pid) == pid                         # its own session
        assert os.readlink(f"/proc/{pid}/fd/3").startswith(f"/memfd:guest-ram-g{i}")
        assert os.readlink(f"/proc/{pid}/fd/1") == info["console_log"]
        assert not fd_targets(z) & fd_targets(pid)               # nothing of the zygote's (its socket)
        assert "host" in json.loads(sup.hvctl("stats", f"g{i}", "--json", check=0).stdout)
    for i, info in enumerate(infos):
        release(info)
    for i in range(3):
        check_done(sup, f"g{i}", i)


def spares(sup):
    """The supervisor's children named hv-spare: the zygote's worker forked ahead of a request."""
    return stress.named_children(sup.proc.pid, "hv-spare")


def fd_links(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_an_idle_zygote_keeps_a_spare_worker_with_its_vm_built_which_dies_with_it(sup, images):
    wait_for(lambda: len(spares(sup)) == 1 and "anon_inode:kvm-vm" in fd_links(spares(sup)[0]), timeout=20)
    (spare,) = spares(sup)
    assert not any("guest-ram" in t for t in fd_links(spare))
    wait_for(lambda: os.getpriority(os.PRIO_PROCESS, spare) == os.getpriority(os.PRIO_PROCESS, sup.proc.pid))
    time.sleep(0.2)                                         # it took a worker's priority back just before "ready"
    info = launch(sup, images, 0)
    assert info["pids"]["worker"] == spare                  # the guest went to it: no fork on its path
    assert f"pid {spare} forked from zygote pid {zygote_pid(sup)} (a spare, its VM built ahead)" in \
        worker_log(info)
    with open(f"/proc/{spare}/comm") as f:
        assert f.read().strip() == "hvw-g0"
    assert os.readlink(f"/proc/{spare}/fd/3").startswith("/memfd:guest-ram-g0")
    wait_for(lambda: len(spares(sup)) == 1, timeout=20)     # and the idle zygote makes the next one
    (after,) = spares(sup)
    assert after != spare
    assert os.getpriority(os.PRIO_PROCESS, spare) == os.getpriority(os.PRIO_PROCESS, sup.proc.pid)
    os.kill(zygote_pid(sup), signal.SIGKILL)
    wait_for(lambda: not alive(after), timeout=10)          # EOF on its socket: a spare has no guest to keep
    wait_for(lambda: not os.path.exists(f"/proc/{after}"), timeout=10)     # and the supervisor reaped it
    assert alive(spare)
    release(info)
    check_done(sup, "g0", 0)


def test_killed_worker_is_failed_and_the_others_finish(sup, images):
    infos = [launch(sup, images, i) for i in range(3)]
    os.kill(infos[1]["pids"]["worker"], signal.SIGKILL)
    r = sup.hvctl("wait", "g1", "--timeout", "20", check=70)
    assert "killed by signal SIGKILL" in r.stderr
    g1 = sup.info("g1")
    assert (g1["state"], g1["exit_status"], g1["pids"]) == ("failed", 70, {})
    for i in (0, 2):
        assert sup.info(f"g{i}")["state"] == "running"
        release(infos[i])
        check_done(sup, f"g{i}", i)
    launch(sup, images, 1, "again")                          # and the supervisor carries on
    release(sup.info("again"))
    check_done(sup, "again", 1)


def test_killing_the_zygote_spares_running_guests(sup, images):
    infos = [launch(sup, images, i) for i in range(2)]
    z = zygote_pid(sup)
    os.kill(z, signal.SIGKILL)
    wait_for(lambda: not alive(z))
    for info in infos:
        assert alive(info["pids"]["worker"])
    # the next start works at once (spawned directly while the zygote is down, or by a new zygote)
    info = launch(sup, images, 2)
    release(info)
    check_done(sup, "g2", 2)
    # a new zygote comes back and forks the following workers
    wait_for(lambda: zygote_pid(sup) not in (None, z), timeout=20)
    z2 = zygote_pid(sup)
    info = launch(sup, images, 3)
    assert f"forked from zygote pid {z2}" in worker_log(info)
    for i, info in [(0, infos[0]), (1, infos[1]), (3, info)]:
        assert sup.info(f"g{i}")["state"] == "running"
        release(info)
        check_done(sup, f"g{i}", i)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_zygote_dies_with_the_supervisor_its_workers_only_when_it_stops_them(images, how):
    """SIGTERM stops the guests with the supervisor; a killed supervisor's workers run on (the next one adopts
    them: test_adoption.py), its zygote does not."""
    sup = make_sup()
    workers = []
    try:
        infos = [launch(sup, images, i) for i in range(2)]
        workers = [info["pids"]["worker"] for info in infos]
        zygote = zygote_pid(sup)
        os.kill(sup.proc.pid, how)
        sup.proc.wait(20)
        wait_for(lambda: not alive(zygote), timeout=10)
        if how == signal.SIGTERM:
            wait_for(lambda: not any(alive(p) for p in workers), timeout=10)
        else:
            assert all(alive(p) for p in workers)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


def test_zygote_off_spawns_workers_directly(images):
    sup = make_sup("0")
    try:
        assert zygote_pid(sup) is None
        info = launch(sup, images, 4)
        pid = info["pids"]["worker"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"pyhv.vcpu_worker.worker" in f.read()
        assert "forked from zygote" not in worker_log(info)
        release(info)
        check_done(sup, "g4", 4)
    finally:
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


# --- the zygote on its own: bad requests, and a worker whose start was called off --------

ZYGOTE_SCRIPT = r"""
import json, os, select, socket, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from pyhv.supervisor import zygote
from pyhv.proto.runtime import child_env
zygote.set_child_subreaper()
z = zygote.Zygote(child_env())
d = tempfile.mkdtemp()

def answers(n):
    got, deadline = [], time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        select.select([z.fileno()], [], [], 1)
        got += [r for r in z.replies() if "id" in r]         # not {"spare": pid}
    return got

# too few fds: an error answer, and the zygote carries on
r, w = os.pipe()
z.submit(1, ["--help"], (r,), d, "bad")
print(json.dumps(answers(1)))
# a worker whose go pipe closes without the byte exits without running anything
mem = os.memfd_create("guest-ram-x")
out = os.open(os.path.join(d, "out"), os.O_WRONLY | os.O_CREAT)
err = os.open(os.path.join(d, "err"), os.O_WRONLY | os.O_CREAT)
go_r, go_w = os.pipe()
import base64
from pyhv.proto import codec, guest
config = base64.b64encode(codec.encode(guest.GuestConfig(name="x", kernel="/nonexistent", boot="raw64"),
                                       guest.GUEST)).decode()
os.makedirs(d + "/guests/x")              # where it would write result.json if it ran the guest anyway
z.submit(2, ["--config", config, "--mem-fd", "3", "--runtime-dir", d], (mem, out, err, go_r), d, "x")
os.close(go_r)
(a,) = answers(1)
time.sleep(0.5)
with open(f"/proc/{a['pid']}/stat") as f:
    waiting = f.read().rsplit(")", 1)[1].split()[0] == "S"          # blocked on the go pipe, not gone
os.close(go_w)
_, status = os.waitpid(a["pid"], 0)
print(json.dumps({"id": a["id"], "exit": os.waitstatus_to_exitcode(status), "waiting": waiting,
                  "ran": os.path.exists(d + "/guests/x/result.json") or os.path.getsize(d + "/err") > 0,
                  "alive": z.alive()}))
z.close()
"""


def test_zygote_answers_bad_requests_and_calls_off_unwanted_workers():
    r = subprocess.run([sys.executable, "-c", ZYGOTE_SCRIPT, REPO], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    bad, called_off = (json.loads(line) for line in r.stdout.splitlines())
    assert len(bad) == 1 and bad[0]["id"] == 1 and "expected 4 fds" in bad[0]["error"]
    assert called_off == {"id": 2, "exit": 1, "waiting": True, "ran": False, "alive": True}


CPUID_APIC_IDS = r"""
    /* every vCPU checks that CPUID.1:EBX[31:24] (initial APIC ID) is its index; vCPU 0 reports */
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    shr $24, %ebx
    cmp %rdi, %rbx
    jne 2f
    lock incl ok(%rip)
2:  test %rdi, %rdi
    jnz 3f
    mov $2000000, %ecx
1:  mov ok(%rip), %eax
    cmp %esi, %eax
    je 4f
    pause
    dec %ecx
    jnz 1b
4:  mov ok(%rip), %eax
    add $0x40, %al
    mov $0x501, %dx
    out %al, %dx
3:  jmp 3b
ok: .long 0
"""


def test_zygote_forked_workers_give_each_vcpu_its_own_cpuid(sup, build_guest):
    """The per-vCPU CPUID is built in the forked worker from memory it owns (a dangling cffi element once
    gave APs garbage CPUID in zygote-forked workers only, and Linux's APs triple-faulted)."""
    image = build_guest(CPUID_APIC_IDS)
    for n in (2, 4):
        sup.hvctl("create", f"c{n}", "--kernel", image, "--boot", "raw64", "--vcpus", n, "--timeout", 60, check=0)
        sup.hvctl("start", f"c{n}", check=0)
        assert sup.hvctl("wait", f"c{n}", "--timeout", 60, timeout=90).returncode == 0x40 + n
