"""Split virtqueue (devices/virtio/queue.py) against a well-behaved and a hostile driver.

A tiny Python "driver" lays out rings and descriptor chains in a real
memfd-backed GuestMemory.  Every hostile case must raise the right error class,
change nothing in guest memory outside the used ring (checked by diffing all of
RAM), and leave the queue serving the next good chain.  Hypothesis compares
pop() with an independent reference walk over random descriptor tables.
"""
import json
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from pyhv.devices.guest_memory import MMIO_HOLE_START, GuestMemory, create_memfd
from pyhv.proto import codec
from pyhv.proto.device_service import QueueConfig, QueueState
from pyhv.proto.messages import to_plain
from pyhv.devices.virtio.queue import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, 
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT as IND_F, VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_WRITE as WRITE, VIRTQ_USED_F_NO_NOTIFY, Chain, ChainError, QueueConfigError,
    QueueFatal, VirtQueue)

RAM = 64 << 20
SIZE = 16
DESC, AVAIL, USED = 0x10000, 0x20000, 0x30000
IND = 0x40000          # indirect tables
BUF = 0x100000         # data buffers
DESC_FMT = struct.Struct("<QIHH")


def restored(mem, size, last, used=None, event_idx=False, indirect=False, **limits):
    """A queue at DESC/AVAIL/USED continuing from ring positions `last` (and `used`), as a restarted device would."""
    features = (VIRTIO_F_RING_EVENT_IDX if event_idx else 0) | (VIRTIO_F_RING_INDIRECT_DESC if indirect else 0)
    state = QueueState(config=QueueConfig(0, size, DESC, AVAIL, USED), last_avail_idx=last,
                       used_idx=last if used is None else used)
    return VirtQueue.restore(mem, state, features, **limits)


def R(addr, ln):
    return (addr, ln, 0)


def W(addr, ln):
    return (addr, ln, WRITE)


class Driver:
    """The guest side of one split virtqueue, just enough to feed the device."""

    def __init__(self, mem, size=SIZE, desc=DESC, avail=AVAIL, used=USED):
        self.mem, self.size = mem, size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.avail_idx = 0
        self.free = 0

    def desc(self, i, addr, ln, flags=0, nxt=0, table=None):
        base = self.desc_addr if table is None else table
        self.mem.write(base + 16 * i, DESC_FMT.pack(addr, ln, flags, nxt))

    def chain(self, bufs):
        """Put (addr, len, flags) buffers in consecutive free descriptors; returns the head."""
        idxs = [(self.free + k) % self.size for k in range(len(bufs))]
        self.free += len(bufs)
        for k, (addr, ln, flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.desc(idxs[k], addr, ln, flags | (0 if last else NEXT), 0 if last else idxs[k + 1])
        return idxs[0]

    def indirect_table(self, table, bufs):
        """Write an indirect table at `table` chaining `bufs` 0 -> 1 -> ...; returns its length."""
        for k, (addr, ln, flags) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.desc(k, addr, ln, flags | (0 if last else NEXT), 0 if last else k + 1, table=table)
        return 16 * len(bufs)

    def post(self, *heads):
        for h in heads:
            self.mem.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_idx(self, v):
        self.avail_idx = v & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def avail_flags(self, v):
        self.mem.write_u16(self.avail_addr, v)

    def used_event(self, v):
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, v)

    def used_idx(self):
        return self.mem.read_u16(self.used_addr + 2)

    def used_flags(self):
        return self.mem.read_u16(self.used_addr)

    def avail_event(self):
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    def used_elem(self, i):
        return struct.unpack("<II", self.mem.read(self.used_addr + 4 + 8 * (i % self.size), 8))

    def used_ring_range(self):
        return (self.used_addr, 6 + 8 * self.size)


LOW = 4 << 20          # everything these tests lay out or write lies below this
_shared = []


@pytest.fixture(scope="module")
def shared_mem():
    """One 64 MiB guest for the module (faulting in a fresh one per test is slow).

    At the end, all RAM above LOW must still be zero: no test, hostile or
    property, may have made the queue write anywhere up there.
    """
    fd = create_memfd(RAM)
    m = GuestMemory(fd, RAM)
    yield m
    high = m.read(LOW, RAM - LOW)
    assert high.count(0) == len(high), "a stray write landed above LOW"
    os.close(fd)            # the mapping goes with the object (queues may still hold views)


@pytest.fixture
def mem(shared_mem):
    shared_mem.write(0, bytes(LOW))
    return shared_mem


def make(mem, size=SIZE, **kw):
    return Driver(mem, size), VirtQueue(mem, size, DESC, AVAIL, USED, **kw)


