"""Device-service processes: devices/service.py driven directly over ZeroMQ, and through RemoteBackend.

Guest RAM is a memfd shared with the service; a queue is laid out in it by a
small Python ring driver; kicks go through the notify eventfd and completions
come back on the used ring and the irq eventfd, as they would from KVM.
"""
import os
import select
import signal
import struct
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from pyhv.devices import service as S
from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio.backend import VIRTIO_F_VERSION_1, QueueConfig
from pyhv.devices.virtio.remote import RemoteBackend
from pyhv.proto import codec
from ringdriver import AVAIL, DESC, USED, RingDriver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAM = 16 << 20
HDR, STATUS, DATA = 0x20000, 0x20100, 0x100000
QSIZE = 8


def blk_read(drv, sector, n=512):
    drv.mem.write(HDR, struct.pack("<IIQ", 0, 0, sector))
    return drv.post([(HDR, 16, False), (DATA, n, True), (STATUS, 1, True)])


def irq_fired(fd, timeout=5):
    return bool(select.select([fd], [], [], timeout)[0]) and os.eventfd_read(fd) >= 1


@pytest.fixture
def guest():
    fd = create_memfd(RAM)
    mem = GuestMemory(fd, RAM)
    yield fd, mem
    mem.close()
    os.close(fd)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(b"".join(bytes([s]) * 512 for s in range(32)))
    return p


# --- the service process, driven directly ----------------------------------------------

class Raw:
    """A service spawned by hand: the fds by pass_fds; we bind control (PAIR) and events (PULL)."""

    def __init__(self, tmp_path, mem_fd, device, disk=None):
        self.notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irqs = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.life_r, self.life_w = os.pipe2(os.O_CLOEXEC)
        ctl, evt = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/e.sock"
        cmd = [sys.executable, "-m", "pyhv.devices.service", "--device", device, "--mem-size", str(RAM),
               "--mem-fd", str(mem_fd), "--control", ctl, "--events", evt, "--notify-fds", str(self.notify),
               "--irq-fds", ",".join(map(str, self.irqs)), "--lifeline", str(self.life_r)]
        if disk:
            cmd += ["--disk", disk]
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.RCVTIMEO, 20000)
        self.ctl.bind(ctl)
        self.evt = self.ctx.socket(zmq.PULL)
        self.evt.setsockopt(zmq.LINGER, 0)
        self.evt.setsockopt(zmq.RCVTIMEO, 5000)
        self.evt.bind(evt)
        self.proc = subprocess.Popen(cmd, pass_fds=[mem_fd, self.notify, *self.irqs, self.life_r],
                                     cwd=ROOT, start_new_session=True)

    def raw(self, data):
        self.ctl.send(data)
        return S.decode(self.ctl.recv())

    def call(self, msg):
        return self.raw(S.encode(msg))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.ctl.close()
        self.evt.close()
        self.ctx.term()
        for f in (self.notify, *self.irqs, self.life_r, self.life_w):
            try:
                os.close(f)
            except OSError:
                pass


def wire_queue(**kw):
    q = dict(index=0, size=QSIZE, desc=DESC, driver=AVAIL, device=USED, notify_fd=0, irq_fd=0, vector=0)
    q.update(kw)
    return S.WireQueue(**q)


@pytest.fixture
def raw_blk(tmp_path, guest, image):
    fd, mem = guest
    r = Raw(tmp_path, fd, "blk", str(image))
    yield r, mem
    r.close()


def test_describe_activate_kick_used_ring_and_irq(raw_blk):
    r, mem = raw_blk
    d = r.call(S.Describe())
    assert isinstance(d, S.Description)
    assert (d.device_type, d.num_queues, d.queue_max_sizes, d.restartable) == (2, 1, [128], True)
    assert d.features & VIRTIO_F_VERSION_1 and struct.unpack_from("<Q", d.config)[0] == 32
    assert isinstance(r.call(S.Activate(features=VIRTIO_F_VERSION_1, queues=[wire_queue()])), S.Ok)
    drv = RingDriver(mem)
    head = blk_read(drv, 5)
    os.eventfd_write(r.notify, 1)
    assert drv.wait_used() == (head, 513)
    assert mem.read(DATA, 512) == bytes([5]) * 512 and mem.read(STATUS, 1) == b"\0"
    assert irq_fired(r.irqs[0])
    c = r.call(S.GetCounters()).counters
    assert (c["requests"], c["read_bytes"], c["kicks"], c["interrupts"]) == (1, 512, 1, 1)
    assert c["pid"] == r.proc.pid
    assert isinstance(r.call(S.Reset()), S.Ok)
    assert isinstance(r.call(S.Shutdown()), S.Ok)
    assert r.proc.wait(10) == 0


