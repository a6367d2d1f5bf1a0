"""The virtio-pci transport (modern, virtio 1.x only, MSI-X only): one PCI function per virtio device.

Why this transport
------------------
Unmodified Linux finds a PCI device by probing config mechanism #1 (ports
0xCF8/0xCFC, vcpu_worker/pci.py) without ACPI tables or command-line device
lists; virtio-mmio would need `virtio_mmio.device=` (absent from Debian's
stock kernel) or an ACPI DSDT.  With MSI-X, Linux's virtio_pci driver takes
one vector per queue and never reads the ISR register on an interrupt, so
the per-request path needs neither the worker nor any state shared across
processes:

    guest writes the queue's notify address --(KVM ioeventfd)--> notify eventfd
        -> backend thread/service pops, serves, puts on the used ring
        -> irq eventfd --(KVM irqfd, GSI routed as an MSI)--> guest vector

No exit to user space happens on that path; the worker sees only the
configuration accesses (common config, MSI-X table, PCI config space).

The function
------------
Vendor 0x1AF4, device 0x1040 + virtio device type, revision 1 (non-
transitional), subsystem 0x1AF4:0x1100, class per device type.  BAR 0 is one
32 KiB, 32-bit memory BAR:

    0x0000  common configuration (struct virtio_pci_common_cfg, 0x3C bytes)
    0x1000  ISR status (1 byte, read-to-clear)
    0x2000  device-specific configuration (only if the device has any)
    0x3000  notify: queue i at 0x3000 + 4*i (queue_notify_off = i, multiplier 4)
    0x4000  MSI-X table (num_queues + 1 vectors)
    0x5000  MSI-X PBA

Capabilities: MSI-X, then vendor-specific virtio capabilities COMMON (1),
NOTIFY (2), ISR (3), DEVICE (4, only with device config) and PCI_CFG (5, the
config-space window onto BAR 0 the spec requires).

Common configuration
--------------------
Handled entirely here, from a Python model of the registers: 64-bit feature
words through device_feature_select / driver_feature_select; per-queue
size / msix_vector / enable / desc / driver / device (locked once the queue
is enabled); device_status with
  * FEATURES_OK rejected (the bit does not stick) when the driver accepted a
    feature the device does not offer, or not VIRTIO_F_VERSION_1;
  * DRIVER_OK: the backend is activated with the enabled queues
    (backend.activate); a refusal (bad ring addresses) sets
    DEVICE_NEEDS_RESET and raises the config interrupt;
  * writing 0 resets: status reads keep the old value until the backend has
    stopped (backend.reset() returned), then read 0; queue registers, driver
    features and vectors return to their reset values (the MSI-X table is
    PCI state and is not touched);
config_generation increments whenever the backend pushes new config bytes.
The backend is called only on those control events, never per request.
Any access width is accepted: a write is applied bytewise to a snapshot of
the structure and each touched field is stored (64-bit fields may be
written as two 32-bit halves, as Linux does).

Notifications
-------------
One eventfd per queue, registered with KVM_IOEVENTFD at the queue's notify
address without datamatch and with length 0 ("any length",
KVM_CAP_IOEVENTFD_ANY_LENGTH), so Linux's 16-bit `iowrite16(queue_index)`
and any other width never leave the kernel.  Without that capability the
length is 2 (what Linux writes) and other widths exit to here and are
forwarded to the eventfd (counted as `notify_exits`).  If the guest moves
BAR 0, the ioeventfds are moved with it.

MSI-X and interrupt masking
---------------------------
Each vector owns an eventfd and a GSI (allocated from 24 upward in
pci.MsiRoutes).  A vector is *live* when MSI-X is enabled, the function is
not masked and the entry is not masked; then its GSI is routed as an MSI
with the entry's address/data (KVM_SET_GSI_ROUTING, which is sent whole,
defaults for GSIs 0-23 included) and the eventfd is bound to it as an
irqfd.  When a vector stops being live, the irqfd is deassigned: further
backend writes accumulate in the eventfd counter, and the PBA bit for that
vector reads 1 while the counter is nonzero (poll, no read).  When it
becomes live again, KVM_IRQFD polls the eventfd on assignment and, if the
counter is nonzero, schedules one injection: exactly the MSI-X "pending
message is sent on unmask" rule.  KVM does not consume the counter on that
path (only its wakeup callback does), so the transport reads it right after
the assignment: a count still there can only be the one KVM already
scheduled (any later write wakes the irqfd, which zeroes the counter
itself), so nothing is lost and a later mask shows no stale PBA bit.
Deassignment flushes KVM's irqfd work, so no message is delivered through a
masked vector.  Several writes while masked give one message, as on
hardware (the PBA is a bit, not a count).  A
queue whose vector is VIRTIO_MSI_NO_VECTOR gets no irq eventfd (there is no
INTx fallback).

The ISR register reports only the configuration-change bit (set by
`config_changed`/`needs_reset`, cleared by reading): queue interrupts are
sent by the backend straight to KVM, so the transport never sees them and
the queue bit stays 0.  A driver using INTx would need it; ours use MSI-X.

Measured (nested kvm_pvm host, 2 cores, 2026-11-24)
---------------------------------------------------
* A ring-3 (native) guest's notify writes: 40,000-50,000/s absorbed by the
  ioeventfd with the rng thread draining them (about 51,000/s with no
  consumer), none reaching user space; an MMIO write that does exit to a
  Python device costs ~70 us here (14,000/s), so the ioeventfd is 3-4x
  cheaper even before counting the worker's CPU.
* 64-byte virtio-rng requests, one at a time (post, kick, spin on used.idx):
  4,500-17,000 round trips/s (the Python service thread's wake-up dominates);
  256 x 4 KiB buffers per kick: 33-62 MB/s of os.urandom into guest RAM.
* KVM_SET_GSI_ROUTING ~100 us; KVM_IRQFD assign + deassign ~20 us: fine for
  mask/unmask, which Linux does only while setting up interrupts.
* Linux 6.1 (virtio_pci + virtio-rng built in, no ACPI) finds 00:01.0,
  keeps BAR 0 where we put it, takes two MSI-X vectors (virtio0-config,
  virtio0-input) and reads /dev/hwrng through the irqfd path.

Threads
-------
vCPU threads call read/write (MMIO) and config_read/config_write (PCI config)
concurrently; backend threads call config_changed/needs_reset.  One lock
guards the register model; the backend is reset outside it (its thread may
be waiting for the lock in needs_reset).
"""
import os
import struct
import threading

