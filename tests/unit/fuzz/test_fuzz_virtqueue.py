"""Fuzz: the split virtqueue (devices/virtio/queue.py) against a driver that writes anything anywhere.

tests/unit/test_virtqueue.py checks pop() against a reference walk; here the
rings and descriptor tables are raw bytes (or arbitrary values in every
field), the device serves what it pops (writes into every writable buffer,
puts it, asks about notifications), the driver may rewrite the rings from
another thread while the device works, and queues are built and restored
from arbitrary settings.  The property: only the documented errors escape
(ChainError, QueueFatal, QueueConfigError), every chain is inside RAM and
within its limits, the device writes only the chains' writable buffers and
the used ring (checked against canary RAM), and the ring positions add up.
"""
import struct
import threading

import pytest
from hypothesis import given, strategies as st

from fuzzing import CanaryMemory, budget
from pyhv.devices.virtio.queue import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, ChainError,
                                       QueueConfigError, QueueFatal, VirtQueue)
from pyhv.proto.device_service import QueueConfig, QueueState

pytestmark = pytest.mark.fuzz

RAM = 2 << 20
DESC, AVAIL, USED, IND = 0x10000, 0x18000, 0x19000, 0x20000
DESC_FMT = struct.Struct("<QIHH")

ADDRS = st.one_of(st.integers(0, RAM - 1), st.integers(0, 2 ** 64 - 1),
                  st.sampled_from([0, RAM - 1, RAM - 16, RAM, IND, DESC, USED, 2 ** 64 - 1, 2 ** 64 - 16, 2 ** 63,
                                   0xC000_0000, 0xFFFF_FFFF]))
LENS = st.one_of(st.integers(0, 4096), st.integers(0, 2 ** 32 - 1),
                 st.sampled_from([0, 1, 15, 16, 32, 64 << 10, RAM, RAM + 1, 2 ** 32 - 1]))


def descriptor(size):
    return st.tuples(ADDRS, LENS, st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)),
                     st.one_of(st.integers(0, max(size - 1, 0)), st.integers(0, 0xFFFF)))


@st.composite
def rings(draw):
    """(size, descriptor table bytes, indirect area bytes, avail ring bytes, features, last_avail)."""
    size = 1 << draw(st.integers(0, 8))
    if draw(st.booleans()):                    # raw bytes
        table = draw(st.binary(min_size=16 * size, max_size=16 * size))
        ind = draw(st.binary(max_size=512))
    else:                                      # every field drawn from its interesting values
        table = b"".join(DESC_FMT.pack(*d) for d in draw(st.lists(descriptor(size), min_size=size, max_size=size)))
        ind = b"".join(DESC_FMT.pack(*d) for d in draw(st.lists(descriptor(32), max_size=32)))
    last = draw(st.integers(0, 0xFFFF))
    posted = draw(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)))
    heads = draw(st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)), min_size=size,
                          max_size=size))
    flags, used_event = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    avail = struct.pack(f"<HH{size}HH", flags, (last + posted) & 0xFFFF, *heads, used_event)
    features = draw(st.sampled_from([0, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX,
                                     VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX]))
    return size, table, ind, avail, features, last


@pytest.fixture(scope="module")
def ram():
    m = CanaryMemory(RAM)
    yield m
    m.close()


def lay_out(mem, size, table, ind, avail):
    mem.reset()
    mem.write(DESC, table)
    mem.write(IND, ind)
    mem.write(AVAIL, avail)
    mem.settle()


def check_chain(mem, q, chain):
    for addr, ln in chain.readable + chain.writable:
        assert mem.contains(addr, ln)
    assert chain.readable_len == sum(n for _, n in chain.readable)
    assert chain.writable_len == sum(n for _, n in chain.writable)
    assert chain.readable_len + chain.writable_len <= q.max_chain_bytes
    assert len(chain.readable) + len(chain.writable) <= q.size + q.max_indirect_len // 16


