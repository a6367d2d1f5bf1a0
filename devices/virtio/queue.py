"""The split virtqueue (virtio 1.x section 2.7), device side, against an untrusted driver.

A `VirtQueue` takes descriptor chains the driver made available (`pop`),
hands them to the device as a validated `Chain` of guest buffers, and returns
them through the used ring (`put`), with both directions of notification
suppression (VIRTQ_AVAIL_F_NO_INTERRUPT / used_event, VIRTQ_USED_F_NO_NOTIFY /
avail_event).

Trust rules
-----------
* Ring locations and the queue size come from the driver through the
  transport; the constructor checks them (size, alignment, every ring wholly
  inside guest RAM) and raises `QueueConfigError`.  After that the three rings
  are accessed through views made once, so no ring access can leave RAM.
* Every value the guest can change is read exactly once into a local Python
  int and only that copy is validated and used.  avail.idx and the ring
  entries are single aligned 16-bit loads (memoryview cast 'H'), so the guest
  cannot make us see a torn index.  A descriptor is one `struct.unpack_from`
  of its 16 bytes: each byte is read once and the resulting tuple is the
  private copy (the guest may rewrite the entry afterwards; we never look
  again).  We read one descriptor at a time rather than copying the whole
  table per pop: a chain is usually 1-3 descriptors and the table can be
  512 KiB (32768 entries).  An indirect table is copied whole with one
  `mem.read` (bounded by `max_indirect_len`) and walked from that copy.
* Errors:
  - `ChainError`: one chain is malformed.  Its avail entry is consumed; the
    device returns it with `put(err.head, 0)` (used length 0, nothing written
    into guest memory), and the queue keeps serving.
  - `QueueFatal`: the avail ring itself is inconsistent (avail.idx moved by
    more than the queue size, or a head index >= size), so no used entry can
    be made sensible.  The queue is marked `broken` and every later `pop`
    raises again.  The device stops serving it and sets DEVICE_NEEDS_RESET
    (64) in device status: spec 2.1.2 (Device Status Field, device
    requirements): "The device SHOULD set DEVICE_NEEDS_RESET when it enters
    an error state that a reset is needed.  If DRIVER_OK is set, after it sets
    DEVICE_NEEDS_RESET, the device MUST send a device configuration change
    notification to the driver."  The driver then resets the device, which
    builds new `VirtQueue`s.  (2.7 only says what the driver MUST NOT do:
    decrement avail idx, expose more chains than the queue size.)
  - `ValueError` from `put`/`walk` is a *device* bug (a head the device made up).

Memory ordering
---------------
The service shares guest RAM with the vCPUs through a MAP_SHARED mapping;
Python gives no fences, so this relies on x86-64 TSO:
* loads are not reordered with older loads: reading avail.idx, then the ring
  entry, then the descriptors it names sees the driver's writes in the order
  its barriers published them;
* stores are not reordered with older stores: `put` writes the used element,
  then used.idx (one aligned 16-bit store), so the driver never sees the new
  index before the element (spec: "The device MUST set len prior to updating
  the used idx"); data written into the chain's buffers beforehand (including
  by os.preadv into the mapping) is likewise visible first;
* a store followed by a load of another location CAN be reordered (store
  buffer), which matters twice: after publishing used.idx and before reading
  used_event/avail.flags (`needs_interrupt`), and after publishing
  avail_event/used.flags and before re-reading avail.idx
  (`set_notification(True)`).  There `full_barrier()` (devices/guest_memory.py)
  executes a locked instruction by acquiring and releasing a lock (glibc
  sem_wait/sem_post are lock cmpxchg / lock xadd), a full barrier on x86.
Little-endian host assumed (virtio 1.x rings are little-endian).

The dirty map
-------------
What a device writes into guest RAM must be logged for a live migration
(devices/guest_memory.py, "The dirty map").  The device writes a chain's
buffers through views (preadv, write_into) and finishes before `put`, so
`put` marks the chain's device-writable buffers, remembered since `pop`,
and the used ring; the other writes to the used ring (used.flags,
avail_event) are marked where they are made.
"""
import struct
import sys

from pyhv.devices.guest_memory import full_barrier
from pyhv.proto.device_service import QueueState
from pyhv.proto.errors import HvError

if sys.byteorder != "little":  # pragma: no cover - the hypervisor is x86-64 only
    raise ImportError("devices.virtio.queue assumes a little-endian host")

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
MAX_QUEUE_SIZE = 32768
DEFAULT_MAX_CHAIN_BYTES = 256 << 20      # spec bound is 2**32; devices want far less
DEFAULT_MAX_INDIRECT_LEN = 64 << 10      # 4096 descriptors per indirect table

_DESC = struct.Struct("<QIHH")           # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")        # id, len
_ADDR_END = 1 << 64