def snapshot(mem, size=None):
    return mem.read(0, mem.size if size is None else size)


def changed(before, after, chunk=1 << 16):
    """Addresses of the bytes that differ."""
    if before == after:
        return []
    out = []
    for off in range(0, len(before), chunk):
        a, b = before[off:off + chunk], after[off:off + chunk]
        if a != b:
            out.extend(off + i for i in range(len(a)) if a[i] != b[i])
    return out


def assert_only(before, after, allowed):
    for x in changed(before, after):
        assert any(a <= x < a + n for a, n in allowed), f"byte 0x{x:x} changed outside {allowed}"


def assert_serves_next(d, q):
    head = d.chain([R(BUF + 0x8000, 8), W(BUF + 0x9000, 4)])
    d.post(head)
    c = q.pop()
    assert (c.head, c.readable, c.writable) == (head, [(BUF + 0x8000, 8)], [(BUF + 0x9000, 4)])
    q.put(c.head, 4)
    assert d.used_elem(q.used_idx - 1) == (head, 4) and d.used_idx() == q.used_idx


# --- configuration --------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32768 * 2, -1])
def test_size_must_be_power_of_two_up_to_32768(mem, size):
    with pytest.raises(QueueConfigError):
        VirtQueue(mem, size, DESC, AVAIL, USED)


def test_largest_queue_and_size_one(mem):
    VirtQueue(mem, 32768, 0x100000, 0x200000, 0x300000)
    VirtQueue(mem, 1, DESC, AVAIL, USED)


@pytest.mark.parametrize("desc,avail,used", [
    (DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED), (DESC, AVAIL, USED + 2),
    (RAM - 16 * SIZE + 16, AVAIL, USED),                     # table runs off the end of RAM
    (DESC, RAM - 6 - 2 * SIZE + 2, USED), (DESC, AVAIL, RAM - 4 * SIZE),
    (MMIO_HOLE_START, AVAIL, USED), (DESC, AVAIL, 2 ** 64 - 4), (-16, AVAIL, USED),
])
def test_ring_alignment_and_placement(mem, desc, avail, used):
    with pytest.raises(QueueConfigError):
        VirtQueue(mem, SIZE, desc, avail, used)


def test_rings_ending_exactly_at_end_of_ram(mem):
    VirtQueue(mem, SIZE, RAM - 16 * SIZE, RAM - 0x1000 - 6 - 2 * SIZE, RAM - 0x2000 - 8 * SIZE - 8)


# --- normal operation -----------------------------------------------------------------

def test_empty_queue_pops_none(mem):
    d, q = make(mem)
    assert q.pop() is None and q.pop() is None
    assert not q.has_pending()


def test_readable_then_writable_chain_gather_scatter(mem):
    d, q = make(mem)
    mem.write(BUF, b"hello ")
    mem.write(BUF + 0x1000, b"world")
    head = d.chain([R(BUF, 6), R(BUF + 0x1000, 5), W(BUF + 0x2000, 3), W(BUF + 0x3000, 4)])
    d.post(head)
    assert q.has_pending()
    c = q.pop()
    assert isinstance(c, Chain) and c.head == head
    assert c.readable == [(BUF, 6), (BUF + 0x1000, 5)] and c.readable_len == 11
    assert c.writable == [(BUF + 0x2000, 3), (BUF + 0x3000, 4)] and c.writable_len == 7
    assert c.read_all(100) == b"hello world"
    assert c.read_all(8) == b"hello wo"
    assert c.read_all(0) == b""
    before = snapshot(mem)
    assert c.write_into(b"ABCDEFGHIJ") == 7                     # never more than the buffers
    assert mem.read(BUF + 0x2000, 3) == b"ABC" and mem.read(BUF + 0x3000, 4) == b"DEFG"
    assert_only(before, snapshot(mem), c.writable)
    assert c.write_into(b"xy", offset=4) == 2
    assert mem.read(BUF + 0x3000, 4) == b"DxyG"
    assert c.write_into(b"z", offset=7) == 0
    with pytest.raises(ValueError):
        c.write_into(b"z", offset=-1)
    q.put(c.head, 7)
    assert d.used_idx() == 1 and d.used_elem(0) == (head, 7)
    assert q.pop() is None


def test_readable_only_and_writable_only_chains(mem):
    d, q = make(mem)
    h1 = d.chain([R(BUF, 16)])
    h2 = d.chain([W(BUF + 16, 16), W(BUF + 32, 16)])
    d.post(h1, h2)
    c1, c2 = q.pop(), q.pop()
    assert (c1.readable, c1.writable) == ([(BUF, 16)], [])
    assert (c2.readable, c2.writable_len) == ([], 32)
    assert c2.read_all(10) == b""
    assert q.pop() is None


