"""virtio-net: the model over guest RAM, the ZeroMQ switch, and real guests talking through a switch and a TAP.

The model tests drive VirtioNet in this process with the Python ring driver
and a fake port.  The switch tests talk to a `pyhv.devices.net_switch` process
with raw ZeroMQ sockets.  The guest tests run tests/guests/virtio_net_driver.c
(a ring-0 driver that broadcasts HELLO and answers ACK) in two guests on one
switch, standalone and under a supervisor, and one guest on a TAP interface
answered by the test through an AF_PACKET socket.
"""
import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import zmq

from conftest import HVCTL
from pyhv.devices.virtio import net as N
from pyhv.devices.virtio.backend import VIRTIO_F_VERSION_1
from pyhv.proto import switch as wire
from ringdriver import RXBUF, RXTX_RAM as RAM, RxTxGuest
from test_supervisor import Supervisor

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = (pathlib.Path(__file__).parent / "guests" / "virtio_net_driver.c").read_text()
MAC_A, MAC_B = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
ETHERTYPE = b"\x88\xb5"


def eth(dst, src, payload):
    return dst + src + ETHERTYPE + payload


class FakePort:
    def __init__(self):
        self.sent = []

    def send(self, frame):
        self.sent.append(bytes(frame))

    def counters(self):
        return {"backend": "fake"}

    def close(self):
        pass


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def guest():
    g = RxTxGuest()
    yield g
    g.close()


@pytest.fixture
def nic(guest):
    d = N.VirtioNet(MAC_A, FakePort())
    d.activate(guest.mem, d.features, guest.queues())
    yield d
    d.close()


# --- the model ------------------------------------------------------------------------------

def test_description_offers_mac_and_link_status():
    d = N.VirtioNet(MAC_A)
    try:
        assert d.device_type == 1 and d.num_queues == 2
        assert d.features == VIRTIO_F_VERSION_1 | N.VIRTIO_NET_F_MAC | N.VIRTIO_NET_F_STATUS
        assert d.config_bytes() == MAC_A + struct.pack("<HH", N.VIRTIO_NET_S_LINK_UP, 1)
    finally:
        d.close()


def test_transmit_strips_the_header_and_sends_the_frame(guest, nic):
    frame = eth(b"\xff" * 6, MAC_A, b"payload" * 10)
    head = guest.send(b"\0" * N.HDR_LEN, frame)          # header and frame in separate buffers
    assert guest.tx.wait_used() == (head, 0)
    assert nic.port.sent == [frame]
    assert nic.counters()["tx_frames"] == 1 and nic.counters()["tx_bytes"] == len(frame)


def test_transmit_refuses_runt_and_oversized_frames(guest, nic):
    runt = guest.send(b"\0" * N.HDR_LEN + b"short", at=0)
    huge = guest.send(b"\0" * N.HDR_LEN + b"x" * (N.MAX_FRAME + 1), at=1)
    assert sorted([guest.tx.wait_used(), guest.tx.wait_used()]) == sorted([(runt, 0), (huge, 0)])
    good = guest.send(b"\0" * N.HDR_LEN + eth(MAC_B, MAC_A, b"ok"), at=2)
    assert guest.tx.wait_used() == (good, 0)
    assert nic.port.sent == [eth(MAC_B, MAC_A, b"ok")]
    assert nic.counters()["tx_errors"] == 2


def test_received_frames_wait_for_buffers_and_get_a_header(guest, nic):
    frames = [eth(MAC_A, MAC_B, bytes([i]) * 50) for i in range(3)]
    for f in frames:
        nic.deliver(f)
    assert nic.counters()["rx_backlog"] == 3
    for slot, f in enumerate(frames):
        head, addr = guest.post_rx(2048, slot)
        assert guest.rx.wait_used() == (head, N.HDR_LEN + len(f))
        hdr = guest.mem.read(addr, N.HDR_LEN)
        assert struct.unpack("<BBHHHHH", hdr)[-1] == 1      # num_buffers
        assert guest.mem.read(addr + N.HDR_LEN, len(f)) == f
        assert guest.mem.read(addr + N.HDR_LEN + len(f), 1) == b"\xEE"     # nothing past the frame
    assert nic.counters()["rx_frames"] == 3 and nic.counters()["rx_backlog"] == 0


def test_receive_buffer_too_small_drops_the_frame_not_the_queue(guest, nic):
    small, _ = guest.post_rx(40, 0)
    nic.deliver(eth(MAC_A, MAC_B, b"z" * 100))
    assert guest.rx.wait_used() == (small, 0)
    assert guest.mem.read(RXBUF, 40) == b"\xEE" * 40       # nothing written into it
    nic.deliver(eth(MAC_A, MAC_B, b"next"))
    good, _ = guest.post_rx(2048, 1)
    assert guest.rx.wait_used() == (good, N.HDR_LEN + 18)
    assert nic.counters()["rx_errors"] == 1


