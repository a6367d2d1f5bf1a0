"""A vhost-user back end in Python for tests: one thread serving one socket, and knobs to make it misbehave.

It speaks the back-end side of proto/vhost_user.py the way libvhost-user
does (qemu-storage-daemon, virtiofsd): rings start disabled when bit 30 was
negotiated, start on SET_VRING_KICK, stop on GET_VRING_BASE (dropping their
kick and call fds), REPLY_ACK when asked.  Its "device" reads what the
driver wrote into each chain's readable buffers and writes `reply(data)`
(default: the bytes reversed, then `FILL` up to the writable length) into
the writable ones, then signals the ring's call fd.  It maps guest RAM from
the memfd SET_MEM_TABLE sends and translates ring addresses through the
region table, so a wrong user address or offset shows up as a wrong ring.

`misbehave` maps a request code to what it does instead of answering:
"close" (hang up), "silent" (never answer), "wrong-request", "no-reply-flag",
"bad-version", "short", "huge", "fds", "nack" (a REPLY_ACK of 1).
"""
import array
import os
import select
import socket
import threading

from pyhv.devices.guest_memory import GuestMemory
from pyhv.devices.virtio.queue import VirtQueue
from pyhv.proto import vhost_user as vu
from pyhv.proto.device_service import QueueConfig, QueueState

FILL = 0x5A
VERSION_1 = 1 << 32
DEFAULT_FEATURES = VERSION_1 | vu.F_PROTOCOL_FEATURES | (1 << 29) | (1 << 28) | (1 << 34) | vu.F_LOG_ALL
DEFAULT_PROTOCOL = vu.PF_MQ | vu.PF_REPLY_ACK | vu.PF_CONFIG | (1 << 5)      # and SLAVE_REQ, which pyhv declines


def _reverse(data):
    return data[::-1]


class Ring:
    def __init__(self):
        self.num = 0
        self.base = 0
        self.addr = None            # (desc, used, avail) user addresses
        self.kick = self.call = None
        self.enabled = False
        self.queue = None


