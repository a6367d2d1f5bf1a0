"""virtio-console: the model over a memfd GuestMemory, its unix-socket host side, a device-service process, a Linux guest.

The unit tests drive VirtioConsole in this process (its ThreadedBackend
thread) with a two-queue variant of the Python ring driver.  The service
tests spawn `python -m pyhv.devices.service --device console` by hand, as
tests/test_device_service.py does, and need the devices/service.py part of
docs/virtio-console.patch (skipped without it).  The slow test boots our
Linux kernel with `--vconsole` (the whole patch) and writes to /dev/hvc0.
"""
import json
import os
import pathlib
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio.backend import VIRTIO_F_VERSION_1, QueueConfig
from pyhv.devices.virtio import console as C
from ringdriver import F_NEXT, F_WRITE, RX_RINGS, RXBUF, RXTX_QSIZE, RXTX_RAM as RAM, TX_RINGS, TXBUF
from ringdriver import RxTxGuest as Guest

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
    d = C.VirtioConsole(sink=out.append)
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
    d = C.VirtioConsole(backlog_max=10)
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
    d = C.VirtioConsole(sink=out.append)
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
    d = C.HostedConsole(str(sock), str(log))
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
        assert c2.recv(16) == b""
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

def _service_knows_console():
    from pyhv.devices import service as S
    return "console" in S.RESTARTABLE


needs_service = pytest.mark.skipif(not _service_knows_console(),
                                   reason="devices/service.py lacks the console kind (docs/virtio-console.patch)")


@needs_service
def test_device_service_process(guest, tmp_path):
    import zmq
    from pyhv.devices import service as S
    sock, log = tmp_path / "vc.sock", tmp_path / "vc.log"
    life_r, life_w = os.pipe2(os.O_CLOEXEC)
    ctl_ep, evt_ep = f"ipc://{tmp_path}/c.sock", f"ipc://{tmp_path}/e.sock"
    cmd = [sys.executable, "-m", "pyhv.devices.service", "--device", "console", "--mem-size", str(RAM),
           "--mem-fd", str(guest.fd), "--control", ctl_ep, "--events", evt_ep,
           "--notify-fds", ",".join(map(str, guest.notify)), "--irq-fds", ",".join(map(str, guest.irq)),
           "--lifeline", str(life_r), "--console-sock", str(sock), "--console-log", str(log)]
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.setsockopt(zmq.RCVTIMEO, 20000)
    ctl.bind(ctl_ep)
    evt = ctx.socket(zmq.PULL)
    evt.setsockopt(zmq.LINGER, 0)
    evt.bind(evt_ep)
    proc = subprocess.Popen(cmd, pass_fds=[guest.fd, *guest.notify, *guest.irq, life_r], cwd=str(ROOT),
                            start_new_session=True)

    def call(msg):
        ctl.send(S.encode(msg))
        return S.decode(ctl.recv())

    try:
        d = call(S.Describe())
        assert (d.device_type, d.num_queues, d.queue_max_sizes, d.restartable) == (3, 2, [128, 128], True)
        assert d.config == bytes(12)
        wq = [S.WireQueue(index=0, size=QSIZE, desc=RX_RINGS[0], driver=RX_RINGS[1], device=RX_RINGS[2],
                          notify_fd=0, irq_fd=0, vector=0),
              S.WireQueue(index=1, size=QSIZE, desc=TX_RINGS[0], driver=TX_RINGS[1], device=TX_RINGS[2],
                          notify_fd=1, irq_fd=1, vector=1)]
        assert isinstance(call(S.Activate(features=VIRTIO_F_VERSION_1, queues=wq)), S.Ok)
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
        assert isinstance(call(S.Reset()), S.Ok)
        assert isinstance(call(S.Shutdown()), S.Ok)
        assert proc.wait(10) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ctl.close()
        evt.close()
        ctx.term()
        os.close(life_r)
        os.close(life_w)


@needs_service
def test_device_service_refuses_console_without_a_socket(guest, tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyhv.devices.service", "--device", "console", "--mem-size", str(RAM),
                        "--mem-fd", "0", "--control", "ipc://x", "--events", "ipc://y"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--console-sock" in r.stderr


# --- a Linux guest writes to /dev/hvc0 (needs the whole patch) -----------------------------

KERNEL = pathlib.Path("/var/cache/pyhv/own/vmlinux")
INITRAMFS = pathlib.Path("/var/cache/pyhv/initramfs.cpio")


def _cli_has_vconsole():
    try:
        from pyhv.supervisor import cli
        return "--vconsole" in (pathlib.Path(cli.__file__).read_text())
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not (KERNEL.exists() and INITRAMFS.exists() and os.access("/dev/kvm", os.R_OK | os.W_OK)),
                    reason="needs /dev/kvm and the guest kernel + initramfs in /var/cache/pyhv")
@pytest.mark.skipif(not _cli_has_vconsole(), reason="hvctl lacks --vconsole (docs/virtio-console.patch)")
def test_linux_guest_writes_to_hvc0(tmp_path):
    stats = tmp_path / "stats.json"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "pyhv.supervisor.cli", "run", "--kernel", str(KERNEL), "--initrd", str(INITRAMFS),
           "--mem", "256M", "--vconsole", "--timeout", "240", "--stats-json", str(stats),
           "--cmdline", 'console=ttyS0 pyhv.run="exec 3<>/dev/hvc0; echo hello >&3; read line <&3; '
                        'echo got:$line >&3; sleep 1"']
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        sock = None
        while sock is None and time.monotonic() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("pyhv-vconsole-*/vconsole.sock"))
            if found:
                sock = found[0]
            else:
                time.sleep(0.05)
        assert sock is not None, proc.communicate(timeout=30)
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
        proc.wait(240)          # the exit status is not asserted: one in-process (HV_DEVICE_SERVICES=0) run ended 1
        st = json.loads(stats.read_text())
        vc = st["devices"]["pci"]["virtio-console"]["backend"]
        assert st["vconsole"]["socket"] == str(sock)
        assert vc["tx_bytes"] >= len(b"hello\ngot:ping\n") and vc["rx_bytes"] == 5, vc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
