"""Just enough of a split-ring virtio driver, in Python, to feed device backends from tests.

Rings sit at fixed guest-physical addresses (by default DESC, AVAIL, USED) in
a memfd-backed GuestMemory; the test posts chains and waits for used entries.
`RxTxGuest` is guest RAM with a receive and a transmit queue, for the
two-queue devices (console, net).
"""
import os
import struct
import time

from pyhv.devices.guest_memory import GuestMemory, create_memfd
from pyhv.devices.virtio.device import Eventfds, TransportEvents
from pyhv.proto.device_service import QueueConfig

DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
F_NEXT, F_WRITE = 1, 2


class FakePort:
    """A virtio-net model's host port that keeps what the device sends."""

    def __init__(self):
        self.sent = []

    def start(self):
        pass

    def send(self, frame):
        self.sent.append(bytes(frame))

    def counters(self):
        return {"backend": "fake"}

    def close(self):
        pass


class RingDriver:
    def __init__(self, mem, size=8, rings=(DESC, AVAIL, USED)):
        self.mem, self.size, self.avail, self.used_seen, self.free = mem, size, 0, 0, 0
        self.desc, self.avail_addr, self.used = rings

    def post(self, bufs):
        """bufs: [(addr, len, writable)]; returns the head."""
        n = len(bufs)
        idx = [(self.free + k) % self.size for k in range(n)]
        self.free += n
        for k, (addr, ln, w) in enumerate(bufs):
            flags = (F_WRITE if w else 0) | (F_NEXT if k < n - 1 else 0)
            self.mem.write(self.desc + 16 * idx[k],
                           struct.pack("<QIHH", addr, ln, flags, idx[k + 1] if k < n - 1 else 0))
        self.mem.write_u16(self.avail_addr + 4 + 2 * (self.avail % self.size), idx[0])
        self.avail = (self.avail + 1) & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail)
        return idx[0]

    def pending_used(self):
        return (self.mem.read_u16(self.used + 2) - self.used_seen) & 0xFFFF

    def wait_used(self, timeout=10):
        """(id, len) of the next used element; TimeoutError if the device posts none in time."""
        deadline = time.monotonic() + timeout
        while self.mem.read_u16(self.used + 2) == self.used_seen:
            if time.monotonic() > deadline:
                raise TimeoutError("no used entry")
            time.sleep(0.0005)
        slot = self.used_seen % self.size
        self.used_seen = (self.used_seen + 1) & 0xFFFF
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))


RXTX_RAM = 16 << 20
RXTX_QSIZE = 8
# receiveq rings at 0x10000.., transmitq rings at 0x14000..; buffers above 0x100000
RX_RINGS, TX_RINGS = (0x10000, 0x11000, 0x12000), (0x14000, 0x15000, 0x16000)
TXBUF, RXBUF = 0x100000, 0x200000


class RxTxGuest:
    """Guest RAM, the eventfds, and drivers for a receive queue (0) and a transmit queue (1)."""

    def __init__(self, ram=RXTX_RAM, qsize=RXTX_QSIZE):
        self.fd = create_memfd(ram)
        self.mem = GuestMemory(self.fd, ram)
        self.qsize = qsize
        self.eventfds = Eventfds.create(2)
        self.notify, self.irq = self.eventfds.notify, self.eventfds.irq
        self.rx = RingDriver(self.mem, qsize, RX_RINGS)
        self.tx = RingDriver(self.mem, qsize, TX_RINGS)

    def queues(self):
        return [QueueConfig(0, self.qsize, *RX_RINGS, 0), QueueConfig(1, self.qsize, *TX_RINGS, 1)]

    def attach(self, model, events=None):
        """Give `model` this guest's eventfds (and where its events go); returns it."""
        model.attach(events or TransportEvents(), self.eventfds)
        return model

    def send(self, *chunks, kick=True, at=0):
        """One transmit chain with one readable buffer per chunk (at TXBUF + at * 64K); returns the head."""
        bufs, addr = [], TXBUF + at * 0x10000
        for c in chunks:
            self.mem.write(addr, c)
            bufs.append((addr, len(c), False))
            addr += 0x1000
        head = self.tx.post(bufs)
        if kick:
            os.eventfd_write(self.notify[1], 1)
        return head

    def post_rx(self, n, slot, kick=True):
        """One receive chain: a writable buffer of n bytes at RXBUF + slot * 4K, pre-filled with 0xEE."""
        addr = RXBUF + slot * 0x1000
        self.mem.write(addr, b"\xEE" * (n + 16))
        head = self.rx.post([(addr, n, True)])
        if kick:
            os.eventfd_write(self.notify[0], 1)
        return head, addr

    def close(self):
        self.mem.close()
        os.close(self.fd)
        self.eventfds.close()
