"""The host end of a guest console: a unix socket that `hvctl console` attaches to, and optionally a log file.

COM1 (in the worker) and virtio-console (in its device service) both use it.
Guest output goes to the log, if any, and to the attached clients; client
input goes to `feed(bytes)`.  A client that does not read gets at most
`out_max` bytes buffered, the rest is dropped and counted (the log has it
all).  At most `max_clients` clients at once (one, by default: two people
typing into one shell is nobody's intent); one more gets BUSY and is closed.  One thread (an EventLoop) serves the socket; `write` may
be called from any thread and never blocks.
"""
import os
import select
import socket
import threading

from pyhv.devices.loop import EventLoop

OUT_BUFFER_MAX = 1 << 20
BUSY = b"\x1b[pyhv: console busy]\r\n"    # all a client gets when another one is attached


class _Client:
    __slots__ = ("sock", "out")

    def __init__(self, sock):
        self.sock, self.out = sock, bytearray()


class ConsoleHost:
    def __init__(self, sock_path, feed, log_path=None, max_clients=1, out_max=OUT_BUFFER_MAX, busy_message=BUSY,
                 start=True):
        """Bound and listening on return; clients are served once start() runs its thread (at once by
        default; a device service starts it only after sandboxing itself, which must precede every thread)."""
        self.sock_path = sock_path
        self.log_path = log_path
        self.feed = feed
        self.max_clients = max_clients
        self.out_max = out_max
        self.busy_message = busy_message
        self._lock = threading.Lock()      # the clients and their buffers
        self._clients = {}                 # fd -> _Client
        self.clients = self.rejected_clients = self.out_dropped = 0
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600) \
            if log_path else None
        try:
            try:
                os.unlink(sock_path)       # a stale socket from an earlier incarnation
            except FileNotFoundError:
                pass
            self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._listen.bind(sock_path)
            os.chmod(sock_path, 0o600)
            self._listen.listen(8)
        except OSError:
            if self._log_fd is not None:
                os.close(self._log_fd)
            raise
        self._loop = EventLoop("console-host")
        self._loop.add(self._listen, self._accept)
        self._thread = None
        if start:
            self.start()

    def start(self):
        self._thread = self._loop.start()

    @property
    def connected(self):
        return bool(self._clients)

    # -- guest output (any thread) --------------------------------------------------------
    def write(self, data):
        if self._log_fd is not None:
            try:
                os.write(self._log_fd, data)
            except OSError:
                pass
        if not self._clients:
            return
        blocked = []
        with self._lock:
            for fd, c in self._clients.items():
                if not c.out:
                    try:
                        sent = c.sock.send(data)
                    except BlockingIOError:
                        sent = 0
                    except OSError:
                        continue           # gone: the loop notices the hang-up
                    rest = data[sent:]
                else:
                    rest = data
                if rest:
                    room = max(0, self.out_max - len(c.out))
                    c.out += rest[:room]
                    self.out_dropped += len(rest) - min(room, len(rest))
                    blocked.append(fd)
        for fd in blocked:
            self._loop.call_soon(lambda fd=fd: self._want_write(fd))

    # -- the loop's thread -----------------------------------------------------------------
    def _accept(self):
        try:
            conn, _ = self._listen.accept()
        except OSError:
            return
        if len(self._clients) >= self.max_clients:
            self.rejected_clients += 1
            try:
                conn.send(self.busy_message)
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(False)
        fd = conn.fileno()
        with self._lock:
            self._clients[fd] = _Client(conn)
        self.clients += 1
        self._loop.add(fd, lambda: self._readable(fd))

    def _want_write(self, fd):
        if fd in self._clients:
            self._loop.modify(fd, select.POLLIN | select.POLLOUT)

    def _readable(self, fd):
        c = self._clients.get(fd)
        if c is None:
            return
        with self._lock:
            pending = bytes(c.out[:65536])
        if pending:
            try:
                n = c.sock.send(pending)
            except BlockingIOError:
                n = 0
            except OSError:
                return self._drop(fd)
            with self._lock:
                del c.out[:n]
                if not c.out:
                    self._loop.modify(fd, select.POLLIN)
        try:
            data = c.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._drop(fd)
        self.feed(data)

    def _drop(self, fd):
        self._loop.remove(fd)
        with self._lock:
            c = self._clients.pop(fd, None)
        if c is not None:
            c.sock.close()

    def counters(self):
        return {"socket": self.sock_path, "log": self.log_path, "client_connected": self.connected,
                "clients": self.clients, "rejected_clients": self.rejected_clients,
                "out_dropped": self.out_dropped}

    def close(self):
        self._loop.stop()
        if self._thread is not None:
            self._thread.join(2.0)
        for fd in list(self._clients):
            self._drop(fd)
        self._listen.close()
        self._loop.close()
        try:
            os.unlink(self.sock_path)
        except OSError:
            pass
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