from pyhv.devices.virtio.backend import VIRTIO_F_VERSION_1, TransportEvents, QueueConfig
from pyhv.devices.virtio.queue import QueueConfigError
from pyhv.vcpu_worker.pci import CAP_ID_MSIX, CAP_ID_VNDR, PciFunction, eventfd_pending

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# device status bits
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, DEVICE_NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128

# virtio_pci_cap.cfg_type
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

CLASS_BY_TYPE = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}
DEFAULT_CLASS = 0x00FF00

BAR = 0
BAR_SIZE = 0x8000
COMMON_OFF, COMMON_LEN = 0x0000, 0x3C
ISR_OFF, ISR_LEN = 0x1000, 1
DEVICE_OFF, DEVICE_MAX = 0x2000, 0x1000
NOTIFY_OFF, NOTIFY_MULTIPLIER = 0x3000, 4
MSIX_TABLE_OFF, MSIX_PBA_OFF = 0x4000, 0x5000
MSIX_ENTRY = 16
MSIX_CTRL_ENABLE, MSIX_CTRL_MASKALL = 0x8000, 0x4000

# struct virtio_pci_common_cfg (virtio 1.2, with queue_notify_data and queue_reset)
COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHH")
assert COMMON.size == COMMON_LEN
# (name, offset, width) in layout order
FIELDS = (("device_feature_select", 0x00, 4), ("device_feature", 0x04, 4),
          ("driver_feature_select", 0x08, 4), ("driver_feature", 0x0C, 4),
          ("config_msix_vector", 0x10, 2), ("num_queues", 0x12, 2),
          ("device_status", 0x14, 1), ("config_generation", 0x15, 1),
          ("queue_select", 0x16, 2), ("queue_size", 0x18, 2), ("queue_msix_vector", 0x1A, 2),
          ("queue_enable", 0x1C, 2), ("queue_notify_off", 0x1E, 2), ("queue_desc", 0x20, 8),
          ("queue_driver", 0x28, 8), ("queue_device", 0x30, 8), ("queue_notify_data", 0x38, 2),
          ("queue_reset", 0x3A, 2))


