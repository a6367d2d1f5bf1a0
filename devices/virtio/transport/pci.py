"""The virtio-pci transport (modern, virtio 1.x only, MSI-X only): one PCI function per virtio device.

Why this transport
------------------
Unmodified Linux finds a PCI device by probing config mechanism #1 (ports
0xCF8/0xCFC, devices/pci/root.py) without ACPI tables or command-line device
lists; virtio-mmio would need `virtio_mmio.device=` (absent from Debian's
stock kernel) or an ACPI DSDT.  With MSI-X, Linux's virtio_pci driver takes
one vector per queue and never reads the ISR register on an interrupt, so
the per-request path needs neither the worker nor any state shared across
processes:

    guest writes the queue's notify address --(KVM ioeventfd)--> notify eventfd
        -> the model's thread (or service) pops, serves, puts on the used ring
        -> irq eventfd --(KVM irqfd, GSI routed as an MSI)--> guest vector

No exit to user space happens on that path; the worker sees only the
configuration accesses (common config, MSI-X table, PCI config space).

The function
------------
Vendor 0x1AF4, device 0x1040 + virtio device type, revision 1 (non-
transitional), subsystem 0x1AF4:0x1100, class per device type.  BAR 0 is one
32 KiB, 32-bit memory BAR:

    0x0000  common configuration (common_config.py)
    0x1000  ISR status (1 byte, read-to-clear)
    0x2000  device-specific configuration (only if the device has any)
    0x3000  notify: queue i at 0x3000 + 4*i (queue_notify_off = i, multiplier 4)
    0x4000  MSI-X table (num_queues + 1 vectors, msix.py)
    0x5000  MSI-X PBA

Capabilities: MSI-X, then vendor-specific virtio capabilities COMMON (1),
NOTIFY (2), ISR (3), DEVICE (4, only with device config) and PCI_CFG (5, the
config-space window onto BAR 0 the spec requires).  config_generation
increments whenever the model pushes new config bytes.

Notifications
-------------
Each queue's notify eventfd is registered (through the IrqRouter) at the
queue's notify address without datamatch and with length 0 ("any length",
KVM_CAP_IOEVENTFD_ANY_LENGTH), so Linux's 16-bit `iowrite16(queue_index)`
and any other width never leave the kernel.  Without that capability the
length is 2 (what Linux writes) and other widths exit to here and are
forwarded to the eventfd (counted as `notify_exits`).  If the guest moves
BAR 0, the ioeventfds move with it.

The ISR register reports only the configuration-change bit (set by
`config_changed`/`needs_reset`, cleared by reading): queue interrupts go
from the model straight to KVM, so the queue bit stays 0.  A queue whose
vector is NO_VECTOR gets no irq eventfd (there is no INTx fallback).

Threads
-------
vCPU threads call the BAR and config hooks concurrently; model threads call
config_changed/needs_reset.  One lock guards the register model; the model
is reset outside it (its thread may be waiting for the lock in needs_reset).
"""
import os
import struct
import threading

from pyhv.devices.pci.config_space import CAP_ID_MSIX, CAP_ID_VNDR, PciFunction
from pyhv.devices.virtio.device import NO_VECTOR, VIRTIO_F_VERSION_1, TransportEvents
from pyhv.devices.virtio.queue import QueueConfigError
from pyhv.devices.virtio.transport import common_config as cc
from pyhv.devices.virtio.transport.msix import CTRL_ENABLE, CTRL_MASKALL, ENTRY, MsixTable
from pyhv.proto.errors import StateError, state_bytes

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5   # virtio_pci_cap.cfg_type
CLASS_BY_TYPE = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}
DEFAULT_CLASS = 0x00FF00

BAR = 0
BAR_SIZE = 0x8000
COMMON_OFF = 0x0000
ISR_OFF, ISR_LEN = 0x1000, 1
DEVICE_OFF, DEVICE_MAX = 0x2000, 0x1000
NOTIFY_OFF, NOTIFY_MULTIPLIER = 0x3000, 4
MSIX_TABLE_OFF, MSIX_PBA_OFF = 0x4000, 0x5000
MAX_QUEUES = 64