def test_chain_as_long_as_the_queue(mem):
    d, q = make(mem, size=4)
    head = d.chain([R(BUF + 16 * i, 16) for i in range(4)])
    d.post(head)
    assert len(q.pop().readable) == 4


def test_zero_copy_views_with_preadv(mem):
    d, q = make(mem)
    mem.write(BUF, b"HEADER!!")
    head = d.chain([R(BUF, 8), W(BUF + 0x1000, 5), W(BUF + 0x2000, 6)])
    d.post(head)
    c = q.pop()
    with tempfile.TemporaryFile() as f:
        f.write(b"0123456789abcdef")
        f.flush()
        assert os.preadv(f.fileno(), c.writable_views(), 0) == 11
        rv = c.readable_views()
        assert rv[0].readonly and bytes(rv[0]) == b"HEADER!!"
        with pytest.raises(TypeError):
            rv[0][0] = 0
        assert os.pwritev(f.fileno(), rv, 100) == 8
    assert mem.read(BUF + 0x1000, 5) == b"01234" and mem.read(BUF + 0x2000, 6) == b"56789a"


def test_indirect_chain(mem):
    d, q = make(mem, indirect=True)
    mem.write(BUF, b"req")
    ln = d.indirect_table(IND, [R(BUF, 3), R(BUF + 8, 5), W(BUF + 0x100, 4), W(BUF + 0x200, 4)])
    d.desc(5, IND, ln, IND_F | WRITE)       # WRITE on an indirect descriptor is ignored
    d.post(5)
    c = q.pop()
    assert c.head == 5
    assert c.readable == [(BUF, 3), (BUF + 8, 5)]
    assert c.writable == [(BUF + 0x100, 4), (BUF + 0x200, 4)]
    assert c.write_into(b"12345678") == 8
    q.put(5, 8)
    assert d.used_elem(0) == (5, 8)


def test_direct_descriptors_then_indirect(mem):
    """Spec 2.7 Indirect Descriptors: the device MUST handle normal descriptors, then one indirect."""
    d, q = make(mem, indirect=True)
    ln = d.indirect_table(IND, [R(BUF + 16, 16), W(BUF + 32, 16)])
    d.desc(0, BUF, 16, NEXT, 1)
    d.desc(1, IND, ln, IND_F)
    d.post(0)
    c = q.pop()
    assert c.readable == [(BUF, 16), (BUF + 16, 16)] and c.writable == [(BUF + 32, 16)]


def test_indirect_table_with_out_of_order_next(mem):
    d, q = make(mem, indirect=True)
    d.desc(0, BUF, 8, NEXT, 2, table=IND)
    d.desc(2, BUF + 8, 8, NEXT | WRITE, 1, table=IND)
    d.desc(1, BUF + 16, 8, WRITE, 0, table=IND)
    d.desc(3, IND, 48, IND_F)
    d.post(3)
    c = q.pop()
    assert c.readable == [(BUF, 8)] and c.writable == [(BUF + 8, 8), (BUF + 16, 8)]


def test_rings_wrap_and_indices_wrap_at_65536(mem):
    d, _ = make(mem, size=4)
    q = restored(mem, 4, 0xFFFD)
    d.avail_idx = 0xFFFD
    for round_ in range(10):
        heads = [d.chain([W(BUF + 64 * k, 8)]) for k in range(3)]
        d.post(*heads)
        got = [q.pop() for _ in range(3)]
        assert q.pop() is None
        assert [c.head for c in got] == heads
        for k, c in enumerate(got):
            q.put(c.head, k)
        assert d.used_idx() == q.used_idx == (0xFFFD + 3 * (round_ + 1)) & 0xFFFF
        for k in range(3):
            assert d.used_elem(q.used_idx - 3 + k) == (heads[k], k)


def test_out_of_order_completion(mem):
    d, q = make(mem)
    heads = [d.chain([W(BUF + 64 * k, 8)]) for k in range(3)]
    d.post(*heads)
    cs = [q.pop() for _ in range(3)]
    for c in reversed(cs):
        q.put(c.head, 1)
    assert [d.used_elem(i)[0] for i in range(3)] == heads[::-1]


def test_put_rejects_device_bugs(mem):
    d, q = make(mem)
    for bad in ((SIZE, 0), (-1, 0), (0, -1), (0, 1 << 32)):
        with pytest.raises(ValueError):
            q.put(*bad)
    assert d.used_idx() == 0


# --- notifications --------------------------------------------------------------------