def test_backlog_is_bounded_and_malformed_frames_are_dropped(guest):
    d = N.VirtioNet(MAC_A, FakePort(), rx_backlog=4)
    try:
        for i in range(10):
            d.deliver(eth(MAC_A, MAC_B, bytes([i]) * 20))
        d.deliver(b"tiny")
        c = d.counters()
        assert (c["rx_backlog"], c["rx_dropped"]) == (4, 7)
    finally:
        d.close()


def test_hostile_receive_chain_outside_ram_is_returned_and_the_device_goes_on(guest, nic):
    bad = guest.rx.post([(RAM - 8, 2048, True)])
    nic.deliver(eth(MAC_A, MAC_B, b"a" * 30))
    os.eventfd_write(guest.notify[0], 1)
    assert guest.rx.wait_used() == (bad, 0)
    nic.deliver(eth(MAC_A, MAC_B, b"b" * 30))
    for slot, fill in ((1, b"a"), (2, b"b")):              # the bad chain cost no frame
        good, addr = guest.post_rx(2048, slot)
        assert guest.rx.wait_used() == (good, N.HDR_LEN + 44)
        assert guest.mem.read(addr + N.HDR_LEN + 14, 30) == fill * 30
    assert nic.counters()["chain_errors"] == 1


def test_mac_parsing_rejects_garbage_and_multicast():
    assert N.parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:01", "01:00:5e:00:00:01", "525400abcd01"):
        with pytest.raises(ValueError):
            N.parse_mac(bad)


# --- the switch -----------------------------------------------------------------------------

@pytest.fixture
def switch_dir():
    d = tempfile.mkdtemp(prefix="hv-sw-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_switch(d, name="lan"):
    p = subprocess.Popen([sys.executable, "-m", "pyhv.devices.net_switch", "--dir", d, "--name", name],
                         stderr=subprocess.PIPE, cwd=ROOT)
    assert wait_for(lambda: os.path.exists(f"{d}/switch-{name}.sock")), "switch did not bind"
    return p


def port(ctx, d, name="lan"):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.connect(wire.endpoint(d, name))
    s.send_multipart(wire.hello())
    return s


def test_switch_floods_then_learns_and_drops_garbage(switch_dir):
    sw = start_switch(switch_dir)
    ctx = zmq.Context()
    try:
        a, b, c = (port(ctx, switch_dir) for _ in range(3))
        time.sleep(0.3)                                        # hellos reach the switch
        # garbage from a: counted and dropped, the switch goes on
        a.send_multipart([b"nonsense"])
        a.send_multipart([wire.FRAME_TAG, b"x" * 5])
        a.send_multipart([b"pyhv-sw\x09F", eth(MAC_B, MAC_A, b"v9")])
        # a broadcast from a reaches b and c, not a
        bcast = eth(b"\xff" * 6, MAC_A, b"hello all")
        a.send_multipart(wire.frame(bcast))
        assert wire.decode(b.recv_multipart()) == ("frame", bcast)
        assert wire.decode(c.recv_multipart()) == ("frame", bcast)
        # b answers a by unicast: the switch learned MAC_A -> a, so c gets nothing
        reply = eth(MAC_A, MAC_B, b"hi a")
        b.send_multipart(wire.frame(reply))
        assert wire.decode(a.recv_multipart()) == ("frame", reply)
        c.setsockopt(zmq.RCVTIMEO, 300)
        with pytest.raises(zmq.Again):
            c.recv_multipart()
        assert wait_for(lambda: json.load(open(f"{switch_dir}/switch-lan.json"))["malformed"] == 3, 5)
        stats = json.load(open(f"{switch_dir}/switch-lan.json"))
        assert stats["unicast"] == 1 and stats["flooded"] == 1 and stats["ports"] == 3
        assert sw.poll() is None
    finally:
        ctx.destroy(0)
        sw.terminate()
        sw.wait(5)


def test_a_second_switch_for_the_same_name_exits_at_once(switch_dir):
    from pyhv.devices.net_switch import ALREADY_SERVED
    sw = start_switch(switch_dir)
    try:
        r = subprocess.run([sys.executable, "-m", "pyhv.devices.net_switch", "--dir", switch_dir, "--name", "lan"],
                           capture_output=True, text=True, timeout=20, cwd=ROOT)
        assert r.returncode == ALREADY_SERVED and "already served" in r.stderr
        assert sw.poll() is None
    finally:
        sw.terminate()
        sw.wait(5)


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
        assert info["config"]["nets"] == ["switch:lab,mac=52:54:00:00:aa:01"]
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
        assert wait_for(lambda: sup.info("k1")["devices"]["virtio-net0"].get("restarts") == 1, 20)
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
        assert wait_for(lambda: sup.info("k2")["devices"]["switch:lab"]["restarts"] == 1, 20)
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

