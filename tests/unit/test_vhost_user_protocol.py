"""vhost-user: the protocol codec (proto/vhost_user.py), and the front end (devices/virtio/vhost_user.py) against
the Python back end of tests/support/vhost_backend.py over a socketpair: the handshake, what the guest is
offered, memory and rings handed over and served, pause/resume and reset through GET/SET_VRING_BASE, and a back
end that breaks the protocol, refuses, goes silent or hangs up."""
import os
import struct
import time

import pytest

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, Eventfds, TransportEvents, Unsupported
from pyhv.devices.virtio.queue import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, QueueConfigError
from pyhv.devices.virtio.vhost_user import MAX_QUEUES, VhostUserBlk, VhostUserFs, _host_address
from pyhv.proto import vhost_user as vu
from pyhv.proto.device_service import QueueConfig
from pyhv.proto.errors import PeerFailed, UserError
from pyhv.proto.guest import DeviceSpec
from ringdriver import RingDriver
from vhost_backend import DEFAULT_FEATURES, DEFAULT_PROTOCOL, FILL, FakeBackend

RAM = 16 << 20
BLK_MQ = 1 << 12
WAIT = 10.0


def blk_config(capacity=2048, num_queues=2):
    c = bytearray(60)
    c[0:8] = capacity.to_bytes(8, "little")
    c[34:36] = num_queues.to_bytes(2, "little")
    return bytes(c)


def rings(i):
    base = 0x10000 + i * 0x4000
    return base, base + 0x1000, base + 0x2000


class Events(TransportEvents):
    def __init__(self):
        self.resets = []

    def needs_reset(self, reason):
        self.resets.append(reason)