def test_no_interrupt_flag_without_event_idx(mem):
    d, q = make(mem)
    d.post(d.chain([W(BUF, 8)]), d.chain([W(BUF, 8)]))
    q.put(q.pop().head, 0)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()                  # nothing used since
    d.avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.put(q.pop().head, 0)
    assert not q.needs_interrupt()


def test_used_event(mem):
    d, q = make(mem, event_idx=True)
    d.avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)       # ignored with EVENT_IDX
    heads = [d.chain([W(BUF, 8)]) for _ in range(8)]
    d.post(*heads)
    cs = [q.pop() for _ in range(8)]
    d.used_event(2)                                 # interrupt once entry 2 is used (idx -> 3)
    q.put(cs[0].head, 0)
    assert q.needs_interrupt()                      # first check: no history, be safe
    q.put(cs[1].head, 0)                            # used idx 1 -> 2
    assert not q.needs_interrupt()
    q.put(cs[2].head, 0)                            # 2 -> 3: entry 2 written
    assert q.needs_interrupt()
    q.put(cs[3].head, 0)
    assert not q.needs_interrupt()                  # used_event now behind
    d.used_event(5)
    for c in cs[4:8]:                               # batch 4 -> 8 crosses used_event 5
        q.put(c.head, 0)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()


def test_used_event_wraps(mem):
    d, _ = make(mem, event_idx=True)
    q = restored(mem, SIZE, 0xFFFE, event_idx=True)
    d.avail_idx = 0xFFFE
    d.post(*[d.chain([W(BUF, 8)]) for _ in range(4)])
    cs = [q.pop() for _ in range(4)]
    q.put(cs[0].head, 0)
    assert q.needs_interrupt()                      # after restore: spurious rather than lost
    d.used_event(0)                                 # entry 0 is the 3rd one (0xFFFF -> 0 -> 1)
    q.put(cs[1].head, 0)
    assert not q.needs_interrupt()
    q.put(cs[2].head, 0)
    assert q.needs_interrupt()


def test_set_notification_without_event_idx(mem):
    d, q = make(mem)
    assert q.set_notification(False) is False
    assert d.used_flags() == VIRTQ_USED_F_NO_NOTIFY
    d.post(d.chain([R(BUF, 1)]))
    assert q.set_notification(True) is True         # re-check after enabling: work pending
    assert d.used_flags() == 0
    q.pop()
    assert q.set_notification(True) is False


def test_avail_event(mem):
    d, q = make(mem, event_idx=True)
    d.post(*[d.chain([R(BUF, 1)]) for _ in range(3)])
    q.pop()
    assert d.avail_event() == 1                     # notify me when you post slot 1...
    q.set_notification(False)
    q.pop()
    assert d.avail_event() == 1                     # disabled: left stale
    assert q.set_notification(True) is True
    assert d.avail_event() == 2
    q.pop()
    assert d.avail_event() == 3
    assert d.used_flags() == 0                      # with EVENT_IDX flags stay 0


# --- restart --------------------------------------------------------------------------

def test_state_restore_resumes_where_the_guest_expects(mem):
    d, q = make(mem, event_idx=True, indirect=True)
    heads = [d.chain([W(BUF + 64 * k, 8)]) for k in range(5)]
    d.post(*heads)
    c0, c1, c2 = q.pop(), q.pop(), q.pop()
    q.put(c0.head, 1)
    q.put(c1.head, 2)
    config = QueueConfig(0, SIZE, DESC, AVAIL, USED)
    st = codec.from_plain(QueueState, json.loads(json.dumps(to_plain(q.state(config)))))
    q2 = VirtQueue.restore(mem, st, VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_RING_INDIRECT_DESC)
    assert (q2.last_avail_idx, q2.used_idx, q2.event_idx, q2.indirect) == (3, 2, True, True)
    c2b = q2.walk(c2.head)                          # an in-flight chain, re-read
    assert (c2b.head, c2b.writable) == (c2.head, c2.writable)
    q2.put(c2b.head, 3)
    assert q2.pop().head == heads[3]
    assert d.used_idx() == 3 and d.used_elem(2) == (heads[2], 3)


@pytest.mark.parametrize("last, used, config", [
    (0x10000, 0, {}), (0, -1, {}), (SIZE + 1, 0, {}), ("3", 0, {}), (0, 0, {"size": 12}), (0, 0, {"device": RAM}),
])
def test_restore_validates(mem, last, used, config):
    qc = QueueConfig(0, SIZE, DESC, AVAIL, USED).replace(**config)
    with pytest.raises(QueueConfigError):
        VirtQueue.restore(mem, QueueState(config=qc, last_avail_idx=last, used_idx=used), 0)


# --- hostile chains: ChainError, nothing written, queue keeps serving --------------------

