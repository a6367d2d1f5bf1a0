"""The virtio-blk model over a memfd GuestMemory and a temp image, driven in this process by a Python ring driver."""
import os
import struct

import pytest

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio import blk as B
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, Eventfds, TransportEvents
from pyhv.proto.device_service import QueueConfig
from ringdriver import AVAIL, DESC, USED, RingDriver

RAM = 16 << 20
HDR, STATUS, DATA = 0x20000, 0x20100, 0x100000
SECTORS = 64


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
        self.eventfds = Eventfds.create(1)
        self.notify, self.irq = self.eventfds.notify_fd(0), self.eventfds.irq_fd(0)
        self.dev = B.VirtioBlk(str(path), read_only=read_only)
        self.dev.attach(TransportEvents(), self.eventfds)
        self.drv = RingDriver(self.mem, size=16)
        self.dev.activate(self.mem, self.dev.features, [QueueConfig(0, 16, DESC, AVAIL, USED, 0)])

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
        os.close(self.fd)
        self.eventfds.close()


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


@pytest.mark.parametrize("empty_at", [DATA + 0x300, 0])
def test_a_zero_length_last_writable_buffer_does_not_move_the_status_byte(blk, empty_at):
    """The status is the last byte of the writable area: a zero-length buffer at its end holds none
    (at guest-physical 0 the old arithmetic pointed below RAM and killed the queue thread)."""
    blk.mem.write(HDR, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 2))
    blk.mem.write(DATA, b"\xEE" * 1024)
    ln = blk.submit([(HDR, 16, False), (DATA, 513, True), (empty_at, 0, True)])
    assert ln == 513
    assert blk.mem.read(DATA, 512) == pattern(2) and blk.mem.read(DATA + 512, 2) == b"\0\xEE"
    assert blk.request(B.VIRTIO_BLK_T_IN, 3, 512) == (513, B.VIRTIO_BLK_S_OK)      # still serving
