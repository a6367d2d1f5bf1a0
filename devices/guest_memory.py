"""Guest RAM: the one checked accessor every guest address goes through, and the log of what devices wrote.

Guest RAM is a memfd the supervisor creates; the worker and each device
service map the same fd.  RAM sits below the 32-bit MMIO hole and, for guests
larger than 3 GiB, continues at 4 GiB.  Every access checks that the whole
range [addr, addr + len) lies inside one RAM region; a guest address is
untrusted input.

The dirty map.  KVM's dirty log sees only what vCPUs write; device services
(and plugins) write guest RAM through their own mappings of the memfd.  So
the memfd holds, after RAM (from the next page boundary), one byte per RAM
page that every process mapping the memfd sees: a device's write is marked
there (a plain store of 1) AFTER it has completed: `write()` marks what it
wrote, `mark()` is for writes through a `view()` (VirtQueue.put marks a
chain's buffers and the used ring).  A live migration (vcpu_worker/
migration.py) takes the marks (`take_dirty`: each set byte is cleared, then a
full barrier, then the pages are copied), so a write that completes after its
page's mark was cleared marks it again and is sent again; x86 keeps a
device's data store before its mark store.  Marking is always on: it costs a
slice store per write, and there is no moment at which turning it on could
race a write in flight.  No guest address reaches the map (it is not RAM).
"""
import mmap
import os
import re
import threading

from pyhv.proto.errors import HvError
from pyhv.proto.guest import HIGH_RAM_START, MMIO_HOLE_START, ram_ranges  # noqa: F401

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_ONES = b"\x01" * 4096            # marks for up to 16 MiB in one slice store
_MARKED = re.compile(rb"[^\x00]+")
_barrier_lock = threading.Lock()


class GuestMemoryError(HvError):
    """A guest-physical range is not (entirely) guest RAM."""


def full_barrier():
    """A full memory barrier on x86: acquiring a lock is a locked read-modify-write (glibc: lock cmpxchg)."""
    _barrier_lock.acquire()
    _barrier_lock.release()


def ram_regions(size):
    """[(guest_phys_addr, length, memfd_offset)] for a guest of `size` bytes: RAM is one memfd, in order."""
    regions, offset = [], 0
    for gpa, length in ram_ranges(size):
        regions.append((gpa, length, offset))
        offset += length
    return regions


def _pages(size):
    return (size + PAGE_SIZE - 1) >> PAGE_SHIFT


def dirty_map_span(size):
    """(memfd offset, length) of the dirty map of a guest of `size` bytes: one byte per page, after RAM."""
    return _pages(size) << PAGE_SHIFT, _pages(_pages(size)) << PAGE_SHIFT


def create_memfd(size, name="guest-ram"):
    """A memfd for `size` bytes of guest RAM and its dirty map (the supervisor's job; `hvctl run` does it too)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, sum(dirty_map_span(size)))
    except OSError:
        os.close(fd)
        raise
    return fd


def memfd_fits(fd, size):
    """Is `fd` the RAM of a `size`-byte guest as create_memfd makes it (RAM and dirty map)?"""
    return os.fstat(fd).st_size == sum(dirty_map_span(size))


class GuestMemory:
    """A mapping of the guest RAM memfd with bounds-checked access.

    `readonly_views`: view() gives read-only views (a plugin's memory: it writes with write(), which is logged).
    """

    def __init__(self, fd, size, readonly_views=False):
        self.fd = fd
        self.size = size
        self.regions = ram_regions(size)
        self._low_end = self.regions[0][1]
        self.readonly_views = readonly_views
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)
        offset, length = dirty_map_span(size)
        self._dirty_map = self.dirty = None
        if os.fstat(fd).st_size >= offset + length:        # a memfd made without one (old tests): no log
            self._dirty_map = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                        offset=offset)
            self.dirty = memoryview(self._dirty_map)[:_pages(size)]

    def host_buffer(self):
        """The whole mapping, for registering with KVM (host address via cffi)."""
        return self._map

    def _offset(self, addr, length):
        if 0 <= addr and 0 <= length and addr + length <= self._low_end:     # the first region: gpa = offset
            return addr
        if length < 0:
            raise GuestMemoryError(f"negative length {length}")
        for gpa, size, off in self.regions:
            if gpa <= addr and addr + length <= gpa + size:
                return off + (addr - gpa)
        raise GuestMemoryError(f"guest range 0x{addr:x}+0x{length:x} is outside guest RAM")

    def contains(self, addr, length):
        try:
            self._offset(addr, length)
            return True
        except GuestMemoryError:
            return False

    def view(self, addr, length):
        """A memoryview of guest RAM [addr, addr+length): no copy.

        Writable (unless `readonly_views`), but a write through it is not logged: only a chain's buffers
        (VirtQueue.put marks them) or a range `mark()`ed after the write may be written this way."""
        off = self._offset(addr, length)
        view = self._view[off:off + length]
        return view.toreadonly() if self.readonly_views else view

    def read(self, addr, length):
        """A private copy: read guest structures once, then validate the copy."""
        off = self._offset(addr, length)
        return bytes(self._view[off:off + length])

    def write(self, addr, data):
        off = self._offset(addr, len(data))
        self._view[off:off + len(data)] = data
        if self.dirty is not None and data:
            self._mark(off, len(data))

    def mark(self, addr, length):
        """Log that guest range [addr, addr+length) has just been written through a view (call after the write)."""
        if self.dirty is not None and length > 0:
            self._mark(self._offset(addr, length), length)

    def _mark(self, off, length):
        first, end = off >> PAGE_SHIFT, ((off + length - 1) >> PAGE_SHIFT) + 1
        dirty = self.dirty
        if end - first == 1:
            dirty[first] = 1
            return
        while first < end:
            n = min(end - first, len(_ONES))
            dirty[first:first + n] = _ONES[:n]
            first += n

    # -- the migration's side of the dirty map (vcpu_worker/migration.py) ------------------------------------------
    def clear_dirty(self):
        """Forget every mark (a migration's first full pass copies every page after this)."""
        self.dirty[:] = bytes(len(self.dirty))
        full_barrier()

    def take_dirty(self):
        """The marks since the last take, one byte per memfd page (nonzero: written), each cleared in the map.

        Only marks seen are cleared (one set after the copy stays for the next take), and the barrier orders the
        clearing before the caller's copy of those pages: a write that lands after it marks its page again."""
        seen = bytes(self.dirty)
        for m in _MARKED.finditer(seen):
            self.dirty[m.start():m.end()] = bytes(m.end() - m.start())
        full_barrier()
        return seen

    def read_u16(self, addr):
        return int.from_bytes(self.read(addr, 2), "little")

    def read_u32(self, addr):
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr):
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u16(self, addr, value):
        self.write(addr, value.to_bytes(2, "little"))

    def write_u32(self, addr, value):
        self.write(addr, value.to_bytes(4, "little"))

    def write_u64(self, addr, value):
        self.write(addr, value.to_bytes(8, "little"))

    def close(self):
        self._view.release()
        self._map.close()
        if self._dirty_map is not None:
            self.dirty.release()
            self._dirty_map.close()
