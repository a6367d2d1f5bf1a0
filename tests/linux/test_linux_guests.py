"""Full Linux boots (slow): our kernel and Debian's stock kernel, neither patched, run busybox user space on 2 vCPUs with virtio devices.

Artefacts come from guests/fetch.sh (idempotent; cached in $HV_ARTEFACTS,
default /var/cache/pyhv).  Guest kernel code is emulated on nested hosts,
so each boot takes one to several minutes (the stock kernel about fifteen),
and their system calls go through the VMM's SYSCALL hook there.
"""
import hashlib
import os
import pathlib
import select
import shutil
import socket
import subprocess
import threading
import time

import pytest

from hv import HVCTL, REPO, Supervisor
from pyhv.proto.errors import EXIT_TIMEOUT

pytestmark = pytest.mark.slow

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))


@pytest.fixture(scope="session")
def artefacts():
    r = subprocess.run(HVCTL + ["guests", "fetch"], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, f"hvctl guests fetch failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    paths = {"own": ARTEFACTS / "own" / "vmlinux", "stock": ARTEFACTS / "stock" / "vmlinuz",
             "initrd": ARTEFACTS / "initramfs.cpio", "stock_initrd": ARTEFACTS / "stock-initramfs.cpio"}
    for p in paths.values():
        assert p.exists(), f"{p} missing after guests/fetch.sh"
    return paths


