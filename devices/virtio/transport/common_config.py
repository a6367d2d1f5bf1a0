"""The virtio-pci common configuration (struct virtio_pci_common_cfg) as a register model, with the device status machine.

Pure state: no eventfds, no KVM, no backend.  The transport holds its lock
around every call and carries out what a write asks for (`write` returns
ACTIVATE or RESET).
* 64-bit feature words through device_feature_select / driver_feature_select;
  driver features freeze once FEATURES_OK has stuck.
* Per queue: size, msix_vector, enable, desc, driver, device; a queue's
  registers lock once it is enabled.
* device_status: FEATURES_OK does not stick (the driver reads the refusal)
  when the driver accepted a feature the device does not offer, or not
  VIRTIO_F_VERSION_1; the first DRIVER_OK asks for ACTIVATE (or fails the
  device if FEATURES_OK is missing); writing 0 asks for RESET, and status
  reads keep the old value until `reset_done()` (the backend has stopped),
  then read 0.
* Any access width: a write is applied bytewise to a snapshot of the
  structure and each touched field is stored (64-bit fields may be written
  as two 32-bit halves, as Linux does).
"""
import struct

from pyhv.devices.virtio.device import NO_VECTOR, VIRTIO_F_VERSION_1
from pyhv.proto.device_service import QueueConfig
from pyhv.proto.errors import StateError

ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, DEVICE_NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
ACTIVATE, RESET = "activate", "reset"

# struct virtio_pci_common_cfg (virtio 1.2, with queue_notify_data and queue_reset)
LAYOUT = struct.Struct("<IIIIHHBBHHHHHQQQHH")
LENGTH = LAYOUT.size
# (name, offset, width) in layout order
FIELDS = (("device_feature_select", 0x00, 4), ("device_feature", 0x04, 4),
          ("driver_feature_select", 0x08, 4), ("driver_feature", 0x0C, 4),
          ("config_msix_vector", 0x10, 2), ("num_queues", 0x12, 2),
          ("device_status", 0x14, 1), ("config_generation", 0x15, 1),
          ("queue_select", 0x16, 2), ("queue_size", 0x18, 2), ("queue_msix_vector", 0x1A, 2),
          ("queue_enable", 0x1C, 2), ("queue_notify_off", 0x1E, 2), ("queue_desc", 0x20, 8),
          ("queue_driver", 0x28, 8), ("queue_device", 0x30, 8), ("queue_notify_data", 0x38, 2),
          ("queue_reset", 0x3A, 2))
_QUEUE_STATE = ("size", "vector", "enabled", "desc", "driver", "device")


class QueueRegisters:
    """One queue's registers as the driver programs them."""
    __slots__ = ("max_size",) + _QUEUE_STATE

    def __init__(self, max_size):
        self.max_size = max_size
        self.reset()

    def reset(self):
        self.size = self.max_size
        self.vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