def wait_for(cond, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def mem():
    fd = create_memfd(RAM)
    m = GuestMemory(fd, RAM)
    yield m
    m.close()
    os.close(fd)


class Setup:
    """A front end of `cls` on a FakeBackend, with its eventfds and a transport stand-in."""

    def __init__(self, cls=VhostUserBlk, timeout=2.0, features=DEFAULT_FEATURES | BLK_MQ, **backend):
        backend.setdefault("config", blk_config())
        ours, self.backend = FakeBackend.pair(features=features, **backend)
        extra = {"tag": "share"} if cls is VhostUserFs else {}
        try:
            self.dev = cls(ours, path="fake.sock", timeout=timeout, **extra)
        except BaseException:
            self.backend.stop()
            raise
        self.eventfds = Eventfds.create(self.dev.num_queues)
        self.events = Events()
        self.dev.attach(self.events, self.eventfds)

    def queues(self, n=None, vector=True):
        return [QueueConfig(i, 8, *rings(i), i if vector else 0xFFFF) for i in range(n or self.dev.num_queues)]

    def close(self):
        self.dev.close()
        self.backend.stop()
        self.eventfds.close()
        assert self.backend.error is None, self.backend.error


@pytest.fixture
def blk():
    s = Setup()
    yield s
    s.close()


def served_once(s, mem, queue=0, payload=b"hello"):
    """Post one chain (readable payload, 16 writable bytes) on `queue`, kick it, wait for it to be used."""
    drv = RingDriver(mem, 8, rings(queue))
    mem.write(0x100000, payload)
    drv.post([(0x100000, len(payload), False), (0x101000, 16, True)])
    os.eventfd_write(s.eventfds.notify_fd(queue), 1)
    drv.wait_used()
    assert mem.read(0x101000, 16) == payload[::-1] + bytes([FILL]) * (16 - len(payload))
    return drv


# -- the codec -------------------------------------------------------------------------------

def test_requests_are_a_native_header_and_a_payload():
    assert vu.message(vu.SET_OWNER) == struct.pack("<III", 3, 1, 0)
    assert vu.message(vu.SET_FEATURES, vu.u64(5), need_reply=True) == struct.pack("<IIIQ", 2, 1 | 8, 8, 5)
    assert vu.vring_addr(1, 0x10, 0x20, 0x30) == struct.pack("<IIQQQQ", 1, 0, 0x10, 0x20, 0x30, 0)
    assert vu.vring_fd(3, has_fd=False) == struct.pack("<Q", 3 | 0x100)
    assert vu.mem_table([(0, 4096, 0x7f00, 0)]) == struct.pack("<IIQQQQ", 1, 0, 0, 4096, 0x7f00, 0)
    with pytest.raises(ValueError):
        vu.mem_table([(0, 1, 2, 3)] * 9)
    assert vu.config(0, 4) == struct.pack("<III", 0, 4, 0) + bytes(4)


@pytest.mark.parametrize("header, error", [
    (struct.pack("<III", 1, 2 | 4, 8), "protocol version 2"),
    (struct.pack("<III", 1, 1, 8), "without the reply flag"),
    (struct.pack("<III", 1, 1 | 4, 1 << 20), "announces 1048576 bytes"),
    (b"\0" * 11, "header of 11 bytes"),
])
def test_a_bad_reply_header_is_refused(header, error):
    with pytest.raises(vu.BackendBroke, match=error):
        vu.parse_header(header)


def test_reply_payloads_are_checked():
    assert vu.parse_header(vu.reply(1, vu.u64(7))[:12]) == (1, 1 | 4, 8)
    assert vu.parse_u64(vu.GET_FEATURES, vu.GET_FEATURES, vu.u64(7)) == 7
    with pytest.raises(vu.BackendBroke, match="answered GET_PROTOCOL_FEATURES to GET_FEATURES"):
        vu.parse_u64(vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, vu.u64(7))
    with pytest.raises(vu.BackendBroke, match="has 4 bytes"):
        vu.parse_u64(vu.GET_FEATURES, vu.GET_FEATURES, b"\0" * 4)
    with pytest.raises(vu.BackendBroke, match="refused SET_OWNER"):
        vu.parse_ack(vu.SET_OWNER, vu.SET_OWNER, vu.u64(1))
    assert vu.parse_vring_state(vu.GET_VRING_BASE, vu.GET_VRING_BASE, vu.vring_state(2, 9), 2) == 9
    with pytest.raises(vu.BackendBroke, match="names ring 3"):
        vu.parse_vring_state(vu.GET_VRING_BASE, vu.GET_VRING_BASE, vu.vring_state(3, 9), 2)
    with pytest.raises(vu.BackendBroke, match="not a 16-bit"):
        vu.parse_vring_state(vu.GET_VRING_BASE, vu.GET_VRING_BASE, vu.vring_state(2, 1 << 16), 2)
    assert vu.parse_config(vu.GET_CONFIG, vu.config(0, 4, b"abcd"), 0, 4) == b"abcd"
    with pytest.raises(vu.BackendBroke, match="refused GET_CONFIG"):
        vu.parse_config(vu.GET_CONFIG, b"", 0, 4)
    with pytest.raises(vu.BackendBroke, match="answered with 4 at 8"):
        vu.parse_config(vu.GET_CONFIG, vu.config(8, 4, b"abcd"), 0, 4)


# -- the handshake ----------------------------------------------------------------------------

def test_the_handshake_negotiates_and_offers_the_guest_only_what_pyhv_carries(blk):
    d, b = blk.dev, blk.backend
    assert b.requests() == [vu.GET_FEATURES, vu.GET_PROTOCOL_FEATURES, vu.SET_PROTOCOL_FEATURES, vu.SET_OWNER,
                            vu.GET_QUEUE_NUM, vu.GET_CONFIG]
    flags = {r: f for r, f, _, _ in b.log}
    assert flags[vu.SET_OWNER] & vu.FLAG_NEED_REPLY and not flags[vu.GET_CONFIG] & vu.FLAG_NEED_REPLY
    assert b.acked_protocol == vu.PF_MQ | vu.PF_REPLY_ACK | vu.PF_CONFIG        # SLAVE_REQ declined
    assert b.owner
    # no bit 30, no dirty logging, no packed ring; the ring features and blk's MQ pass
    assert d.features == VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC | BLK_MQ
    assert (d.device_type, d.num_queues, d.queue_max_sizes) == (2, 2, (256, 256))
    assert d.config_bytes() == blk_config()
    assert d.status().state == "running" and d.status().pid == os.getpid()


def test_more_queues_than_pyhv_takes_are_capped_in_the_config():
    s = Setup(config=blk_config(num_queues=40), queue_num=64)
    try:
        assert s.dev.num_queues == MAX_QUEUES
        assert int.from_bytes(s.dev.config_bytes()[34:36], "little") == MAX_QUEUES
    finally:
        s.close()


@pytest.mark.parametrize("backend, error", [
    ({"features": DEFAULT_FEATURES & ~(1 << 32)}, "offers no VIRTIO_F_VERSION_1"),
    ({"protocol_features": vu.PF_REPLY_ACK}, "offers no CONFIG protocol feature"),
    ({"config": blk_config(num_queues=8), "queue_num": 4}, "config says 8 queues, GET_QUEUE_NUM 4"),
    ({"misbehave": {vu.GET_FEATURES: "wrong-request"}}, "answered SET_FEATURES to GET_FEATURES"),
    ({"misbehave": {vu.GET_FEATURES: "no-reply-flag"}}, "without the reply flag"),
    ({"misbehave": {vu.GET_FEATURES: "bad-version"}}, "protocol version 2"),
    ({"misbehave": {vu.GET_FEATURES: "fds"}}, "sent file descriptors with its reply to GET_FEATURES"),
    ({"misbehave": {vu.GET_CONFIG: "short"}}, "reply to GET_CONFIG has 71 bytes"),
    ({"misbehave": {vu.GET_QUEUE_NUM: "huge"}}, "announces 1048576 bytes"),
    ({"misbehave": {vu.SET_OWNER: "nack"}}, "refused SET_OWNER"),
    ({"misbehave": {vu.SET_PROTOCOL_FEATURES: "close"}}, "closed the connection"),
    ({"misbehave": {vu.GET_PROTOCOL_FEATURES: "silent"}}, "no reply to GET_PROTOCOL_FEATURES within 0.3 s"),
])
def test_a_back_end_that_cannot_serve_or_breaks_the_protocol_is_refused_at_connection(backend, error):
    with pytest.raises(PeerFailed, match=error) as e:
        Setup(timeout=0.3, **backend)
    assert "vhost-user-blk back end" in str(e.value) and "fake.sock" in str(e.value)


# -- memory, rings, the data path ----------------------------------------------------------------

def test_activation_hands_over_guest_ram_and_the_rings_and_the_back_end_serves_them(blk, mem):
    d, b = blk.dev, blk.backend
    features = d.features
    d.activate(mem, features, blk.queues())
    assert b.acked_features == features | vu.F_PROTOCOL_FEATURES
    host = _host_address(mem.host_buffer())
    assert b.regions == [(0, RAM, host, 0)]                 # guest address, size, our user address, memfd offset
    assert [r for r in b.requests() if r not in (vu.SET_VRING_NUM, vu.SET_VRING_BASE, vu.SET_VRING_ADDR,
                                                 vu.SET_VRING_CALL, vu.SET_VRING_KICK, vu.SET_VRING_ENABLE)][-2:] \
        == [vu.SET_FEATURES, vu.SET_MEM_TABLE]
    assert all(f & vu.FLAG_NEED_REPLY for r, f, _, _ in b.log if r in (vu.SET_MEM_TABLE, vu.SET_VRING_KICK))
    assert [n for r, _, _, n in b.log if r == vu.SET_MEM_TABLE] == [1]
    assert b.rings[1].addr == (host + rings(1)[0], host + rings(1)[2], host + rings(1)[1])   # desc, used, avail
    for q in (0, 1):
        served_once(blk, mem, queue=q)
        assert os.eventfd_read(blk.eventfds.irq_fd(q)) >= 1          # the call fd is the queue vector's irq eventfd
    assert b.served == 2 and d.counters()["activations"] == 1


def test_a_queue_without_a_vector_gets_a_call_fd_nobody_reads(blk, mem):
    # libvhost-user back ends write their call fd whether or not the driver wants interrupts
    blk.dev.activate(mem, blk.dev.features, blk.queues(vector=False))
    call = [(vu.unpack_u64(p), n) for r, _, p, n in blk.backend.log if r == vu.SET_VRING_CALL]
    assert call == [(0, 1), (1, 1)]
    served_once(blk, mem)
    assert blk.backend.rings[0].call is not None
    for fd in blk.eventfds.irq:                                 # no vector was signalled
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)


