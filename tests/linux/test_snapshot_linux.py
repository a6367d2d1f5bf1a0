"""A Linux guest restored from a snapshot taken at its shell prompt: clones that each keep working (slow: one boot).

Our kernel boots once with virtio-blk, -net, -rng and -console next to a
peer guest on the same switch; it is snapshotted at its prompt and stopped,
then restored twice.  Each clone answers at its console, reads the disk as
it was and writes its own copy of it, reads /dev/hwrng, and the first pings
the peer through the switch (the second is restored onto a switch of its
own, where its twin's address is free).
"""
import hashlib
import os
import pathlib
import shutil
import socket
import tempfile
import time

import pytest

from hv import Supervisor
from linux_console import Console, wait_for_shell

pytestmark = pytest.mark.slow

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))


def test_a_linux_guest_restored_twice_from_its_shell_prompt_keeps_working(tmp_path):
    kernel, initrd = ARTEFACTS / "own" / "vmlinux", ARTEFACTS / "initramfs.cpio"
    assert kernel.exists() and initrd.exists(), "run `hvctl guests fetch` first"
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    digest = hashlib.md5(disk.read_bytes()).hexdigest()
    sup = Supervisor()
    snap = tempfile.mkdtemp(prefix="hv-linux-snap-", dir="/tmp")
    consoles = []
    try:
        common = ["--kernel", kernel, "--initrd", initrd, "--timeout", 900]
        sup.hvctl("create", "peer", *common, "--net", "switch:lan",
                  "--cmdline", "console=ttyS0 ip=10.0.3.2::::peer:eth0:off", "--start", check=0)
        sup.hvctl("create", "src", *common, "--vcpus", 2, "--disk", disk, "--rng", "--vconsole",
                  "--net", "switch:lan", "--cmdline", "console=ttyS0 ip=10.0.3.1::::src:eth0:off", "--start",
                  check=0)
        wait_for_shell(sup, "src")
        c = Console(sup, "src")
        consoles.append(c)
        time.sleep(2)                         # the prompt
        assert "ready=2" in c.run("echo ready=$((1+1))", "ready=2")
        c.close()
        r = sup.hvctl("snapshot", "src", os.path.join(snap, "s"), "--stop", check=0)
        assert "snapshot of src" in r.stdout
        sup.hvctl("restore", os.path.join(snap, "s"), "--name", "c1", check=0)
        sup.hvctl("restore", os.path.join(snap, "s"), "--name", "c2", "--net", "switch:alone", check=0)
        for name in ("c1", "c2"):
            c = Console(sup, name)
            consoles.append(c)
            out = c.run(f"echo {name}-answers=$((6*7))", f"{name}-answers=42", timeout=30)
            assert f"{name}-answers=42" in out
            out = c.run("md5sum /dev/vda; echo rng=$(head -c 64 /dev/hwrng | wc -c); "
                        f"echo {name}-wrote | dd of=/dev/vda bs=512 seek=7 conv=notrunc,fsync 2>/dev/null; "
                        "echo io-$((1+1))", "io-2")
            assert f"{digest}  /dev/vda" in out and "rng=64" in out, out
        wait_for_shell(sup, "peer")
        out = consoles[1].run("ping -c 1 -W 5 10.0.3.2 >/dev/null && echo ping-$((2+2))", "ping-4", timeout=60)
        assert "ping-4" in out
        for name in ("c1", "c2"):
            image = pathlib.Path(sup.dir) / "guests" / name / "disk-virtio-blk0"
            assert image.read_bytes()[7 * 512:].startswith(f"{name}-wrote\n".encode())
        assert hashlib.md5(disk.read_bytes()).hexdigest() == digest        # clones write their own copies
        # the clone's virtio console: its host socket carries what the guest writes to /dev/hvc0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(pathlib.Path(sup.dir) / "guests" / "c1" / "vconsole.sock"))
            s.settimeout(30)
            consoles[1].run("echo hvc-$((8*8)) > /dev/hvc0; echo sent-$((1+2))", "sent-3")
            got = b""
            while b"hvc-64" not in got:
                got += s.recv(4096)
    finally:
        for c in consoles:
            c.close()
        sup.stop()
        shutil.rmtree(snap, ignore_errors=True)