@pytest.mark.parametrize("data, words", [
    (b"\xc1garbage", "not a msgpack message"),
    (msgpack.packb([1, 2, 3]), "not a protocol envelope"),
    (msgpack.packb({"v": 1, "type": "Launch", "fields": {}}), "unknown message type"),
    (msgpack.packb({"v": 1, "type": "Ok", "fields": {}}), "unexpected message Ok"),
    (msgpack.packb({"v": 9, "type": "Describe", "fields": {}}), "version"),
    (S.encode(S.ConfigWrite(offset=1000, data=b"x")), "outside"),
    (msgpack.packb({"v": 1, "type": "ConfigWrite", "fields": {"offset": "0", "data": b""}}), "expected int"),
    (S.encode(S.Activate(features=1 << 32, queues=[wire_queue(notify_fd=3)])), "notify fd #3"),
    (S.encode(S.Activate(features=1 << 32, queues=[wire_queue(irq_fd=7)])), "irq fd #7"),
    (S.encode(S.Activate(features=1 << 32, queues=[wire_queue(index=4)])), "queue 4"),
    (S.encode(S.Activate(features=1 << 32, queues=[wire_queue(desc=RAM - 16)])), "outside guest RAM"),
    (S.encode(S.Activate(features=1 << 32, queues=[wire_queue(size=3)])), "power of two"),
])
def test_malformed_control_gets_a_one_line_error_and_the_service_keeps_serving(raw_blk, data, words):
    r, _ = raw_blk
    reply = r.raw(data)
    assert isinstance(reply, S.Error) and words in reply.message and "\n" not in reply.message
    assert isinstance(r.call(S.Describe()), S.Description)
    assert r.proc.poll() is None


def test_activate_twice_is_refused_then_reset_allows_it(raw_blk):
    r, _ = raw_blk
    act = S.Activate(features=VIRTIO_F_VERSION_1, queues=[wire_queue()])
    assert isinstance(r.call(act), S.Ok)
    e = r.call(act)
    assert isinstance(e, S.Error) and "twice" in e.message
    assert isinstance(r.call(S.Reset()), S.Ok) and isinstance(r.call(act), S.Ok)


def test_broken_avail_ring_sends_needs_reset_on_the_event_socket(raw_blk):
    r, mem = raw_blk
    r.call(S.Activate(features=VIRTIO_F_VERSION_1, queues=[wire_queue()]))
    mem.write_u16(AVAIL + 2, 100)
    os.eventfd_write(r.notify, 1)
    ev = S.decode(r.evt.recv())
    assert isinstance(ev, S.NeedsReset) and "avail.idx" in ev.reason


def test_lifeline_eof_ends_the_service(raw_blk):
    r, _ = raw_blk
    assert isinstance(r.call(S.Describe()), S.Description)
    os.close(r.life_w)
    assert r.proc.wait(10) == 0


def test_bad_command_line_exits_2_with_one_line(tmp_path, guest):
    fd, _ = guest
    p = subprocess.run([sys.executable, "-m", "pyhv.devices.service", "--device", "blk", "--mem-size", str(RAM),
                        "--mem-fd", str(fd), "--control", f"ipc://{tmp_path}/c", "--events", f"ipc://{tmp_path}/e",
                        "--disk", str(tmp_path / "nope.img")], pass_fds=[fd], cwd=ROOT, capture_output=True,
                       timeout=30)
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1 and b"nope.img" in p.stderr


# --- RemoteBackend: the worker side ------------------------------------------------------

