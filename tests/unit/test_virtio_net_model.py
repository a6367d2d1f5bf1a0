"""virtio-net without KVM: the model over guest RAM with a fake port, and the learning switch process over raw ZeroMQ."""
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time

import pytest
import zmq

from pyhv.devices.net.switch import ALREADY_SERVED
from pyhv.devices.virtio import net as N
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1
from pyhv.proto import runtime, switch as wire
from pyhv.proto.errors import UserError
from pyhv.proto.guest import parse_mac
from pyhv.vcpu_worker.launchers import switch_command
from ringdriver import RXBUF, RXTX_RAM as RAM, FakePort, RxTxGuest

MAC_A, MAC_B = bytes.fromhex("525400000001"), bytes.fromhex("525400000002")
ETHERTYPE = b"\x88\xb5"


def eth(dst, src, payload):
    return dst + src + ETHERTYPE + payload


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
    d = guest.attach(N.VirtioNet(MAC_A, FakePort()))
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
    assert parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:01", "01:00:5e:00:00:01", "525400abcd01", None):
        with pytest.raises(UserError):
            parse_mac(bad)


def test_rx_backlog_is_model_state_that_a_restore_brings_back(guest):
    d = guest.attach(N.VirtioNet(MAC_A, FakePort()))
    try:
        d.deliver(eth(MAC_A, MAC_B, b"kept"))
        state = d.model_state()
        e = guest.attach(N.VirtioNet(MAC_A, FakePort()))
        e.restore_model_state({"rx": state["rx"] + [b"runt"]})
        assert e.counters()["rx_backlog"] == 1
        e.close()
    finally:
        d.close()


# --- the switch -----------------------------------------------------------------------------

@pytest.fixture
def switch_dir():
    d = tempfile.mkdtemp(prefix="hv-sw-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start_switch(d, name="lan"):
    p = subprocess.Popen(switch_command(runtime.RuntimeDir(d), name), stderr=subprocess.PIPE, env=runtime.child_env())
    assert wait_for(lambda: os.path.exists(f"{d}/switch-{name}.sock")), "switch did not bind"
    return p


def port(ctx, d, name="lan"):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.connect(runtime.RuntimeDir(d).switch_endpoint(name))
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
    sw = start_switch(switch_dir)
    try:
        r = subprocess.run(switch_command(runtime.RuntimeDir(switch_dir), "lan"), capture_output=True, text=True,
                           timeout=20, env=runtime.child_env())
        assert r.returncode == ALREADY_SERVED and "already served" in r.stderr
        assert sw.poll() is None
    finally:
        sw.terminate()
        sw.wait(5)
