"""virtio-blk: the model over a memfd GuestMemory and a temp image, then a ring-0 C driver in a real guest.

The unit tests drive VirtioBlk in this process (its ThreadedBackend thread)
through a small Python ring driver.  The guest tests boot
tests/guests/virtio_blk_driver.c with the device behind virtio-pci: the model
in-process, in a device-service process (RemoteBackend; needs the transport
part of docs/device-service-integration.patch) and through `hvctl run --disk`
(needs the whole patch).
"""
import inspect
import os
import pathlib
import re
import struct
import time

import pytest

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio.backend import VIRTIO_F_VERSION_1, QueueConfig
from pyhv.devices.virtio import blk as B
from ringdriver import AVAIL, DESC, USED, RingDriver

HERE = pathlib.Path(__file__).resolve().parent
RAM = 16 << 20

HDR, STATUS, DATA = 0x20000, 0x20100, 0x100000
SECTORS = 64
GUEST_TIMEOUT = 120


def pattern(sector):
    return bytes((sector * 7 + j) & 0xFF for j in range(512))


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(pattern(s) for s in range(SECTORS)))
    return p


class Blk:
    """A VirtioBlk serving queue 0 of a memfd guest, with helpers to send requests."""

    def __init__(self, path, read_only=False):
        self.fd = create_memfd(RAM)
        self.mem = GuestMemory(self.fd, RAM)
        self.notify, self.irq = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        self.dev = B.VirtioBlk(str(path), read_only=read_only)
        self.drv = RingDriver(self.mem, size=16)
        self.dev.activate(self.mem, self.dev.features, [QueueConfig(0, 16, DESC, AVAIL, USED, self.notify, self.irq, 0)])

    def submit(self, bufs):
        head = self.drv.post(bufs)
        os.eventfd_write(self.notify, 1)
        h, ln = self.drv.wait_used()
        assert h == head
        return ln

    def request(self, rtype, sector, data_len=0, writable=True, status_addr=STATUS):
        """Standard framing: header | data | status; returns (used len, status byte)."""
        self.mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(status_addr, b"\xEE")
        bufs = [(HDR, 16, False)]
        if data_len:
            bufs.append((DATA, data_len, writable))
        bufs.append((status_addr, 1, True))
        ln = self.submit(bufs)
        return ln, self.mem.read(status_addr, 1)[0]

    def close(self):
        self.dev.close()
        self.mem.close()
        for f in (self.fd, self.notify, self.irq):
            os.close(f)


@pytest.fixture
def blk(image):
    b = Blk(image)
    yield b
    b.close()


def test_config_space_and_features(image):
    d = B.VirtioBlk(str(image))
    try:
        cap, size_max, seg_max, _, _, _, blk_size = struct.unpack("<QIIHBBI", d.config_bytes())
        assert (cap, size_max, seg_max, blk_size) == (SECTORS, 0, B.SEG_MAX, 512)
        f = d.features
        assert f & VIRTIO_F_VERSION_1 and f & B.VIRTIO_BLK_F_FLUSH and f & B.VIRTIO_BLK_F_SEG_MAX
        assert not f & B.VIRTIO_BLK_F_RO
        assert d.device_type == 2 and d.num_queues == 1
    finally:
        d.close()
    r = B.VirtioBlk(str(image), read_only=True)
    assert r.features & B.VIRTIO_BLK_F_RO
    r.close()


def test_capacity_ignores_a_trailing_partial_sector(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(512 * 3 + 100))
    d = B.VirtioBlk(str(p))
    assert d.capacity == 3
    d.close()


def test_read_lands_in_guest_ram_and_the_status_is_the_last_writable_byte(blk):
    ln, st = blk.request(B.VIRTIO_BLK_T_IN, 3, 1024)
    assert (ln, st) == (1025, B.VIRTIO_BLK_S_OK)
    assert blk.mem.read(DATA, 1024) == pattern(3) + pattern(4)
    assert blk.mem.read(HDR, 16) == struct.pack("<IIQ", 0, 0, 3)     # readable part untouched
    c = blk.dev.counters()
    assert (c["requests"], c["read_bytes"], c["errors"]) == (1, 1024, 0)


def test_any_layout_header_split_and_data_and_status_in_one_buffer(blk):
    blk.mem.write(HDR, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 5))
    blk.mem.write(DATA + 512, b"\xEE")
    # header in two pieces; data and status share one writable buffer of 513 bytes
    ln = blk.submit([(HDR, 10, False), (HDR + 10, 6, False), (DATA, 513, True)])
    assert ln == 513
    assert blk.mem.read(DATA, 512) == pattern(5) and blk.mem.read(DATA + 512, 1) == b"\0"


