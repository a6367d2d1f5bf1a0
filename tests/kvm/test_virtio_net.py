"""virtio-net in real guests: tests/support/guests/virtio_net_driver.c (a ring-0 driver that broadcasts HELLO and
answers ACK) in two guests on one switch, standalone and under a supervisor, and one guest on a TAP interface
answered by the test through an AF_PACKET socket.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest

from hv import GUESTS, HVCTL, Supervisor, wait_for

DRIVER = (GUESTS / "virtio_net_driver.c").read_text()
ETHERTYPE = b"\x88\xb5"


@pytest.fixture
def switch_dir():
    d = tempfile.mkdtemp(prefix="hv-sw-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- guests ---------------------------------------------------------------------------------

def _mac_and_got(out):
    lines = out.splitlines()
    mac = next(line.split()[1] for line in lines if line.startswith("mac "))
    got = next(line[4:] for line in lines if line.startswith("got "))
    return mac, got


def test_two_standalone_guests_exchange_frames_through_a_switch(build_c_guest, switch_dir):
    image = build_c_guest(DRIVER)
    env = {**os.environ, "HV_RUNTIME_DIR": switch_dir}
    cmd = [*HVCTL, "run", "--kernel", str(image), "--boot", "raw64", "--net", "switch:pair", "--timeout", "90"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out, err)
    (mac0, got0), (mac1, got1) = (_mac_and_got(o) for o, _ in outs)
    assert mac0 != mac1
    assert got0.split()[-1] == mac1 and got1.split()[-1] == mac0     # each heard the other
    assert {got0.split()[0], got1.split()[0]} <= {"HELLO", "ACK"}


def test_supervised_guests_share_a_switch_and_info_shows_devices(build_c_guest):
    image = build_c_guest(DRIVER)
    sup = Supervisor()
    try:
        for name, mac in (("n1", "52:54:00:00:aa:01"), ("n2", "52:54:00:00:aa:02")):
            sup.hvctl("create", name, "--kernel", image, "--boot", "raw64", "--timeout", 90,
                      "--net", f"switch:lab,mac={mac}", check=0)
        sup.hvctl("start", "n1", check=0)
        info = sup.info("n1")
        assert info["config"]["devices"] == [{"kind": "net", "options": {"port": "switch:lab",
                                                                          "mac": "52:54:00:00:aa:01"}}]
        assert info["devices"]["virtio-net0"]["state"] == "running"
        assert info["pids"]["device:virtio-net0"] == info["devices"]["virtio-net0"]["pid"]
        assert info["devices"]["switch:lab"]["state"] == "running"
        sup.hvctl("start", "n2", check=0)
        for name, other in (("n1", "52:54:00:00:aa:02"), ("n2", "52:54:00:00:aa:01")):
            assert sup.hvctl("wait", name, timeout=120).returncode == 0
            out = sup.hvctl("logs", name).stdout
            assert f"from {other}" in out, out
        text = sup.hvctl("info", "n1").stdout
        assert "net:" in text and "switch:lab,mac=52:54:00:00:aa:01" in text
    finally:
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


def test_killed_net_service_and_switch_are_restarted_and_shown_in_info(build_c_guest):
    """kill -9 of a guest's NIC service, then of the switch: the guests and the supervisor live on."""
    spin = build_c_guest(r"""
        long guest_main(long i, long n, long khz) { for (;;) __asm__ volatile("pause"); return 0; }
    """)
    sup = Supervisor()
    try:
        for name in ("k1", "k2"):
            sup.hvctl("create", name, "--kernel", spin, "--boot", "raw64", "--net", "switch:lab", check=0)
            sup.hvctl("start", name, check=0)
        pid = sup.info("k1")["devices"]["virtio-net0"]["pid"]
        assert psutil.Process(pid).ppid() == sup.proc.pid            # the supervisor started it
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sup.info("k1")["devices"]["virtio-net0"].get("restarts") == 1, 20)
        info = sup.info("k1")
        assert info["state"] == "running" and info["devices"]["virtio-net0"]["state"] == "running"
        assert info["devices"]["virtio-net0"]["pid"] != pid
        assert "killed by SIGKILL" in open(os.path.join(sup.dir, "test-supervisor.log")).read()
        assert "1 restart(s)" in sup.hvctl("info", "k1").stdout
        assert sup.info("k2")["state"] == "running"
        assert sup.info("k2")["devices"]["virtio-net0"]["restarts"] == 0
        # the switch itself: the supervisor restarts it
        switch_pid = info["devices"]["switch:lab"]["pid"]
        os.kill(switch_pid, signal.SIGKILL)
        wait_for(lambda: sup.info("k2")["devices"]["switch:lab"]["restarts"] == 1, 20)
        assert sup.info("k2")["devices"]["switch:lab"]["state"] == "running"
        assert all(sup.info(n)["state"] == "running" for n in ("k1", "k2"))
    finally:
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