def _loop2(d):
    d.desc(0, BUF, 16, NEXT, 1)
    d.desc(1, BUF + 16, 16, NEXT, 0)
    return 0


def _self_loop(d):
    d.desc(3, BUF, 16, NEXT, 3)
    return 3


def _long_loop(d):
    for i in range(SIZE):
        d.desc(i, BUF, 16, NEXT, (i + 1) % SIZE)
    return 7


def _next_out_of_range(d):
    d.desc(0, BUF, 16, NEXT, SIZE)
    return 0


def _next_ffff(d):
    d.desc(0, BUF, 16, NEXT | WRITE, 0xFFFF)
    return 0


def _addr_overflow(d):
    d.desc(0, 2 ** 64 - 8, 16)
    return 0


def _addr_overflow_max(d):
    d.desc(0, 2 ** 64 - 1, 0xFFFFFFFF, WRITE)
    return 0


def _beyond_ram(d):
    d.desc(0, RAM - 8, 16, WRITE)
    return 0


def _at_end_of_ram(d):
    d.desc(0, BUF, 16, NEXT, 1)
    d.desc(1, RAM, 1, WRITE)
    return 0


def _huge_len(d):
    d.desc(0, BUF, 0xFFFFFFFF, WRITE)
    return 0


def _mmio_hole(d):
    d.desc(0, MMIO_HOLE_START + 0x1000, 16, WRITE)
    return 0


def _write_then_read(d):
    return d.chain([R(BUF, 8), W(BUF + 16, 16), R(BUF + 32, 16)])


def _too_many_bytes(d):
    return d.chain([R(BUF, 0x800), W(BUF + 0x1000, 0x801)])   # queue cap 0x1000


def _bad_second_buffer_after_good_writable(d):
    return d.chain([W(BUF, 16), W(RAM + 0x1000, 16)])


def _nested_indirect(d):
    d.indirect_table(IND + 0x100, [W(BUF, 16)])
    d.indirect_table(IND, [R(BUF, 16), (IND + 0x100, 16, IND_F)])
    d.desc(0, IND, 32, IND_F)
    return 0


def _indirect_and_next(d):
    d.indirect_table(IND, [W(BUF, 16)])
    d.desc(0, IND, 16, IND_F | NEXT, 1)
    d.desc(1, BUF + 16, 16, WRITE)
    return 0


def _indirect_len(n):
    def build(d):
        d.indirect_table(IND, [W(BUF + 16 * i, 16) for i in range(4)])
        d.desc(2, IND, n, IND_F)
        return 2
    build.__name__ = f"_indirect_len_{n}"
    return build


def _indirect_outside_ram(d):
    d.desc(0, RAM - 16, 32, IND_F)
    return 0


def _indirect_loop(d):
    d.desc(0, BUF, 16, NEXT, 1, table=IND)
    d.desc(1, BUF, 16, NEXT, 0, table=IND)
    d.desc(0, IND, 32, IND_F)
    return 0


def _indirect_self_loop(d):
    d.desc(0, BUF, 16, NEXT | WRITE, 0, table=IND)
    d.desc(0, IND, 16, IND_F)
    return 0


def _indirect_next_out_of_range(d):
    d.desc(0, BUF, 16, NEXT, 1, table=IND)
    d.desc(1, BUF, 16, NEXT, 2, table=IND)             # table has 2 entries
    d.desc(0, IND, 32, IND_F)
    return 0


def _indirect_bad_buffer(d):
    d.indirect_table(IND, [R(BUF, 16), W(MMIO_HOLE_START, 16)])
    d.desc(0, IND, 32, IND_F)
    return 0


def _write_then_read_across_indirect(d):
    d.indirect_table(IND, [R(BUF, 16)])
    d.desc(0, BUF + 16, 16, WRITE | NEXT, 1)
    d.desc(1, IND, 16, IND_F)
    return 0


HOSTILE = [_loop2, _self_loop, _long_loop, _next_out_of_range, _next_ffff, _addr_overflow,
           _addr_overflow_max, _beyond_ram, _at_end_of_ram, _huge_len, _mmio_hole,
           _write_then_read, _too_many_bytes, _bad_second_buffer_after_good_writable,
           _nested_indirect, _indirect_and_next, _indirect_len(24), _indirect_len(0),
           _indirect_len(8), _indirect_len(0x1010), _indirect_len(0xFFFFFFF0),
           _indirect_outside_ram, _indirect_loop, _indirect_self_loop,
           _indirect_next_out_of_range, _indirect_bad_buffer, _write_then_read_across_indirect]