class Events:
    def __init__(self):
        self.log = []

    def config_changed(self, config):
        self.log.append(("config", config))

    def needs_reset(self, reason):
        self.log.append(("reset", reason))


def remote(mem, device="blk", disk=None, **kw):
    rb = RemoteBackend(device, mem, disk=disk, **kw)
    ev = Events()
    rb.attach(ev)
    return rb, ev


def activate(rb, mem):
    n, i = rb.transport_eventfds()
    rb.activate(mem, VIRTIO_F_VERSION_1, [QueueConfig(0, QSIZE, DESC, AVAIL, USED, n[0], i[0], 0)])
    return n[0], i[0]


def wait_for(pred, timeout=15):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def test_remote_backend_describes_and_serves(guest, image):
    _, mem = guest
    rb, _ = remote(mem, disk=str(image))
    try:
        assert (rb.device_type, rb.num_queues, rb.queue_max_sizes) == (2, 1, (128,))
        assert struct.unpack_from("<Q", rb.config_bytes())[0] == 32
        notify, irq = activate(rb, mem)
        drv = RingDriver(mem)
        head = blk_read(drv, 9)
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 4) == b"\x09" * 4
        assert irq_fired(irq)
        c = rb.counters()
        assert c["state"] == "running" and c["requests"] == 1 and c["restarts"] == 0
        rb.reset()
        assert rb.counters()["state"] == "running"
    finally:
        rb.close()
    assert rb.counters()["state"] == "stopped"


def test_paused_service_serves_nothing_until_resumed(guest, image):
    """Pausing a guest stops its device services' data paths; resume continues from used.idx."""
    _, mem = guest
    rb, _ = remote(mem, disk=str(image))
    try:
        notify, irq = activate(rb, mem)
        drv = RingDriver(mem)
        first = blk_read(drv, 3)
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (first, 513)
        rb.pause()
        assert rb.counters()["paused"] is True
        second = blk_read(drv, 5)
        os.eventfd_write(notify, 1)
        with pytest.raises(TimeoutError):
            drv.wait_used(timeout=0.5)                 # the kick waits in the eventfd
        rb.resume()
        assert drv.wait_used() == (second, 513) and mem.read(DATA, 4) == b"\x05" * 4
        assert rb.counters()["requests"] == 2 and rb.counters()["paused"] is False
    finally:
        rb.close()


def test_activate_refused_by_the_service_is_a_queue_config_error(guest, image):
    from pyhv.devices.virtio.queue import QueueConfigError
    _, mem = guest
    rb, _ = remote(mem, disk=str(image))
    try:
        n, i = rb.transport_eventfds()
        with pytest.raises(QueueConfigError, match="outside guest RAM"):
            rb.activate(mem, VIRTIO_F_VERSION_1, [QueueConfig(0, QSIZE, RAM - 16, AVAIL, USED, n[0], i[0], 0)])
        other = os.eventfd(0)
        with pytest.raises(QueueConfigError, match="eventfds"):
            rb.activate(mem, VIRTIO_F_VERSION_1, [QueueConfig(0, QSIZE, DESC, AVAIL, USED, other, None, 0)])
        os.close(other)
    finally:
        rb.close()


def test_kill_9_reports_failed_restarts_and_serves_the_request_in_flight(guest, image):
    _, mem = guest
    rb, ev = remote(mem, disk=str(image), restart_delay=0.5)
    try:
        notify, irq = activate(rb, mem)
        drv = RingDriver(mem)
        head = blk_read(drv, 1)
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (head, 513)
        old = rb.pid
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: rb.counters()["state"] == "failed")
        c = rb.counters()
        assert c["reason"] == f"service pid {old} killed by SIGKILL" and c["failures"] == 1
        head = blk_read(drv, 7)                        # posted and kicked while no service runs
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 512) == b"\x07" * 512
        assert irq_fired(irq)
        c = rb.counters()
        assert c["state"] == "running" and c["restarts"] == 1 and rb.pid != old
        assert c["service_resumes"] == 1
        head = blk_read(drv, 8)                        # and the next one, normally
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 1) == b"\x08"
        assert ev.log == []                            # a successful restart is silent
    finally:
        rb.close()


