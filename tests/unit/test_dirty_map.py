"""The dirty map after guest RAM in the memfd: what devices write is logged, after the write, for a live migration.

Every process that maps the memfd sees the same map (two mappings here
stand for the worker and a device service).  The marks must cover every
page a device wrote: GuestMemory.write's, a view's that is `mark()`ed, a
chain's buffers once VirtQueue.put returns it, and the used ring; and
`take_dirty` clears only what it saw.
"""
import os

import pytest

from pyhv.devices.guest_memory import (HIGH_RAM_START, MMIO_HOLE_START, PAGE_SIZE, GuestMemory, create_memfd,
                                       dirty_map_span, memfd_fits)
from pyhv.devices.virtio.queue import VirtQueue
from ringdriver import AVAIL, DESC, USED, RingDriver

RAM = 16 << 20


@pytest.fixture
def two():
    """The memfd mapped twice: (the worker's view, a device service's view)."""
    fd = create_memfd(RAM)
    yield GuestMemory(fd, RAM), GuestMemory(fd, RAM)
    os.close(fd)            # the mappings go with the objects (queues may still hold views)


def marked(seen):
    return [i for i, v in enumerate(seen) if v]


def test_the_memfd_holds_ram_then_one_byte_per_page(two):
    a, _ = two
    assert dirty_map_span(RAM) == (RAM, PAGE_SIZE)           # 4096 pages: one page of map
    assert memfd_fits(a.fd, RAM) and not memfd_fits(a.fd, RAM * 2)
    assert len(a.dirty) == RAM // PAGE_SIZE
    assert marked(a.take_dirty()) == []
    with pytest.raises(Exception):
        a.read(RAM, 1)                                       # the map is no guest address


def test_writes_are_marked_in_every_mapping_and_taking_clears_them(two):
    worker, service = two
    service.write(3 * PAGE_SIZE - 2, b"abcd")                 # straddles pages 2 and 3
    service.write_u32(10 * PAGE_SIZE, 7)
    service.view(20 * PAGE_SIZE, 3 * PAGE_SIZE)[:] = bytes(3 * PAGE_SIZE)
    seen = worker.take_dirty()
    assert marked(seen) == [2, 3, 10]                       # the view's write is not logged until marked
    service.mark(20 * PAGE_SIZE + 1, 2 * PAGE_SIZE)         # pages 20..22
    assert marked(worker.take_dirty()) == [20, 21, 22]
    assert marked(worker.take_dirty()) == []                # taken means cleared


def test_a_mark_made_after_a_take_stays_for_the_next(two):
    worker, service = two
    service.write(0, b"x")
    seen = worker.take_dirty()
    service.write(0, b"y")                                  # written again after its mark was cleared
    assert marked(seen) == [0] and marked(worker.take_dirty()) == [0]


def test_high_ram_is_marked_at_its_memfd_page():
    size = MMIO_HOLE_START + (8 << 20)                      # 8 MiB above 4 GiB
    fd = create_memfd(size)
    try:
        m = GuestMemory(fd, size)
        m.write(HIGH_RAM_START + PAGE_SIZE, b"z")
        assert marked(m.take_dirty()) == [MMIO_HOLE_START // PAGE_SIZE + 1]
        m.close()
    finally:
        os.close(fd)


def test_a_plugin_reads_through_views_and_writes_only_through_write():
    fd = create_memfd(RAM)
    m = GuestMemory(fd, RAM, readonly_views=True)
    with pytest.raises(TypeError):
        m.view(0, 4)[:] = b"abcd"
    m.write(0, b"abcd")
    assert bytes(m.view(0, 4)) == b"abcd" and marked(m.take_dirty()) == [0]
    m.close()
    os.close(fd)


def test_put_marks_the_chain_it_returns_and_the_used_ring(two):
    worker, service = two
    driver = RingDriver(service, 8)
    q = VirtQueue(service, 8, DESC, AVAIL, USED)
    driver.post([(0x100000, 16, False), (0x200000 - 8, 16, True), (0x300000, 100, True)])
    worker.take_dirty()                                     # the driver's own writes
    chain = q.pop()
    views = chain.writable_views()
    views[0][:] = b"w" * 16                                 # e.g. preadv into the buffers
    views[1][:4] = b"data"
    assert marked(worker.take_dirty()) == []                # in flight: not the guest's to see yet
    q.put(chain.head, 20)
    used_page = USED // PAGE_SIZE
    assert marked(worker.take_dirty()) == [used_page, 0x1FF, 0x200, 0x300]


def test_a_bad_chain_returned_empty_marks_only_the_used_ring(two):
    worker, service = two
    driver = RingDriver(service, 8)
    q = VirtQueue(service, 8, DESC, AVAIL, USED)
    driver.post([(RAM - 8, 16, True)])                      # leaves RAM: a ChainError
    worker.take_dirty()
    with pytest.raises(Exception) as e:
        q.pop()
    q.put(e.value.head, 0)
    assert marked(worker.take_dirty()) == [USED // PAGE_SIZE]


def test_used_flags_and_avail_event_are_marked(two):
    worker, service = two
    q = VirtQueue(service, 8, DESC, AVAIL, USED)
    worker.take_dirty()
    q.set_notification(False)                               # used.flags
    assert marked(worker.take_dirty()) == [USED // PAGE_SIZE]
    qe = VirtQueue(service, 8, DESC, AVAIL, USED, event_idx=True)
    RingDriver(service, 8).post([(0x100000, 16, True)])
    worker.take_dirty()
    qe.pop()                                                # writes avail_event
    assert marked(worker.take_dirty()) == [USED // PAGE_SIZE]