class VirtQueueError(HvError):
    """Base of the virtqueue errors: what a guest's driver did wrong."""


class QueueConfigError(VirtQueueError):
    """The driver configured an impossible queue (size, alignment, rings outside RAM)."""


class QueueFatal(VirtQueueError):
    """The avail ring is inconsistent: set DEVICE_NEEDS_RESET (see module docstring)."""


class ChainError(VirtQueueError):
    """One descriptor chain is malformed: return it with `put(err.head, 0)` and go on."""

    def __init__(self, head, reason):
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason


class Chain:
    """A validated descriptor chain: guest buffers as (addr, len) copies.

    All device-readable buffers precede all device-writable ones (checked), and
    every buffer lies inside guest RAM (checked), so the accessors below cannot
    fail on guest input.
    """

    __slots__ = ("mem", "head", "readable", "writable", "readable_len", "writable_len")

    def __init__(self, mem, head, readable, writable, readable_len, writable_len):
        self.mem = mem
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self):
        return (f"Chain(head={self.head}, readable={self.readable_len}B/{len(self.readable)}, "
                f"writable={self.writable_len}B/{len(self.writable)})")

    def read_all(self, max_bytes):
        """The device-readable bytes gathered into one private copy, at most `max_bytes`."""
        out = []
        left = max_bytes
        for addr, ln in self.readable:
            if left <= 0:
                break
            n = ln if ln <= left else left
            out.append(self.mem.read(addr, n))
            left -= n
        return out[0] if len(out) == 1 else b"".join(out)

    def write_into(self, data, offset=0):
        """Scatter `data` into the writable buffers from byte `offset` of the writable area.

        Never writes past the writable buffers: returns the number of bytes
        written, min(len(data), writable_len - offset), which may be short.
        """
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        src = memoryview(data).cast("B")
        done = 0
        skip = offset
        for addr, ln in self.writable:
            if done == len(src):
                break
            if skip >= ln:
                skip -= ln
                continue
            n = min(ln - skip, len(src) - done)
            self.mem.view(addr + skip, n)[:] = src[done:done + n]
            done += n
            skip = 0
        return done

    def writable_views(self):
        """Zero-copy writable memoryviews of the device-writable buffers (e.g. for os.preadv)."""
        return [self.mem.view(addr, ln) for addr, ln in self.writable]

    def readable_views(self):
        """Zero-copy read-only memoryviews of the device-readable buffers (e.g. for os.pwritev).

        The guest can change these bytes at any time: parse headers from
        `read_all` copies, hand views only to code that just moves bytes.
        """
        return [self.mem.view(addr, ln).toreadonly() for addr, ln in self.readable]