def _can_make_taps():
    if not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        return False
    r = subprocess.run(["ip", "tuntap", "add", "dev", "pyhvprobe0", "mode", "tap"], capture_output=True)
    if r.returncode:
        return False
    subprocess.run(["ip", "link", "del", "pyhvprobe0"], capture_output=True)
    return True


@pytest.mark.skipif(not _can_make_taps(), reason="needs /dev/net/tun, iproute2 and CAP_NET_ADMIN to create a TAP")
def test_guest_on_a_tap_talks_to_the_host(build_c_guest):
    image = build_c_guest(DRIVER)
    tap = f"pyhvt{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        s.bind((tap, 0))
        s.settimeout(60)
        p = subprocess.Popen([*HVCTL, "run", "--kernel", str(image), "--boot", "raw64", "--net", f"tap:{tap}",
                              "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            frame = s.recv(2048)
            assert frame[12:14] == ETHERTYPE and frame[14:20] == b"HELLO "
            host_mac = bytes.fromhex("020000000001")
            s.send(frame[6:12] + host_mac + ETHERTYPE + b"ACK from the host\0".ljust(46, b"\0"))
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
            s.close()
        assert p.returncode == 0, (out, err)
        assert "got ACK from the host" in out
    finally:
        subprocess.run(["ip", "link", "del", tap], capture_output=True)


def test_bad_net_options_fail_with_one_line():
    for spec, words in (("wifi:x", "tap:IFNAME"), ("tap:" + "x" * 16, "tap:IFNAME"),
                        ("switch:lab,mac=01:00:5e:00:00:01", "multicast"), ("switch:lab,speed=10", "option")):
        r = subprocess.run([*HVCTL, "run", "--kernel", sys.executable, "--net", spec], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.splitlines()) == 1, (spec, r.stderr)



def test_a_switch_whose_socket_path_cannot_exist_is_refused_at_create_and_run(build_c_guest):
    """Issue 14 defect 7 (its second way in): a long runtime dir plus a long switch name made a socket path past the
    unix limit.  create --start succeeded and the guest ran with a NIC whose switch could never start ('stopped'),
    and hvctl run ended with exit 1 and ZeroMQ's message.  Both now refuse it: exit 2, one line, nothing created."""
    spin = build_c_guest("long guest_main(long i, long n, long k) { for (;;) __asm__ volatile(\"pause\"); }")
    rundir = "/tmp/hv-long-" + "x" * (65 - len("/tmp/hv-long-"))       # fits the guests' sockets, not the switch's
    shutil.rmtree(rundir, ignore_errors=True)
    os.makedirs(rundir, mode=0o700)
    sup = Supervisor(rundir)
    try:
        long_switch = "switch:" + "s" * 32
        r = sup.hvctl("create", "g", "--kernel", spin, "--boot", "raw64", "--net", long_switch, "--start")
        assert r.returncode == 2 and "more than a unix socket allows" in r.stderr and len(r.stderr.splitlines()) == 1
        assert sup.hvctl("list", "--json", check=0).stdout.strip() == "[]"
        r = subprocess.run([*HVCTL, "run", "--kernel", spin, "--boot", "raw64", "--net", long_switch, "--timeout", "5"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "HV_RUNTIME_DIR": rundir})
        assert r.returncode == 2 and "use a shorter switch name" in r.stderr and len(r.stderr.splitlines()) == 1
        sup.hvctl("create", "g", "--kernel", spin, "--boot", "raw64", "--net", "switch:" + "s" * 28, "--start",
                  check=0)                                               # 4 characters fewer fit
        wait_for(lambda: sup.info("g")["devices"].get("switch:" + "s" * 28, {}).get("state") == "running", 20)
    finally:
        sup.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def test_hvctl_run_makes_its_switch_dir_private_even_under_umask_000(build_c_guest, tmp_path):
    """Re-checking issue 14 defect 5 (runtime dir safety rested on the umask): the supervisor's dir was fixed, but
    `hvctl run --net switch:` made the default runtime dir itself, with os.makedirs: under umask 000 the dir and
    the switch's socket were 0777, so any local user could connect to the switch and read and inject the guests'
    frames.  It now makes the dir as the supervisor does: 0700, or refused if another user's."""
    import stat
    spin = build_c_guest("long guest_main(long i, long n, long k) { for (;;) __asm__ volatile(\"pause\"); }")
    os.chmod(tmp_path, 0o755)
    rundir = str(tmp_path / "rt")
    env = {**os.environ, "HV_RUNTIME_DIR": rundir}
    r = subprocess.run([*HVCTL, "run", "--kernel", spin, "--boot", "raw64", "--net", "switch:lab", "--timeout", "2"],
                       env=env, umask=0, capture_output=True, timeout=60)
    assert r.returncode == 124, r.stderr
    assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
    os.chmod(rundir, 0o777)                                    # a dir others can write to is refused
    r = subprocess.run([*HVCTL, "run", "--kernel", spin, "--boot", "raw64", "--net", "switch:lab", "--timeout", "2"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "writable by others" in r.stderr and len(r.stderr.splitlines()) == 1
