"""Migration between the supervisors of two runtime dirs on this machine: the guest continues, every number once.

Both ways: the RAM memfd handed over, and `--copy` (RAM streamed while the
guest runs, then what it dirtied while held).  The counting guest
(support/guests/count.c) prints 0..400: the source's console followed by
the target's must be that sequence exactly.  With --copy, a guest that
rewrites its RAM all the time (rewrite.c) and one whose RAM a virtio-blk
device writes all the time (blk_reader.c) check after the move that no page
is stale.  A failed migration leaves the source as it was and nothing on
the target.
"""
import os
import re
import shutil
import signal
import subprocess

import psutil
import pytest

from hv import GUESTS, HVCTL, Supervisor, wait_for

FULL = "".join(f"{n}\n" for n in range(401))
COPIED = re.compile(r"^(\S+) now runs under (\S+) \(RAM copied in (\d+) rounds( \(the round limit\))?: "
                    r"([\d.]+) MiB, ([\d.]+) MiB of it while held; downtime (\d+) ms, ([\d.]+) s in all\)\n$")


@pytest.fixture
def counter(build_c_guest):
    return str(build_c_guest((GUESTS / "count.c").read_text()))


@pytest.fixture
def slow_counter(build_c_guest):
    """The same guest at 40 ms a number: 16 s, for a test whose steps must all happen while it runs."""
    return str(build_c_guest((GUESTS / "count.c").read_text(), cflags=("-DSTEP_MS=40",)))


@pytest.fixture
def pair():
    a, b = Supervisor(), Supervisor()
    yield a, b
    for s in (a, b):
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


def console(sup, name):
    with open(os.path.join(sup.dir, "guests", name, "console.log")) as f:
        return f.read()


def start_counting(sup, name, counter):
    sup.hvctl("create", name, "--boot", "raw64", "--kernel", counter, "--vcpus", "2", "--timeout", "90", "--start",
              check=0)
    wait_for(lambda: console(sup, name).count("\n") >= 20, timeout=20)


def nothing_left(sup):
    """No guest, no migration's files, no receiver process under this supervisor."""
    assert sup.hvctl("list", "--json", check=0).stdout.strip() == "[]"
    assert [f for f in os.listdir(sup.dir) if f.startswith("incoming-")] == []
    assert receivers(sup) == []


def receivers(sup):
    return [p for p in psutil.Process(sup.proc.pid).children(recursive=True)
            if "pyhv.supervisor.receiver" in " ".join(p.cmdline())]


def migrated(r, name, to):
    """The figures `migrate --copy` printed: (rounds, MiB, MiB while held, converged)."""
    m = COPIED.match(r.stdout)
    assert m and m.group(1) == name and m.group(2) == to, r.stdout
    return int(m.group(3)), float(m.group(5)), float(m.group(6)), m.group(4) is None


@pytest.mark.parametrize("copy", [False, True], ids=["handover", "copy"])
def test_a_migrated_guest_continues_under_the_other_supervisor(pair, counter, copy):
    a, b = pair
    start_counting(a, "c", counter)
    r = a.hvctl("migrate", "c", "--to", b.dir, *(["--copy"] if copy else []), check=0)
    if copy:
        rounds, sent, held, converged = migrated(r, "c", b.dir)
        assert 2 <= rounds <= 30 and sent > 0 and held <= sent    # a first full pass, then at least one more
    else:
        assert r.stdout == f"c now runs under {b.dir}\n"
    info = a.info("c")
    assert info["state"] == "stopped" and info["reason"] == f"migrated to {b.dir}"
    info = b.info("c")                   # running, or (on a loaded machine) already at its own end
    assert info["state"] == "running" or (info["state"], info["exit_status"]) == ("stopped", 0), info["reason"]
    assert b.hvctl("wait", "c", timeout=60).returncode == 0
    assert console(a, "c") + console(b, "c") == FULL
    assert [f for f in os.listdir(b.dir) if f.startswith("incoming-")] == [] and receivers(b) == []


@pytest.mark.parametrize("there, back", [(True, False), (False, True)], ids=["copy-then-handover",
                                                                            "handover-then-copy"])
def test_a_guest_migrated_there_and_back_continues(pair, slow_counter, there, back):
    """Back where it was, the guest replaces the record it left ("migrated to ..."); its logs are kept."""
    a, b = pair
    start_counting(a, "c", slow_counter)
    a.hvctl("migrate", "c", "--to", b.dir, *(["--copy"] if there else []), check=0)
    wait_for(lambda: console(b, "c").count("\n") >= 5, timeout=30)
    b.hvctl("migrate", "c", "--to", a.dir, *(["--copy"] if back else []), check=0)
    assert b.info("c")["reason"] == f"migrated to {a.dir}"
    assert a.hvctl("wait", "c", timeout=60).returncode == 0
    with open(os.path.join(a.dir, "logs", "c", "console.log")) as f:
        first_leg = f.read()
    assert first_leg + console(b, "c") + console(a, "c") == FULL


