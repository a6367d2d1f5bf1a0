"""Device-service processes: devices/virtio/service.py driven directly over ZeroMQ, and through ServiceProxy.

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

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, Eventfds
from pyhv.devices.virtio.proxy import ServiceProxy
from pyhv.devices.virtio.queue import QueueConfigError
from pyhv.proto import codec, device_service as S, runtime
from pyhv.proto.guest import DeviceSpec, GuestConfig
from pyhv.proto.messages import Error, Ok
from pyhv.vcpu_worker.launchers import LocalLauncher, service_command
from ringdriver import AVAIL, DESC, USED, RingDriver

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

def encode(msg):
    return codec.encode(msg, S.SERVICE)


def decode(data):
    return codec.decode(data, S.SERVICE)


class Raw:
    """A service spawned by hand from a ServiceSpec: fds by pass_fds; we bind control (PAIR) and events (PULL)."""

    def __init__(self, tmp_path, mem_fd, kind, options):
        self.options = options
        self.notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.irqs = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        self.life_r, self.life_w = os.pipe2(os.O_CLOEXEC)
        ctl, evt = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/e.sock"
        fds = S.ServiceFds(mem_fd, self.life_r, [self.notify], self.irqs)
        spec = S.ServiceSpec(kind=kind, name=f"virtio-{kind}0", mem_size=RAM, control=ctl, events=evt,
                             options=options, fds=fds)
        self.ctx = zmq.Context()
        self.ctl = self.ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.RCVTIMEO, 20000)
        self.ctl.bind(ctl)
        self.evt = self.ctx.socket(zmq.PULL)
        self.evt.setsockopt(zmq.LINGER, 0)
        self.evt.setsockopt(zmq.RCVTIMEO, 5000)
        self.evt.bind(evt)
        self.proc = subprocess.Popen(service_command(spec), pass_fds=fds.all(), env=runtime.child_env(),
                                     start_new_session=True)

    def raw(self, data):
        self.ctl.send(data)
        return decode(self.ctl.recv())

    def call(self, msg):
        return self.raw(encode(msg))

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


def queue(**kw):
    q = dict(index=0, size=QSIZE, desc=DESC, driver=AVAIL, device=USED, vector=0)
    q.update(kw)
    return S.QueueConfig(**q)


@pytest.fixture
def raw_blk(tmp_path, guest, image):
    fd, mem = guest
    r = Raw(tmp_path, fd, "blk", {"path": str(image)})
    yield r, mem
    r.close()


def test_describe_activate_kick_used_ring_and_irq(raw_blk):
    r, mem = raw_blk
    d = r.call(S.Describe())
    assert isinstance(d, S.Description)
    assert (d.device_type, d.num_queues, d.queue_max_sizes) == (2, 1, [128])
    assert d.features & VIRTIO_F_VERSION_1 and struct.unpack_from("<Q", d.config)[0] == 32
    assert isinstance(r.call(S.Activate(features=VIRTIO_F_VERSION_1, queues=[queue()])), Ok)
    drv = RingDriver(mem)
    head = blk_read(drv, 5)
    os.eventfd_write(r.notify, 1)
    assert drv.wait_used() == (head, 513)
    assert mem.read(DATA, 512) == bytes([5]) * 512 and mem.read(STATUS, 1) == b"\0"
    assert irq_fired(r.irqs[0])
    c = r.call(S.GetCounters()).counters
    assert (c["requests"], c["read_bytes"], c["kicks"], c["interrupts"]) == (1, 512, 1, 1)
    assert c["pid"] == r.proc.pid
    assert isinstance(r.call(S.Reset()), Ok)
    assert isinstance(r.call(S.Shutdown()), Ok)
    assert r.proc.wait(10) == 0


@pytest.mark.parametrize("data, words", [
    (b"\xc1garbage", "not a msgpack message"),
    (msgpack.packb([1, 2, 3]), "not a protocol envelope"),
    (msgpack.packb({"v": 1, "type": "Launch", "fields": {}}), "unknown message type"),
    (msgpack.packb({"v": 1, "type": "Ok", "fields": {}}), "unexpected message Ok"),
    (msgpack.packb({"v": 9, "type": "Describe", "fields": {}}), "version"),
    (encode(S.ConfigWrite(offset=1000, data=b"x")), "outside"),
    (msgpack.packb({"v": 1, "type": "ConfigWrite", "fields": {"offset": "0", "data": b""}}), "expected int"),
    (encode(S.Activate(features=1 << 32, queues=[queue(index=4)])), "queue 4"),
    (encode(S.Activate(features=1 << 32, queues=[queue(size=256)])), "queue 0 of size 256"),
    (encode(S.Activate(features=1 << 32, queues=[queue(desc=RAM - 16)])), "outside guest RAM"),
    (encode(S.Activate(features=1 << 32, queues=[queue(size=3)])), "power of two"),
])
def test_malformed_control_gets_a_one_line_error_and_the_service_keeps_serving(raw_blk, data, words):
    r, _ = raw_blk
    reply = r.raw(data)
    assert isinstance(reply, Error) and words in reply.message and "\n" not in reply.message
    assert isinstance(r.call(S.Describe()), S.Description)
    assert r.proc.poll() is None


def test_activate_twice_is_refused_then_reset_allows_it(raw_blk):
    r, _ = raw_blk
    act = S.Activate(features=VIRTIO_F_VERSION_1, queues=[queue()])
    assert isinstance(r.call(act), Ok)
    e = r.call(act)
    assert isinstance(e, Error) and "twice" in e.message
    assert isinstance(r.call(S.Reset()), Ok) and isinstance(r.call(act), Ok)


def test_broken_avail_ring_sends_needs_reset_on_the_event_socket(raw_blk):
    r, mem = raw_blk
    r.call(S.Activate(features=VIRTIO_F_VERSION_1, queues=[queue()]))
    mem.write_u16(AVAIL + 2, 100)
    os.eventfd_write(r.notify, 1)
    ev = decode(r.evt.recv())
    assert isinstance(ev, S.NeedsReset) and "avail.idx" in ev.reason


def test_lifeline_eof_ends_the_service(raw_blk):
    r, _ = raw_blk
    assert isinstance(r.call(S.Describe()), S.Description)
    os.close(r.life_w)
    assert r.proc.wait(10) == 0


def test_a_paused_service_keeps_its_queue_snapshots_and_a_new_one_restores_it(tmp_path, raw_blk, guest):
    r, mem = raw_blk
    r.call(S.Activate(features=VIRTIO_F_VERSION_1, queues=[queue()]))
    drv = RingDriver(mem)
    e = r.call(S.Snapshot())
    assert isinstance(e, Error) and "pause it first" in e.message
    assert isinstance(r.call(S.PauseDevice()), Ok)
    head = blk_read(drv, 4)
    os.eventfd_write(r.notify, 1)
    with pytest.raises(TimeoutError):
        drv.wait_used(timeout=0.3)                     # paused: the kick waits in the eventfd
    state = r.call(S.Snapshot()).state
    assert (state.features, len(state.queues)) == (VIRTIO_F_VERSION_1, 1)
    assert (state.queues[0].last_avail_idx, state.queues[0].used_idx, state.queues[0].config) == (0, 0, queue())
    r.close()
    fd, _ = guest
    (tmp_path / "2").mkdir()
    r2 = Raw(tmp_path / "2", fd, "blk", r.options)
    try:
        assert isinstance(r2.call(S.Restore(state=state)), Ok)
        os.eventfd_write(r2.notify, 1)
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 512) == bytes([4]) * 512
    finally:
        r2.close()


def test_bad_spec_exits_2_with_one_line(tmp_path, guest):
    fd, _ = guest
    spec = S.ServiceSpec(kind="blk", name="virtio-blk0", mem_size=RAM, control=f"ipc://{tmp_path}/c",
                         events=f"ipc://{tmp_path}/e", options={"path": str(tmp_path / "nope.img")},
                         fds=S.ServiceFds(fd, fd, [], []))
    p = subprocess.run(service_command(spec), pass_fds=[fd], env=runtime.child_env(), capture_output=True, timeout=30)
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1 and b"nope.img" in p.stderr
    p = subprocess.run(service_command(spec)[:-1] + ["not base64!"], env=runtime.child_env(), capture_output=True,
                       timeout=30)
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1 and b"bad --spec" in p.stderr


# --- ServiceProxy: the worker side ------------------------------------------------------

class Events:
    def __init__(self):
        self.log = []

    def config_changed(self, config):
        self.log.append(("config", config))

    def needs_reset(self, reason):
        self.log.append(("reset", reason))


@pytest.fixture
def host():
    h = runtime.PrivateDir()
    yield h
    h.remove()


def remote(mem, host, kind="blk", options=None, **kw):
    config = GuestConfig(name="t", kernel="/k", mem_bytes=RAM, devices=[DeviceSpec(kind, options or {})])
    (name, k, _), = kinds.named(config.devices)
    eventfds = Eventfds.create(k.model_class().num_queues)
    rb = ServiceProxy(k, name, mem, eventfds, LocalLauncher(config, host), **kw)
    ev = Events()
    rb.attach(ev, eventfds)
    rb.test_eventfds = eventfds
    return rb, ev


def activate(rb, mem):
    rb.activate(mem, VIRTIO_F_VERSION_1, [queue()])
    return rb.test_eventfds.notify_fd(0), rb.test_eventfds.irq_fd(0)


def wait_for(pred, timeout=15):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def test_remote_backend_describes_and_serves(guest, image, host):
    _, mem = guest
    rb, _ = remote(mem, host, options={"path": str(image)})
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


def test_paused_service_serves_nothing_until_resumed(guest, image, host):
    """Pausing a guest stops its device services' data paths; resume continues from used.idx."""
    _, mem = guest
    rb, _ = remote(mem, host, options={"path": str(image)})
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


