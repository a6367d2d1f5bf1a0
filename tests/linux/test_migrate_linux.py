"""A Linux guest migrated with --copy while its devices write its RAM: it keeps working there (slow: two boots).

Our kernel boots with virtio-blk, -rng and -net under one supervisor, a
peer on the same switch name under the other.  At its prompt the guest
starts a loop that keeps the block and rng devices writing into its RAM
(reading the disk with the page cache dropped each time, and /dev/hwrng),
then moves with `migrate --copy`.  Under the target it answers at its
console, its loop's last disk checksum is right, a fresh read of the disk
is too, and it pings the peer through the target's switch.
"""
import hashlib
import os
import re
import shutil

import pytest

from hv import Supervisor
from test_snapshot_linux import ARTEFACTS, Console, wait_for_shell

pytestmark = pytest.mark.slow


def test_a_linux_guest_moves_with_copy_while_its_devices_write_its_ram(tmp_path):
    kernel, initrd = ARTEFACTS / "own" / "vmlinux", ARTEFACTS / "initramfs.cpio"
    assert kernel.exists() and initrd.exists(), "run `hvctl guests fetch` first"
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    digest = hashlib.md5(disk.read_bytes()).hexdigest()
    a, b = Supervisor(), Supervisor()
    consoles = []
    try:
        common = ["--kernel", kernel, "--initrd", initrd, "--timeout", 1200]
        b.hvctl("create", "peer", *common, "--net", "switch:lan",
                "--cmdline", "console=ttyS0 ip=10.0.4.2::::peer:eth0:off", "--start", check=0)
        a.hvctl("create", "src", *common, "--vcpus", 2, "--disk", disk, "--rng", "--net", "switch:lan",
                "--cmdline", "console=ttyS0 ip=10.0.4.1::::src:eth0:off", "--start", check=0)
        wait_for_shell(a, "src")
        c = Console(a, "src")
        consoles.append(c)
        assert "ready=2" in c.run("echo 1 > /proc/sys/kernel/printk; echo ready=$((1+1))", "ready=2")   # quiet
        c.run("(n=0; while :; do echo 3 > /proc/sys/vm/drop_caches; md5sum /dev/vda > /tmp/s; mv /tmp/s /tmp/sum; "
              "head -c 65536 /dev/hwrng | wc -c > /tmp/r; mv /tmp/r /tmp/rng; n=$((n+1)); echo $n > /tmp/n; "
              "done) & echo loop-$((2+3))", "loop-5")
        out = c.run("until [ -s /tmp/n ]; do sleep 1; done; cat /tmp/n /tmp/sum; echo before-$((3+4))", "before-7",
                    timeout=300)
        assert f"{digest}  /dev/vda" in out, out
        c.close()
        r = a.hvctl("migrate", "src", "--to", b.dir, "--copy", check=0, timeout=900)
        assert re.match(rf"src now runs under {re.escape(b.dir)} \(RAM copied in \d+ rounds", r.stdout), r.stdout
        assert a.info("src")["reason"] == f"migrated to {b.dir}"
        c = Console(b, "src")
        consoles.append(c)
        out = c.run("echo n=$(cat /tmp/n); echo after-$((6*7))", "after-42", timeout=60)
        n = int(re.search(r"n=(\d+)", out).group(1))           # the loop's passes so far, some of them there
        out = c.run(f"until [ $(cat /tmp/n) -gt {n} ]; do sleep 1; done; cat /tmp/sum /tmp/rng; kill %1; "
                    "md5sum /dev/vda; echo read-$((4+4))", "read-8", timeout=300)
        assert out.count(f"{digest}  /dev/vda") == 2 and "65536" in out, out
        wait_for_shell(b, "peer")
        out = c.run("ping -c 1 -W 5 10.0.4.2 >/dev/null && echo ping-$((2+2))", "ping-4", timeout=60)
        assert "ping-4" in out
    finally:
        for c in consoles:
            c.close()
        for s in (a, b):
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)
