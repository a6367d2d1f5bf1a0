"""Snapshot and restore: guests continue from exactly where they were, clones each on their own, bad snapshots refused.

The counting guest (support/guests/count.c) prints 0..400, one number per
line: the source's console up to the snapshot followed by a restored
guest's console must be that sequence exactly, every number once.
"""
import json
import os
import shutil
import subprocess
import tempfile

import pytest

from hv import GUESTS, hvctl, wait_for

LAST = 400
FULL = "".join(f"{n}\n" for n in range(LAST + 1))


@pytest.fixture
def counter(build_c_guest):
    return str(build_c_guest((GUESTS / "count.c").read_text()))


@pytest.fixture
def slow_counter(build_c_guest):
    """The same guest at 40 ms a number (16 s), for a test whose steps must all happen while it runs."""
    return str(build_c_guest((GUESTS / "count.c").read_text(), cflags=("-DSTEP_MS=40",)))


@pytest.fixture
def snapdir():
    d = tempfile.mkdtemp(prefix="hv-snap-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def console(sup, name):
    with open(sup.info(name)["console_log"]) as f:
        return f.read()


def start_counting(sup, name, counter, *options):
    sup.hvctl("create", name, "--boot", "raw64", "--kernel", counter, "--timeout", "90", *options, "--start", check=0)
    wait_for(lambda: console(sup, name).count("\n") >= 20, timeout=20)


def test_snapshot_stop_then_clones_each_continue_from_the_next_number(sup, counter, snapdir):
    start_counting(sup, "src", counter, "--vcpus", "2")
    snap = os.path.join(snapdir, "s")
    r = sup.hvctl("snapshot", "src", snap, "--stop", check=0)
    assert r.stdout.startswith(f"snapshot of src in {snap}: ")
    assert sup.info("src")["state"] == "stopped"
    before = console(sup, "src")
    assert 0 < len(before) < len(FULL)
    for i in range(3):
        assert sup.hvctl("restore", snap, "--name", f"clone{i}", check=0).stdout == f"clone{i}\n"
    for i in range(3):
        assert sup.hvctl("wait", f"clone{i}", timeout=60).returncode == 0
        assert before + console(sup, f"clone{i}") == FULL
    # without --name: the snapshot's own name, once that guest is gone
    assert sup.hvctl("restore", snap).returncode == 1             # src still exists
    sup.hvctl("destroy", "src", check=0)
    assert sup.hvctl("restore", snap, check=0).stdout == "src\n"
    assert sup.hvctl("wait", "src", timeout=60).returncode == 0
    assert before + console(sup, "src") == FULL


def test_a_snapshot_lets_the_guest_run_on_and_a_paused_one_stays_paused(sup, counter, snapdir):
    start_counting(sup, "src", counter)
    snap = os.path.join(snapdir, "s")
    sup.hvctl("snapshot", "src", snap, check=0)
    info = sup.info("src")                 # running on, or (on a loaded machine) already at its own end
    assert info["state"] == "running" or (info["state"], info["exit_status"]) == ("stopped", 0), info["reason"]
    sup.hvctl("restore", snap, "--name", "held", "--paused", check=0)
    assert sup.info("held")["state"] == "paused"
    assert sup.hvctl("wait", "src", timeout=60).returncode == 0
    assert console(sup, "src") == FULL                        # the source lost and repeated nothing
    assert console(sup, "held") == ""                         # paused from before its first instruction
    sup.hvctl("resume", "held", check=0)
    assert sup.hvctl("wait", "held", timeout=60).returncode == 0
    tail = console(sup, "held")
    assert tail and FULL.endswith(tail) and len(tail) < len(FULL) - 20

    # a paused guest is snapshotted as it is and stays paused
    start_counting(sup, "p", counter)
    sup.hvctl("pause", "p", check=0)
    sup.hvctl("snapshot", "p", os.path.join(snapdir, "p"), check=0)
    assert sup.info("p")["state"] == "paused"
    sup.hvctl("stop", "p", check=0)


def test_run_restore_in_the_foreground(sup, counter, snapdir):
    start_counting(sup, "src", counter)
    snap = os.path.join(snapdir, "s")
    sup.hvctl("snapshot", "src", snap, "--stop", check=0)
    r = hvctl("run", "--restore", snap, "--timeout", "60", text=True)
    assert r.returncode == 0, r.stderr
    assert console(sup, "src") + r.stdout == FULL
    r = hvctl("run", "--restore", snap, "--kernel", counter, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--kernel" in r.stderr


def corrupt_variants(snap, work):
    """(what, path of a broken copy of `snap`) for each way a snapshot can be bad."""
    def copy(name):
        d = os.path.join(work, name)
        shutil.copytree(snap, d)
        return d

    def manifest(d, change):
        p = os.path.join(d, "manifest.json")
        with open(p) as f:
            m = json.load(f)
        change(m)
        with open(p, "w") as f:
            json.dump(m, f)

    d = copy("flipped-ram-byte")
    offset = manifest_of(d)["files"]["memory"]["extents"][-1][0]
    with open(os.path.join(d, "memory"), "r+b") as f:
        f.seek(offset + 100)
        b = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([b[0] ^ 0x40]))
    yield "corrupt", d
    d = copy("truncated-ram")
    os.truncate(os.path.join(d, "memory"), 4096)
    yield "truncated", d
    d = copy("state-changed")
    with open(os.path.join(d, "state.msgpack"), "r+b") as f:
        f.seek(50)
        f.write(b"\0\0\0\0")
    yield "corrupt", d
    d = copy("major-2")
    manifest(d, lambda m: m.update(version="2.0"))
    yield "format version 2.0", d
    d = copy("no-manifest")
    os.unlink(os.path.join(d, "manifest.json"))
    yield "incomplete", d
    d = copy("no-state")
    os.unlink(os.path.join(d, "state.msgpack"))
    yield "incomplete", d
    d = copy("garbage-manifest")
    with open(os.path.join(d, "manifest.json"), "w") as f:
        f.write("{not json")
    yield "not JSON", d
    yield "not a directory", os.path.join(work, "absent")


def manifest_of(d):
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def test_bad_snapshots_are_refused_and_nothing_is_created(sup, counter, snapdir):
    start_counting(sup, "src", counter)
    snap = os.path.join(snapdir, "s")
    sup.hvctl("snapshot", "src", snap, "--stop", check=0)
    guests = sup.hvctl("list", "--json", check=0).stdout
    assert json.loads(manifest_of(snap)["version"].split(".")[0]) == 1
    for what, bad in corrupt_variants(snap, snapdir):
        r = sup.hvctl("restore", bad, "--name", "bad")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and what in r.stderr, (what, r.stderr)
        r = hvctl("run", "--restore", bad, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and what in r.stderr, (what, r.stderr)
        assert sup.hvctl("list", "--json", check=0).stdout == guests
        assert not os.path.exists(os.path.join(sup.dir, "guests", "bad"))
    # a newer minor version of the same major is read
    newer = os.path.join(snapdir, "minor")
    shutil.copytree(snap, newer)
    m = manifest_of(newer)
    m["version"] = "1.9"
    with open(os.path.join(newer, "manifest.json"), "w") as f:
        json.dump(m, f)
    sup.hvctl("restore", newer, "--name", "minor", check=0)
    assert sup.hvctl("wait", "minor", timeout=60).returncode == 0


def test_a_failed_snapshot_leaves_the_guest_running_and_nothing_behind(sup, counter, slow_counter, snapdir):
    start_counting(sup, "src", slow_counter)
    full = os.path.join(snapdir, "small")
    os.mkdir(full)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", full], check=True)
    try:
        r = sup.hvctl("snapshot", "src", os.path.join(full, "s"))
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "No space left" in r.stderr, r.stderr
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", full], check=True)
    os.mkdir(os.path.join(snapdir, "taken"))
    open(os.path.join(snapdir, "taken", "x"), "w").close()
    r = sup.hvctl("snapshot", "src", os.path.join(snapdir, "taken"))
    assert r.returncode == 2 and "not empty" in r.stderr
    r = sup.hvctl("snapshot", "src", os.path.join(snapdir, "no", "such", "dir"))
    assert r.returncode == 2 and "no such directory" in r.stderr
    assert sup.info("src")["state"] == "running"
    assert sup.hvctl("wait", "src", timeout=90).returncode == 0
    assert console(sup, "src") == FULL
    sup.hvctl("create", "idle", "--boot", "raw64", "--kernel", counter, check=0)
    r = sup.hvctl("snapshot", "idle", os.path.join(snapdir, "idle"))
    assert r.returncode == 1 and "created" in r.stderr


def test_each_clone_gets_its_own_copy_of_a_writable_disk(sup, counter, snapdir, tmp_path):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"snapshot-time data")
    start_counting(sup, "src", counter, "--disk", str(disk))
    snap = os.path.join(snapdir, "s")
    sup.hvctl("snapshot", "src", snap, "--stop", check=0)
    with open(disk, "r+b") as f:                   # changed after the snapshot: clones must not see it
        f.seek(1 << 20)
        f.write(b"later")
    for name in ("k1", "k2"):
        sup.hvctl("restore", snap, "--name", name, check=0)
        path = sup.info(name)["config"]["devices"][0]["options"]["path"]
        assert path == os.path.join(sup.dir, "guests", name, "disk-virtio-blk0")
        with open(path, "rb") as f:
            f.seek(1 << 20)
            assert f.read(18) == b"snapshot-time data"
        assert os.stat(path).st_blocks * 512 < 1 << 20         # sparse, like the original
        assert sup.hvctl("wait", name, timeout=60).returncode == 0