def test_bad_rings_from_the_driver_are_refused_before_anything_is_sent(blk, mem):
    before = len(blk.backend.log)
    for q in (QueueConfig(0, 8, RAM - 16, *rings(0)[1:], 0), QueueConfig(0, 6, *rings(0), 0),
              QueueConfig(0, 8, rings(0)[0] + 8, *rings(0)[1:], 0), QueueConfig(5, 8, *rings(0), 0)):
        with pytest.raises(QueueConfigError):
            blk.dev.activate(mem, blk.dev.features, [q])
    assert len(blk.backend.log) == before and blk.dev.status().state == "running"


def test_pause_stops_the_rings_and_resume_restarts_them_where_they_stopped(blk, mem):
    d, b = blk.dev, blk.backend
    d.activate(mem, d.features, blk.queues())
    drv = served_once(blk, mem)
    d.pause()
    assert b.requests().count(vu.GET_VRING_BASE) == 2 and all(r.kick is None for r in b.rings.values())
    # posted and kicked while paused: the back end holds no kick fd, so nothing is served until resume
    drv.post([(0x100000, 5, False), (0x101000, 16, True)])
    os.eventfd_write(blk.eventfds.notify_fd(0), 1)
    assert drv.pending_used() == 0
    d.resume()
    bases = [vu.unpack_vring_state(p) for r, _, p, _ in b.log if r == vu.SET_VRING_BASE]
    assert bases[-2:] == [(0, 1), (1, 0)]                      # ring 0 had taken one chain
    drv.wait_used()
    assert b.served == 2 and (d.counters()["pauses"], d.counters()["resumes"]) == (1, 1)


