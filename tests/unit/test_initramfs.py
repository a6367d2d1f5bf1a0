"""guests/initramfs.py: the newc cpio writer, checked byte by byte and against cpio(1)."""
import importlib.util
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

from hv import REPO
SCRIPT = REPO / "guests" / "initramfs.py"

_spec = importlib.util.spec_from_file_location("pyhv_initramfs", SCRIPT)
initramfs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(initramfs)

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) is not installed")

FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
          "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")


def parse(data):
    """Records of a newc archive as dicts (name, data and the 13 header fields), checking the framing."""
    records, off = [], 0
    while True:
        assert off % 4 == 0, f"record at {off} is not 4-byte aligned"
        assert data[off:off + 6] == b"070701", f"bad magic at {off}: {data[off:off + 6]!r}"
        hexes = data[off + 6:off + 110]
        assert len(hexes) == 104 and all(c in b"0123456789ABCDEF" for c in hexes), "fields must be 8 upper-case hex digits"
        rec = {k: int(hexes[i * 8:i * 8 + 8], 16) for i, k in enumerate(FIELDS)}
        name_end = off + 110 + rec["namesize"]
        assert data[name_end - 1] == 0, "name must be NUL-terminated (namesize counts the NUL)"
        rec["name"] = data[off + 110:name_end - 1].decode()
        assert b"\0" not in data[off + 110:name_end - 1]
        data_off = (name_end + 3) & ~3
        assert data[name_end:data_off] == b"\0" * (data_off - name_end), "name padding must be NULs"
        rec["data"] = data[data_off:data_off + rec["filesize"]]
        assert len(rec["data"]) == rec["filesize"], "archive truncated inside file data"
        off = (data_off + rec["filesize"] + 3) & ~3
        assert data[data_off + rec["filesize"]:off] == b"\0" * (off - data_off - rec["filesize"])
        records.append(rec)
        if rec["name"] == "TRAILER!!!":
            break
    assert len(data) % 512 == 0, "archive is padded to 512 bytes"
    assert data[off:] == b"\0" * (len(data) - off), "only NUL padding after the trailer"
    return records


def sample():
    a = initramfs.Archive()
    a.dir("/etc")
    a.file("/etc/hostname", b"pyhv\n")
    for n in range(6):                          # every padding case of the data
        a.file(f"/data/f{n}", bytes(range(n)), mode=0o600)
    a.file("/usr/lib/deep/x.txt", "text ünïcode\n", mode=0o640)   # parents created on the way
    a.symlink("/bin/sh", "busybox")
    a.node("/dev/console", "c", 5, 1)
    a.node("/dev/vda", "b", 254, 0, mode=0o660)
    a.fifo("/run/fifo")
    a.dir("/tmp", mode=0o1777)
    a.file("/init", b"#!/bin/sh\nexit 0\n", mode=0o755)
    return a


def by_name(records):
    return {r["name"]: r for r in records}


