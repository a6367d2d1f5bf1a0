"""virtio-console (device type 3): one extra console port for the guest (/dev/hvc0 in Linux).

The first console stays the 8250 on COM1; this is a second, faster one with
no per-byte exits.  Single port, no VIRTIO_CONSOLE_F_MULTIPORT, so exactly
two queues (spec 5.3.2): receiveq (0, host -> guest) and transmitq (1,
guest -> host).  Config (struct virtio_console_config, 12 bytes): le16 cols,
le16 rows, le32 max_nr_ports, le32 emerg_wr.  Features offered:
VIRTIO_F_VERSION_1, VIRTIO_CONSOLE_F_EMERG_WRITE (a driver write to emerg_wr
is one output byte) and VIRTIO_CONSOLE_F_SIZE only when a non-zero size was
given (a 0x0 size makes Linux resize the hvc to nothing).

Data path
---------
* transmitq: every chain's device-readable bytes (at most MAX_TX_CHAIN) go
  to `sink(bytes)`; the chain is returned with used length 0 (the device
  wrote nothing).  Device-writable parts are ignored.
* receiveq: host input given to `feed(data)` (any thread) is kept in a
  backlog of at most `backlog_max` bytes (the excess is dropped and
  counted) until the driver has posted receive buffers; each chain gets at
  most its device-writable length, and is returned with the number of
  bytes written.  Chains are popped only while there is input, so posted
  buffers wait in the ring, not in this process (a restarted service
  resumes cleanly).  `feed` wakes the backend thread through an eventfd
  polled next to the queue notify eventfds.
* Malformed chains (ChainError) are returned with length 0 (ThreadedBackend.pop);
  a receive chain with no writable byte too (counted in `empty_rx_chains`).

Host side
---------
`HostedConsole` (the "console" kind in its device service) serves its host
end through devices/console_host.py: a unix socket, one client at a time,
guest output also appended to the log file if there is one.
"""
import struct
import threading

from pyhv.devices.console_host import ConsoleHost
from pyhv.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE
from pyhv.devices.virtio.threaded import ThreadedBackend
from pyhv.proto.errors import state_bytes

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 128
BACKLOG_MAX = 64 << 10          # host input waiting for receive buffers
MAX_TX_CHAIN = 1 << 20          # bytes taken from one transmit chain
_CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8


class VirtioConsole(ThreadedBackend):
    device_type = VIRTIO_ID_CONSOLE
    num_queues = 2
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-console"
    host_input_queue = RECEIVEQ        # feed() bumps it: served without a guest kick

    def __init__(self, sink=None, cols=0, rows=0, backlog_max=BACKLOG_MAX):
        super().__init__()
        self.sink = sink if sink is not None else (lambda data: None)
        self.cols, self.rows = cols, rows
        self.features = VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_EMERG_WRITE | \
            (VIRTIO_CONSOLE_F_SIZE if cols and rows else 0)
        self.backlog_max = backlog_max
        self._backlog = bytearray()
        self._in_lock = threading.Lock()
        self.tx_bytes = self.rx_bytes = self.dropped = 0
        self.tx_chains = self.rx_chains = self.empty_rx_chains = 0
        self.emerg_bytes = 0

    # -- static description / config --------------------------------------------------
    def config_bytes(self):
        return _CONFIG.pack(self.cols, self.rows, 0, 0)

    def config_write(self, offset, data):
        """emerg_wr (offset 8, le32): the low byte is one output character; the rest is read-only."""
        if offset == EMERG_WR_OFFSET and data:
            self.emerg_bytes += 1
            self._output(bytes(data[:1]))

    # -- host side ----------------------------------------------------------------------
    def feed(self, data):
        """Host input for the guest (any thread); returns the number of bytes accepted."""
        if not data:
            return 0
        with self._in_lock:
            room = max(0, self.backlog_max - len(self._backlog))
            take = min(room, len(data))
            self._backlog += data[:take]
            self.dropped += len(data) - take
        if take:
            self.host_input_arrived()
        return take

    @property
    def backlog(self):
        with self._in_lock:
            return len(self._backlog)

    def _output(self, data):
        self.tx_bytes += len(data)
        try:
            self.sink(data)
        except Exception:                 # a broken sink must not kill the queue thread
            pass

    # -- the data path --------------------------------------------------------------------
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
            data = chain.read_all(min(chain.readable_len, MAX_TX_CHAIN)) if chain.readable_len else b""
            vq.put(chain.head, 0)
            self.tx_chains += 1
            if data:
                self._output(bytes(data))

    def _receive(self, vq):
        while True:
            with self._in_lock:
                if not self._backlog:
                    return
            chain = self.pop(vq)
            if chain is None:
                return                    # input waits for the driver's next buffers
            if chain.writable_len == 0:
                self.empty_rx_chains += 1
                vq.put(chain.head, 0)
                continue
            with self._in_lock:
                n = chain.write_into(bytes(self._backlog[:chain.writable_len]))
                del self._backlog[:n]
            vq.put(chain.head, n)
            self.rx_chains += 1
            self.rx_bytes += n

    def model_state(self):
        """Host input not yet given to the guest."""
        with self._in_lock:
            return {"backlog": bytes(self._backlog)}

    def restore_model_state(self, state):
        with self._in_lock:
            self._backlog = bytearray(state_bytes(state.get("backlog", b""), "console backlog")[:self.backlog_max])

    def counters(self):
        c = super().counters()
        c.update(tx_bytes=self.tx_bytes, rx_bytes=self.rx_bytes, dropped=self.dropped,
                 backlog=self.backlog, tx_chains=self.tx_chains, rx_chains=self.rx_chains,
                 empty_rx_chains=self.empty_rx_chains, emerg_bytes=self.emerg_bytes)
        return c


class HostedConsole(VirtioConsole):
    """A VirtioConsole with its host end: the "console" kind as its device service builds it."""

    def __init__(self, sock_path, log_path=None, **kw):
        super().__init__(**kw)
        self.host = ConsoleHost(sock_path, self.feed, log_path, max_clients=1)
        self.sink = self.host.write

    def counters(self):
        c = super().counters()
        h = self.host.counters()
        h["dropped"] = c["dropped"] + h["out_dropped"]
        h["rx_dropped"] = c["dropped"]
        c.update(h)
        return c

    def close(self):
        super().close()
        if self.host is not None:
            self.host.close()
            self.host = None