def test_reset_stops_the_rings_and_the_driver_can_start_again(blk, mem):
    d, b = blk.dev, blk.backend
    d.activate(mem, d.features, blk.queues())
    d.reset()
    assert b.requests().count(vu.GET_VRING_BASE) == 2 and all(r.queue is None for r in b.rings.values())
    d.activate(mem, d.features, blk.queues())
    served_once(blk, mem)


def test_a_back_end_without_protocol_features_gets_a_round_trip_instead_of_acks(mem):
    s = Setup(VhostUserFs, features=VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX)
    try:
        d, b = s.dev, s.backend
        assert (d.device_type, d.num_queues, d.features) == (26, 2, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX)
        assert d.config_bytes() == b"share".ljust(36, b"\0") + struct.pack("<I", 1)   # tag, one request queue
        d.activate(mem, d.features, s.queues())
        assert vu.GET_PROTOCOL_FEATURES not in b.requests() and vu.SET_VRING_ENABLE not in b.requests()
        assert b.requests()[-1] == vu.GET_FEATURES                 # the barrier after the rings' set-up
        assert not any(f & vu.FLAG_NEED_REPLY for _, f, _, _ in b.log)
        served_once(s, mem, queue=1)
    finally:
        s.close()


# -- failures after the connection ----------------------------------------------------------------

