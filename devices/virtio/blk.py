"""virtio-blk (block device, type 2) over a raw image file: zero-copy preadv/pwritev into guest RAM.

One request queue.  Config space (struct virtio_blk_config, the first 24
bytes): capacity (512-byte sectors, le64), size_max (0: not offered),
seg_max, geometry (0: not offered), blk_size (512).  Features offered:
VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
VIRTIO_BLK_F_FLUSH, and VIRTIO_BLK_F_RO for a read-only image.

A request (spec 5.2.6) is a 16-byte header {le32 type, le32 reserved, le64
sector} in the device-readable part of the chain, then data, then one status
byte, the LAST byte of the device-writable part.  Framing is not assumed
(VIRTIO_F_ANY_LAYOUT is implied by VERSION_1): the header may span
descriptors; the data is whatever readable bytes follow the header (OUT) or
the writable bytes before the status byte (IN / GET_ID).  The header is read
once into a private copy; data moves between the image and guest RAM with
os.preadv/os.pwritev on memoryviews of the guest mapping (no copy in Python).

Status: VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR (bad sector range, a length not
a multiple of 512, a header shorter than 16 bytes, a host I/O error, and a
write to a read-only device: spec 5.2.6.2 "A device MUST set the status byte
to VIRTIO_BLK_S_IOERR for a write request if the VIRTIO_BLK_F_RO feature if
offered, and MUST NOT write any data"), VIRTIO_BLK_S_UNSUPP (any other
type).  The used length is the number of bytes written into the chain: data
read plus the status byte.  A chain with no device-writable byte has nowhere
to put a status: it is returned with length 0 and counted in `errors`.
"""
import os
import struct

from pyhv.devices.virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
                                        VIRTIO_ID_BLOCK)
from pyhv.devices.virtio.threaded import ThreadedBackend

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2

SECTOR = 512
ID_BYTES = 20
QUEUE_SIZE = 128
SEG_MAX = QUEUE_SIZE - 2            # header and status take a descriptor each
IOV_MAX = 1024
_HEADER = struct.Struct("<IIQ")
_CONFIG = struct.Struct("<QIIHBBI")  # capacity, size_max, seg_max, geometry (c, h, s), blk_size


def _slice(buffers, start, length):
    """(addr, len) pieces covering bytes [start, start+length) of the concatenated `buffers`."""
    out = []
    for addr, ln in buffers:
        if length <= 0:
            break
        if start >= ln:
            start -= ln
            continue
        n = min(ln - start, length)
        out.append((addr + start, n))
        length -= n
        start = 0
    return out


class VirtioBlk(ThreadedBackend):
    device_type = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_max_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"

    def __init__(self, path, read_only=False, fd=None):
        """`fd`: the image already open (and locked, devices/virtio/image_lock.py), which the model then owns;
        without it the model opens `path` itself, unlocked."""
        super().__init__()
        self.path = path
        self.read_only = bool(read_only)
        self.fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC) if fd is None else fd
        try:
            size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise
        self.capacity = size // SECTOR           # a trailing partial sector is not visible
        # INDIRECT_DESC lets a driver put a many-segment request in one ring slot; EVENT_IDX lets it
        # batch interrupts (used_event) -- both handled by the validated queue (devices/virtio/queue.py).
        self.features = (VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE |
                         VIRTIO_BLK_F_FLUSH | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX |
                         (VIRTIO_BLK_F_RO if read_only else 0))
        self.serial = ("pyhv-" + os.path.basename(path)).encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.requests = self.read_bytes = self.write_bytes = self.flushes = 0
        self.io_errors = self.unsupported = self.no_status = 0

    def config_bytes(self):
        return _CONFIG.pack(self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR)

    # -- the data path ----------------------------------------------------------
    def process(self, index, vq):
        while True:
            chain = self.pop(vq)
            if chain is None:
                return
            if chain.writable_len == 0:
                self.no_status += 1                # nowhere to report: length 0
                vq.put(chain.head, 0)
                continue
            self.requests += 1
            written, status = self._request(chain)
            if status == VIRTIO_BLK_S_IOERR:
                self.io_errors += 1
            elif status == VIRTIO_BLK_S_UNSUPP:
                self.unsupported += 1
            addr, ln = next((a, n) for a, n in reversed(chain.writable) if n)   # zero-length buffers hold no byte
            chain.mem.write(addr + ln - 1, bytes((status,)))
            vq.put(chain.head, written + 1)

    def _request(self, chain):
        """(bytes written into the chain before the status byte, status)."""
        if chain.readable_len < _HEADER.size:
            return 0, VIRTIO_BLK_S_IOERR
        rtype, _, sector = _HEADER.unpack(chain.read_all(_HEADER.size))   # the private copy
        out_len = chain.readable_len - _HEADER.size
        in_len = chain.writable_len - 1
        if rtype == VIRTIO_BLK_T_IN:
            if not self._range_ok(sector, in_len):
                return 0, VIRTIO_BLK_S_IOERR
            pieces = _slice(chain.writable, 0, in_len)
            if not self._transfer(os.preadv, chain.mem, pieces, sector * SECTOR, writable=True):
                return 0, VIRTIO_BLK_S_IOERR
            self.read_bytes += in_len
            return in_len, VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_OUT:
            if self.read_only or not self._range_ok(sector, out_len):
                return 0, VIRTIO_BLK_S_IOERR
            pieces = _slice(chain.readable, _HEADER.size, out_len)
            if not self._transfer(os.pwritev, chain.mem, pieces, sector * SECTOR, writable=False):
                return 0, VIRTIO_BLK_S_IOERR
            self.write_bytes += out_len
            return 0, VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.flushes += 1
            if self.read_only:
                return 0, VIRTIO_BLK_S_OK
            try:
                os.fsync(self.fd)
            except OSError:
                return 0, VIRTIO_BLK_S_IOERR
            return 0, VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_GET_ID:
            n = chain.write_into(self.serial[:in_len])
            return n, VIRTIO_BLK_S_OK
        return 0, VIRTIO_BLK_S_UNSUPP

    def _range_ok(self, sector, length):
        return length % SECTOR == 0 and sector <= self.capacity and \
            sector + length // SECTOR <= self.capacity

    def _transfer(self, op, mem, pieces, offset, writable):
        """Move every byte of `pieces` with preadv/pwritev at `offset`; False on error or short I/O."""
        views = [mem.view(a, n) if writable else mem.view(a, n).toreadonly() for a, n in pieces]
        try:
            while views:
                batch = views[:IOV_MAX]
                want = sum(len(v) for v in batch)
                try:
                    done = op(self.fd, batch, offset)
                except OSError:
                    return False
                if done <= 0:
                    return False              # the image shrank under us
                offset += done
                if done == want:
                    views = views[IOV_MAX:]
                    continue
                # short transfer: skip what was done and go on from there
                rest = []
                for v in views:
                    if done >= len(v):
                        done -= len(v)
                    elif done:
                        rest.append(v[done:])
                        done = 0
                    else:
                        rest.append(v)
                views = rest
            return True
        finally:
            for v in views:
                v.release()

    @property
    def errors(self):
        return self.io_errors + self.unsupported + self.no_status + self.chain_errors + self.fatal_errors

    def counters(self):
        c = super().counters()
        c.update(requests=self.requests, read_bytes=self.read_bytes, write_bytes=self.write_bytes,
                 flushes=self.flushes, errors=self.errors, io_errors=self.io_errors,
                 unsupported=self.unsupported, capacity=self.capacity, read_only=self.read_only)
        return c

    def close(self):
        self.reset()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