def test_activate_refused_by_the_service_is_a_queue_config_error(guest, image, host):
    _, mem = guest
    rb, _ = remote(mem, host, options={"path": str(image)})
    try:
        with pytest.raises(QueueConfigError, match="outside guest RAM"):
            rb.activate(mem, VIRTIO_F_VERSION_1, [queue(desc=RAM - 16)])
    finally:
        rb.close()


def test_kill_9_reports_failed_restarts_and_serves_the_request_in_flight(guest, image, host):
    _, mem = guest
    rb, ev = remote(mem, host, options={"path": str(image)}, restart_delay=0.5)
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
        head = blk_read(drv, 8)                        # and the next one, normally
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 1) == b"\x08"
        assert ev.log == []                            # a successful restart is silent
    finally:
        rb.close()


def test_a_restart_waits_for_an_absent_launcher_without_using_up_restarts(guest, image, host):
    """No supervisor to start the service (killed, or being upgraded): the proxy asks again until one answers,
    then the device goes on from the used ring, its restart budget untouched and its endpoints reused."""
    from pyhv.devices.virtio.proxy import LauncherAbsent
    _, mem = guest
    asks = []

    class Away(LocalLauncher):
        absent = 0

        def start(self, device, incarnation, fds):
            asks.append(incarnation)
            if self.absent:
                self.absent -= 1
                raise LauncherAbsent("no supervisor serves services.sock")
            return super().start(device, incarnation, fds)

    config = GuestConfig(name="t", kernel="/k", mem_bytes=RAM, devices=[DeviceSpec("blk", {"path": str(image)})])
    (name, k, _), = kinds.named(config.devices)
    eventfds = Eventfds.create(k.model_class().num_queues)
    launcher = Away(config, host)
    rb = ServiceProxy(k, name, mem, eventfds, launcher, max_restarts=1)
    rb.attach(Events(), eventfds)
    rb.test_eventfds = eventfds
    try:
        notify, _ = activate(rb, mem)
        drv = RingDriver(mem)
        launcher.absent = 3
        os.kill(rb.pid, signal.SIGKILL)
        wait_for(lambda: "waiting to be restarted" in rb.status().reason)
        assert rb.status().state == "failed"
        head = blk_read(drv, 3)                        # posted while nobody can start the service
        os.eventfd_write(notify, 1)
        assert drv.wait_used() == (head, 513) and mem.read(DATA, 512) == b"\x03" * 512
        assert rb.status().state == "running" and rb.restarts == 1
        assert asks == [1, 2, 2, 2, 2]                 # nothing started for the absent asks: same endpoints
    finally:
        rb.close()