def test_a_back_end_that_hangs_up_fails_the_device_and_the_driver_is_told(blk, mem):
    d = blk.dev
    d.activate(mem, d.features, blk.queues())
    blk.backend.hang_up()
    wait_for(lambda: d.status().state == "failed" and blk.events.resets, "the hang-up to be noticed")
    assert "closed the connection" in d.status().reason and "fake.sock" in d.status().reason
    assert blk.events.resets == [d.status().reason] and d.status().pid is None
    d.pause()
    d.resume()
    d.reset()                                                   # none of them raises or blocks
    with pytest.raises(QueueConfigError, match="closed the connection"):
        d.activate(mem, d.features, blk.queues())
    assert d.counters()["reason"] == d.status().reason


@pytest.mark.parametrize("bad", ["silent", "huge", "close"])
def test_a_back_end_that_fails_to_stop_a_ring_fails_the_device(mem, bad):
    s = Setup(timeout=0.3, misbehave={vu.GET_VRING_BASE: bad})
    try:
        d = s.dev
        d.activate(mem, d.features, s.queues())
        d.pause()
        wait_for(lambda: s.events.resets, "the driver to be told")
        assert d.status().state == "failed" and "GET_VRING_BASE" in d.status().reason
        d.resume()
        assert d.status().state == "failed"
    finally:
        s.close()


def test_a_refused_activation_fails_the_device_but_leaves_the_reset_to_the_transport(mem):
    s = Setup(misbehave={vu.SET_MEM_TABLE: "nack"})
    try:
        with pytest.raises(QueueConfigError, match="refused SET_MEM_TABLE"):
            s.dev.activate(mem, s.dev.features, s.queues())
        assert s.dev.status().state == "failed"
        wait_for(lambda: s.dev.sock.fileno() < 0, "the watcher to close the socket")
        assert s.events.resets == []
    finally:
        s.close()


def test_a_vhost_user_device_cannot_be_snapshotted(blk):
    with pytest.raises(Unsupported):
        blk.dev.snapshot()
    devices = [DeviceSpec("rng"), DeviceSpec("vhost-user", {"type": "blk", "socket": "/run/b.sock"})]
    with pytest.raises(UserError, match="guest g cannot be snapshotted or migrated: vhost-user0 .*back end process"):
        kinds.check_snapshottable(devices, "g")
    kinds.check_snapshottable(devices[:1], "g")


# -- the kind ---------------------------------------------------------------------------------------

def test_the_kind_parses_and_checks_its_option(tmp_path):
    k = kinds.kind("vhost-user")
    assert k.parse("blk,socket=/run/qsd.sock") == {"type": "blk", "socket": "/run/qsd.sock"}
    assert k.parse("fs,socket=/run/v.sock") == {"type": "fs", "socket": "/run/v.sock", "tag": "fs"}
    assert k.parse("fs,tag=share,socket=/run/v.sock")["tag"] == "share"
    for bad, error in (("nbd,socket=/x", "not one of blk, fs"), ("blk", "give socket=PATH"),
                       ("blk,socket=/x,tag=t", "for fs devices only"), ("fs,socket=/x,tag=" + "t" * 37, "1 to 36"),
                       ("blk,socket=/x,socket=/y", "bad option"), ("blk,path=/x", "bad option"),
                       ("blk,socket=/" + "s" * 120, "longer than a unix socket")):
        with pytest.raises(UserError, match=error):
            k.parse(bad)
    with pytest.raises(UserError, match="no back end listens on"):
        k.check_host({"type": "blk", "socket": str(tmp_path / "none.sock")})
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a unix socket"):
        k.check_host({"type": "blk", "socket": str(tmp_path / "file")})
    devices = [DeviceSpec("vhost-user", k.parse("blk,socket=/a")), DeviceSpec("vhost-user", k.parse("fs,socket=/b"))]
    assert [n for n, _, _ in kinds.named(devices)] == ["vhost-user0", "vhost-user1"]
    with pytest.raises(UserError, match="has no device service"):
        kinds.service_spec(devices, "vhost-user0", None, RAM, 1, None)
