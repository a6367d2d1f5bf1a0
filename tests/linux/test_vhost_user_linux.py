"""vhost-user with real back ends from Debian's packages and our Linux kernel's drivers (slow: one boot).

qemu-storage-daemon exports a qcow2 overlay (over a raw base with a known
pattern) as vhost-user-blk, and virtiofsd shares a host directory; one
supervised guest uses both (`--vhost-user blk,...` and `fs,...,tag=share`).
At its shell it reads the base's pattern through the overlay and writes a
sector, mounts the share, reads the host's file and writes one the host then
sees; it is paused and resumed (every ring stopped with GET_VRING_BASE and
restarted from there) and reads both again.  Then qemu-storage-daemon is
killed: `hvctl info` shows the disk failed with the reason, while the guest
still answers at its console and reads the share; a snapshot is refused.
On the host afterwards the overlay holds the guest's write and the base is
unchanged.
"""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

from hv import Supervisor, wait_for
from linux_console import Console, wait_for_shell

pytestmark = pytest.mark.slow

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))
QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SECTORS = 2048


def pattern(sector):
    return bytes((sector * 7 + j) & 0xFF for j in range(512))


def md5(data):
    return hashlib.md5(data).hexdigest()


def start(cmd, log, sock):
    """A back end in its own session (so its whole group can be killed), up once its socket exists."""
    p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, f"{cmd[0]} did not start: {log.name}"
        time.sleep(0.05)
    return p


def kill(p):
    if p is not None and p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.mark.skipif(not (QSD and QEMU_IMG and os.access(VIRTIOFSD, os.X_OK)),
                    reason="needs qemu-storage-daemon, /usr/lib/qemu/virtiofsd (qemu-system-common) and qemu-img "
                           "(qemu-utils): setup.sh installs them")
def test_linux_uses_a_qcow2_overlay_through_qemu_storage_daemon_and_a_host_directory_through_virtiofsd(tmp_path):
    kernel, initrd = ARTEFACTS / "own" / "vmlinux", ARTEFACTS / "initramfs.cpio"
    assert kernel.exists() and initrd.exists(), "run `hvctl guests fetch` first"
    base, overlay, flat = tmp_path / "base.img", tmp_path / "overlay.qcow2", tmp_path / "overlay.raw"
    base.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
    base_digest = md5(base.read_bytes())
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)], check=True)
    share = tmp_path / "share"
    share.mkdir()
    (share / "from-host.txt").write_text("written by the host\n")
    blk_sock, fs_sock = tmp_path / "blk.sock", tmp_path / "fs.sock"
    log = open(tmp_path / "backends.log", "ab")
    qsd = vfs = sup = None
    consoles = []
    try:
        qsd = start([QSD, "--blockdev", f"driver=file,node-name=file,filename={overlay}",
                     "--blockdev", "driver=qcow2,node-name=disk,file=file",
                     "--export", f"type=vhost-user-blk,id=vub,node-name=disk,writable=on,addr.type=unix,"
                                 f"addr.path={blk_sock}"], log, blk_sock)
        vfs = start([VIRTIOFSD, f"--socket-path={fs_sock}", "-o", f"source={share}", "-o", "cache=none"], log,
                    fs_sock)
        sup = Supervisor()
        sup.hvctl("create", "g", "--kernel", kernel, "--initrd", initrd, "--timeout", 1200,
                  "--vhost-user", f"blk,socket={blk_sock}", "--vhost-user", f"fs,socket={fs_sock},tag=share",
                  "--cmdline", "console=ttyS0", "--start", check=0)
        info = sup.info("g")
        assert {d: info["devices"][d]["state"] for d in ("vhost-user0", "vhost-user1")} == \
            {"vhost-user0": "running", "vhost-user1": "running"}, info["devices"]
        assert info["pids"]["device:vhost-user0"] == qsd.pid
        wait_for_shell(sup, "g")
        c = Console(sup, "g")
        consoles.append(c)
        time.sleep(2)                                   # the prompt

        # the disk: the base's pattern through the overlay; a write with a flush
        out = c.run("dd if=/dev/vda bs=512 skip=3 count=1 2>/dev/null | md5sum; cat /sys/block/vda/size; "
                    "echo guest-wrote-this | dd of=/dev/vda bs=512 seek=5 conv=notrunc,fsync 2>/dev/null "
                    "&& echo blk-$((1+1))", "blk-2")
        assert md5(pattern(3)) in out and f"\n{SECTORS}" in out.replace("\r", ""), out
        # the share: the host's file in, the guest's file out
        out = c.run("mkdir -p /mnt && mount -t virtiofs share /mnt && cat /mnt/from-host.txt && "
                    "echo from-the-guest > /mnt/from-guest.txt && sync && echo fs-$((2+2))", "fs-4")
        assert "written by the host" in out, out
        assert (share / "from-guest.txt").read_text() == "from-the-guest\n"

        # pause and resume: the back ends' rings stop and start again where they were
        sup.hvctl("pause", "g", check=0)
        assert sup.info("g")["devices"]["vhost-user0"]["paused"]
        sup.hvctl("resume", "g", check=0)
        pci = json.loads(sup.hvctl("stats", "g", "--json", check=0).stdout)["devices"]["pci"]
        for name in ("vhost-user0", "vhost-user1"):
            b = pci[name]["backend"]
            assert (b["pauses"], b["resumes"], b["rings_running"], b["activations"]) == (1, 1, True, 1), b
        out = c.run("dd if=/dev/vda bs=512 skip=5 count=1 2>/dev/null | head -c 16; echo; "
                    "echo 1 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip=4 count=1 2>/dev/null | md5sum; "
                    "ls /mnt; echo again-$((3+3))", "again-6")
        assert "guest-wrote-thi" in out and md5(pattern(4)) in out and "from-guest.txt" in out, out

        # the disk's back end dies: reported, and the guest and its share go on
        kill(qsd)
        wait_for(lambda: sup.info("g")["devices"]["vhost-user0"]["state"] == "failed", timeout=60)
        info = sup.info("g")
        assert "closed the connection" in info["devices"]["vhost-user0"]["reason"], info["devices"]
        assert info["state"] == "running" and info["devices"]["vhost-user1"]["state"] == "running"
        pci = json.loads(sup.hvctl("stats", "g", "--json", check=0).stdout)["devices"]["pci"]
        assert pci["vhost-user0"]["status"] & 64 and not pci["vhost-user1"]["status"] & 64   # DEVICE_NEEDS_RESET
        out = c.run("cat /mnt/from-host.txt; echo alive-$((6*7))", "alive-42", timeout=60)
        assert "written by the host" in out, out
        r = sup.hvctl("snapshot", "g", tmp_path / "snap", check=2)
        assert "cannot be snapshotted" in r.stderr and not (tmp_path / "snap").exists()
        sup.hvctl("stop", "g", check=0)

        # on the host: the overlay has the write, the base is as it was
        subprocess.run([QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", "raw", str(overlay), str(flat)], check=True)
        data = flat.read_bytes()
        assert data[5 * 512:].startswith(b"guest-wrote-this\n") and data[3 * 512:4 * 512] == pattern(3)
        assert md5(base.read_bytes()) == base_digest
    finally:
        for c in consoles:
            c.close()
        if sup is not None:
            sup.stop()
        kill(qsd)
        kill(vfs)
        log.close()
