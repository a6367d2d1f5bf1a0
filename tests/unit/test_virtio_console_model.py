"""virtio-console without KVM: the model over a memfd GuestMemory, its unix-socket host side, its device-service process.

The model runs in this process (its ThreadedBackend thread) fed by a
two-queue variant of the Python ring driver; the service is started from a
ServiceSpec by hand, as tests/unit/test_device_service.py does.
"""
import os
import select
import socket
import struct
import subprocess
import time

import pytest

from pyhv.devices.console_host import BUSY
from pyhv.devices.virtio import console as C
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1
from pyhv.proto import codec, device_service as S, runtime
from pyhv.proto.messages import Ok
from pyhv.vcpu_worker.launchers import service_command
from ringdriver import RX_RINGS, RXBUF, RXTX_QSIZE, RXTX_RAM as RAM, TX_RINGS
from ringdriver import RxTxGuest as Guest

QSIZE = RXTX_QSIZE


def irq_fired(fd, timeout=5):
    return bool(select.select([fd], [], [], timeout)[0]) and os.eventfd_read(fd) >= 1


def wait_for(pred, timeout=5):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


@pytest.fixture
def con(guest):
    out = []
    d = guest.attach(C.VirtioConsole(sink=out.append))
    d.out = out
    d.activate(guest.mem, d.features, guest.queues())
    yield d
    d.close()


# --- the model ---------------------------------------------------------------------------

def test_description_config_and_features():
    d = C.VirtioConsole()
    try:
        assert (d.device_type, d.num_queues, d.queue_max_sizes) == (3, 2, (C.QUEUE_SIZE, C.QUEUE_SIZE))
        assert d.features & VIRTIO_F_VERSION_1 and d.features & C.VIRTIO_CONSOLE_F_EMERG_WRITE
        assert not d.features & (C.VIRTIO_CONSOLE_F_MULTIPORT | C.VIRTIO_CONSOLE_F_SIZE)
        assert d.config_bytes() == bytes(12)
    finally:
        d.close()
    s = C.VirtioConsole(cols=80, rows=25)
    assert s.features & C.VIRTIO_CONSOLE_F_SIZE
    assert struct.unpack("<HHII", s.config_bytes()) == (80, 25, 0, 0)
    s.close()