def test_chain_popped_but_not_completed_by_the_dead_service_is_served_again(guest, image):
    """SIGSTOP the service mid-flight: it has the chain (avail consumed) but never puts it."""
    _, mem = guest
    rb, _ = remote(mem, disk=str(image), timeout=1.0)
    try:
        notify, _ = activate(rb, mem)
        drv = RingDriver(mem)
        old = rb.pid
        os.kill(old, signal.SIGSTOP)
        head = blk_read(drv, 3)
        os.eventfd_write(notify, 1)
        assert rb.counters()["state"] == "running"     # the GetCounters round trip times out...
        wait_for(lambda: rb.pid not in (None, old))    # ...so the hung service is killed and replaced
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 1) == b"\x03"
        c = rb.counters()
        assert c["control_timeouts"] == 1 and "no reply to GetCounters" in c["reason"]
    finally:
        rb.close()


def test_restarts_are_bounded_then_the_device_needs_reset(guest, image):
    _, mem = guest
    rb, ev = remote(mem, disk=str(image), max_restarts=1)
    try:
        activate(rb, mem)
        os.kill(rb.pid, signal.SIGKILL)
        wait_for(lambda: rb.restarts == 1 and rb.state == "running")
        os.kill(rb.pid, signal.SIGKILL)
        wait_for(lambda: ev.log)
        assert ev.log[0][0] == "reset" and "not restarted" in ev.log[0][1]
        c = rb.counters()
        assert c["state"] == "failed" and c["failures"] == 2 and c["pid"] is None
        rb.reset()                                     # returns at once: nothing runs
        from pyhv.devices.virtio.queue import QueueConfigError
        with pytest.raises(QueueConfigError, match="failed"):
            activate(rb, mem)
    finally:
        rb.close()


def test_needs_reset_from_the_service_reaches_the_transport(guest):
    _, mem = guest
    rb, ev = remote(mem, device="rng")
    try:
        notify, _ = activate(rb, mem)
        mem.write_u16(AVAIL + 2, 100)
        os.eventfd_write(notify, 1)
        wait_for(lambda: ev.log)
        assert ev.log[0][0] == "reset" and "avail.idx" in ev.log[0][1]
    finally:
        rb.close()


def test_services_die_with_their_worker(tmp_path, image):
    """A worker killed with -9 leaves no service behind (the lifeline pipe)."""
    code = f"""
import os, sys, time
sys.path.insert(0, {ROOT!r})
from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio.remote import RemoteBackend
from pyhv.proto import codec
mem = GuestMemory(create_memfd({RAM}), {RAM})
rb = RemoteBackend("blk", mem, disk={str(image)!r})
print(rb.pid, flush=True)
time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        pid = int(p.stdout.readline())
        os.kill(pid, 0)
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break                          # exited; waiting for its new parent to reap it
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the service outlived its worker")
    finally:
        p.kill()
        p.stdout.close()


SAMPLES = [S.Describe(), S.Description(device_type=2, features=1 << 32 | 1 << 9, num_queues=1, queue_max_sizes=[128],
                                       config=b"\0" * 24, name="virtio-blk", restartable=True),
           S.ConfigWrite(offset=0, data=b"\1"), S.Activate(features=1 << 32, queues=[wire_queue(), wire_queue(irq_fd=None)]),
           S.Activate(features=0, queues=[], resume=True), S.Reset(), S.GetCounters(),
           S.Counters(counters={"requests": 1, "state": "running"}), S.Shutdown(),
           S.ConfigChanged(config=b"x"), S.NeedsReset(reason="r"), wire_queue(), S.Ok(), S.Error(kind="protocol", message="m")]


def test_every_service_message_round_trips_and_stays_out_of_the_supervisor_protocol():
    from pyhv.proto.messages import MESSAGES
    assert {type(m) for m in SAMPLES} == set(S.SERVICE_MESSAGES.values())
    for m in SAMPLES:
        assert S.decode(S.encode(m)) == m
    assert (set(S.SERVICE_MESSAGES) - {"Ok", "Error"}).isdisjoint(MESSAGES)
    with pytest.raises(Exception, match="unknown message type"):
        codec.decode(S.encode(S.Describe()))