@pytest.mark.parametrize("build", HOSTILE, ids=lambda f: f.__name__.strip("_"))
def test_hostile_chain(mem, build):
    d, q = make(mem, indirect=True, max_chain_bytes=0x1000, max_indirect_len=0x1000)
    head = build(d)
    d.post(head)
    before = snapshot(mem)
    with pytest.raises(ChainError) as e:
        q.pop()
    assert e.value.head == head
    assert snapshot(mem, LOW) == before[:LOW]       # pop wrote nothing (see also shared_mem)
    q.put(e.value.head, 0)
    assert_only(before, snapshot(mem), [d.used_ring_range()])
    assert d.used_elem(0) == (head, 0) and d.used_idx() == 1
    assert_serves_next(d, q)


def test_indirect_not_negotiated(mem):
    d, q = make(mem)                                # indirect=False
    ln = d.indirect_table(IND, [W(BUF, 16)])
    d.desc(0, IND, ln, IND_F)
    d.post(0)
    before = snapshot(mem)
    with pytest.raises(ChainError, match="not negotiated"):
        q.pop()
    assert snapshot(mem) == before
    q.put(0, 0)
    assert_serves_next(d, q)


def _jump(d):
    d.post(d.chain([R(BUF, 1)]))
    d.set_avail_idx(SIZE + 1)


def _backwards(d):
    d.set_avail_idx(0xFFFF)


def _head_too_big(d):
    d.post(SIZE)


def _head_ffff(d):
    d.post(0xFFFF)


@pytest.mark.parametrize("build", [_jump, _backwards, _head_too_big, _head_ffff],
                         ids=lambda f: f.__name__.strip("_"))
def test_fatal_avail_ring(mem, build):
    d, q = make(mem)
    build(d)
    before = snapshot(mem)
    with pytest.raises(QueueFatal):
        q.pop()
    assert q.broken
    d.set_avail_idx(0)
    d.post(d.chain([R(BUF, 1)]))
    with pytest.raises(QueueFatal):                 # stays broken until the driver resets
        q.pop()
    assert_only(before, snapshot(mem), [(AVAIL, 6 + 2 * SIZE), (DESC, 16 * SIZE)])
    mem.write(AVAIL, bytes(6 + 2 * SIZE))           # reset: the driver re-creates the rings
    mem.write(USED, bytes(6 + 8 * SIZE))
    d2, q2 = make(mem)
    assert_serves_next(d2, q2)


def test_jump_after_good_progress(mem):
    d, q = make(mem, size=4)
    d.post(*[d.chain([R(BUF, 1)]) for _ in range(3)])
    for _ in range(3):
        q.put(q.pop().head, 0)
    d.set_avail_idx(3 + 5)
    with pytest.raises(QueueFatal):
        q.pop()


def test_exactly_size_pending_is_fine(mem):
    d, q = make(mem, size=4)
    d.post(*[d.chain([R(BUF, 1)]) for _ in range(4)])
    assert [q.pop().head for _ in range(4)] == [0, 1, 2, 3]
    assert q.pop() is None


def test_mmio_hole_with_ram_above_4g():
    """A guest over 3 GiB: RAM on both sides of the hole; buffers must not touch the hole."""
    size = MMIO_HOLE_START + (16 << 20)
    try:
        fd = create_memfd(size)
        m = GuestMemory(fd, size)
    except (OSError, ValueError) as e:                # pragma: no cover - host limits
        pytest.skip(f"cannot map a {size:#x}-byte guest: {e}")
    try:
        d = Driver(m)
        q = VirtQueue(m, SIZE, DESC, AVAIL, USED)
        hi = 1 << 32
        ok = d.chain([R(MMIO_HOLE_START - 0x1000, 0x1000), W(hi, 0x1000), W(hi + (16 << 20) - 8, 8)])
        bad = [d.chain([R(MMIO_HOLE_START - 0x1000, 0x1001)]),     # straddles into the hole
               d.chain([W(MMIO_HOLE_START, 1)]),
               d.chain([W(hi - 1, 2)]),                             # straddles out of the hole
               d.chain([W(hi + (16 << 20) - 8, 9)])]                # past the top of high RAM
        d.post(ok, *bad)
        c = q.pop()
        assert c.writable == [(hi, 0x1000), (hi + (16 << 20) - 8, 8)]
        assert c.write_into(b"x" * 0x1008) == 0x1008
        for h in bad:
            with pytest.raises(ChainError) as e:
                q.pop()
            assert e.value.head == h
    finally:
        os.close(fd)


# --- property tests -------------------------------------------------------------------

# Per example the low 2 MiB (rings, tables, buffers) is diffed exactly; a stray
# write anywhere higher fails the shared_mem teardown check.  (A whole-RAM copy
# per example takes ~0.1 s here, too slow for hundreds of examples.)
PLOW = 2 << 20


