"""The snapshot directory format (proto/snapshot.py) without KVM: round trip, sparseness, and every refusal."""
import json
import os

import pytest

from pyhv.devices.guest_memory import create_memfd
from pyhv.proto import snapshot as S
from pyhv.proto.errors import UserError
from pyhv.proto.guest import GuestConfig

MiB = 1 << 20
CONFIG = GuestConfig(name="g", kernel="/k", boot="raw64", mem_bytes=64 * MiB, vcpus=2)
STATE = S.MachineState(vcpus=[{"regs": b"\1" * 144}, {"regs": b"\2" * 144}], vm={"clock": b"c"},
                       devices={"serial": {"rx": b"abc"}})


def ram_with(pages):
    """A 64 MiB memfd with data only in `pages` {page number: byte}."""
    fd = create_memfd(CONFIG.mem_bytes)
    for page, byte in pages.items():
        os.pwrite(fd, bytes([byte]) * 4096, page * 4096)
    return fd


def write(path, pages={0: 1, 1: 2, 5000: 3}):
    fd = ram_with(pages)
    w = S.Writer(path)
    w.state(STATE)
    w.memory(fd, CONFIG.mem_bytes)
    w.commit(CONFIG)
    os.close(fd)
    return path


def test_round_trip_is_sparse_and_exact(tmp_path):
    snap = write(str(tmp_path / "s"))
    assert sorted(os.listdir(snap)) == ["manifest.json", "memory", "state.msgpack"]
    st = os.stat(os.path.join(snap, "memory"))
    assert st.st_size == CONFIG.mem_bytes and st.st_blocks * 512 < 1 * MiB       # 3 pages of data, not 64 MiB
    s = S.Snapshot(snap)
    assert s.config == CONFIG and s.state == STATE and s.version == S.VERSION
    fd = create_memfd(CONFIG.mem_bytes)
    s.load_memory(fd)
    assert os.pread(fd, 4096, 0) == b"\1" * 4096 and os.pread(fd, 4096, 5000 * 4096) == b"\3" * 4096
    assert os.pread(fd, 4096, 2 * 4096) == bytes(4096)
    assert S.data_extents(fd, CONFIG.mem_bytes) == [(0, 8192), (5000 * 4096, 4096)]


def test_an_empty_directory_is_taken_and_a_full_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    write(str(tmp_path / "empty"))
    assert S.Snapshot(str(tmp_path / "empty")).config == CONFIG
    with pytest.raises(UserError, match="not empty"):
        S.Writer(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such directory"):
        S.Writer(str(tmp_path / "a" / "b"))


def test_an_aborted_snapshot_leaves_nothing(tmp_path):
    w = S.Writer(str(tmp_path / "s"))
    w.state(STATE)
    w.abort()
    assert os.listdir(tmp_path) == []


def edit_manifest(snap, change):
    p = os.path.join(snap, "manifest.json")
    with open(p) as f:
        m = json.load(f)
    change(m)
    with open(p, "w") as f:
        json.dump(m, f)


def _set(path, value):
    def change(m):
        *where, last = path
        for k in where:
            m = m[k]
        m[last] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(["version"], "2.0"), "format version 2.0"),
    (_set(["version"], "one"), "bad format version"),
    (_set(["format"], "qemu"), "not a pyhv-snapshot manifest"),
    (_set(["files", "memory", "extents"], [[0, 8192], [4096, 4096]]), "overlap"),
    (_set(["files", "memory", "extents"], [[0, 128 * MiB]]), "leave the file"),
    (_set(["files", "memory", "size"], 32 * MiB), "the guest has"),
    (_set(["files", "../etc"], {"size": 1, "sha256": "x"}), "bad file name"),
    (_set(["files", "state.msgpack", "sha256"], "0" * 64), "checksum"),
    (_set(["config", "vcpus"], 3), "3 vCPUs"),
    (_set(["config", "boot"], 7), "bad guest config"),
    (_set(["config", "cmdline"], "\ud800"), "bad guest config.*not UTF-8"),   # JSON can say it; .encode() fails
    (lambda m: m["files"].pop("state.msgpack"), "incomplete"),
])
def test_a_bad_manifest_is_refused(tmp_path, change, message):
    snap = write(str(tmp_path / "s"))
    edit_manifest(snap, change)
    with pytest.raises(S.SnapshotError, match=message):
        S.Snapshot(snap)


@pytest.mark.parametrize("text", [b"[" * 100_000, b'{"format": "pyhv-snapshot", "files": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_a_manifest_nested_past_the_recursion_limit_is_refused_in_one_line(tmp_path, text):
    """Found by tests/unit/fuzz/test_fuzz_snapshot.py: json.loads raised RecursionError, which the reader did not
    catch, so `hvctl restore` of such a directory printed a traceback instead of refusing it."""
    snap = write(str(tmp_path / "s"))
    with open(os.path.join(snap, "manifest.json"), "wb") as f:
        f.write(text)
    with pytest.raises(S.SnapshotError, match="not JSON"):
        S.Snapshot(snap)


def test_ram_that_does_not_match_its_checksum_is_refused_while_loading(tmp_path):
    snap = write(str(tmp_path / "s"))
    with open(os.path.join(snap, "memory"), "r+b") as f:
        f.seek(5000 * 4096 + 7)
        f.write(b"\xff")
    s = S.Snapshot(snap)                   # the manifest and state are fine
    with pytest.raises(S.SnapshotError, match="memory does not match its checksum"):
        s.load_memory(create_memfd(CONFIG.mem_bytes))


def test_a_disk_image_is_copied_sparsely_and_checked(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(MiB)
        f.write(b"data" * 1024)
    fd = ram_with({0: 1})
    w = S.Writer(str(tmp_path / "s"))
    w.state(STATE)
    w.memory(fd, CONFIG.mem_bytes)
    w.disk("blk0", str(image))
    w.commit(CONFIG)
    s = S.Snapshot(str(tmp_path / "s"))
    assert list(s.disks()) == ["blk0"]
    s.copy_disk("blk0", str(tmp_path / "copy.img"))
    assert (tmp_path / "copy.img").read_bytes() == image.read_bytes()
    assert os.stat(tmp_path / "copy.img").st_blocks * 512 < 2 * MiB
    with open(tmp_path / "s" / "disk-blk0", "r+b") as f:
        f.seek(MiB)
        f.write(b"DATA")
    with pytest.raises(S.SnapshotError, match="disk-blk0 does not match"):
        s.copy_disk("blk0", str(tmp_path / "copy2.img"))
    assert not (tmp_path / "copy2.img").exists()


def test_a_hand_over_has_no_ram_and_is_no_snapshot(tmp_path):
    w = S.Writer(str(tmp_path / "h"))
    w.state(STATE)
    w.commit(CONFIG, handover=True)
    assert sorted(os.listdir(tmp_path / "h")) == ["manifest.json", "state.msgpack"]
    with pytest.raises(S.SnapshotError, match="hand-over state, not a snapshot"):
        S.Snapshot(str(tmp_path / "h"))
    h = S.Snapshot(str(tmp_path / "h"), handover=True)
    assert h.handover and h.state == STATE
    assert not S.Snapshot(write(str(tmp_path / "s")), handover=True).handover