def boot_until(args, marker=None, timeout=900):
    """Run `hvctl run ARGS`; stop once `marker` (bytes) appears. Returns (status or None if stopped, output)."""
    p = subprocess.Popen(HVCTL + ["run", *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                return p.wait(timeout=30), bytes(out)
            out += chunk
            if marker is not None and marker in out:
                return None, bytes(out)
        raise AssertionError(f"no {marker!r} within {timeout} s; output ends:\n{out[-3000:].decode(errors='replace')}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_own_kernel_runs_user_space_on_two_cpus_with_virtio_disk_and_rng(artefacts, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    digest = hashlib.md5(disk.read_bytes()).hexdigest()
    script = ("md5sum /dev/vda; echo rng=$(head -c 64 /dev/hwrng | wc -c); "
              "echo pyhv-wrote-this | dd of=/dev/vda bs=512 seek=100 conv=notrunc,fsync 2>/dev/null; echo done")
    status, out = boot_until(["--kernel", artefacts["own"], "--initrd", artefacts["initrd"], "--vcpus", 2,
                              "--disk", disk, "--rng", "--timeout", 800,
                              "--cmdline", f'console=ttyS0 pyhv.run="{script}"'], timeout=900)
    text = out.decode(errors="replace")
    assert "smp: Brought up 1 node, 2 CPUs" in text
    assert "Run /init as init process" in text
    assert "pyhv-init: 2 cpus" in text
    assert f"{digest}  /dev/vda" in text                  # the guest read the whole disk through the service
    assert "rng=64" in text                                # /dev/hwrng is virtio-rng
    assert "done" in text
    assert status == 0                                     # reboot -f
    assert disk.read_bytes()[100 * 512:100 * 512 + 16] == b"pyhv-wrote-this\n"


def _ping_until(peer, tries=90):
    """Shell: ping `peer` once a second until it answers (the other guest may still be booting)."""
    return (f"i=0; until ping -c 1 -W 2 {peer} >/dev/null 2>&1; do i=$((i+1)); "
            f"[ $i -gt {tries} ] && echo ping-failed && exit 1; done; echo ping-ok {peer}")


def test_own_kernels_ping_each_other_through_a_switch(artefacts, tmp_path):
    """Two Linux guests on one ZeroMQ switch (standalone runs share it through the runtime dir)."""
    env = {**os.environ, "HV_RUNTIME_DIR": str(tmp_path)}
    procs = []
    for me, peer in (("10.0.3.1", "10.0.3.2"), ("10.0.3.2", "10.0.3.1")):
        script = f"{_ping_until(peer)}; ip -s link show eth0 | grep -A1 RX; sleep 15"
        cmd = [*HVCTL, "run", "--kernel", str(artefacts["own"]), "--initrd", str(artefacts["initrd"]),
               "--net", "switch:lan", "--timeout", "700",
               "--cmdline", f'console=ttyS0 ip={me}::::guest:eth0:off pyhv.run="{script}"']
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=800)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for (me, peer), p, text in zip((("10.0.3.1", "10.0.3.2"), ("10.0.3.2", "10.0.3.1")), procs, outs):
        assert "virtio_net" in text or "eth0" in text, text[-3000:]
        assert f"ping-ok {peer}" in text, text[-3000:]
        assert p.returncode == 0


def _can_make_taps():
    if not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        return False
    r = subprocess.run(["ip", "tuntap", "add", "dev", "pyhvprobe1", "mode", "tap"], capture_output=True)
    subprocess.run(["ip", "link", "del", "pyhvprobe1"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_make_taps(), reason="needs /dev/net/tun, iproute2 and CAP_NET_ADMIN to create a TAP")
def test_own_kernel_pings_the_host_through_a_tap(artefacts):
    tap = f"pyhvl{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.0.4.1/24", "dev", tap], check=True)
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        status, out = boot_until(["--kernel", artefacts["own"], "--initrd", artefacts["initrd"],
                                  "--net", f"tap:{tap}", "--timeout", 600,
                                  "--cmdline", f'console=ttyS0 ip=10.0.4.2::10.0.4.1:255.255.255.0:guest:eth0:off '
                                               f'pyhv.run="{_ping_until("10.0.4.1", 30)}"'], timeout=700)
        text = out.decode(errors="replace")
        assert "ping-ok 10.0.4.1" in text, text[-3000:]
        assert status == 0
    finally:
        subprocess.run(["ip", "link", "del", tap], capture_output=True)


STOCK_CAP = 1800           # s; CI's 90 minutes cannot give one boot more (Run /init came at 11-16 min here, 2026-12-07)


def _is_nested_kvm():
    return pathlib.Path("/sys/module/kvm_pvm").exists()


class SocketReader(threading.Thread):
    """Everything that arrives on a unix socket (the virtio console's), read from when it can connect."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.data, self.stop = path, bytearray(), threading.Event()
        self.start()

    def run(self):
        while not self.stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.path))
                    s.settimeout(1)
                    while not self.stop.is_set():
                        try:
                            chunk = s.recv(4096)
                        except socket.timeout:
                            continue
                        if not chunk:
                            break
                        self.data += chunk
            except OSError:
                time.sleep(0.5)


MILESTONES = ("Linux version", "smp: Brought up", "Run /init as init process", "pyhv-init: modules loaded",
              "pyhv-init: 2 cpus", "ping-ok", "stock-done")


def test_stock_debian_kernel_runs_user_space_with_its_own_modules(artefacts, tmp_path):
    """Debian's cloud kernel, unmodified, on 2 vCPUs: init loads its own virtio modules (stock-initramfs.cpio), and
    one boot (~15 minutes to Run /init on nested hosts) checks SMP, the disk, the network (pings our kernel on the
    same switch), the hwrng and the virtio console, then reboots.  On nested hosts its system calls are the VMM's
    SYSCALL hook's (vcpu_worker/syscall_hook.py)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    digest = hashlib.md5(disk.read_bytes()).hexdigest()
    env = {**os.environ, "HV_RUNTIME_DIR": str(tmp_path)}
    script = ("ip link set eth0 up; ip addr add 10.0.6.2/24 dev eth0; md5sum /dev/vda; "
              "echo rng=$(head -c 64 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current); "
              "echo stock-hvc-$((6*7)) >/dev/hvc0; uname -r; "
              f"{_ping_until('10.0.6.1', 300)}; for i in $(seq 40); do ls /bin >/dev/null; done; echo stock-done")
    cmd = [*HVCTL, "run", "--kernel", str(artefacts["stock"]), "--initrd", str(artefacts["stock_initrd"]),
           "--vcpus", "2", "--disk", str(disk), "--rng", "--vconsole", "--net", "switch:stocknet",
           "--timeout", str(STOCK_CAP),
           # without these its periodic tick livelocked under load here (docs/kvm-notes.md, "Debian's stock kernel")
           "--cmdline", f'console=ttyS0 mitigations=off nowatchdog pyhv.run="{script}"']
    stock = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peer = hvc = None
    out = bytearray()
    try:
        deadline = time.monotonic() + STOCK_CAP + 60
        while time.monotonic() < deadline:
            chunk = os.read(stock.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if hvc is None and b"virtio console on " in out:
                line = out[out.index(b"virtio console on "):].split(b"\n", 1)[0]
                hvc = SocketReader(line[len(b"virtio console on "):].decode().strip())
            if peer is None and b"Run /init as init process" in out:
                # the other end of the ping, started now so that it does not slow the long boot
                peer = subprocess.Popen(
                    [*HVCTL, "run", "--kernel", str(artefacts["own"]), "--initrd", str(artefacts["initrd"]),
                     "--net", "switch:stocknet", "--timeout", "1500",
                     "--cmdline", 'console=ttyS0 ip=10.0.6.1::::peer:eth0:off pyhv.run="sleep 1400"'],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        status = stock.wait(timeout=60)
    finally:
        for p in (stock, peer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if hvc is not None:
            hvc.stop.set()
    text = out.decode(errors="replace")
    tail = text[-4000:]
    if status == EXIT_TIMEOUT and "segfault" not in text and _is_nested_kvm():
        # Only the time cap is forgiven, and only where guest ring 0 is emulated; anything wrong before it fails.
        pytest.xfail(f"nested kvm_pvm host: not through its script within {STOCK_CAP} s (emulated ring 0); "
                     f"it got to: {[m for m in MILESTONES if m in text][-1:]}")
    assert "smp: Brought up 1 node, 2 CPUs" in text, tail
    assert "Run /init as init process" in text, tail
    assert "pyhv-init: modules loaded" in text and "pyhv-init: insmod" not in text, tail
    assert "pyhv-init: 2 cpus" in text, tail
    assert f"{digest}  /dev/vda" in text, tail                 # virtio_blk, loaded by init
    assert "rng=64 virtio_rng" in text, tail                    # virtio_rng, /dev/hwrng
    assert "ping-ok 10.0.6.1" in text, tail                     # virtio_net through the switch
    assert b"stock-hvc-42" in (hvc.data if hvc is not None else b""), tail   # virtio_console, /dev/hvc0
    assert "6.1.0-" in text and "cloud-amd64" in text, tail
    assert "segfault" not in text and "stock-done" in text, tail
    assert status == 0, tail                                   # reboot -f


def test_own_kernel_mounts_an_ext2_root_on_virtio_blk_and_writes_to_it(artefacts, tmp_path):
    # The root file system: our initramfs's busybox tree plus a data file, as an ext2 image (no initrd).
    root = tmp_path / "root"
    root.mkdir()
    with open(artefacts["initrd"], "rb") as f:
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=f, cwd=root, check=True)
    data = os.urandom(256 << 10)
    (root / "data.bin").write_bytes(data)
    image = tmp_path / "root.ext2"
    subprocess.run(["mke2fs", "-q", "-t", "ext2", "-d", str(root), str(image), "16M"], check=True)
    script = "grep ' / ' /proc/mounts; md5sum /data.bin; echo written-by-guest > /from-guest.txt; sync; echo done"
    status, out = boot_until(["--kernel", artefacts["own"], "--disk", image, "--timeout", 600,
                              "--cmdline", f'console=ttyS0 root=/dev/vda rw init=/init pyhv.run="{script}"'],
                             timeout=700)
    text = out.decode(errors="replace")
    assert "VFS: Mounted root (ext2 filesystem)" in text
    assert "/dev/root / ext2 rw" in text
    assert f"{hashlib.md5(data).hexdigest()}  /data.bin" in text
    assert status == 0 and "done" in text
    written = subprocess.run(["debugfs", "-R", "cat /from-guest.txt", str(image)], capture_output=True, check=True)
    assert written.stdout == b"written-by-guest\n"
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


def test_own_kernel_gives_an_interactive_shell_through_hvctl_console_and_shuts_down(artefacts):
    # The shell's output goes through the tty layer, i.e. the 8250's interrupt-driven transmit path.

    sup = Supervisor()
    try:
        sup.hvctl("create", "sh", "--kernel", artefacts["own"], "--initrd", artefacts["initrd"], "--vcpus", 2,
                  "--cmdline", "console=ttyS0", "--timeout", 600, check=0)
        sup.hvctl("start", "sh", check=0)
        deadline = time.monotonic() + 500
        while b"starting a shell" not in pathlib.Path(sup.info("sh")["console_log"]).read_bytes():
            assert time.monotonic() < deadline and sup.info("sh")["state"] == "running", "no shell came up"
            time.sleep(2)
        console = subprocess.Popen(HVCTL + ["console", "sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   env={**os.environ, "HV_RUNTIME_DIR": sup.dir})
        seen = bytearray()

        def expect(needle, timeout=120):
            end = time.monotonic() + timeout
            while needle not in seen:
                assert time.monotonic() < end, f"no {needle!r} from the shell; got {bytes(seen[-500:])!r}"
                ready, _, _ = select.select([console.stdout], [], [], 1)
                if ready:
                    seen.extend(os.read(console.stdout.fileno(), 4096))

        time.sleep(3)                      # let the shell reach its prompt
        console.stdin.write(b"echo answer=$((6*7))\n")
        console.stdin.flush()
        expect(b"answer=42")
        # hvctl shutdown: Ctrl-Alt-Del through the i8042 reaches init, which syncs and reboots (status 0)
        assert sup.hvctl("shutdown", "sh", "--timeout", "120", timeout=150).returncode == 0
        assert b"pyhv-init: Ctrl-Alt-Del: syncing" in pathlib.Path(sup.info("sh")["console_log"]).read_bytes()
        assert sup.info("sh")["exit_status"] == 0
        console.stdin.close()
        console.wait(timeout=30)
    finally:
        sup.stop()