class FakeBackend:
    def __init__(self, sock, features=DEFAULT_FEATURES, protocol_features=DEFAULT_PROTOCOL, config=b"",
                 queue_num=4, misbehave=None, reply=_reverse):
        self.sock = sock
        self.features = features
        self.protocol_features = protocol_features
        self.config = bytes(config)
        self.queue_num = queue_num
        self.misbehave = dict(misbehave or {})
        self.reply_fn = reply
        self.log = []               # (request, flags, payload, number of fds) in arrival order
        self.acked_features = None
        self.acked_protocol = 0
        self.regions = []
        self.mem = None
        self.rings = {}
        self.served = 0
        self.owner = False
        self.error = None           # what broke the back end itself (a test failure)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="fake-vhost-user", daemon=True)
        self.thread.start()

    @classmethod
    def pair(cls, **kw):
        """(front end's socket, back end) over a socketpair."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return ours, cls(theirs, **kw)

    @classmethod
    def listen(cls, path, **kw):
        """A Listener on unix socket `path`: its `backend` serves the first front end that connects."""
        return Listener(cls, path, kw)

    def requests(self):
        return [r for r, _, _, _ in self.log]

    def hang_up(self):
        """As the back end's death looks from the front end: the connection ends (its thread then ends too)."""
        self.sock.shutdown(socket.SHUT_RDWR)

    def stop(self):
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)
        self._drop_rings()
        self.sock.close()
        if self.mem is not None:
            self.mem.close()

    def _drop_rings(self):
        for r in self.rings.values():
            self._stop_ring(r)

    @staticmethod
    def _stop_ring(r):
        if r.queue is not None:
            r.queue.close()
            r.queue = None
        for fd in (r.kick, r.call):
            if fd is not None:
                os.close(fd)
        r.kick = r.call = None

    # -- the thread ---------------------------------------------------------------------------
    def _run(self):
        try:
            while True:
                p = select.poll()
                p.register(self._stop_r, select.POLLIN)
                p.register(self.sock, select.POLLIN)
                kicks = {r.kick: i for i, r in self.rings.items() if r.kick is not None}
                for fd in kicks:
                    p.register(fd, select.POLLIN)
                for fd, _ in p.poll():
                    if fd == self._stop_r:
                        return
                    if fd == self.sock.fileno():
                        if not self._message():
                            return
                    elif fd in kicks and kicks[fd] in self.rings and self.rings[kicks[fd]].kick == fd:
                        os.eventfd_read(fd)
                        self._serve(kicks[fd])
        except Exception as e:          # noqa: BLE001 - reported to the test
            self.error = e

    def _message(self):
        """Read and handle one message; False once the front end has gone (or we hung up)."""
        head, fds = self._recv(vu.HEADER.size)
        if head is None:
            return False
        request, flags, size = vu.unpack_header(head)
        payload, more = self._recv(size) if size else (b"", [])
        fds += more
        self.log.append((request, flags, payload, len(fds)))
        bad = self.misbehave.get(request)
        if bad == "close":
            for fd in fds:
                os.close(fd)
            self.sock.shutdown(socket.SHUT_RDWR)
            return False
        if bad == "silent":
            for fd in fds:
                os.close(fd)
            return True
        answer = self._handle(request, payload, fds)
        if answer is None and flags & vu.FLAG_NEED_REPLY:
            answer = vu.u64(1 if bad == "nack" else 0)
        if answer is not None:
            self._answer(request, answer, bad)
        return True

    def _recv(self, n):
        buf, fds = b"", []
        while len(buf) < n:
            data, anc, _, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(8 * 4))
            for level, kind, extra in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(extra[:len(extra) - len(extra) % 4])
                    fds += list(a)
            if not data:
                return None, fds
            buf += data
        return buf, fds

    def _answer(self, request, payload, bad):
        data = vu.reply(request, payload)
        fds = []
        if bad == "wrong-request":
            data = vu.reply(request + 1, payload)
        elif bad == "no-reply-flag":
            data = vu.message(request, payload)
        elif bad == "bad-version":
            data = vu.HEADER.pack(request, 2 | vu.FLAG_REPLY, len(payload)) + payload
        elif bad == "short":
            data = vu.reply(request, payload[:-1])
        elif bad == "huge":
            data = vu.HEADER.pack(request, vu.VERSION | vu.FLAG_REPLY, 1 << 20)
        elif bad == "fds":
            fds = [os.eventfd(0)]
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            self.sock.sendmsg([data], anc)
        finally:
            for fd in fds:
                os.close(fd)

    # -- requests -----------------------------------------------------------------------------
    def _handle(self, request, payload, fds):
        proto = (self.acked_features or 0) & vu.F_PROTOCOL_FEATURES     # rings start disabled
        if request == vu.GET_FEATURES:
            return vu.u64(self.features)
        if request == vu.SET_FEATURES:
            self.acked_features = vu.unpack_u64(payload)
        elif request == vu.GET_PROTOCOL_FEATURES:
            return vu.u64(self.protocol_features)
        elif request == vu.SET_PROTOCOL_FEATURES:
            self.acked_protocol = vu.unpack_u64(payload)
        elif request == vu.SET_OWNER:
            self.owner = True
        elif request == vu.GET_QUEUE_NUM:
            return vu.u64(self.queue_num)
        elif request == vu.GET_CONFIG:
            offset, size, _, _ = vu.unpack_config(payload)
            return vu.config(offset, size, self.config[offset:offset + size].ljust(size, b"\0"))
        elif request == vu.SET_MEM_TABLE:
            self.regions = vu.unpack_mem_table(payload)
            if self.mem is not None:
                self.mem.close()
            total = sum(size for _, size, _, _ in self.regions)
            self.mem = GuestMemory(fds[0], total)
            for fd in fds:
                os.close(fd)            # mapped: the fds are not needed any more
            fds = []
        elif request in (vu.SET_VRING_NUM, vu.SET_VRING_BASE, vu.SET_VRING_ENABLE):
            index, num = vu.unpack_vring_state(payload)
            r = self.rings.setdefault(index, Ring())
            setattr(r, {vu.SET_VRING_NUM: "num", vu.SET_VRING_BASE: "base", vu.SET_VRING_ENABLE: "enabled"}[request],
                    num if request != vu.SET_VRING_ENABLE else bool(num))
            if request == vu.SET_VRING_ENABLE and num:
                self._serve(index)
        elif request == vu.SET_VRING_ADDR:
            index, _, desc, used, avail, _ = vu.unpack_vring_addr(payload)
            self.rings.setdefault(index, Ring()).addr = (desc, used, avail)
        elif request in (vu.SET_VRING_KICK, vu.SET_VRING_CALL):
            value = vu.unpack_u64(payload)
            r = self.rings.setdefault(value & vu.VRING_INDEX_MASK, Ring())
            attr = "kick" if request == vu.SET_VRING_KICK else "call"
            if getattr(r, attr) is not None:
                os.close(getattr(r, attr))
            setattr(r, attr, fds[0] if fds and not value & vu.VRING_NOFD else None)
            fds = fds[1:] if fds and not value & vu.VRING_NOFD else fds
            if request == vu.SET_VRING_KICK:
                self._start(value & vu.VRING_INDEX_MASK)
                if not proto:
                    r.enabled = True
        elif request == vu.GET_VRING_BASE:
            index, _ = vu.unpack_vring_state(payload)
            r = self.rings.get(index, Ring())
            base = r.queue.last_avail_idx if r.queue is not None else r.base
            self._stop_ring(r)
            r.base = base
            return vu.vring_state(index, base)
        for fd in fds:
            os.close(fd)
        return None

    def _gpa(self, user):
        for gpa, size, ua, _ in self.regions:
            if ua <= user < ua + size:
                return gpa + user - ua
        raise ValueError(f"user address 0x{user:x} is in no region")

    def _start(self, index):
        r = self.rings[index]
        desc, used, avail = (self._gpa(a) for a in r.addr)
        config = QueueConfig(index, r.num, desc, avail, used)
        used_idx = self.mem.read_u16(used + 2)
        r.queue = VirtQueue.restore(self.mem, QueueState(config, r.base, used_idx),
                                    self.acked_features or 0)

    def _serve(self, index):
        r = self.rings.get(index)
        if r is None or r.queue is None or not r.enabled:
            return
        q = r.queue
        while True:
            chain = q.pop()
            if chain is None:
                break
            data = chain.read_all(1 << 20)
            out = self.reply_fn(data)
            out = out + bytes([FILL]) * max(0, chain.writable_len - len(out))
            q.put(chain.head, chain.write_into(out))
            self.served += 1
        if r.call is not None and q.needs_interrupt():
            os.eventfd_write(r.call, 1)


class Listener:
    """A listening socket whose first connection gets a FakeBackend (as a real back end's socket does)."""

    def __init__(self, cls, path, kw):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.backend = None
        self._accepted = threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(cls, kw), daemon=True)
        self._thread.start()

    def _accept(self, cls, kw):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return                      # closed before anyone came
        self.backend = cls(conn, **kw)
        self._accepted.set()

    def wait(self, timeout=30):
        assert self._accepted.wait(timeout), f"no front end connected to {self.path}"
        return self.backend

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes accept()
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        if self.backend is not None:
            self.backend.stop()
