"""virtio-console in a Linux guest: our kernel with `--vconsole` writes to /dev/hvc0 and reads a line back."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from hv import REPO as ROOT


def connect(path, timeout=5):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


# --- a Linux guest writes to /dev/hvc0 ---------------------------------------------------------

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))
KERNEL = ARTEFACTS / "own" / "vmlinux"
INITRAMFS = ARTEFACTS / "initramfs.cpio"


@pytest.mark.slow
@pytest.mark.skipif(not (KERNEL.exists() and INITRAMFS.exists()),
                    reason="needs the guest kernel + initramfs in $HV_ARTEFACTS (bash guests/fetch.sh)")
def test_linux_guest_writes_to_hvc0(tmp_path):
    stats = tmp_path / "stats.json"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pyhv.supervisor.cli", "run", "--kernel", str(KERNEL), "--initrd", str(INITRAMFS),
           "--mem", "256M", "--vconsole", "--timeout", "240", "--stats-json", str(stats),
           "--cmdline", 'console=ttyS0 pyhv.run="exec 3<>/dev/hvc0; echo hello >&3; read line <&3; '
                        'echo got:$line >&3; sleep 1"']
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        notice = proc.stderr.readline().decode()            # hvctl says where the virtio console is
        assert notice.startswith("hvctl: virtio console on "), notice
        sock = pathlib.Path(notice.split(" on ", 1)[1].strip())
        c = None
        while c is None and time.monotonic() < deadline:
            try:
                c = connect(sock, timeout=240)
            except OSError:
                time.sleep(0.05)

        def read_until(marker, got=b""):
            while marker not in got.replace(b"\r\n", b"\n") and time.monotonic() < deadline:
                chunk = c.recv(4096)
                if not chunk:
                    break
                got += chunk
            return got.replace(b"\r\n", b"\n")

        got = read_until(b"hello\n")                  # guest -> host
        assert b"hello\n" in got, got
        c.sendall(b"ping\r")                           # host -> guest: a line for `read`
        got = read_until(b"got:ping\n", got)
        assert b"got:ping\n" in got, got
        c.close()
        proc.communicate(timeout=240)
        st = json.loads(stats.read_text())
        vc = st["devices"]["pci"]["virtio-console"]["backend"]
        assert vc["tx_bytes"] >= len(b"hello\ngot:ping\n") and vc["rx_bytes"] == 5, vc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