class _Queue:
    __slots__ = ("max_size", "size", "vector", "enabled", "desc", "driver", "device", "notify_fd")

    def __init__(self, max_size, notify_fd):
        self.max_size = max_size
        self.notify_fd = notify_fd
        self.reset()

    def reset(self):
        self.size = self.max_size
        self.vector = VIRTIO_MSI_NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


class _Vector:
    __slots__ = ("fd", "gsi", "address", "data", "masked", "bound")

    def __init__(self, fd):
        self.fd = fd
        self.gsi = None
        self.address = 0
        self.data = 0
        self.masked = True          # MSI-X entries come out of reset masked
        self.bound = False


def _cap_body(cfg_type, bar, offset, length, extra=b""):
    """virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


class VirtioPciDevice(PciFunction, TransportEvents):
    """One virtio device behind PCI; `backend` is a devices.virtio.backend.VirtioBackend."""

    def __init__(self, backend, mem):
        t = backend.device_type
        super().__init__(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + t, CLASS_BY_TYPE.get(t, DEFAULT_CLASS),
                         revision=1, subsystem_vendor=VIRTIO_PCI_VENDOR, subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID)
        if not backend.features & VIRTIO_F_VERSION_1:
            raise ValueError(f"{backend.name}: a modern virtio device must offer VIRTIO_F_VERSION_1")
        if backend.num_queues != len(backend.queue_max_sizes) or not 1 <= backend.num_queues <= 64:
            raise ValueError(f"{backend.name}: num_queues and queue_max_sizes disagree")
        self.backend = backend
        self.mem = mem
        self.device_features = backend.features
        self._config = bytes(backend.config_bytes())[:DEVICE_MAX]
        self._lock = threading.Lock()
        nq = backend.num_queues
        # A backend in another process made its eventfds before spawning the service (fds
        # cannot follow later over ZeroMQ): use those.  Otherwise make our own.
        given = getattr(backend, "transport_eventfds", None)
        if given is not None:
            notify_fds, irq_fds = given()
            if len(notify_fds) != nq or len(irq_fds) != nq + 1:
                raise ValueError(f"{backend.name}: backend eventfds do not match {nq} queues")
            self._own_fds = False        # the backend closes them (after its service is gone)
        else:
            notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq)]
            irq_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq + 1)]
            self._own_fds = True
        self.queues = [_Queue(m, fd) for m, fd in zip(backend.queue_max_sizes, notify_fds)]
        self.vectors = [_Vector(fd) for fd in irq_fds]
        self._msix_table = bytearray(MSIX_ENTRY * len(self.vectors))
        for v in range(len(self.vectors)):
            self._msix_table[v * MSIX_ENTRY + 12] = 1
        self._notify_addr = None
        self._ioeventfd_len = None
        self.ioeventfd_log = []      # without a VM: ("assign"|"deassign", fd, addr, len)
        self._reset_state()
        self.status = 0
        self._resetting = False
        self._status_shown = 0       # what device_status reads while a reset is in progress
        # counters
        self.common_reads = self.common_writes = 0
        self.msix_writes = 0
        self.notify_exits = 0
        self.config_interrupts = 0
        self.resets = 0
        self.activations = 0
        self.activation_failures = 0
        self.features_rejected = 0
        self.needs_reset_events = 0
        self.last_error = ""
        self._build_config_space()
        backend.attach(self)

    def _reset_state(self):
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        self.active = False
        for q in self.queues:
            q.reset()

    def _build_config_space(self):
        self.add_bar(BAR, BAR_SIZE)
        nvec = len(self.vectors)
        self.msix_cap = self.add_capability(
            CAP_ID_MSIX, struct.pack("<HII", nvec - 1, MSIX_TABLE_OFF | BAR, MSIX_PBA_OFF | BAR),
            writable=struct.pack("<H", MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL))
        self.add_capability(CAP_ID_VNDR, _cap_body(CAP_COMMON, BAR, COMMON_OFF, COMMON_LEN))
        self.add_capability(CAP_ID_VNDR, _cap_body(CAP_NOTIFY, BAR, NOTIFY_OFF, NOTIFY_MULTIPLIER * len(self.queues),
                                                   struct.pack("<I", NOTIFY_MULTIPLIER)))
        self.add_capability(CAP_ID_VNDR, _cap_body(CAP_ISR, BAR, ISR_OFF, ISR_LEN))
        if self._config:
            self.add_capability(CAP_ID_VNDR, _cap_body(CAP_DEVICE, BAR, DEVICE_OFF, len(self._config)))
        # PCI_CFG: bar (byte 4 of the cap), offset, length and data are the driver's to write.
        self.pci_cfg_cap = self.add_capability(
            CAP_ID_VNDR, _cap_body(CAP_PCI_CFG, 0, 0, 0, b"\0\0\0\0"),
            writable=b"\0\0\xff\0\0\0" + b"\xff" * 12)

    # -- PCI plumbing ------------------------------------------------------------------
    def plugged(self):
        for v in self.vectors:
            v.gsi = self.root.msi.allocate()
        vm = self.root.msi.vm
        if vm is None:
            self._ioeventfd_len = 2
        else:
            any_len = vm.kvm.check_extension("KVM_CAP_IOEVENTFD_ANY_LENGTH")
            self._ioeventfd_len = 0 if any_len else 2

    def bar_moved(self, index, old, new):
        if index != BAR:
            return
        vm = self.root.msi.vm if self.root is not None else None
        ln = self._ioeventfd_len
        for i, q in enumerate(self.queues):
            off = NOTIFY_OFF + NOTIFY_MULTIPLIER * i
            if old is not None:
                self._ioeventfd(vm, q.notify_fd, old + off, ln, True)
            if new is not None:
                self._ioeventfd(vm, q.notify_fd, new + off, ln, False)
        self._notify_addr = None if new is None else new + NOTIFY_OFF

    def _ioeventfd(self, vm, fd, addr, ln, deassign):
        if vm is None:
            self.ioeventfd_log.append(("deassign" if deassign else "assign", fd, addr, ln))
        else:
            vm.ioeventfd(fd, addr, ln, deassign=deassign)

    def config_read_hook(self, offset, size):
        data_off = self.pci_cfg_cap + 16
        if offset + size <= data_off or offset >= data_off + 4:
            return None
        bar, off, ln = self.config[self.pci_cfg_cap + 4], self._get(self.pci_cfg_cap + 8, 4), \
            self._get(self.pci_cfg_cap + 12, 4)
        window = bytearray(self.config[data_off:data_off + 4])
        if bar == BAR and ln in (1, 2, 4) and off % ln == 0 and off + ln <= BAR_SIZE:
            window[:ln] = self.bar_read(BAR, off, ln)
        whole = bytes(self.config[:data_off]) + bytes(window) + bytes(self.config[data_off + 4:])
        return int.from_bytes(whole[offset:offset + size], "little")

    def config_written(self, offset, size):
        cap = self.msix_cap
        if offset < cap + 4 and offset + size > cap + 2:
            with self._lock:
                for v in range(len(self.vectors)):
                    self._update_vector(v)
        data_off = self.pci_cfg_cap + 16
        if offset < data_off + 4 and offset + size > data_off:
            bar, off, ln = self.config[self.pci_cfg_cap + 4], self._get(self.pci_cfg_cap + 8, 4), \
                self._get(self.pci_cfg_cap + 12, 4)
            if bar == BAR and ln in (1, 2, 4) and off % ln == 0 and off + ln <= BAR_SIZE:
                self.bar_write(BAR, off, bytes(self.config[data_off:data_off + ln]))

    # -- BAR 0 ---------------------------------------------------------------------
    def bar_read(self, index, offset, size):
        if offset < COMMON_OFF + 0x1000:
            return self._common_read(offset - COMMON_OFF, size)
        if ISR_OFF <= offset < ISR_OFF + 0x1000:
            with self._lock:
                isr, self.isr = self.isr, 0
            return bytes([isr if offset == ISR_OFF else 0]) + bytes(size - 1)
        if DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_MAX:
            off = offset - DEVICE_OFF
            return self._config[off:off + size].ljust(size, b"\0")
        if MSIX_TABLE_OFF <= offset < MSIX_PBA_OFF:
            off = offset - MSIX_TABLE_OFF
            with self._lock:
                return bytes(self._msix_table[off:off + size]).ljust(size, b"\0")
        if MSIX_PBA_OFF <= offset < MSIX_PBA_OFF + 0x1000:
            return self._pba()[offset - MSIX_PBA_OFF:][:size].ljust(size, b"\0")
        return bytes(size)

    def bar_write(self, index, offset, data):
        if offset < COMMON_OFF + 0x1000:
            self._common_write(offset - COMMON_OFF, data)
        elif NOTIFY_OFF <= offset < NOTIFY_OFF + 0x1000:
            q = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
            if q < len(self.queues) and (offset - NOTIFY_OFF) % NOTIFY_MULTIPLIER == 0:
                self.notify_exits += 1        # a width the ioeventfd did not match: forward
                os.eventfd_write(self.queues[q].notify_fd, 1)
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_MAX:
            off = offset - DEVICE_OFF
            if off + len(data) <= len(self._config):
                self.backend.config_write(off, bytes(data))
        elif MSIX_TABLE_OFF <= offset < MSIX_PBA_OFF:
            self._msix_write(offset - MSIX_TABLE_OFF, data)
        # ISR, PBA and the gaps are read-only

    # -- common configuration ----------------------------------------------------------
    def _common_snapshot(self):
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        sel = self.device_feature_select
        dev_feat = (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        dsel = self.driver_feature_select
        drv_feat = (self.driver_features >> (32 * dsel)) & 0xFFFFFFFF if dsel < 2 else 0
        status = self._status_shown if self._resetting else self.status
        return COMMON.pack(
            sel, dev_feat, dsel, drv_feat, self.config_vector, len(self.queues), status,
            self.config_generation & 0xFF, self.queue_select,
            q.size if q else 0, q.vector if q else VIRTIO_MSI_NO_VECTOR, int(q.enabled) if q else 0,
            self.queue_select if q else 0, q.desc if q else 0, q.driver if q else 0, q.device if q else 0,
            0, 0)

    def _common_read(self, offset, size):
        self.common_reads += 1
        if offset >= COMMON_LEN:
            return bytes(size)
        with self._lock:
            snap = self._common_snapshot()
        return snap[offset:offset + size].ljust(size, b"\0")

    def _common_write(self, offset, data):
        self.common_writes += 1
        if offset >= COMMON_LEN:
            return
        do_reset = False
        with self._lock:
            snap = bytearray(self._common_snapshot())
            end = min(offset + len(data), COMMON_LEN)
            snap[offset:end] = data[:end - offset]
            for name, off, width in FIELDS:
                if off < end and off + width > offset:
                    value = int.from_bytes(snap[off:off + width], "little")
                    if name == "device_status":
                        do_reset = self._write_status(value)
                    else:
                        setter = getattr(self, "_set_" + name, None)
                        if setter is not None:
                            setter(value)
        if do_reset:
            self._reset_device()

    def _set_device_feature_select(self, v):
        self.device_feature_select = v

    def _set_driver_feature_select(self, v):
        self.driver_feature_select = v

    def _set_driver_feature(self, v):
        sel = self.driver_feature_select
        if sel >= 2 or self.status & FEATURES_OK:
            return                               # frozen once FEATURES_OK stuck
        mask = 0xFFFFFFFF << (32 * sel)
        self.driver_features = (self.driver_features & ~mask) | (v << (32 * sel))

    def _valid_vector(self, v):
        return v if v < len(self.vectors) else VIRTIO_MSI_NO_VECTOR

    def _set_config_msix_vector(self, v):
        self.config_vector = self._valid_vector(v)

    def _set_queue_select(self, v):
        self.queue_select = v

    def _queue(self):
        """The selected queue if the driver may still change it."""
        if self.queue_select >= len(self.queues):
            return None
        q = self.queues[self.queue_select]
        return None if q.enabled else q

    def _set_queue_size(self, v):
        q = self._queue()
        if q is not None and 1 <= v <= q.max_size:
            q.size = v                           # power of two checked at DRIVER_OK (VirtQueue)

    def _set_queue_msix_vector(self, v):
        q = self._queue()
        if q is not None:
            q.vector = self._valid_vector(v)

    def _set_queue_enable(self, v):
        q = self._queue()
        if q is not None and v == 1:
            q.enabled = True

    def _set_queue_desc(self, v):
        q = self._queue()
        if q is not None:
            q.desc = v

    def _set_queue_driver(self, v):
        q = self._queue()
        if q is not None:
            q.driver = v

    def _set_queue_device(self, v):
        q = self._queue()
        if q is not None:
            q.device = v

    def _write_status(self, v):
        """Apply a device_status write (lock held); returns True if a reset must follow."""
        if self._resetting:
            return False
        if v == 0:
            self._status_shown = self.status
            self._resetting = True
            return True
        old = self.status
        v &= 0xFF & ~DEVICE_NEEDS_RESET
        if v & FEATURES_OK and not old & FEATURES_OK:
            f = self.driver_features
            if f & ~self.device_features or not f & VIRTIO_F_VERSION_1:
                v &= ~FEATURES_OK                 # it does not stick: the driver sees the refusal
                self.features_rejected += 1
        self.status = v | (old & DEVICE_NEEDS_RESET)
        if v & DRIVER_OK and not old & DRIVER_OK and not self.active:
            if not self.status & FEATURES_OK:
                self._fail("DRIVER_OK without FEATURES_OK")
            else:
                self._activate()
        return False

    def _activate(self):
        queues = []
        for i, q in enumerate(self.queues):
            if not q.enabled:
                continue
            fd = self.vectors[q.vector].fd if q.vector != VIRTIO_MSI_NO_VECTOR else None
            queues.append(QueueConfig(i, q.size, q.desc, q.driver, q.device, q.notify_fd, fd, q.vector))
        try:
            self.backend.activate(self.mem, self.driver_features, queues)
        except QueueConfigError as e:
            self.activation_failures += 1
            self._fail(f"activate: {e}")
            return
        except Exception as e:                    # a backend bug must not kill the vCPU
            self.activation_failures += 1
            self._fail(f"activate: {type(e).__name__}: {e}")
            return
        self.active = True
        self.activations += 1

    def _fail(self, reason):
        """Lock held: DEVICE_NEEDS_RESET plus a configuration change interrupt."""
        self.last_error = reason
        self.needs_reset_events += 1
        self.status |= DEVICE_NEEDS_RESET
        self._config_interrupt()

    def _config_interrupt(self):
        self.isr |= 2
        if self.status & DRIVER_OK and self.config_vector != VIRTIO_MSI_NO_VECTOR:
            self.config_interrupts += 1
            os.eventfd_write(self.vectors[self.config_vector].fd, 1)

    def _reset_device(self):
        """Status 0 was written: stop the backend (outside the lock), then clear the registers."""
        try:
            self.backend.reset()
        finally:
            with self._lock:
                self._reset_state()
                for v in self.vectors:          # drop interrupts raised before the reset
                    if not v.bound:
                        try:
                            os.eventfd_read(v.fd)
                        except BlockingIOError:
                            pass
                self.status = 0
                self._resetting = False
                self.resets += 1

    # -- TransportEvents (called by the backend, any thread) ------------------------------
    def config_changed(self, config):
        with self._lock:
            self._config = bytes(config)[:DEVICE_MAX]
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._config_interrupt()

    def needs_reset(self, reason):
        with self._lock:
            self._fail(reason)

    # -- MSI-X -------------------------------------------------------------------------
    def _msix_control(self):
        return self._get(self.msix_cap + 2, 2)

    def _msix_write(self, offset, data):
        self.msix_writes += 1
        with self._lock:
            end = min(offset + len(data), len(self._msix_table))
            if offset >= end:
                return
            self._msix_table[offset:end] = data[:end - offset]
            for v in range(offset // MSIX_ENTRY, (end - 1) // MSIX_ENTRY + 1):
                base = v * MSIX_ENTRY
                ctrl = self._msix_table[base + 12] & 1
                self._msix_table[base + 12:base + 16] = bytes([ctrl, 0, 0, 0])   # reserved bits read 0
                self._update_vector(v)

    def _update_vector(self, v):
        """Lock held: make KVM's route and irqfd binding match the guest's MSI-X state for vector v."""
        vec = self.vectors[v]
        base = v * MSIX_ENTRY
        addr_lo, addr_hi, data, ctrl = struct.unpack_from("<IIII", self._msix_table, base)
        vec.address = addr_hi << 32 | addr_lo
        vec.data = data
        vec.masked = bool(ctrl & 1)
        control = self._msix_control()
        live = bool(control & MSIX_CTRL_ENABLE) and not control & MSIX_CTRL_MASKALL and not vec.masked
        msi = self.root.msi
        if live:
            msi.set_msi(vec.gsi, vec.address, vec.data)
            if not vec.bound:
                msi.bind(vec.fd, vec.gsi)      # KVM injects a count that built up while masked...
                vec.bound = True
                try:                           # ...but leaves the counter set: clear it (see docstring)
                    os.eventfd_read(vec.fd)
                except BlockingIOError:
                    pass
        elif vec.bound:
            msi.unbind(vec.fd, vec.gsi)
            vec.bound = False

    def _pba(self):
        bits = 0
        with self._lock:
            for i, vec in enumerate(self.vectors):
                if not vec.bound and eventfd_pending(vec.fd):
                    bits |= 1 << i
        return bits.to_bytes(8 * ((len(self.vectors) + 63) // 64), "little")

    # -- observation / teardown ---------------------------------------------------------------
    def counters(self):
        c = {"status": self.status, "common_reads": self.common_reads, "common_writes": self.common_writes,
             "msix_writes": self.msix_writes, "notify_exits": self.notify_exits,
             "config_interrupts": self.config_interrupts, "resets": self.resets,
             "activations": self.activations, "activation_failures": self.activation_failures,
             "features_rejected": self.features_rejected, "needs_reset": self.needs_reset_events,
             "live_vectors": sum(v.bound for v in self.vectors)}
        if self.last_error:
            c["last_error"] = self.last_error
        c["backend"] = self.backend.counters()
        return c

    def close(self):
        self.backend.close()             # an in-process backend: reset(); a remote one: its service ends
        if self._own_fds:
            for q in self.queues:
                os.close(q.notify_fd)
            for v in self.vectors:
                os.close(v.fd)
        self.queues = []
        self.vectors = []