def _cap_body(cfg_type, bar, offset, length, extra=b""):
    """virtio_pci_cap after cap_vndr/cap_next: cap_len, cfg_type, bar, id, padding[2], offset, length."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


class VirtioPciDevice(PciFunction, TransportEvents):
    """One virtio device behind PCI: `backend` is a VirtioDevice (a model, or the proxy of one in a service)."""

    def __init__(self, backend, mem, router, eventfds):
        t = backend.device_type
        super().__init__(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + t, CLASS_BY_TYPE.get(t, DEFAULT_CLASS),
                         revision=1, subsystem_vendor=VIRTIO_PCI_VENDOR, subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID)
        nq = backend.num_queues
        if not backend.features & VIRTIO_F_VERSION_1:
            raise QueueConfigError(f"{backend.name}: a modern virtio device must offer VIRTIO_F_VERSION_1")
        if nq != len(backend.queue_max_sizes) or not 1 <= nq <= MAX_QUEUES:
            raise QueueConfigError(f"{backend.name}: num_queues and queue_max_sizes disagree")
        if len(eventfds.notify) != nq or len(eventfds.irq) != nq + 1:
            raise QueueConfigError(f"{backend.name}: eventfds do not match {nq} queues")
        self.backend = backend
        self.mem = mem
        self.router = router
        self.eventfds = eventfds
        self._config = bytes(backend.config_bytes())[:DEVICE_MAX]
        self._lock = threading.Lock()
        self.common = cc.CommonConfig(backend.features, backend.queue_max_sizes, nq + 1)
        self.msix = MsixTable(eventfds.irq, router)
        self.isr = 0
        self._notify_addr = None
        self._ioeventfd_len = 0 if router.ioeventfd_any_length else 2
        self.common_reads = self.common_writes = 0
        self.notify_exits = 0
        self.config_interrupts = 0
        self.resets = 0
        self.activations = 0
        self.activation_failures = 0
        self.needs_reset_events = 0
        self.last_error = ""
        self._build_config_space()
        backend.attach(self, eventfds)

    @property
    def status(self):
        return self.common.status

    def _build_config_space(self):
        self.add_bar(BAR, BAR_SIZE)
        nvec = len(self.msix.vectors)
        self.msix_cap = self.add_capability(
            CAP_ID_MSIX, struct.pack("<HII", nvec - 1, MSIX_TABLE_OFF | BAR, MSIX_PBA_OFF | BAR),
            writable=struct.pack("<H", CTRL_ENABLE | CTRL_MASKALL))
        self.add_capability(CAP_ID_VNDR, _cap_body(CAP_COMMON, BAR, COMMON_OFF, cc.LENGTH))
        self.add_capability(CAP_ID_VNDR, _cap_body(CAP_NOTIFY, BAR, NOTIFY_OFF,
                                                   NOTIFY_MULTIPLIER * len(self.common.queues),
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
        self.msix.plugged()

    def bar_moved(self, index, old, new):
        if index != BAR:
            return
        ln = self._ioeventfd_len
        for i, fd in enumerate(self.eventfds.notify):
            off = NOTIFY_OFF + NOTIFY_MULTIPLIER * i
            if old is not None:
                self.router.remove_ioeventfd(fd, old + off, ln)
            if new is not None:
                self.router.add_ioeventfd(fd, new + off, ln)
        self._notify_addr = None if new is None else new + NOTIFY_OFF

    def _pci_cfg_window(self):
        """(offset, length) into BAR 0 that the PCI_CFG capability names, or None if it names nothing valid."""
        bar, off, ln = self.config[self.pci_cfg_cap + 4], self._get(self.pci_cfg_cap + 8, 4), \
            self._get(self.pci_cfg_cap + 12, 4)
        if bar == BAR and ln in (1, 2, 4) and off % ln == 0 and off + ln <= BAR_SIZE:
            return off, ln
        return None

    def config_read_hook(self, offset, size):
        data_off = self.pci_cfg_cap + 16
        if offset + size <= data_off or offset >= data_off + 4:
            return None
        window = bytearray(self.config[data_off:data_off + 4])
        target = self._pci_cfg_window()
        if target is not None:
            off, ln = target
            window[:ln] = self.bar_read(BAR, off, ln)
        whole = bytes(self.config[:data_off]) + bytes(window) + bytes(self.config[data_off + 4:])
        return int.from_bytes(whole[offset:offset + size], "little")

    def config_written(self, offset, size):
        cap = self.msix_cap
        if offset < cap + 4 and offset + size > cap + 2:
            with self._lock:
                self.msix.set_control(self._get(cap + 2, 2))
        data_off = self.pci_cfg_cap + 16
        if offset < data_off + 4 and offset + size > data_off:
            target = self._pci_cfg_window()
            if target is not None:
                off, ln = target
                self.bar_write(BAR, off, bytes(self.config[data_off:data_off + ln]))

    # -- BAR 0 ---------------------------------------------------------------------
    def bar_read(self, index, offset, size):
        if offset < COMMON_OFF + 0x1000:
            self.common_reads += 1
            with self._lock:
                return self.common.read(offset - COMMON_OFF, size)
        if ISR_OFF <= offset < ISR_OFF + 0x1000:
            with self._lock:
                isr, self.isr = self.isr, 0
            return bytes([isr if offset == ISR_OFF else 0]) + bytes(size - 1)
        if DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_MAX:
            off = offset - DEVICE_OFF
            return self._config[off:off + size].ljust(size, b"\0")
        if MSIX_TABLE_OFF <= offset < MSIX_PBA_OFF:
            with self._lock:
                return self.msix.read(offset - MSIX_TABLE_OFF, size)
        if MSIX_PBA_OFF <= offset < MSIX_PBA_OFF + 0x1000:
            with self._lock:
                return self.msix.pba()[offset - MSIX_PBA_OFF:][:size].ljust(size, b"\0")
        return bytes(size)

    def bar_write(self, index, offset, data):
        if offset < COMMON_OFF + 0x1000:
            self.common_writes += 1
            with self._lock:
                action = self.common.write(offset - COMMON_OFF, data)
                if action == cc.ACTIVATE:
                    self._activate()
            if action == cc.RESET:
                self._reset_device()
        elif NOTIFY_OFF <= offset < NOTIFY_OFF + 0x1000:
            q = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
            if q < len(self.common.queues) and (offset - NOTIFY_OFF) % NOTIFY_MULTIPLIER == 0:
                self.notify_exits += 1        # a width the ioeventfd did not match: forward
                os.eventfd_write(self.eventfds.notify_fd(q), 1)
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_MAX:
            off = offset - DEVICE_OFF
            if off + len(data) <= len(self._config):
                self.backend.config_write(off, bytes(data))
        elif MSIX_TABLE_OFF <= offset < MSIX_PBA_OFF:
            with self._lock:
                self.msix.write(offset - MSIX_TABLE_OFF, data)
        # ISR, PBA and the gaps are read-only

    # -- the status machine's actions (lock held for activate) ----------------------------------
    def _activate(self):
        if not self.common.status & cc.FEATURES_OK:
            return self._fail("DRIVER_OK without FEATURES_OK")
        try:
            self.backend.activate(self.mem, self.common.driver_features, self.common.enabled_queues())
        except QueueConfigError as e:
            self.activation_failures += 1
            return self._fail(f"activate: {e}")
        except Exception as e:                    # a backend bug must not kill the vCPU
            self.activation_failures += 1
            return self._fail(f"activate: {type(e).__name__}: {e}")
        self.activations += 1

    def _fail(self, reason):
        """Lock held: DEVICE_NEEDS_RESET plus a configuration change interrupt."""
        self.last_error = reason
        self.needs_reset_events += 1
        self.common.fail()
        self._config_interrupt()

    def _config_interrupt(self):
        self.isr |= 2
        vector = self.common.config_vector
        if self.common.status & cc.DRIVER_OK and vector != NO_VECTOR:
            self.config_interrupts += 1
            os.eventfd_write(self.msix.fd(vector), 1)

    def _reset_device(self):
        """Status 0 was written: stop the backend (outside the lock), then clear the registers."""
        try:
            self.backend.reset()
        finally:
            with self._lock:
                self.common.reset_done()
                self.isr = 0
                self.msix.drop_pending()          # interrupts raised before the reset
                self.resets += 1

    # -- TransportEvents (called by the backend, any thread) ------------------------------
    def config_changed(self, config):
        with self._lock:
            self._config = bytes(config)[:DEVICE_MAX]
            self.common.config_generation = (self.common.config_generation + 1) & 0xFF
            self._config_interrupt()

    def needs_reset(self, reason):
        with self._lock:
            self._fail(reason)

    # -- lifecycle beyond the driver's ------------------------------------------------------
    def pause(self):
        self.backend.pause()

    def resume(self):
        self.backend.resume()

    def snapshot(self):
        """Config space, the common-config registers, MSI-X and ISR, and the (paused) backend's DeviceState."""
        with self._lock:
            state = {"pci": super().snapshot(), "common": self.common.snapshot(), "msix": self.msix.snapshot(),
                     "isr": self.isr, "config": bytes(self._config)}
        state["device"] = self.backend.snapshot()
        return state

    def restore(self, state):
        """Registers from `snapshot()`; the backend's state is the device manager's to restore (it may be remote)."""
        with self._lock:
            self.common.restore(state["common"])
            self._config = state_bytes(state["config"], "virtio config")[:DEVICE_MAX]
            self.isr = int(state["isr"]) & 3
        super().restore(state["pci"])             # decoding: the notify ioeventfds follow BAR 0
        with self._lock:
            self.msix.restore(state["msix"])
        if state.get("device") is not None and not self.common.active:
            raise StateError(f"{self.backend.name}: device state for a device the driver has not started")

    # -- observation / teardown ---------------------------------------------------------------
    def counters(self):
        c = {"status": self.common.status, "common_reads": self.common_reads, "common_writes": self.common_writes,
             "msix_writes": self.msix.writes, "notify_exits": self.notify_exits,
             "config_interrupts": self.config_interrupts, "resets": self.resets,
             "activations": self.activations, "activation_failures": self.activation_failures,
             "features_rejected": self.common.features_rejected, "needs_reset": self.needs_reset_events,
             "live_vectors": self.msix.live_vectors()}
        if self.last_error:
            c["last_error"] = self.last_error
        c["backend"] = self.backend.counters()
        return c

    def close(self):
        self.backend.close()             # an in-process model: reset(); a proxy: its service ends