class VirtQueue:
    """One split virtqueue over guest memory `mem` (a GuestMemory).

    `event_idx` / `indirect`: VIRTIO_F_EVENT_IDX / VIRTIO_F_INDIRECT_DESC negotiated.
    """

    def __init__(self, mem, size, desc_addr, avail_addr, used_addr, event_idx=False,
                 indirect=False, max_chain_bytes=DEFAULT_MAX_CHAIN_BYTES,
                 max_indirect_len=DEFAULT_MAX_INDIRECT_LEN):
        for name, v in (("size", size), ("desc_addr", desc_addr), ("avail_addr", avail_addr),
                        ("used_addr", used_addr)):
            if type(v) is not int or v < 0:
                raise QueueConfigError(f"{name} {v!r} is not a non-negative int")
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueConfigError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        for name, addr, align, length in (("descriptor table", desc_addr, 16, 16 * size),
                                          ("available ring", avail_addr, 2, 6 + 2 * size),
                                          ("used ring", used_addr, 4, 6 + 8 * size)):
            if addr % align:
                raise QueueConfigError(f"{name} at 0x{addr:x} is not {align}-byte aligned")
            if not mem.contains(addr, length):
                raise QueueConfigError(f"{name} 0x{addr:x}+0x{length:x} is outside guest RAM")
        if max_indirect_len < 16 or max_chain_bytes < 0:
            raise QueueConfigError("bad limits")
        self.mem = mem
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.event_idx = bool(event_idx)
        self.indirect = bool(indirect)
        self.max_chain_bytes = max_chain_bytes
        self.max_indirect_len = max_indirect_len
        self.broken = False
        self._mask = size - 1
        self._desc = mem.view(desc_addr, 16 * size)
        # avail: [0] flags, [1] idx, [2 + i] ring[i], [2 + size] used_event
        self._avail = mem.view(avail_addr, 6 + 2 * size).cast("H")
        # used: bytes for the elements, 'H' for [0] flags, [1] idx, [2 + 4*size] avail_event
        self._used = mem.view(used_addr, 6 + 8 * size)
        self._used16 = self._used.cast("H")
        self._used_len = 6 + 8 * size
        self._taken = {}            # head -> Chain popped and not yet put: put marks its buffers written
        self._last_avail = 0        # next avail ring slot the device reads (free-running u16)
        self._avail_shadow = 0      # avail.idx as last read and validated
        self._used_idx = 0          # next used ring slot the device writes (free-running u16)
        self._notify = True         # available-buffer notifications wanted
        self._signalled_used = 0    # used idx at the last needs_interrupt()
        self._signalled_valid = False

    # -- the one shape of a queue's settings, and its position ------------------------------
    @classmethod
    def from_config(cls, mem, config, features, **limits):
        """The queue a QueueConfig describes, with the ring features negotiated in `features`."""
        return cls(mem, config.size, config.desc, config.driver, config.device,
                   event_idx=bool(features & VIRTIO_F_RING_EVENT_IDX),
                   indirect=bool(features & VIRTIO_F_RING_INDIRECT_DESC), **limits)

    def state(self, config):
        """This queue's position as a QueueState over `config` (the settings it was built from).

        Chains popped but not yet put are the device's to remember (their heads;
        `walk(head)` re-reads them, the driver cannot reuse them until used).
        """
        return QueueState(config=config, last_avail_idx=self._last_avail, used_idx=self._used_idx,
                          notify=self._notify, broken=self.broken)

    @classmethod
    def restore(cls, mem, state, features, **limits):
        """Rebuild a queue from a QueueState, re-validating it; writes nothing to guest memory.

        The first `needs_interrupt()` afterwards returns True unless the driver
        set VIRTQ_AVAIL_F_NO_INTERRUPT: the old process may have put chains
        without signalling them, so an interrupt may be spurious, never lost.
        """
        q = cls.from_config(mem, state.config, features, **limits)
        last, used = state.last_avail_idx, state.used_idx
        for v in (last, used):
            if type(v) is not int or not 0 <= v <= 0xFFFF:
                q.close()
                raise QueueConfigError(f"bad ring index {v!r} in queue state")
        if (last - used) & 0xFFFF > q.size:
            q.close()
            raise QueueConfigError(f"{(last - used) & 0xFFFF} chains in flight > queue size")
        q._last_avail = q._avail_shadow = last
        q._used_idx = used
        q._signalled_used = used
        q._notify = bool(state.notify)
        q.broken = bool(state.broken)
        return q

    @classmethod
    def resumed(cls, mem, config, features):
        """A queue that continues where another process left it: from used.idx as found in guest RAM.

        Chains that process had popped but not returned are served again.
        """
        used = mem.read_u16(config.device + 2) if mem.contains(config.device, 4) else 0
        return cls.restore(mem, QueueState(config=config, last_avail_idx=used, used_idx=used), features)

    def close(self):
        """Release the ring views (GuestMemory.close needs all views released)."""
        for v in (self._used16, self._used, self._avail, self._desc):
            v.release()

    @property
    def last_avail_idx(self):
        return self._last_avail

    @property
    def used_idx(self):
        return self._used_idx

    # -- available ring ---------------------------------------------------------------
    def _fatal(self, reason):
        self.broken = True
        raise QueueFatal(reason)

    def pop(self):
        """The next available chain, or None when the driver has posted nothing new.

        Raises ChainError (entry consumed; `put(err.head, 0)`) or QueueFatal.
        """
        if self.broken:
            raise QueueFatal("queue is broken: the device needs a reset")
        last = self._last_avail
        if last == self._avail_shadow:
            idx = self._avail[1]                          # one 16-bit load
            pending = (idx - last) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                self._fatal(f"avail.idx {idx} is {pending} ahead of last_avail {last} "
                            f"(queue size {self.size})")
            self._avail_shadow = idx
        head = self._avail[2 + (last & self._mask)]
        if head >= self.size:
            self._fatal(f"avail ring slot {last & self._mask} holds head {head} >= size {self.size}")
        self._last_avail = last = (last + 1) & 0xFFFF
        if self.event_idx and self._notify:
            self._used16[2 + 4 * self.size] = last        # avail_event: notify on the next one
            self.mem.mark(self.used_addr, self._used_len)
        chain = self._taken[head] = self.walk(head)
        return chain

    def walk(self, head):
        """Read and validate the chain starting at descriptor `head` (< size)."""
        if type(head) is not int or not 0 <= head < self.size:
            raise ValueError(f"head {head!r} out of range")
        mem = self.mem
        table = self._desc
        limit = self.size               # descriptors in the table being walked
        idx = head
        count = 0
        in_indirect = False
        readable, writable = [], []
        rlen = wlen = 0
        cap = self.max_chain_bytes
        while True:
            count += 1
            if count > limit:
                raise ChainError(head, "chain longer than its descriptor table (a loop)")
            addr, ln, flags, nxt = _DESC.unpack_from(table, idx << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:    # its WRITE flag is ignored (spec: MUST)
                if in_indirect:
                    raise ChainError(head, "INDIRECT descriptor inside an indirect table")
                if not self.indirect:
                    raise ChainError(head, "INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC "
                                           "not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "descriptor has both INDIRECT and NEXT")
                if ln == 0 or ln & 15 or ln > self.max_indirect_len:
                    raise ChainError(head, f"indirect table length {ln} is not a multiple of 16 "
                                           f"in 16..{self.max_indirect_len}")
                if addr + ln > _ADDR_END or not mem.contains(addr, ln):
                    raise ChainError(head, f"indirect table 0x{addr:x}+0x{ln:x} is outside "
                                           "guest RAM")
                table = mem.read(addr, ln)       # private copy, walked from here on
                limit = ln >> 4
                idx = count = 0
                in_indirect = True
                continue
            if addr + ln > _ADDR_END:
                raise ChainError(head, f"buffer 0x{addr:x}+0x{ln:x} wraps the address space")
            if not mem.contains(addr, ln):
                raise ChainError(head, f"buffer 0x{addr:x}+0x{ln:x} is outside guest RAM")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, ln))
                wlen += ln
            elif writable:
                raise ChainError(head, "device-readable buffer after a device-writable one")
            else:
                readable.append((addr, ln))
                rlen += ln
            if rlen + wlen > cap:
                raise ChainError(head, f"chain is longer than {cap} bytes")
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(mem, head, readable, writable, rlen, wlen)
            if nxt >= limit:
                raise ChainError(head, f"next index {nxt} >= table size {limit}")
            idx = nxt

    def has_pending(self):
        """Whether avail.idx shows chains not yet popped (a hint; pop validates)."""
        return self._last_avail != self._avail_shadow or self._avail[1] != self._last_avail

    # -- used ring --------------------------------------------------------------------
    def put(self, head, written_len):
        """Return chain `head` to the driver with `written_len` bytes written into it.

        The device must have written those bytes (from the start of the
        writable buffers) before calling this.
        """
        if type(head) is not int or not 0 <= head < self.size:
            raise ValueError(f"head {head!r} out of range")
        if type(written_len) is not int or not 0 <= written_len <= 0xFFFFFFFF:
            raise ValueError(f"used length {written_len!r} out of range")
        used = self._used_idx
        _USED_ELEM.pack_into(self._used, 4 + 8 * (used & self._mask), head, written_len)
        used = (used + 1) & 0xFFFF
        self._used16[1] = used          # after the element: x86 keeps store order
        self._used_idx = used
        self._mark_written(head)

    def _mark_written(self, head):
        """Log the chain's device-writable buffers and the used ring as written (after put's stores)."""
        mem = self.mem
        chain = self._taken.pop(head, None)
        if chain is None:               # not popped here (a chain from walk()): its descriptors, read again
            try:
                chain = self.walk(head)
            except ChainError:
                chain = None
        if chain is not None:
            for addr, ln in chain.writable:
                mem.mark(addr, ln)
        mem.mark(self.used_addr, self._used_len)

    def needs_interrupt(self):
        """After a batch of puts: must the device send a used buffer notification?

        False when nothing was put since the last call.  Without EVENT_IDX the
        driver's VIRTQ_AVAIL_F_NO_INTERRUPT decides; with it, vring_need_event:
        notify iff used_event lies in [old, new) of the used idx since the last
        notification check.
        """
        full_barrier()                 # used.idx store before the flags/used_event load
        new, old = self._used_idx, self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if valid and new == old:
            return False
        if not self.event_idx:
            return not self._avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        if not valid:
            return True
        used_event = self._avail[2 + self.size]
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    def set_notification(self, enabled):
        """Ask the driver for (or to suppress) available buffer notifications.

        Without EVENT_IDX this sets/clears VIRTQ_USED_F_NO_NOTIFY in used.flags.
        With EVENT_IDX used.flags stays 0: enabling writes avail_event =
        last_avail_idx (notify on the next new chain); disabling leaves it
        stale, so the driver stops notifying once it has passed it.
        Returns whether chains are pending after the change; after enabling,
        a True return means the device must pop again (it may have missed the
        notification), the usual "disable, drain, enable, re-check" loop.
        """
        enabled = bool(enabled)
        self._notify = enabled
        if self.event_idx:
            if enabled:
                self._used16[2 + 4 * self.size] = self._last_avail
        else:
            self._used16[0] = 0 if enabled else VIRTQ_USED_F_NO_NOTIFY
        self.mem.mark(self.used_addr, self._used_len)
        if enabled:
            full_barrier()             # publish before re-reading avail.idx
        return self.has_pending()