def test_header_fields():
    records = parse(sample().to_bytes())
    recs = by_name(records)
    body = records[:-1]
    assert [r["ino"] for r in body] == list(range(1, len(body) + 1)), "inodes count from 1 in archive order"
    for r in body:
        assert (r["uid"], r["gid"], r["mtime"], r["check"]) == (0, 0, 0, 0)
        assert (r["devmajor"], r["devminor"]) == (0, 0)
        assert not r["name"].startswith("/") and r["name"]
    assert recs["etc/hostname"]["mode"] == stat.S_IFREG | 0o644
    assert recs["etc/hostname"]["data"] == b"pyhv\n" and recs["etc/hostname"]["nlink"] == 1
    for n in range(6):
        assert recs[f"data/f{n}"]["data"] == bytes(range(n))
        assert recs[f"data/f{n}"]["mode"] == stat.S_IFREG | 0o600
    assert recs["usr/lib/deep/x.txt"]["data"] == "text ünïcode\n".encode()
    assert recs["bin/sh"]["mode"] == stat.S_IFLNK | 0o777 and recs["bin/sh"]["data"] == b"busybox"
    con = recs["dev/console"]
    assert con["mode"] == stat.S_IFCHR | 0o600 and (con["rdevmajor"], con["rdevminor"]) == (5, 1)
    assert con["filesize"] == 0
    vda = recs["dev/vda"]
    assert vda["mode"] == stat.S_IFBLK | 0o660 and (vda["rdevmajor"], vda["rdevminor"]) == (254, 0)
    assert recs["run/fifo"]["mode"] == stat.S_IFIFO | 0o644
    assert recs["tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert recs["init"]["mode"] == stat.S_IFREG | 0o755
    # Directory link counts: 2 + subdirectories.
    assert recs["usr"]["nlink"] == 3 and recs["usr/lib"]["nlink"] == 3 and recs["usr/lib/deep"]["nlink"] == 2
    trailer = records[-1]
    assert trailer["name"] == "TRAILER!!!" and trailer["filesize"] == 0 and trailer["nlink"] == 1
    assert trailer["mode"] == 0 and trailer["ino"] == 0


def test_parents_precede_children():
    names = [r["name"] for r in parse(sample().to_bytes())[:-1]]
    for i, n in enumerate(names):
        parent = n.rpartition("/")[0]
        if parent:
            assert parent in names[:i], f"{n} comes before its parent {parent}"
    assert len(names) == len(set(names))


def test_reproducible():
    assert sample().to_bytes() == sample().to_bytes()


def test_bad_specs():
    a = initramfs.Archive()
    a.file("/a", b"x")
    for bad in (lambda: a.file("/a", b"y"),                # duplicate
                lambda: a.file("/a/b", b"y"),              # parent is a file
                lambda: a.file("/../etc/x", b""),          # escapes the root
                lambda: a.file("/", b""),                  # no name
                lambda: a.file("/m", b"", mode=0o10000),   # mode bits outside 0o7777
                lambda: a.node("/dev/x", "p", 1, 1),       # not c or b
                lambda: a.symlink("/l", "")):
        with pytest.raises(initramfs.SpecError):
            bad()
    a.dir("/d")
    a.dir("/d")                                            # the same directory twice is fine
    assert initramfs.parse_file_spec("/h/x:/g/x") == ("/h/x", "/g/x", None)
    assert initramfs.parse_file_spec("/h/x:/g/x:0750") == ("/h/x", "/g/x", 0o750)
    for bad in ("nocolon", "/h:", ":/g", "/h:/g:9", "/h:/g:0o7", "/h:/g:1:2"):
        with pytest.raises(initramfs.SpecError):
            initramfs.parse_file_spec(bad)


def fake_busybox(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF not really busybox" + bytes(range(256)))
    bb.chmod(0o700)
    return bb


def test_busybox_initramfs(tmp_path):
    bb = fake_busybox(tmp_path)
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\necho hi\n")
    init.chmod(0o600)
    extra = tmp_path / "extra"
    extra.write_bytes(b"payload")
    extra.chmod(0o640)
    a = initramfs.busybox_initramfs(str(bb), str(init), [(str(extra), "/opt/extra", None),
                                                          (str(extra), "/opt/extra2", 0o4755)])
    recs = by_name(parse(a.to_bytes()))
    assert recs["bin/busybox"]["data"] == bb.read_bytes() and recs["bin/busybox"]["mode"] == stat.S_IFREG | 0o755
    assert recs["init"]["data"] == init.read_bytes() and recs["init"]["mode"] == stat.S_IFREG | 0o755
    assert recs["dev/console"]["mode"] == stat.S_IFCHR | 0o600
    assert (recs["dev/console"]["rdevmajor"], recs["dev/console"]["rdevminor"]) == (5, 1)
    for applet in ("sh", "mount", "cttyhack", "setsid", "reboot", "grep"):
        assert recs[f"bin/{applet}"]["data"] == b"busybox", applet
    assert recs["opt/extra"]["mode"] == stat.S_IFREG | 0o640      # the host file's permissions
    assert recs["opt/extra2"]["mode"] == stat.S_IFREG | 0o4755    # MODE given
    for d in ("proc", "sys", "dev", "tmp"):
        assert stat.S_ISDIR(recs[d]["mode"])


def test_cli(tmp_path):
    bb = fake_busybox(tmp_path)
    extra = tmp_path / "extra"
    extra.write_bytes(b"abc")
    out = tmp_path / "out.cpio"
    cmd = [sys.executable, str(SCRIPT), str(out), "--busybox", str(bb),
           "--init", str(REPO / "guests" / "linux" / "init.sh"), "--file", f"{extra}:/etc/extra:0600"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    recs = by_name(parse(out.read_bytes()))
    assert recs["etc/extra"]["data"] == b"abc" and recs["etc/extra"]["mode"] == stat.S_IFREG | 0o600
    assert recs["init"]["data"] == (REPO / "guests" / "linux" / "init.sh").read_bytes()
    first = out.read_bytes()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert out.read_bytes() == first, "two runs give the same bytes"
    bad = subprocess.run(cmd[:-2] + ["--file", "no-colon"], capture_output=True, text=True)
    assert bad.returncode == 2 and "HOSTPATH:GUESTPATH" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(cmd[:3] + [str(tmp_path / "nope"), "--init", str(extra)], capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


@needs_cpio
def test_cpio_lists_it():
    data = sample().to_bytes()
    p = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().splitlines() == [r["name"] for r in parse(data)[:-1]]
    p = subprocess.run(["cpio", "-tv", "--quiet"], input=data, capture_output=True)
    lines = {ln.split()[-1] if "->" not in ln else ln.split()[-3]: ln for ln in p.stdout.decode().splitlines()}
    assert lines["dev/console"].startswith("crw-------") and "5,   1" in lines["dev/console"]
    assert lines["dev/vda"].startswith("brw-rw----")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("bin/sh -> busybox")
    assert lines["tmp"].startswith("drwxrwxrwt")
    assert " 1970 " in lines["etc/hostname"]          # mtime 0


@needs_cpio
def test_cpio_extracts_it(tmp_path):
    # mknod needs root; cpio(1) would fail on the device nodes without it.
    a = initramfs.Archive()
    a.file("/etc/hostname", b"pyhv\n")
    for n in range(6):
        a.file(f"/data/f{n}", bytes(range(n)), mode=0o600)
    a.file("/usr/lib/deep/x.txt", "text ünïcode\n", mode=0o640)
    a.symlink("/bin/sh", "busybox")
    a.file("/bin/busybox", b"\x7fELF", mode=0o755)
    a.file("/init", b"#!/bin/sh\n", mode=0o755)
    if os.geteuid() == 0:
        a.node("/dev/console", "c", 5, 1)
    dest = tmp_path / "root"
    dest.mkdir()
    p = subprocess.run(["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "--preserve-modification-time"],
                       input=a.to_bytes(), cwd=dest, capture_output=True)
    assert p.returncode == 0, p.stderr
    assert (dest / "etc/hostname").read_bytes() == b"pyhv\n"
    for n in range(6):
        f = dest / f"data/f{n}"
        assert f.read_bytes() == bytes(range(n))
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.stat().st_mtime == 0
    assert (dest / "usr/lib/deep/x.txt").read_text() == "text ünïcode\n"
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert (dest / "bin/sh").read_bytes() == b"\x7fELF"
    assert stat.S_IMODE((dest / "init").stat().st_mode) == 0o755
    if os.geteuid() == 0:
        st = os.lstat(dest / "dev/console")
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


def fake_module(path, **modinfo):
    """A minimal ELF64 object with a .modinfo section, as a .ko has (key=value strings, NUL-separated)."""
    import struct
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off, str_off = 64, 64 + len(info)
    shoff = (str_off + len(shstr) + 7) & ~7
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0,
                                                               64, 3, 2)
    sections = [bytes(64),
                struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(info), 0, 0, 1, 0),
                struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, str_off, len(shstr), 0, 0, 1, 0)]
    body = header + info + shstr
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + bytes(shoff - len(body)) + b"".join(sections))


def test_modules_come_with_their_dependencies_first(tmp_path):
    tree = tmp_path / "lib" / "modules" / "6.1.0-test"
    fake_module(tree / "kernel/drivers/virtio/virtio.ko", name="virtio", depends="")
    fake_module(tree / "kernel/drivers/virtio/virtio_ring.ko", name="virtio_ring", depends="")
    fake_module(tree / "kernel/drivers/net/virtio_net.ko", name="virtio_net", depends="virtio_ring,virtio,net_failover")
    fake_module(tree / "kernel/drivers/net/net_failover.ko", name="net_failover", depends="failover")
    fake_module(tree / "kernel/net/core/failover.ko", name="failover", depends="")
    fake_module(tree / "kernel/drivers/char/hw_random/virtio-rng.ko", name="virtio_rng", depends="virtio,virtio_ring")
    order = initramfs.module_closure(str(tree), ["virtio_net", "virtio-rng"])
    assert order == ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
                     "kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                     "kernel/drivers/net/virtio_net.ko", "kernel/drivers/char/hw_random/virtio-rng.ko"]
    a = initramfs.Archive()
    paths = initramfs.add_modules(a, str(tree), ["virtio_rng"])
    assert paths == ["/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko",
                     "/lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_ring.ko",
                     "/lib/modules/6.1.0-test/kernel/drivers/char/hw_random/virtio-rng.ko"]
    listed = {r["name"]: r["data"] for r in parse(a.to_bytes())}["etc/pyhv-modules"]
    assert listed.decode().split() == paths
    with pytest.raises(initramfs.SpecError, match="virtio_scsi"):
        initramfs.module_closure(str(tree), ["virtio_scsi"])