def test_write_then_flush_reaches_the_image(blk, image):
    blk.mem.write(DATA, b"\x5A" * 512)
    assert blk.request(B.VIRTIO_BLK_T_OUT, 7, 512, writable=False) == (1, B.VIRTIO_BLK_S_OK)
    assert blk.request(B.VIRTIO_BLK_T_FLUSH, 0) == (1, B.VIRTIO_BLK_S_OK)
    data = image.read_bytes()
    assert data[7 * 512:8 * 512] == b"\x5A" * 512
    assert data[6 * 512:7 * 512] == pattern(6) and data[8 * 512:9 * 512] == pattern(8)
    c = blk.dev.counters()
    assert (c["write_bytes"], c["flushes"], c["errors"]) == (512, 1, 0)


def test_get_id(blk):
    ln, st = blk.request(B.VIRTIO_BLK_T_GET_ID, 0, 20)
    assert (ln, st) == (21, B.VIRTIO_BLK_S_OK)
    assert blk.mem.read(DATA, 20) == b"pyhv-disk.img".ljust(20, b"\0")


def test_read_only_device_refuses_writes_with_ioerr(image):
    b = Blk(image, read_only=True)
    try:
        b.mem.write(DATA, b"\xFF" * 512)
        assert b.request(B.VIRTIO_BLK_T_OUT, 0, 512, writable=False) == (1, B.VIRTIO_BLK_S_IOERR)
        assert image.read_bytes()[:512] == pattern(0)
        assert b.request(B.VIRTIO_BLK_T_IN, 0, 512) == (513, B.VIRTIO_BLK_S_OK)
        assert b.request(B.VIRTIO_BLK_T_FLUSH, 0) == (1, B.VIRTIO_BLK_S_OK)
    finally:
        b.close()


@pytest.mark.parametrize("sector, length", [
    (SECTORS, 512),             # first sector past the end
    (SECTORS - 1, 1024),        # runs past the end
    (2**64 - 1, 512),           # sector * 512 would overflow 64 bits
    (2**55, 512),
    (0, 100),                   # not a multiple of 512
])
def test_bad_sector_ranges_and_lengths_get_ioerr_and_touch_nothing(blk, image, sector, length):
    blk.mem.write(DATA, b"\x33" * length)
    assert blk.request(B.VIRTIO_BLK_T_IN, sector, length) == (1, B.VIRTIO_BLK_S_IOERR)
    assert blk.mem.read(DATA, length) == b"\x33" * length
    assert blk.request(B.VIRTIO_BLK_T_OUT, sector, length, writable=False) == (1, B.VIRTIO_BLK_S_IOERR)
    assert image.read_bytes() == b"".join(pattern(s) for s in range(SECTORS))
    assert blk.dev.counters()["io_errors"] == 2


def test_unsupported_type(blk):
    assert blk.request(11, 0, 512, writable=False) == (1, B.VIRTIO_BLK_S_UNSUPP)   # DISCARD
    assert blk.dev.counters()["unsupported"] == 1


def test_short_header_gets_ioerr(blk):
    blk.mem.write(HDR, struct.pack("<IIQ", 0, 0, 0))
    blk.mem.write(STATUS, b"\xEE")
    assert blk.submit([(HDR, 8, False), (STATUS, 1, True)]) == 1
    assert blk.mem.read(STATUS, 1)[0] == B.VIRTIO_BLK_S_IOERR


def test_no_writable_byte_returns_length_0_and_writes_nothing(blk):
    blk.mem.write(HDR, struct.pack("<IIQ", 0, 0, 0))
    blk.mem.write(DATA, b"\x44" * 512)
    before = blk.mem.read(HDR, 0x200) + blk.mem.read(DATA, 0x1000)
    assert blk.submit([(HDR, 16, False), (DATA, 512, False)]) == 0
    assert blk.mem.read(HDR, 0x200) + blk.mem.read(DATA, 0x1000) == before
    assert blk.dev.counters()["errors"] == 1
    assert blk.request(B.VIRTIO_BLK_T_IN, 0, 512) == (513, B.VIRTIO_BLK_S_OK)   # still serving


def test_status_byte_is_the_last_byte_of_a_multi_descriptor_writable_area(blk):
    blk.mem.write(HDR, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 1))
    blk.mem.write(DATA, b"\xEE" * 0x3000)
    ln = blk.submit([(HDR, 16, False), (DATA, 256, True), (DATA + 0x1000, 256, True), (DATA + 0x2000, 1, True)])
    assert ln == 513
    assert blk.mem.read(DATA, 256) + blk.mem.read(DATA + 0x1000, 256) == pattern(1)
    assert blk.mem.read(DATA + 0x2000, 2) == b"\0\xEE"


def test_many_segments_move_with_one_preadv(blk, image):
    pieces = [(DATA + 0x1000 * k, 512, True) for k in range(8)]
    blk.mem.write(HDR, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 8))
    ln = blk.submit([(HDR, 16, False)] + pieces + [(STATUS, 1, True)])
    assert ln == 8 * 512 + 1
    assert all(blk.mem.read(DATA + 0x1000 * k, 512) == pattern(8 + k) for k in range(8))


# --- guests on KVM ---------------------------------------------------------------------

def _driver_image(build_c_guest):
    return build_c_guest((HERE / "guests" / "virtio_blk_driver.c").read_text(), cflags=("-mgeneral-regs-only",))


