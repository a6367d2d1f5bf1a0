"""Guest RAM: the one checked accessor every guest address goes through.

Guest RAM is a memfd the supervisor creates; the worker and each device
service map the same fd.  RAM sits below the 32-bit MMIO hole and, for guests
larger than 3 GiB, continues at 4 GiB.  Every access checks that the whole
range [addr, addr + len) lies inside one RAM region; a guest address is
untrusted input.
"""
import mmap
import os

from pyhv.proto.errors import HvError
from pyhv.proto.guest import HIGH_RAM_START, MMIO_HOLE_START, ram_ranges  # noqa: F401


class GuestMemoryError(HvError):
    """A guest-physical range is not (entirely) guest RAM."""


def ram_regions(size):
    """[(guest_phys_addr, length, memfd_offset)] for a guest of `size` bytes: RAM is one memfd, in order."""
    regions, offset = [], 0
    for gpa, length in ram_ranges(size):
        regions.append((gpa, length, offset))
        offset += length
    return regions


def create_memfd(size, name="guest-ram"):
    """A memfd of `size` bytes for guest RAM (the supervisor's job; `hvctl run` does it too)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class GuestMemory:
    """A mapping of the guest RAM memfd with bounds-checked access."""

    def __init__(self, fd, size):
        self.fd = fd
        self.size = size
        self.regions = ram_regions(size)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)

    def host_buffer(self):
        """The whole mapping, for registering with KVM (host address via cffi)."""
        return self._map

    def _offset(self, addr, length):
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
        """A writable memoryview of guest RAM [addr, addr+length): no copy."""
        off = self._offset(addr, length)
        return self._view[off:off + length]

    def read(self, addr, length):
        """A private copy: read guest structures once, then validate the copy."""
        off = self._offset(addr, length)
        return bytes(self._view[off:off + length])

    def write(self, addr, data):
        off = self._offset(addr, len(data))
        self._view[off:off + len(data)] = data

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