class CommonConfig:
    def __init__(self, device_features, queue_max_sizes, num_vectors):
        self.device_features = device_features
        self.queues = [QueueRegisters(m) for m in queue_max_sizes]
        self.num_vectors = num_vectors
        self.status = 0
        self.resetting = False
        self.status_shown = 0               # what device_status reads while a reset is in progress
        self.features_rejected = 0
        self.clear()

    def clear(self):
        """The registers' reset values (the status is cleared by reset_done)."""
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    def reset_done(self):
        self.clear()
        self.status = 0
        self.resetting = False

    @property
    def active(self):
        return bool(self.status & DRIVER_OK) and not self.resetting

    def enabled_queues(self):
        """The QueueConfigs the backend gets at DRIVER_OK."""
        return [QueueConfig(i, q.size, q.desc, q.driver, q.device, q.vector)
                for i, q in enumerate(self.queues) if q.enabled]

    def fail(self):
        """DEVICE_NEEDS_RESET: the device cannot go on until the driver resets it."""
        self.status |= DEVICE_NEEDS_RESET

    # -- register access ----------------------------------------------------------------
    def _pack(self):
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        sel = self.device_feature_select
        dev_feat = (self.device_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        dsel = self.driver_feature_select
        drv_feat = (self.driver_features >> (32 * dsel)) & 0xFFFFFFFF if dsel < 2 else 0
        status = self.status_shown if self.resetting else self.status
        return LAYOUT.pack(
            sel, dev_feat, dsel, drv_feat, self.config_vector, len(self.queues), status,
            self.config_generation & 0xFF, self.queue_select,
            q.size if q else 0, q.vector if q else NO_VECTOR, int(q.enabled) if q else 0,
            self.queue_select if q else 0, q.desc if q else 0, q.driver if q else 0, q.device if q else 0,
            0, 0)

    def read(self, offset, size):
        if offset >= LENGTH:
            return bytes(size)
        return self._pack()[offset:offset + size].ljust(size, b"\0")

    def write(self, offset, data):
        """Apply a write; returns ACTIVATE, RESET or None for what the transport must now do."""
        if offset >= LENGTH:
            return None
        snap = bytearray(self._pack())
        end = min(offset + len(data), LENGTH)
        snap[offset:end] = data[:end - offset]
        action = None
        for name, off, width in FIELDS:
            if off < end and off + width > offset:
                value = int.from_bytes(snap[off:off + width], "little")
                if name == "device_status":
                    action = self._write_status(value)
                else:
                    setter = getattr(self, "_set_" + name, None)
                    if setter is not None:
                        setter(value)
        return action

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
        return v if v < self.num_vectors else NO_VECTOR

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
        if self.resetting:
            return None
        if v == 0:
            self.status_shown = self.status
            self.resetting = True
            return RESET
        old = self.status
        v &= 0xFF & ~DEVICE_NEEDS_RESET
        if v & FEATURES_OK and not old & FEATURES_OK:
            f = self.driver_features
            if f & ~self.device_features or not f & VIRTIO_F_VERSION_1:
                v &= ~FEATURES_OK                 # it does not stick: the driver sees the refusal
                self.features_rejected += 1
        self.status = v | (old & DEVICE_NEEDS_RESET)
        if v & DRIVER_OK and not old & DRIVER_OK:
            return ACTIVATE
        return None

    # -- state ------------------------------------------------------------------------------
    def snapshot(self):
        return {"status": self.status, "device_feature_select": self.device_feature_select,
                "driver_feature_select": self.driver_feature_select, "driver_features": self.driver_features,
                "config_vector": self.config_vector, "queue_select": self.queue_select,
                "config_generation": self.config_generation,
                "queues": [{k: getattr(q, k) for k in _QUEUE_STATE} for q in self.queues]}

    # what each saved register can hold: the width of its field in the structure the driver reads
    _LIMITS = {"status": 0xFF, "device_feature_select": 0xFFFF_FFFF, "driver_feature_select": 0xFFFF_FFFF,
               "driver_features": (1 << 64) - 1, "config_vector": 0xFFFF, "queue_select": 0xFFFF,
               "config_generation": 0xFF}
    _QUEUE_LIMITS = {"size": 0xFFFF, "vector": 0xFFFF, "enabled": 1, "desc": (1 << 64) - 1,
                     "driver": (1 << 64) - 1, "device": (1 << 64) - 1}

    def restore(self, state):
        """Take `snapshot()`'s values; StateError (nothing changed) for one its register could not hold."""
        def checked(value, limit, what):
            if type(value) not in (int, bool) or not 0 <= value <= limit:
                raise StateError(f"saved transport register {what}={value!r} is outside 0..{limit:#x}")
            return int(value)
        queues = state["queues"]
        if len(queues) != len(self.queues):
            raise StateError(f"{len(queues)} queues in the saved transport, the device has {len(self.queues)}")
        regs = {name: checked(state[name], limit, name) for name, limit in self._LIMITS.items()}
        saved = [{k: checked(s[k], limit, f"queue {i} {k}") for k, limit in self._QUEUE_LIMITS.items()}
                 for i, s in enumerate(queues)]
        for q, s in zip(self.queues, saved):
            if not 1 <= s["size"] <= q.max_size:
                raise StateError(f"saved queue size {s['size']} is outside 1..{q.max_size}")
        for what, vector in [("config", regs["config_vector"])] + [(f"queue {i}", s["vector"])
                                                                  for i, s in enumerate(saved)]:
            if vector != self._valid_vector(vector):     # a guest's write of it would have read back NO_VECTOR
                raise StateError(f"saved {what} MSI-X vector {vector} is not one of the device's "
                                 f"{self.num_vectors}")
        for name, value in regs.items():
            setattr(self, name, value)
        for q, s in zip(self.queues, saved):
            for k, value in s.items():
                setattr(q, k, bool(value) if k == "enabled" else value)
        self.resetting = False