@pytest.fixture
def pmem(shared_mem):
    return shared_mem


def _ram_ok(addr, ln):
    return 0 <= addr and addr + ln <= RAM


def model_walk(mem, descs, head, indirect_ok, max_ind, cap, info=None):
    """Independent reference: ('ok', readable, writable) or 'chain' (a ChainError)."""
    table, ind, i, seen, r, w, total = descs, False, head, set(), [], [], 0
    while True:
        if (ind, i) in seen:
            return "chain"                          # a loop: revisiting a descriptor
        seen.add((ind, i))
        addr, ln, fl, nx = table[i]
        if fl & IND_F:
            if ind or not indirect_ok or fl & NEXT or ln == 0 or ln % 16 or ln > max_ind \
                    or not _ram_ok(addr, ln):
                return "chain"
            raw = mem.read(addr, ln)
            table = [DESC_FMT.unpack(raw[k:k + 16]) for k in range(0, ln, 16)]
            ind, i = True, 0
            if info is not None:
                info["indirect"] = True
            continue
        if not _ram_ok(addr, ln):
            return "chain"
        if fl & WRITE:
            w.append((addr, ln))
        elif w:
            return "chain"
        else:
            r.append((addr, ln))
        total += ln
        if total > cap:
            return "chain"
        if not fl & NEXT:
            return ("ok", r, w)
        if nx >= len(table):
            return "chain"
        i = nx


def model_pop(mem, size, descs, avail_idx, ring, last, opts, info=None):
    pending = (avail_idx - last) & 0xFFFF
    if pending == 0:
        return None
    if pending > size:
        return "fatal"
    head = ring[last % size]
    if head >= size:
        return "fatal"
    return head, model_walk(mem, descs, head, opts["indirect"], opts["max_indirect_len"],
                            opts["max_chain_bytes"], info)


# Wild descriptors: any field any value, biased to the edges of RAM and of u64/u32.
ADDRS = st.one_of(
    st.integers(BUF, BUF + 0x4000),
    st.sampled_from([0, RAM - 16, RAM - 1, RAM, MMIO_HOLE_START, MMIO_HOLE_START - 8, 1 << 32,
                     2 ** 64 - 16, 2 ** 64 - 1, IND, IND + 0x200, DESC, USED]),
    st.integers(0, 2 ** 64 - 1))
LENS = st.one_of(st.integers(0, 0x100),
                 st.sampled_from([0, 8, 15, 16, 32, 48, 64, 128, 0x1000, 0x10000, 0x10010,
                                  0xFFFFFFF0, 0xFFFFFFFF]),
                 st.integers(0, 2 ** 32 - 1))
FLAGS = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
NEXTS = st.one_of(st.integers(0, 17), st.integers(0, 0xFFFF))
WILD = st.tuples(ADDRS, LENS, FLAGS, NEXTS)
OPTS = st.fixed_dictionaries({
    "indirect": st.sampled_from([True, True, False]),
    "max_chain_bytes": st.sampled_from([256 << 20] * 6 + [0x400, 0]),
    "max_indirect_len": st.sampled_from([64 << 10, 64 << 10, 32]),
})


RARE = st.sampled_from([False] * 9 + [True])      # about 1 in 10 (index 0 is drawn most)


def _mostly(draw, likely, rare):
    """`likely` mostly: enough wild values without drowning the walk."""
    return draw(rare if draw(RARE) else likely)


def _mostly_st(likely, rare):
    return RARE.flatmap(lambda r: rare if r else likely)


@st.composite
def descriptor(draw, n, i, split):
    """Descriptor i of a table of n entries: about 1 in 10 wild, else mostly a sane
    chain i -> i + 1 that turns device-writable at `split`."""
    if draw(RARE):
        return draw(WILD)
    flags = draw(st.sampled_from([NEXT, 0, NEXT, 0, NEXT, 0, IND_F, IND_F | WRITE, IND_F | NEXT]))
    if i >= split if draw(st.integers(0, 4)) else draw(st.booleans()):
        flags |= WRITE
    seq = draw(st.sampled_from([True, True, True, False]))
    nxt = i + 1 if seq else draw(st.integers(0, n))          # n: one past the end
    if flags & IND_F:
        ln = 16 * _mostly(draw, st.integers(1, 6), st.integers(0, 7))
        return (draw(st.sampled_from([IND, IND + 0x200])), ln, flags, nxt)
    return (draw(st.integers(BUF, BUF + 0x4000)), draw(st.integers(0, 0x100)), flags, nxt)


