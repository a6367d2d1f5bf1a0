"""Migration between the supervisors of two runtime dirs on this machine: the guest continues, every number once.

The counting guest (support/guests/count.c) prints 0..400: the source's
console followed by the target's must be that sequence exactly.  A failed
migration leaves the source as it was.
"""
import os
import shutil

import pytest

from hv import GUESTS, Supervisor, wait_for

FULL = "".join(f"{n}\n" for n in range(401))


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


def test_a_migrated_guest_continues_under_the_other_supervisor(pair, counter):
    a, b = pair
    start_counting(a, "c", counter)
    r = a.hvctl("migrate", "c", "--to", b.dir, check=0)
    assert r.stdout == f"c now runs under {b.dir}\n"
    info = a.info("c")
    assert info["state"] == "stopped" and info["reason"] == f"migrated to {b.dir}"
    info = b.info("c")                   # running, or (on a loaded machine) already at its own end
    assert info["state"] == "running" or (info["state"], info["exit_status"]) == ("stopped", 0), info["reason"]
    assert b.hvctl("wait", "c", timeout=60).returncode == 0
    assert console(a, "c") + console(b, "c") == FULL
    assert [f for f in os.listdir(b.dir) if f.startswith("incoming-")] == []


def test_a_paused_guest_arrives_paused(pair, counter):
    a, b = pair
    start_counting(a, "p", counter)
    a.hvctl("pause", "p", check=0)
    a.hvctl("migrate", "p", "--to", b.dir, check=0)
    assert b.info("p")["state"] == "paused"
    assert console(b, "p") == ""
    b.hvctl("resume", "p", check=0)
    assert b.hvctl("wait", "p", timeout=60).returncode == 0
    assert console(a, "p") + console(b, "p") == FULL


def test_a_failed_migration_leaves_the_source_running(pair, slow_counter, tmp_path):
    a, b = pair
    start_counting(a, "c", slow_counter)
    b.hvctl("create", "c", "--boot", "raw64", "--kernel", slow_counter, check=0)     # the name is taken there
    r = a.hvctl("migrate", "c", "--to", b.dir)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "already exists" in r.stderr and "runs on here" in r.stderr
    assert a.info("c")["state"] == "running"
    a.hvctl("pause", "c", check=0)                   # the rest without a clock: the guest waits for us
    r = a.hvctl("migrate", "c", "--to", b.dir)
    assert r.returncode == 1 and "stays paused here" in r.stderr, r.stderr
    r = a.hvctl("migrate", "c", "--to", str(tmp_path))                          # nobody serves it
    assert r.returncode == 1 and "no supervisor is serving" in r.stderr
    r = a.hvctl("migrate", "c", "--to", a.dir)
    assert r.returncode == 2 and "own runtime dir" in r.stderr
    r = a.hvctl("migrate", "c", "--to", b.dir, "--copy")
    assert r.returncode == 2 and "not implemented" in r.stderr
    assert a.info("c")["state"] == "paused"
    assert b.info("c")["state"] == "created"
    assert [f for f in os.listdir(b.dir) if f.startswith("incoming-")] == []
    a.hvctl("resume", "c", check=0)
    assert a.hvctl("wait", "c", timeout=90).returncode == 0
    assert console(a, "c") == FULL                         # held and let go: no number lost or repeated


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