@pytest.mark.parametrize("copy", [False, True], ids=["handover", "copy"])
def test_a_paused_guest_arrives_paused(pair, counter, copy):
    a, b = pair
    start_counting(a, "p", counter)
    a.hvctl("pause", "p", check=0)
    a.hvctl("migrate", "p", "--to", b.dir, *(["--copy"] if copy else []), check=0)
    assert b.info("p")["state"] == "paused"
    assert console(b, "p") == ""
    b.hvctl("resume", "p", check=0)
    assert b.hvctl("wait", "p", timeout=60).returncode == 0
    assert console(a, "p") + console(b, "p") == FULL


def test_a_guest_rewriting_its_ram_moves_with_no_page_stale(pair, build_c_guest):
    """Ring 3 runs natively here: the guest rewrites 64 MiB every millisecond or so, so every round finds pages
    written again.  The migration converges or stops at the round limit, says which, and the guest checks every
    page of every pass after the move (a stale one ends it with status 3)."""
    a, b = pair
    image = build_c_guest((GUESTS / "rewrite.c").read_text(), mode="user64", cflags=("-DLAST=3000",))
    a.hvctl("create", "r", "--boot", "user64", "--kernel", image, "--mem", "128M", "--timeout", "120", "--start",
            check=0)
    wait_for(lambda: console(a, "r").count("\n") >= 3, timeout=30)
    r = a.hvctl("migrate", "r", "--to", b.dir, "--copy", check=0, timeout=300)
    rounds, sent, held, converged = migrated(r, "r", b.dir)
    assert rounds <= 30 and (converged or rounds == 30)
    assert sent > 64 + 4                  # the 64 MiB it rewrites (and < 4 MiB of code, stack, tables), and more
    assert b.hvctl("wait", "r", timeout=120).returncode == 0
    assert console(a, "r") + console(b, "r") == "".join(f"{n}\n" for n in range(16, 3001, 16))


def test_what_a_device_writes_during_the_copy_arrives(pair, build_c_guest, tmp_path):
    """virtio-blk reads into pages only the device writes, all through the copy: the guest checks each page's
    sector after the move; a device write the dirty map missed would leave an older sector there (status 3)."""
    a, b = pair
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"".join(bytes((s * 7 + j) & 0xFF for j in range(512)) for s in range(64)))
    image = build_c_guest((GUESTS / "blk_reader.c").read_text(), cflags=("-mgeneral-regs-only", "-DPASSES=120"))
    a.hvctl("create", "d", "--boot", "raw64", "--kernel", image, "--disk", f"{disk},ro", "--timeout", "180",
            "--start", check=0)
    wait_for(lambda: console(a, "d").count("\n") >= 10, timeout=60)
    r = a.hvctl("migrate", "d", "--to", b.dir, "--copy", check=0, timeout=300)
    migrated(r, "d", b.dir)
    assert b.hvctl("wait", "d", timeout=180).returncode == 100, console(b, "d")[-200:]
    assert console(a, "d") + console(b, "d") == "".join(f"{n}\n" for n in range(1, 121))


@pytest.mark.parametrize("copy", [False, True], ids=["handover", "copy"])
def test_a_failed_migration_leaves_the_source_running(pair, slow_counter, tmp_path, copy):
    a, b = pair
    flag = ["--copy"] if copy else []
    start_counting(a, "c", slow_counter)
    b.hvctl("create", "c", "--boot", "raw64", "--kernel", slow_counter, check=0)     # the name is taken there
    r = a.hvctl("migrate", "c", "--to", b.dir, *flag)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "already exists" in r.stderr and "runs on here" in r.stderr
    assert a.info("c")["state"] == "running"
    a.hvctl("pause", "c", check=0)                   # the rest without a clock: the guest waits for us
    r = a.hvctl("migrate", "c", "--to", b.dir, *flag)
    assert r.returncode == 1 and "stays paused here" in r.stderr, r.stderr
    r = a.hvctl("migrate", "c", "--to", str(tmp_path), *flag)                    # nobody serves it
    assert r.returncode == 1 and "no supervisor is serving" in r.stderr
    r = a.hvctl("migrate", "c", "--to", str(tmp_path / "no" / "such" / "dir"), *flag)
    assert r.returncode == 1 and "no supervisor is serving" in r.stderr
    r = a.hvctl("migrate", "c", "--to", a.dir, *flag)
    assert r.returncode == 2 and "own runtime dir" in r.stderr
    assert a.info("c")["state"] == "paused"
    assert b.info("c")["state"] == "created"
    assert [f for f in os.listdir(b.dir) if f.startswith("incoming-")] == [] and receivers(b) == []
    a.hvctl("resume", "c", check=0)
    assert a.hvctl("wait", "c", timeout=90).returncode == 0
    assert console(a, "c") == FULL                         # held and let go: no number lost or repeated


