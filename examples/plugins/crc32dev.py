"""A CRC-32 engine on I/O ports: the guest names a buffer in its RAM, the device checksums it and raises its line.

An example device plugin (docs/plugins.md):

    hvctl run --boot raw64 --kernel examples/build/crc32_demo.bin --device examples/plugins/crc32dev.py:Crc32

Registers, 32 bits each, at ports base + offset:
    0x00 ADDR_LO, 0x04 ADDR_HI   guest-physical address of the buffer
    0x08 LEN                     its length in bytes (at most 16 MiB)
    0x0C CMD                     write 1: checksum ADDR..ADDR+LEN
    0x10 RESULT                  the CRC-32 (zlib's) of the last command
    0x14 STATUS                  bit 0: done, bit 1: the range was not guest RAM
    0x18 ID                      reads "CRC3"
Options: base (default 0x300), irq (an IOAPIC line pulsed when a command
completes; default none).
"""
import struct
import zlib

MAX_LEN = 16 << 20
ADDR_LO, ADDR_HI, LEN, CMD, RESULT, STATUS, ID = range(0, 0x1C, 4)
DONE, BAD_RANGE = 1, 2


class Crc32:
    def __init__(self, base="0x300", irq=None):
        self.pio = [(int(base, 0), 0x20)]
        self.irq = None if irq is None else int(irq, 0)
        self.regs = {ADDR_LO: 0, ADDR_HI: 0, LEN: 0, RESULT: 0, STATUS: 0}
        self.ctx = None
        self.commands = 0

    def attach(self, ctx):
        """Called once in the plugin's process: guest RAM (checked accessor) and the interrupt line."""
        self.ctx = ctx

    def read(self, offset, size):
        reg = offset & ~3
        value = 0x33435243 if reg == ID else self.regs.get(reg, 0)       # "CRC3"
        return struct.pack("<I", value)[offset - reg:][:size].ljust(size, b"\0")

    def write(self, offset, data):
        reg = offset & ~3
        if reg == CMD:
            if data[0] == 1:
                self._checksum()
        elif reg in (ADDR_LO, ADDR_HI, LEN) and offset == reg and len(data) == 4:
            self.regs[reg] = struct.unpack("<I", data)[0]

    def _checksum(self):
        addr, length = self.regs[ADDR_HI] << 32 | self.regs[ADDR_LO], self.regs[LEN]
        mem = self.ctx.memory
        if length > MAX_LEN or not mem.contains(addr, length):
            self.regs[STATUS] = DONE | BAD_RANGE
        else:
            self.regs[RESULT] = zlib.crc32(mem.view(addr, length))
            self.regs[STATUS] = DONE
        self.commands += 1
        if self.irq is not None:
            self.ctx.interrupt()

    def snapshot(self):
        return {"regs": {str(k): v for k, v in self.regs.items()}, "commands": self.commands}

    def restore(self, state):
        self.regs = {int(k): v for k, v in state["regs"].items()}
        self.commands = state["commands"]