def test_chain_popped_but_not_completed_by_the_dead_service_is_served_again(guest, image, host):
    """SIGSTOP the service mid-flight: it has the chain (avail consumed) but never puts it."""
    _, mem = guest
    rb, _ = remote(mem, host, options={"path": str(image)}, timeout=1.0)
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


def test_restarts_are_bounded_then_the_device_needs_reset(guest, image, host):
    _, mem = guest
    rb, ev = remote(mem, host, options={"path": str(image)}, max_restarts=1)
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
        with pytest.raises(QueueConfigError, match="failed"):
            activate(rb, mem)
    finally:
        rb.close()


def test_needs_reset_from_the_service_reaches_the_transport(guest, host):
    _, mem = guest
    rb, ev = remote(mem, host, kind="rng")
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
from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.device import Eventfds
from pyhv.devices.virtio.proxy import ServiceProxy
from pyhv.proto import runtime
from pyhv.proto.guest import DeviceSpec, GuestConfig
from pyhv.vcpu_worker.launchers import LocalLauncher
config = GuestConfig(name="t", kernel="/k", mem_bytes={RAM}, devices=[DeviceSpec("blk", {{"path": {str(image)!r}}})])
mem = GuestMemory(create_memfd({RAM}), {RAM})
rb = ServiceProxy(kinds.kind("blk"), "virtio-blk0", mem, Eventfds.create(1), LocalLauncher(config, runtime.PrivateDir()))
print(rb.pid, flush=True)
time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         env={**runtime.child_env(), "TMPDIR": str(tmp_path)})     # its private dir goes there
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
                                       config=b"\0" * 24, name="virtio-blk"),
           S.ConfigWrite(offset=0, data=b"\1"), S.Activate(features=1 << 32, queues=[queue(), queue(vector=0xFFFF)]),
           S.Reset(), S.PauseDevice(), S.ResumeDevice(), S.Snapshot(), S.StateReply(state=None),
           S.StateReply(state=S.DeviceState(features=1, queues=[S.QueueState(queue(), 3, 2)], model={"rx": [b"x"]})),
           S.Restore(state=S.DeviceState(features=1, queues=[]), paused=True), S.GetCounters(),
           S.Counters(counters={"requests": 1, "state": "running"}), S.Shutdown(),
           S.ConfigChanged(config=b"x"), S.NeedsReset(reason="r"), Ok(), Error(kind="protocol", message="m")]