def test_a_receiver_killed_mid_stream_leaves_the_source_running_and_nothing_there(pair, build_c_guest):
    a, b = pair
    image = build_c_guest((GUESTS / "rewrite.c").read_text(), mode="user64", cflags=("-DMIB=192", "-DLAST=800"))
    a.hvctl("create", "r", "--boot", "user64", "--kernel", image, "--mem", "256M", "--timeout", "180", "--start",
            check=0)
    wait_for(lambda: console(a, "r").count("\n") >= 1, timeout=60)
    env = {**os.environ, "HV_RUNTIME_DIR": a.dir}
    move = subprocess.Popen(HVCTL + ["migrate", "r", "--to", b.dir, "--copy"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: receivers(b), timeout=30)
    receiver = receivers(b)[0]
    wait_for(lambda: receiver.memory_info().shared > (48 << 20), timeout=60)    # guest RAM arriving: mid-stream
    receiver.send_signal(signal.SIGKILL)
    out, err = move.communicate(timeout=120)
    assert move.returncode == 1 and "runs on here" in err, (out, err)
    assert a.info("r")["state"] == "running"
    nothing_left(b)
    assert a.hvctl("wait", "r", timeout=180).returncode == 0
    assert console(a, "r") == "".join(f"{n}\n" for n in range(16, 801, 16))


def test_a_migrating_guest_refuses_what_would_disturb_it(pair, build_c_guest):
    """While it moves: no pause, stop, snapshot, second migration or destroy here, nor start or destroy there."""
    a, b = pair
    image = build_c_guest((GUESTS / "rewrite.c").read_text(), mode="user64", cflags=("-DMIB=192", "-DLAST=800"))
    a.hvctl("create", "r", "--boot", "user64", "--kernel", image, "--mem", "256M", "--timeout", "180", "--start",
            check=0)
    wait_for(lambda: console(a, "r").count("\n") >= 1, timeout=60)
    env = {**os.environ, "HV_RUNTIME_DIR": a.dir}
    move = subprocess.Popen(HVCTL + ["migrate", "r", "--to", b.dir, "--copy"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: receivers(b), timeout=30)
    for args in (["pause", "r"], ["stop", "r"], ["destroy", "r", "--force"], ["migrate", "r", "--to", b.dir],
                 ["snapshot", "r", "/tmp/never-written"]):
        moving = move.poll() is None
        r = a.hvctl(*args)
        if moving and move.poll() is None:    # (unless the move finished meanwhile on a fast machine)
            assert r.returncode == 1 and "being migrated" in r.stderr, (args, r.stderr)
    moving = move.poll() is None
    r = b.hvctl("create", "r", "--boot", "user64", "--kernel", image)
    assert r.returncode == 1 or not moving, r.stderr
    if moving and move.poll() is None:        # reserved while it streams, the guest itself once it is held there
        assert "being migrated here" in r.stderr or "already exists" in r.stderr, r.stderr
    out, err = move.communicate(timeout=300)
    assert move.returncode == 0, err
    assert not os.path.exists("/tmp/never-written")
    assert b.hvctl("wait", "r", timeout=180).returncode == 0
    assert console(a, "r") + console(b, "r") == "".join(f"{n}\n" for n in range(16, 801, 16))


def test_a_forged_hand_over_is_refused(pair, tmp_path):
    """Immigrate without the RAM fd, or naming a dir outside the receiver's runtime dir, changes nothing."""
    import socket
    from pyhv.devices.guest_memory import create_memfd
    from pyhv.proto import codec, control as m
    from pyhv.proto.client import SeqClient
    from pyhv.proto.errors import ProtocolError, UserError
    _, b = pair
    with pytest.raises(ProtocolError, match="one fd"):
        SeqClient(os.path.join(b.dir, "hvctl.sock")).request(m.Immigrate(os.path.join(b.dir, "x", "state")))
    fd = create_memfd(1 << 20)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(os.path.join(b.dir, "hvctl.sock"))
        socket.send_fds(s, [codec.encode(m.Immigrate(str(tmp_path / "x" / "state")), m.CONTROL)], [fd])
        reply = codec.decode(s.recv(65536), m.CONTROL)
    os.close(fd)
    assert reply.kind == UserError.kind and "only from inside" in reply.message
    assert b.hvctl("list", "--json", check=0).stdout.strip() == "[]"


def test_a_stream_without_the_token_is_refused_and_leaves_nothing(pair, counter):
    """Whoever connects to a receiver must present the token its supervisor handed to the source."""
    from pyhv.proto import control as m, migration as mig
    from pyhv.proto.client import SeqClient
    from pyhv.proto.guest import GuestConfig
    _, b = pair
    ready = SeqClient(os.path.join(b.dir, "hvctl.sock")).request(
        m.ReceiveGuest(GuestConfig(name="x", kernel=counter, boot="raw64")))
    assert b.hvctl("list", "--json", check=0).stdout.strip() == "[]"     # reserved, not there yet
    r = b.hvctl("create", "x", "--boot", "raw64", "--kernel", counter)
    assert r.returncode == 1 and "being migrated here" in r.stderr
    stream = mig.connect(ready.address)
    stream.send_preamble()
    stream.send_msg(mig.Hello("not-the-token", "x", 128 << 20, 1))
    with pytest.raises(mig.MigrationError, match="token"):
        stream.recv_msg(mig.Prepared)
    stream.close()
    wait_for(lambda: not receivers(b) and not [f for f in os.listdir(b.dir) if f.startswith("incoming-")])
    nothing_left(b)
    b.hvctl("create", "x", "--boot", "raw64", "--kernel", counter, check=0)     # the name is free again


# --- a supervisor that dies while a guest moves (guests outlive their supervisor) -------------------------------

def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def state_of(sup, name):
    """The guest's state under `sup`, or None while it has no such guest."""
    import json
    guests = json.loads(sup.hvctl("list", "--json", check=0).stdout)
    return next((g["state"] for g in guests if g["name"] == name), None)


def kill9(sup):
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait(10)


def test_a_guest_arriving_when_its_supervisor_died_is_discarded_not_adopted(build_guest):
    """Until the source's Commit the guest held by the target may still run at the source: the next supervisor
    there must kill its held worker and forget it, not adopt it.  (The moment stood for here: a guest whose
    record says it is arriving, its worker running, and the supervisor killed.)"""
    import json
    t = Supervisor()
    t2 = None
    try:
        t.hvctl("create", "x", "--boot", "raw64", "--kernel", build_guest("1: jmp 1b\n"), "--timeout", "120",
                "--start", check=0)
        worker = t.info("x")["pids"]["worker"]
        path = os.path.join(t.dir, "guests", "x", "guest.json")
        with open(path) as f:
            record = json.load(f)
        with open(path, "w") as f:
            json.dump({**record, "arriving": True}, f)
        kill9(t)
        assert alive(worker)                              # guests outlive their supervisor...
        t2 = Supervisor(t.dir)
        wait_for(lambda: not alive(worker), timeout=10)   # ...but not this one
        nothing_left(t2)
        assert not os.path.exists(os.path.join(t.dir, "guests", "x"))
    finally:
        for s in (t2, t):
            if s is not None and s.proc.poll() is None:
                s.stop()
        shutil.rmtree(t.dir, ignore_errors=True)


def test_a_source_supervisor_killed_mid_copy_leaves_the_guest_migrated(build_c_guest):
    """The source's worker streams on without its supervisor, commits, and ends itself ("migrated to DIR") when no
    Stop comes; the next supervisor there finds it so.  Every number once."""
    a, b = Supervisor(), Supervisor()
    a2 = None
    try:
        image = build_c_guest((GUESTS / "rewrite.c").read_text(), mode="user64", cflags=("-DMIB=192", "-DLAST=800"))
        a.hvctl("create", "r", "--boot", "user64", "--kernel", image, "--mem", "256M", "--timeout", "180", "--start",
                check=0)
        wait_for(lambda: console(a, "r").count("\n") >= 1, timeout=60)
        worker = a.info("r")["pids"]["worker"]
        move = subprocess.Popen(HVCTL + ["migrate", "r", "--to", b.dir, "--copy"], text=True,
                                env={**os.environ, "HV_RUNTIME_DIR": a.dir}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        wait_for(lambda: receivers(b), timeout=30)
        receiver = receivers(b)[0]
        wait_for(lambda: receiver.memory_info().shared > (48 << 20), timeout=60)    # the worker streams: mid-copy
        kill9(a)
        move.communicate(timeout=60)
        wait_for(lambda: state_of(b, "r") in ("running", "stopped"), timeout=120)
        wait_for(lambda: not alive(worker), timeout=60)
        a2 = Supervisor(a.dir)
        info = a2.info("r")
        assert (info["state"], info["reason"]) == ("stopped", f"migrated to {b.dir}")
        assert b.hvctl("wait", "r", timeout=180).returncode == 0
        assert console(a, "r") + console(b, "r") == "".join(f"{n}\n" for n in range(16, 801, 16))
    finally:
        for s in (a2, a, b):
            if s is not None and s.proc.poll() is None:
                s.stop()
        for s in (a, b):
            shutil.rmtree(s.dir, ignore_errors=True)
