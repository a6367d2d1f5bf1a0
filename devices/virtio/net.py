"""virtio-net (device type 1): an Ethernet NIC whose frames go to a host port (a TAP device or a ZeroMQ switch).

Features offered: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and
VIRTIO_NET_F_STATUS (link always up).  No checksum or segmentation offloads
and no mergeable receive buffers: every frame is a whole Ethernet frame of at
most MAX_FRAME bytes, preceded in the guest's buffers by the 12-byte
struct virtio_net_hdr_v1 (all zero from the device except num_buffers = 1).
Queues (spec 5.1.2): receiveq (0), transmitq (1).

Data path
---------
* transmitq: each chain's readable bytes are header + frame; the frame goes
  to `port.send(frame)` and the chain comes back with used length 0.  A chain
  shorter than header + 14 bytes (no Ethernet header) or longer than
  header + MAX_FRAME is returned unsent and counted in `tx_errors`.
* receiveq: frames from the port arrive through `deliver(frame)` (the port's
  thread) into a bounded backlog (`RX_BACKLOG` frames; beyond it frames are
  dropped, like a NIC whose ring is full).  The backend thread, woken through
  an eventfd, writes header + frame into the next posted chain.  A chain too
  small for a frame is returned with length 0 (`rx_errors`) and the frame is
  dropped.

Ports (`devices/net/ports.py`) own their sockets; the model only calls
`port.send` from its thread and is fed by `deliver` from the port's thread.
"""
import collections
import struct
import threading

from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_NET
from pyhv.devices.virtio.threaded import ThreadedBackend
from pyhv.proto.guest import format_mac

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 256
HDR_LEN = 12                    # virtio_net_hdr_v1 (num_buffers is always there with VERSION_1)
ETH_HLEN = 14
MAX_FRAME = 1514                # no VLAN, no jumbo frames, no GSO
RX_BACKLOG = 256
_HDR_RX = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)      # num_buffers = 1
_CONFIG = struct.Struct("<6sHH")                            # mac, status, max_virtqueue_pairs


class VirtioNet(ThreadedBackend):
    device_type = VIRTIO_ID_NET
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    num_queues = 2
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-net"
    host_input_queue = RECEIVEQ        # deliver() bumps it: served without a guest kick

    def __init__(self, mac, port=None, rx_backlog=RX_BACKLOG):
        super().__init__()
        self.mac = mac
        self.port = port
        self._rx = collections.deque()
        self._rx_max = rx_backlog
        self._rx_lock = threading.Lock()
        self.tx_frames = self.tx_bytes = self.tx_errors = 0
        self.rx_frames = self.rx_bytes = self.rx_errors = self.rx_dropped = 0

    def config_bytes(self):
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1)

    # -- host side (the port's thread) ------------------------------------------------------
    def deliver(self, frame):
        """A frame for the guest; dropped (and counted) when the backlog is full or it is malformed."""
        if not ETH_HLEN <= len(frame) <= MAX_FRAME:
            self.rx_dropped += 1
            return
        with self._rx_lock:
            if len(self._rx) >= self._rx_max:
                self.rx_dropped += 1
                return
            self._rx.append(bytes(frame))
        self.host_input_arrived()

    # -- the data path (backend thread) -----------------------------------------------------
    def process(self, index, vq):
        if index == TRANSMITQ:
            self._transmit(vq)
        elif index == RECEIVEQ:
            self._receive(vq)

    def _transmit(self, vq):
        while True:
            chain = self.pop(vq)
            if chain is None:
                return
            n = chain.readable_len
            if not HDR_LEN + ETH_HLEN <= n <= HDR_LEN + MAX_FRAME:
                self.tx_errors += 1
                vq.put(chain.head, 0)
                continue
            frame = chain.read_all(n)[HDR_LEN:]
            vq.put(chain.head, 0)
            self.tx_frames += 1
            self.tx_bytes += len(frame)
            if self.port is not None:
                self.port.send(frame)

    def _receive(self, vq):
        while True:
            with self._rx_lock:
                if not self._rx:
                    return
            chain = self.pop(vq)
            if chain is None:
                return                    # frames wait for the driver's next buffers
            with self._rx_lock:
                frame = self._rx.popleft()
            if chain.writable_len < HDR_LEN + len(frame):
                self.rx_errors += 1
                vq.put(chain.head, 0)
                continue
            chain.write_into(_HDR_RX)
            chain.write_into(frame, HDR_LEN)
            vq.put(chain.head, HDR_LEN + len(frame))
            self.rx_frames += 1
            self.rx_bytes += len(frame)

    def counters(self):
        c = super().counters()
        with self._rx_lock:
            backlog = len(self._rx)
        c.update(mac=format_mac(self.mac), tx_frames=self.tx_frames, tx_bytes=self.tx_bytes,
                 tx_errors=self.tx_errors, rx_frames=self.rx_frames, rx_bytes=self.rx_bytes,
                 rx_errors=self.rx_errors, rx_dropped=self.rx_dropped, rx_backlog=backlog,
                 requests=self.tx_frames + self.rx_frames, bytes=self.tx_bytes + self.rx_bytes,
                 errors=self.tx_errors + self.rx_errors + self.chain_errors + self.fatal_errors)
        if self.port is not None:
            c["port"] = self.port.counters()
        return c

    def model_state(self):
        """Frames received but not yet given to the guest."""
        with self._rx_lock:
            return {"rx": list(self._rx)}

    def restore_model_state(self, state):
        with self._rx_lock:
            self._rx = collections.deque(bytes(f) for f in state.get("rx", [])[:self._rx_max]
                                         if ETH_HLEN <= len(f) <= MAX_FRAME)

    def attach(self, events, eventfds):
        super().attach(events, eventfds)
        if self.port is not None:
            self.port.start()             # frames from the host only once the device is wired

    def close(self):
        self.reset()                      # no more port.send from the backend thread
        if self.port is not None:
            self.port.close()
            self.port = None
        super().close()