def test_every_service_message_round_trips_and_stays_out_of_the_control_channel():
    from pyhv.proto.control import CONTROL
    assert {type(m) for m in SAMPLES} == set(S.SERVICE.types.values())
    for m in SAMPLES:
        assert decode(encode(m)) == m
    assert (set(S.SERVICE.types) - {"Ok", "Error"}).isdisjoint(CONTROL.types)
    with pytest.raises(Exception, match="unknown message type"):
        codec.decode(encode(S.Describe()), CONTROL)


def test_a_service_that_never_connects_is_given_up_on_not_waited_for(guest, host):
    """Its control socket has no peer: a send there would block for good (a guest hung in `running`)."""
    import threading
    from pyhv.devices.virtio.proxy import ServiceGone
    from pyhv.vcpu_worker.launchers import ServiceProcess
    _, mem = guest

    class Mute(LocalLauncher):
        def start(self, device, incarnation, fds):
            p = subprocess.Popen(["sleep", "60"])
            return ServiceProcess(p.pid, os.pidfd_open(p.pid), p)

    config = GuestConfig(name="t", kernel="/k", mem_bytes=RAM, devices=[DeviceSpec("rng", {})])
    (name, k, _), = kinds.named(config.devices)
    outcome = []

    def build():
        try:
            ServiceProxy(k, name, mem, Eventfds.create(k.model_class().num_queues), Mute(config, host),
                         timeout=1.0, start_timeout=1.0, max_restarts=0)
            outcome.append("built")
        except ServiceGone as e:
            outcome.append(str(e))

    t = threading.Thread(target=build, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the proxy waited for ever on a service that never connected"
    assert outcome and "did not take Describe" in outcome[0]