def test_guest_output_reaches_the_sink_exactly(guest, con):
    head = guest.send(b"hello, ", b"world\n")          # one chain, two readable descriptors
    assert guest.tx.wait_used() == (head, 0)
    assert irq_fired(guest.irq[1])
    assert wait_for(lambda: b"".join(con.out) == b"hello, world\n")
    blob = bytes(range(256)) * 16
    heads = [guest.send(blob[i:i + 1000], kick=False, at=i // 1000) for i in range(0, 3000, 1000)]
    os.eventfd_write(guest.notify[1], 1)
    assert [guest.tx.wait_used() for _ in heads] == [(h, 0) for h in heads]
    assert wait_for(lambda: b"".join(con.out) == b"hello, world\n" + blob[:3000])
    c = con.counters()
    assert (c["tx_bytes"], c["tx_chains"], c["rx_bytes"], c["dropped"], c["chain_errors"]) == (3013, 4, 0, 0, 0)


def test_input_waits_for_buffers_and_never_overfills_one(guest, con):
    data = bytes((i * 13) & 0xFF for i in range(100))
    assert con.feed(data) == 100
    time.sleep(0.05)
    assert con.backlog == 100 and guest.rx.pending_used() == 0
    got = []
    for slot, n in enumerate((40, 40, 40)):
        head, addr = guest.post_rx(n, slot)
        h, ln = guest.rx.wait_used()
        assert h == head and ln == min(n, 100 - 40 * slot)
        assert guest.mem.read(addr + ln, 16) == b"\xEE" * 16      # nothing past the used length
        got.append(guest.mem.read(addr, ln))
    assert b"".join(got) == data
    assert con.backlog == 0
    assert irq_fired(guest.irq[0])
    # a posted buffer with no input stays with the device until input arrives
    head, addr = guest.post_rx(64, 5)
    time.sleep(0.05)
    assert guest.rx.pending_used() == 0
    con.feed(b"late")
    assert guest.rx.wait_used() == (head, 4)
    assert guest.mem.read(addr, 5) == b"late\xEE"
    c = con.counters()
    assert (c["rx_bytes"], c["rx_chains"], c["dropped"], c["backlog"]) == (104, 4, 0, 0)


def test_scattered_receive_buffer_and_backlog_cap(guest):
    d = guest.attach(C.VirtioConsole(backlog_max=10))
    d.activate(guest.mem, d.features, guest.queues())
    try:
        assert d.feed(b"0123456789ABCDE") == 10
        assert d.counters()["dropped"] == 5 and d.backlog == 10
        head = guest.rx.post([(RXBUF, 3, True), (RXBUF + 0x1000, 100, True)])
        os.eventfd_write(guest.notify[0], 1)
        assert guest.rx.wait_used() == (head, 10)
        assert guest.mem.read(RXBUF, 3) + guest.mem.read(RXBUF + 0x1000, 7) == b"0123456789"
    finally:
        d.close()


def test_bad_chains_are_returned_with_length_zero(guest, con):
    # transmit: a descriptor outside guest RAM
    head = guest.tx.post([(RAM + 0x1000, 16, False)])
    os.eventfd_write(guest.notify[1], 1)
    assert guest.tx.wait_used() == (head, 0)
    # receive: a readable-only chain and a chain outside RAM, then a good one
    con.feed(b"abc")
    bad1 = guest.rx.post([(RXBUF, 16, False)])
    bad2 = guest.rx.post([(RAM - 8, 64, True)])
    good, addr = guest.post_rx(16, 3)
    assert [guest.rx.wait_used() for _ in range(3)] == [(bad1, 0), (bad2, 0), (good, 3)]
    assert guest.mem.read(addr, 3) == b"abc"
    c = con.counters()
    assert (c["chain_errors"], c["empty_rx_chains"], c["tx_bytes"], c["fatal_errors"]) == (2, 1, 0, 0)
    # the queues still work
    h = guest.send(b"ok")
    assert guest.tx.wait_used() == (h, 0)
    assert wait_for(lambda: b"".join(con.out) == b"ok")


def test_emergency_write_and_backlog_kept_across_reset(guest):
    out = []
    d = guest.attach(C.VirtioConsole(sink=out.append))
    try:
        d.config_write(C.EMERG_WR_OFFSET, b"!\0\0\0")
        assert out == [b"!"]
        d.feed(b"typed before DRIVER_OK")
        d.activate(guest.mem, d.features, guest.queues())
        d.reset()
        d.activate(guest.mem, d.features, guest.queues())
        head, addr = guest.post_rx(64, 0)
        assert guest.rx.wait_used() == (head, 22)
        assert guest.mem.read(addr, 22) == b"typed before DRIVER_OK"
    finally:
        d.close()


# --- the host side: unix socket and log --------------------------------------------------

def connect(path, timeout=5):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_hosted_console_socket_both_ways_and_log(guest, tmp_path):
    sock, log = tmp_path / "vc.sock", tmp_path / "vc.log"
    d = guest.attach(C.HostedConsole(str(sock), str(log)))
    d.activate(guest.mem, d.features, guest.queues())
    try:
        guest.send(b"before any client\n")
        guest.tx.wait_used()
        assert wait_for(lambda: log.read_bytes() == b"before any client\n")
        c = connect(sock)
        assert wait_for(lambda: d.host.connected)
        guest.send(b"to the client\n")
        assert recv_exactly(c, 14) == b"to the client\n"
        # a second client is turned away while the first is connected
        c2 = connect(sock)
        assert c2.recv(64) == BUSY and c2.recv(16) == b""
        c2.close()
        c.sendall(b"keys")
        head, addr = guest.post_rx(2, 0)
        assert guest.rx.wait_used() == (head, 2)
        head2, addr2 = guest.post_rx(16, 1)
        assert guest.rx.wait_used() == (head2, 2)
        assert guest.mem.read(addr, 2) + guest.mem.read(addr2, 2) == b"keys"
        assert log.read_bytes() == b"before any client\nto the client\n"
        k = d.counters()
        assert (k["tx_bytes"], k["rx_bytes"], k["dropped"], k["clients"], k["rejected_clients"]) == (32, 4, 0, 1, 1)
        c.close()                       # the next client is served
        assert wait_for(lambda: not d.host.connected)
        c3 = connect(sock)
        assert wait_for(lambda: d.host.connected)
        guest.send(b"again")
        assert recv_exactly(c3, 5) == b"again"
        c3.close()
    finally:
        d.close()
    assert not sock.exists()


# --- through a device-service process ---------------------------------------------------

def _start_service(guest, tmp_path, options):
    import zmq
    life_r, life_w = os.pipe2(os.O_CLOEXEC)
    ctl_ep, evt_ep = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/e.sock"
    fds = S.ServiceFds(guest.fd, life_r, guest.notify, guest.irq)
    spec = S.ServiceSpec(kind="console", name="virtio-console", mem_size=RAM, control=ctl_ep, events=evt_ep,
                         options=options, fds=fds)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.setsockopt(zmq.RCVTIMEO, 20000)
    ctl.bind(ctl_ep)
    proc = subprocess.Popen(service_command(spec), pass_fds=fds.all(), env=runtime.child_env(),
                            start_new_session=True, stderr=subprocess.PIPE)
    return ctx, ctl, proc, (life_r, life_w)


def test_device_service_process(guest, tmp_path):
    sock, log = tmp_path / "vc.sock", tmp_path / "vc.log"
    ctx, ctl, proc, life = _start_service(guest, tmp_path, {"socket": str(sock), "log": str(log)})

    def call(msg):
        ctl.send(codec.encode(msg, S.SERVICE))
        return codec.decode(ctl.recv(), S.SERVICE)

    try:
        d = call(S.Describe())
        assert (d.device_type, d.num_queues, d.queue_max_sizes) == (3, 2, [128, 128])
        assert d.config == bytes(12)
        qs = [S.QueueConfig(0, QSIZE, *RX_RINGS, 0), S.QueueConfig(1, QSIZE, *TX_RINGS, 1)]
        assert isinstance(call(S.Activate(features=VIRTIO_F_VERSION_1, queues=qs)), Ok)
        assert sock.exists()
        c = connect(sock)
        time.sleep(0.1)                 # let the service accept before the guest writes
        head = guest.send(b"from the guest\n")
        assert guest.tx.wait_used() == (head, 0)
        assert irq_fired(guest.irq[1])
        assert recv_exactly(c, 15) == b"from the guest\n"
        c.sendall(b"to the guest")
        head, addr = guest.post_rx(64, 0)
        assert guest.rx.wait_used() == (head, 12)
        assert guest.mem.read(addr, 12) == b"to the guest"
        assert irq_fired(guest.irq[0])
        k = call(S.GetCounters()).counters
        assert (k["tx_bytes"], k["rx_bytes"], k["dropped"], k["client_connected"], k["socket"]) == \
            (15, 12, 0, True, str(sock))
        assert k["pid"] == proc.pid
        assert log.read_bytes() == b"from the guest\n"
        c.close()
        assert isinstance(call(S.Reset()), Ok)
        assert isinstance(call(S.Shutdown()), Ok)
        assert proc.wait(10) == 0            # a clean end: its unlink of the socket was refused, not killed
        assert sock.exists()                  # it may not touch the filesystem once serving (proto/sandbox.py):
                                              # the socket goes with its guest's dir; a new service replaces it
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ctl.close()
        ctx.term()
        for fd in life:
            os.close(fd)


def test_device_service_refuses_console_without_a_socket(guest, tmp_path):
    ctx, ctl, proc, life = _start_service(guest, tmp_path, {})
    try:
        assert proc.wait(30) == 2
        err = proc.stderr.read().decode()
        assert "needs option 'socket'" in err and err.count("\n") == 1
    finally:
        ctl.close()
        ctx.term()
        for fd in life:
            os.close(fd)