def _transport_takes_backend_fds():
    from pyhv.vcpu_worker.virtio_pci import VirtioPciDevice
    return "transport_eventfds" in inspect.getsource(VirtioPciDevice.__init__)


def _boot(kernel, make_backend, mem_bytes=64 << 20):
    from pyhv.proto.messages import GuestConfig
    from pyhv.vcpu_worker import pci as P
    from pyhv.vcpu_worker import virtio_pci as V
    from pyhv.vcpu_worker.machine import Machine
    out = bytearray()
    cfg = GuestConfig(name="t", kernel=str(kernel), boot="raw64", mem_bytes=mem_bytes, timeout=GUEST_TIMEOUT)
    m = Machine(cfg, create_memfd(mem_bytes), out.extend)
    pci = getattr(m, "pci", None)
    if pci is None:
        pci = m.pci = P.PciRoot(m.vm)
        pci.attach(m.pio, m.mmio)
    dev = V.VirtioPciDevice(make_backend(m.mem), m.mem)
    pci.add(dev, "virtio-blk")
    m.start()
    outcome = m.wait(GUEST_TIMEOUT)
    if outcome is None:
        m.stop()
    counters = dev.counters()
    m.join()
    m.pci.close()
    assert outcome is not None, "guest timed out: " + out.decode(errors="replace")
    return outcome, out.decode(errors="replace"), counters


def test_guest_driver_reads_and_writes_in_process(build_c_guest, image):
    outcome, text, c = _boot(_driver_image(build_c_guest), lambda mem: B.VirtioBlk(str(image)))
    assert outcome.status == 100, text
    for line in ("id ok", "read ok", "errors ok", "write ok"):
        assert line in text
    assert image.read_bytes()[512:1024] == bytes((0xA5 ^ j) & 0xFF for j in range(512))
    assert c["notify_exits"] == 0 and c["backend"]["errors"] == 3


def test_guest_driver_through_a_device_service(build_c_guest, image):
    if not _transport_takes_backend_fds():
        pytest.skip("the transport makes its own eventfds: apply docs/device-service-integration.patch")
    from pyhv.devices.virtio.remote import RemoteBackend
    outcome, text, c = _boot(_driver_image(build_c_guest), lambda mem: RemoteBackend("blk", mem, disk=str(image)))
    assert outcome.status == 100, text
    assert image.read_bytes()[512:1024] == bytes((0xA5 ^ j) & 0xFF for j in range(512))
    b = c["backend"]
    assert b["state"] == "running" and b["pid"] and b["restarts"] == 0
    assert b["write_bytes"] == 512 and b["errors"] == 3


def _hvctl_disk_supported():
    import pyhv.supervisor.config as C
    return "--disk is not supported yet" not in inspect.getsource(C)


def test_hvctl_run_disk_and_read_only_disk(build_c_guest, run_guest, image):
    if not _hvctl_disk_supported():
        pytest.skip("--disk is not wired: apply docs/device-service-integration.patch")
    kernel = _driver_image(build_c_guest)
    r = run_guest(kernel, "--boot", "raw64", "--disk", f"{image},ro", "--timeout", "60", timeout=90)
    assert r.returncode == 100, r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert b"write-status=1" in r.stdout and image.read_bytes()[:1024] == pattern(0) + pattern(1)
    r = run_guest(kernel, "--boot", "raw64", "--rng", "--disk", str(image), "--timeout", "60", timeout=90)
    assert r.returncode == 100, r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert b"write-status=0" in r.stdout
    assert image.read_bytes()[512:1024] == bytes((0xA5 ^ j) & 0xFF for j in range(512))


def test_guest_sequential_read_throughput(build_c_guest, tmp_path, capsys):
    """16 MiB read by the guest, 4 x 256 KiB in flight; printed next to a host preadv of the same file."""
    if not _transport_takes_backend_fds():
        pytest.skip("needs docs/device-service-integration.patch")
    from pyhv.devices.virtio.remote import RemoteBackend
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.write(b"".join(pattern(s) for s in range(SECTORS)))
        f.truncate(32 << 20)
    outcome, text, c = _boot(_driver_image(build_c_guest), lambda mem: RemoteBackend("blk", mem, disk=str(img)))
    assert outcome.status == 100 and "bench ok" in text, text
    guest_kbs = int(re.search(r"KB/s=(\d+)", text).group(1))
    fd = os.open(img, os.O_RDONLY)
    buf = bytearray(256 << 10)
    t = time.perf_counter()
    for off in range(0, 16 << 20, len(buf)):
        os.preadv(fd, [buf], off)
    host = (16 << 20) / (time.perf_counter() - t) / 1024
    os.close(fd)
    with capsys.disabled():
        print(f"\nvirtio-blk sequential read: guest {guest_kbs / 1024:.1f} MB/s (service process, "
              f"4 x 256 KiB in flight), host preadv {host / 1024:.0f} MB/s")
