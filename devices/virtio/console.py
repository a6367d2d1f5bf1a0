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
`ConsoleHost` (used by the device-service process, `--console-sock PATH
[--console-log PATH]`) is a unix stream socket: one client at a time (a
second one is accepted and closed at once, counted in `rejected_clients`),
bytes copied both ways by one thread; guest output is also appended to the
log file.  Output for a client that does not read is kept up to
OUT_BUFFER_MAX bytes and the rest dropped (counted); with no client, output
goes to the log only.
"""
import os
import select
import socket
import struct
import threading

from pyhv.devices.virtio.backend import VIRTIO_F_VERSION_1, VIRTIO_ID_CONSOLE, ThreadedBackend

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 128
BACKLOG_MAX = 64 << 10          # host input waiting for receive buffers
MAX_TX_CHAIN = 1 << 20          # bytes taken from one transmit chain
OUT_BUFFER_MAX = 1 << 20        # guest output waiting for a slow socket client
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

    def counters(self):
        c = super().counters()
        c.update(tx_bytes=self.tx_bytes, rx_bytes=self.rx_bytes, dropped=self.dropped,
                 backlog=self.backlog, tx_chains=self.tx_chains, rx_chains=self.rx_chains,
                 empty_rx_chains=self.empty_rx_chains, emerg_bytes=self.emerg_bytes)
        return c


class ConsoleHost:
    """The host end of a VirtioConsole: a unix socket (one client at a time) and an optional log file."""

    def __init__(self, sock_path, log_path=None, out_max=OUT_BUFFER_MAX):
        self.sock_path = sock_path
        self.log_path = log_path
        self.out_max = out_max
        self.console = None
        self._lock = threading.Lock()
        self._out = bytearray()
        self._client = None
        self.clients = self.rejected_clients = self.out_dropped = 0
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600) \
            if log_path else None
        try:
            try:
                os.unlink(sock_path)      # a stale socket from an earlier incarnation
            except FileNotFoundError:
                pass
            self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._listen.bind(sock_path)
            os.chmod(sock_path, 0o600)
            self._listen.listen(4)
        except OSError:
            if self._log_fd is not None:
                os.close(self._log_fd)
            raise
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = False
        self._thread = None

    def start(self, console):
        """Serve `console` (a VirtioConsole): its sink becomes this host."""
        self.console = console
        console.sink = self.write
        self._thread = threading.Thread(target=self._run, name="vconsole-host", daemon=True)
        self._thread.start()

    # called from the backend thread
    def write(self, data):
        if self._log_fd is not None:
            try:
                os.write(self._log_fd, data)
            except OSError:
                pass
        with self._lock:
            if self._client is None:
                return
            room = max(0, self.out_max - len(self._out))
            self._out += data[:room]
            self.out_dropped += max(0, len(data) - room)
        os.eventfd_write(self._wake_fd, 1)

    @property
    def connected(self):
        return self._client is not None

    def _drop_client(self):
        with self._lock:
            c, self._client = self._client, None
            self._out.clear()
        if c is not None:
            c.close()

    def _run(self):
        lfd, wfd = self._listen.fileno(), self._wake_fd
        while not self._stop:
            client = self._client
            rlist, wlist = [lfd, wfd], []
            if client is not None:
                rlist.append(client)
                with self._lock:
                    if self._out:
                        wlist.append(client)
            try:
                r, w, _ = select.select(rlist, wlist, [])
            except (OSError, ValueError):
                if self._stop:
                    return
                continue
            if self._stop:
                return
            if wfd in r:
                try:
                    os.eventfd_read(wfd)
                except BlockingIOError:
                    pass
            if lfd in r:
                try:
                    conn, _ = self._listen.accept()
                except OSError:
                    conn = None
                if conn is not None:
                    if self._client is None:
                        conn.setblocking(False)
                        with self._lock:
                            self._client = conn
                            self._out.clear()
                        self.clients += 1
                    else:
                        self.rejected_clients += 1
                        conn.close()
            if client is not None and client in r:
                try:
                    data = client.recv(4096)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    self._drop_client()
                    continue
                if data and self.console is not None:
                    self.console.feed(data)
            if client is not None and client in w and self._client is client:
                with self._lock:
                    chunk = bytes(self._out[:65536])
                try:
                    n = client.send(chunk)
                except BlockingIOError:
                    n = 0
                except OSError:
                    self._drop_client()
                    continue
                with self._lock:
                    del self._out[:n]

    def counters(self):
        return {"socket": self.sock_path, "log": self.log_path, "client_connected": self.connected,
                "clients": self.clients, "rejected_clients": self.rejected_clients,
                "out_dropped": self.out_dropped}

    def close(self):
        self._stop = True
        if self._thread is not None:
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join(2.0)
            self._thread = None
        self._drop_client()
        self._listen.close()
        try:
            os.unlink(self.sock_path)
        except OSError:
            pass
        os.close(self._wake_fd)
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None


class HostedConsole(VirtioConsole):
    """A VirtioConsole with its ConsoleHost, as the device service builds it ("console" kind)."""

    def __init__(self, sock_path, log_path=None, **kw):
        super().__init__(**kw)
        self.host = ConsoleHost(sock_path, log_path)
        self.host.start(self)

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
