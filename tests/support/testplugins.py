"""Device plugins the plugin tests load with `--device testplugins:CLASS` (this directory is their search path).

Each is what an outside user could write from docs/plugins.md alone; the
misbehaving ones misbehave on purpose, at one register, so a guest can show
what happens before and after.
"""
import os
import struct
import time


class Scratch:
    """Eight bytes of registers at ports `base` (or MMIO `mmio`); reading `fail_at` raises, `die_at` kills the
    process, `hang_at` never returns, `slow_at` answers after `slow_ms`."""

    def __init__(self, base="0x300", mmio=None, fail_at=None, die_at=None, hang_at=None, slow_at=None, slow_ms="0"):
        if mmio is None:
            self.pio = [(int(base, 0), 8)]
        else:
            self.mmio = [(int(mmio, 0), 0x1000)]
        num = lambda v: None if v is None else int(v, 0)  # noqa: E731
        self.fail_at, self.die_at, self.hang_at, self.slow_at = map(num, (fail_at, die_at, hang_at, slow_at))
        self.slow_ms = int(slow_ms)
        self.regs = bytearray(8)

    def read(self, offset, size):
        if offset == self.fail_at:
            raise RuntimeError(f"boom at {offset:#x}")
        if offset == self.die_at:
            os._exit(3)
        if offset == self.hang_at:
            while True:
                time.sleep(1)
        if offset == self.slow_at:
            time.sleep(self.slow_ms / 1000)
        offset %= 8
        return bytes(self.regs[offset:offset + size]).ljust(size, b"\0")

    def write(self, offset, data):
        offset %= 8
        self.regs[offset:offset + len(data)] = data[:8 - offset]


class Counter:
    """Port `base`: every write adds 1; a 4-byte read returns the count.  Kept in snapshots."""

    def __init__(self, base="0x310"):
        self.pio = [(int(base, 0), 4)]
        self.count = 0

    def read(self, offset, size):
        return struct.pack("<I", self.count)[:size].ljust(size, b"\0")

    def write(self, offset, data):
        self.count += 1

    def snapshot(self):
        return {"count": self.count}

    def restore(self, state):
        self.count = state["count"]


class NoState(Counter):
    """A Counter that cannot snapshot: no snapshot() of its own."""
    snapshot = None