def serve(mem, q, draw_int):
    """Pop and serve until empty or broken: [(head, used length)] and the writable ranges the device was given."""
    used, allowed = [], []
    for _ in range(q.size + 2):
        try:
            chain = q.pop()
        except ChainError as e:
            q.put(e.head, 0)
            used.append((e.head, 0))
            continue
        except QueueFatal:
            assert q.broken
            with pytest.raises(QueueFatal):
                q.pop()
            break
        if chain is None:
            break
        check_chain(mem, q, chain)
        assert len(chain.read_all(1 << 16)) == min(chain.readable_len, 1 << 16)
        offset = draw_int(0, chain.writable_len)
        data = b"\xee" * min(chain.writable_len, 1 << 16)
        assert chain.write_into(data, offset) == min(len(data), chain.writable_len - offset)
        allowed += chain.writable
        q.put(chain.head, min(chain.writable_len, 0xFFFFFFFF))
        used.append((chain.head, min(chain.writable_len, 0xFFFFFFFF)))
        q.set_notification(draw_int(0, 1))
        q.needs_interrupt()
    else:
        pytest.fail("popped more chains than the queue holds")
    return used, allowed


@budget(150)
@given(rings(), st.data())
def test_served_rings_write_only_where_the_driver_said(ram, r, data):
    size, table, ind, avail, features, last = r
    lay_out(ram, size, table, ind, avail)
    q = VirtQueue.restore(ram, QueueState(QueueConfig(0, size, DESC, AVAIL, USED), last, last), features)
    try:
        used, allowed = serve(ram, q, lambda lo, hi: data.draw(st.integers(lo, hi)))
        assert q.used_idx == (last + len(used)) & 0xFFFF and len(used) <= size
        if used:
            assert ram.read_u16(USED + 2) == q.used_idx
        ram.assert_written_only_within(allowed + [(USED, 6 + 8 * size)])
    finally:
        q.close()


@budget(40)
@given(rings(), st.integers(0, 2 ** 32 - 1))
def test_a_driver_rewriting_the_rings_while_the_device_serves_them(ram, r, seed):
    """A second thread scribbles over the descriptor table, indirect area and avail ring (not the used ring,
    which the device owns) while the device pops: every chain it gets is still valid, nothing else escapes."""
    import random
    size, table, ind, avail, features, last = r
    lay_out(ram, size, table, ind, avail)
    q = VirtQueue.restore(ram, QueueState(QueueConfig(0, size, DESC, AVAIL, USED), last, last), features)
    stop = threading.Event()

    def scribble():
        rng = random.Random(seed)
        spans = [(DESC, 16 * size), (IND, 512), (AVAIL, 6 + 2 * size)]
        while not stop.is_set():
            base, n = rng.choice(spans)
            at = base + rng.randrange(n)
            ram.write(at, rng.randbytes(min(8, base + n - at)))
    t = threading.Thread(target=scribble, daemon=True)
    t.start()
    try:
        for _ in range(4):
            serve(ram, q, lambda lo, hi: hi)
            if q.broken:
                break
    finally:
        stop.set()
        t.join()
        q.close()


SETTINGS = st.one_of(st.integers(0, 2 ** 64 - 1), st.integers(-5, RAM + 5), st.sampled_from([0, RAM - 8, 2 ** 64]))


@budget(200)
@given(size=st.one_of(st.integers(-2, 70000), st.sampled_from([1, 2, 256, 32768])), desc=SETTINGS, avail=SETTINGS,
       used=SETTINGS, last=st.integers(-1, 0x10000), used_idx=st.integers(-1, 0x10000),
       features=st.integers(0, 2 ** 64 - 1), broken=st.booleans())
def test_queues_from_any_settings_or_saved_state(ram, size, desc, avail, used, last, used_idx, features, broken):
    """What a driver programs, what a restarted service is sent and what a snapshot holds: QueueConfigError or a
    queue whose rings lie inside RAM and whose positions are in range."""
    config = QueueConfig(0, size, desc, avail, used)
    for make in (lambda: VirtQueue.from_config(ram, config, features),
                 lambda: VirtQueue.restore(ram, QueueState(config, last, used_idx, broken=broken), features),
                 lambda: VirtQueue.resumed(ram, config, features)):
        try:
            q = make()
        except QueueConfigError:
            continue
        try:
            assert ram.contains(q.desc_addr, 16 * q.size) and ram.contains(q.avail_addr, 6 + 2 * q.size)
            assert ram.contains(q.used_addr, 6 + 8 * q.size)
            assert 0 <= q.last_avail_idx <= 0xFFFF and 0 <= q.used_idx <= 0xFFFF
            assert (q.last_avail_idx - q.used_idx) & 0xFFFF <= q.size
            q.has_pending()
        finally:
            q.close()