@st.composite
def queues(draw):
    size = draw(st.sampled_from([1, 2, 4, 4, 8, 8, 16]))
    split = draw(st.integers(0, size))
    descs = [draw(descriptor(size, i, split)) for i in range(size)]
    ind_tables = []
    for _ in range(2):
        n = draw(st.integers(0, 6))
        split = draw(st.integers(0, n))
        ind_tables.append([draw(descriptor(n, i, split)) for i in range(n)])
    ring = draw(st.lists(_mostly_st(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                         min_size=size, max_size=size))
    last = draw(st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)))
    pending = _mostly(draw, st.integers(1, size), st.integers(0, 0xFFFF))
    return size, descs, ind_tables, ring, last, (last + pending) & 0xFFFF, draw(OPTS)


def _lay_out(mem, size, descs, ind_tables, ring, avail_idx, last):
    mem.write(0, bytes(PLOW))
    d = Driver(mem, size)
    mem.write_u16(USED + 2, last)                   # the used idx the restored queue resumes
    for i, t in enumerate(descs):
        d.desc(i, *t)
    for base, table in zip((IND, IND + 0x200), ind_tables):
        for i, t in enumerate(table):
            d.desc(i, *t, table=base)
    for i, h in enumerate(ring):
        mem.write_u16(AVAIL + 4 + 2 * i, h)
    d.set_avail_idx(avail_idx)
    return d


def _label(got, info):
    if not isinstance(got, tuple):
        return {None: "empty", "fatal": "QueueFatal"}[got]
    if got[1] == "chain":
        return "ChainError"
    n = len(got[1][1]) + len(got[1][2])
    return f"Chain of {min(n, 4)}{'+' if n >= 4 else ''}" + (" via indirect" if info else "")


PROP = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROP
@given(queues())
def test_property_pop_matches_reference_and_never_writes(pmem, q_):
    size, descs, ind_tables, ring, last, avail_idx, opts = q_
    d = _lay_out(pmem, size, descs, ind_tables, ring, avail_idx, last)
    q = restored(pmem, size, last, **opts)
    info = {}
    expected = model_pop(pmem, size, descs, avail_idx, ring, last, opts, info)
    before = snapshot(pmem, PLOW)
    try:
        got = q.pop()
    except QueueFatal:
        got = "fatal"
    except ChainError as e:
        got = (e.head, "chain")
    # any other exception propagates and fails the test
    assert snapshot(pmem, PLOW) == before
    if isinstance(got, Chain):
        for addr, ln in got.readable + got.writable:
            assert pmem.contains(addr, ln)
        n = len(got.readable) + len(got.writable)
        assert n <= size + opts["max_indirect_len"] // 16
        assert got.readable_len + got.writable_len <= opts["max_chain_bytes"]
        got = (got.head, ("ok", got.readable, got.writable))
    assert got == expected
    event(_label(got, info))
    if isinstance(got, tuple):
        q.put(got[0], 0)
        assert_only(before, snapshot(pmem, PLOW), [d.used_ring_range()])


@PROP
@given(queues(), st.data())
def test_property_pop_sequence(pmem, q_, data):
    """Drain a random avail ring: each pop agrees with the model, only the used ring changes
    (with EVENT_IDX pop also writes avail_event, which is in the used ring)."""
    size, descs, ind_tables, ring, last, avail_idx, opts = q_
    d = _lay_out(pmem, size, descs, ind_tables, ring, avail_idx, last)
    q = restored(pmem, size, last, event_idx=data.draw(st.booleans()), **opts)
    before = snapshot(pmem, PLOW)
    used = []
    for k in range(size + 2):
        expected = model_pop(pmem, size, descs, avail_idx, ring, (last + k) & 0xFFFF, opts)
        try:
            c = q.pop()
        except QueueFatal:
            assert expected == "fatal" and q.broken
            with pytest.raises(QueueFatal):
                q.pop()
            break
        except ChainError as e:
            assert expected == (e.head, "chain")
            used.append((e.head, 0))
            q.put(e.head, 0)
            continue
        if c is None:
            assert expected is None
            break
        assert expected == (c.head, ("ok", c.readable, c.writable))
        n = data.draw(st.integers(0, c.writable_len))
        used.append((c.head, n))
        q.put(c.head, n)
    else:
        pytest.fail("popped more chains than the queue holds")
    assert len(used) <= size
    assert_only(before, snapshot(pmem, PLOW), [d.used_ring_range()])
    assert d.used_idx() == (last + len(used)) & 0xFFFF
    for k, elem in enumerate(used):
        assert d.used_elem((last + k) & 0xFFFF) == elem
    if q.event_idx and used:
        assert d.avail_event() == q.last_avail_idx
