"""The vhost-user front end: a VirtioDevice in the worker whose queues another program serves, over a unix socket.

Why in the worker, and not in a device service
----------------------------------------------
A vhost-user back end (qemu-storage-daemon's vhost-user-blk export,
virtiofsd) is already a process of its own that maps guest RAM and works
the queues itself; what is left for pyhv is the control channel: tell it
the features, the memory table and each ring's addresses and eventfds, and
stop and restart the rings.  That is a handful of small messages at
DRIVER_OK, reset, pause and resume, never per request, so a service process
in between would add a process and a hop and serve nothing.  The worker
owns every fd the back end needs (the RAM memfd, the notify eventfds KVM
signals on the guest's kick, the irq eventfds KVM turns into MSIs), so the
front end sends them straight from here: guest kick -> KVM ioeventfd -> the
back end; the back end -> irq eventfd -> KVM irqfd -> guest.  The back end
is the user's program: pyhv neither starts nor restarts it.

What it says (docs/interop/vhost-user.rst; proto/vhost_user.py)
--------------------------------------------------------------
On connecting: GET_FEATURES (VIRTIO_F_VERSION_1 required), GET/
SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG, whatever of those it offers),
SET_OWNER, GET_QUEUE_NUM (with MQ), then what the device type needs: blk
reads its config space with GET_CONFIG (CONFIG is required for it, as in
QEMU); fs builds its own (the tag and one request queue).  The guest is
offered VERSION_1 and what the back end offers of the ring features
(INDIRECT_DESC, EVENT_IDX) and of the device type's own bits: never packed
rings, an IOMMU, dirty logging or bit 30.  No back-end channel
(SLAVE_REQ) is set up, so a config change the back end would announce
(a resized disk) does not reach the guest.  At DRIVER_OK: SET_FEATURES,
SET_MEM_TABLE (guest RAM's regions, each with the memfd and its user
address in this process's mapping), and per enabled queue SET_VRING_NUM,
SET_VRING_BASE, SET_VRING_ADDR (user addresses), SET_VRING_CALL (the irq
eventfd of the queue's MSI-X vector, or one nobody reads for a queue without
a vector), SET_VRING_KICK (its notify eventfd),
SET_VRING_ENABLE.  Each request asks for a REPLY_ACK where the back end
offers it; otherwise a GET_FEATURES round trip ends each step, so an error
shows up there and then.  Reset and pause stop every ring with
GET_VRING_BASE (which returns where it stopped); resume starts them again
from there, with one kick and one interrupt per ring (spurious at worst:
the back end drops its call fd when a ring stops, so a request it finished
meanwhile may not have been signalled).

An untrusted peer
-----------------
Every reply is checked (proto/vhost_user.py); fds in a reply, an oversized
or unexpected message, a refusal or no answer within `timeout` seconds fail
the device.  So does the back end hanging up: a watcher thread polls the
socket for hang-up only (replies are read by the requesting thread).  A
failed device has state "failed" with the reason (`hvctl info`), is set
DEVICE_NEEDS_RESET if the driver was using it, and is never reconnected;
the guest and its other devices go on.  A snapshot (or migration) is
refused: the back end's state (requests in flight, a FUSE session) is not
pyhv's to save.

Threads: the transport calls activate from a vCPU thread under its own lock,
reset from a vCPU thread, pause/resume/counters from the worker's; one lock
serialises the requests.  The watcher tells the transport about a hang-up
without holding that lock.
"""
import array
import ctypes
import os
import select
import socket
import struct
import threading
import time

from pyhv.devices.loop import EventLoop
from pyhv.devices.virtio.device import NO_VECTOR, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VirtioDevice
from pyhv.devices.virtio.queue import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, QueueConfigError
from pyhv.proto import vhost_user as vu
from pyhv.proto.device_service import DeviceHealth
from pyhv.proto.errors import PeerFailed

VIRTIO_ID_FS = 26
REQUEST_TIMEOUT = 5.0
MAX_QUEUES = 16                         # per device; a back end offering more is given this many
RING_FEATURES = VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR
_MAX_FDS = 8


def _host_address(buf):
    """The address of a writable buffer (guest RAM's mapping) in this process."""
    c = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(c)
    del c                                   # releases the export: the mapping can still be closed
    return addr


def _peer_pid(sock):
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return pid or None
    except OSError:
        return None


class VhostUserDevice(VirtioDevice):
    """A device served by a vhost-user back end on `sock` (connected).  Subclasses describe the device type."""

    name = "vhost-user"
    device_features = 0                 # the device type's own feature bits the guest may be offered
    queue_max_size = 256

    def __init__(self, sock, path="", timeout=REQUEST_TIMEOUT):
        super().__init__()
        self.sock = sock
        self.path = path
        self.timeout = timeout
        self.backend_pid = _peer_pid(sock)
        self._lock = threading.RLock()
        self.state = "starting"
        self.reason = ""
        self.requests = 0
        self.activations = self.pauses = self.resumes = 0
        self.backend_features = self.protocol_features = 0
        self._active = None             # (features, [QueueConfig], GuestMemory) while the driver runs it
        self._running = False           # the back end serves the rings
        self._bases = {}                # ring index -> next available index to start from
        self._paused = False
        self._host_base = 0
        self._sink = None               # the call fd of queues without an MSI-X vector
        self._loop = None
        try:
            self._handshake()
        except PeerFailed:
            sock.close()
            raise
        self.state = "running"
        self._loop = EventLoop(f"{self.name}-watch")
        self._loop.add(sock.fileno(), self._hung_up, events=_HANGUP)
        self._watcher = self._loop.start()

    # -- the device type --------------------------------------------------------------------
    def describe_device(self, max_queues):
        """Set num_queues, queue_max_sizes and the config space (`max_queues`: GET_QUEUE_NUM's answer or None)."""
        raise NotImplementedError

    # -- requests (lock held) ---------------------------------------------------------------
    @property
    def _acked(self):
        return bool(self.protocol_features & vu.PF_REPLY_ACK)

    def _where(self):
        pid = f" (pid {self.backend_pid})" if self.backend_pid else ""
        return f"{self.name} back end{pid} on {self.path or 'its socket'}"

    def _fail(self, reason):
        """The device is failed from now on: the socket is shut down (the watcher closes it)."""
        if self.state != "failed":
            self.state, self.reason = "failed", reason
        self._running = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _check_usable(self):
        if self.state == "failed":
            raise PeerFailed(self.reason)

    def _exchange(self, request, payload=b"", fds=(), parse=None):
        """Send one request; for one that has a reply, `parse(reply request, reply payload)` checks it and makes
        the result.  Otherwise a REPLY_ACK is asked for where negotiated.  Any fault fails the device."""
        self._check_usable()
        ack = parse is None and self._acked
        try:
            self._send(vu.message(request, payload, need_reply=ack), fds)
            if ack:
                vu.parse_ack(request, *self._receive(request))
            elif parse is not None:
                return parse(*self._receive(request))
            return None
        except TimeoutError:
            self._fail(f"{self._where()}: no reply to {vu.name(request)} within {self.timeout:g} s")
        except vu.BackendBroke as e:
            self._fail(f"{self._where()}: {e}")
        except (BrokenPipeError, ConnectionResetError):
            self._fail(f"{self._where()} closed the connection (at {vu.name(request)})")
        except OSError as e:
            self._fail(f"{self._where()}: {vu.name(request)} failed: {e.strerror or e}")
        raise PeerFailed(self.reason)

    def _send(self, data, fds):
        self.requests += 1
        self.sock.settimeout(self.timeout)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = self.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
        if sent < len(data):
            self.sock.sendall(data[sent:], socket.MSG_NOSIGNAL)

    def _receive(self, request):
        deadline = time.monotonic() + self.timeout
        got, _, size = vu.parse_header(self._recv_exact(vu.HEADER.size, deadline, request))
        return got, self._recv_exact(size, deadline, request)

    def _recv_exact(self, n, deadline, request):
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            data, anc, flags, _ = self.sock.recvmsg(n - len(buf), socket.CMSG_SPACE(_MAX_FDS * 4),
                                                    socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, extra in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(extra[:len(extra) - len(extra) % fds.itemsize])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if fds or flags & socket.MSG_CTRUNC:
                raise vu.BackendBroke(f"sent file descriptors with its reply to {vu.name(request)}")
            if not data:
                raise ConnectionResetError
            buf += data
        return bytes(buf)

    def _get_u64(self, request):
        return self._exchange(request, parse=lambda got, payload: vu.parse_u64(request, got, payload))

    def _barrier(self):
        """Without REPLY_ACK: a round trip, so the requests before it have been read and acted on."""
        if not self._acked:
            if self._get_u64(vu.GET_FEATURES) != self.backend_features:
                self._fail(f"{self._where()}: its features changed")
                raise PeerFailed(self.reason)

    # -- connection set-up ----------------------------------------------------------------------
    def _handshake(self):
        features = self._get_u64(vu.GET_FEATURES)
        self.backend_features = features
        if not features & VIRTIO_F_VERSION_1:
            self._fail(f"{self._where()}: offers no VIRTIO_F_VERSION_1 (pyhv's virtio devices are modern only)")
            raise PeerFailed(self.reason)
        if features & vu.F_PROTOCOL_FEATURES:
            offered = self._get_u64(vu.GET_PROTOCOL_FEATURES)
            self._exchange(vu.SET_PROTOCOL_FEATURES, vu.u64(offered & vu.WANTED_PROTOCOL_FEATURES))
            self.protocol_features = offered & vu.WANTED_PROTOCOL_FEATURES   # REPLY_ACK holds from here on
        self._exchange(vu.SET_OWNER)
        max_queues = None
        if self.protocol_features & vu.PF_MQ:
            max_queues = self._get_u64(vu.GET_QUEUE_NUM)
            if not 1 <= max_queues <= 0xFFFF:
                self._fail(f"{self._where()}: GET_QUEUE_NUM says {max_queues} queues")
                raise PeerFailed(self.reason)
        self.describe_device(max_queues)
        self.features = VIRTIO_F_VERSION_1 | features & (RING_FEATURES | self.device_features)
        self._barrier()

    def _refuse(self, why):
        """The back end cannot serve this device: fail with `why`."""
        self._fail(f"{self._where()}: {why}")
        raise PeerFailed(self.reason)

    # -- rings ------------------------------------------------------------------------------------
    def _user_address(self, mem, gpa):
        for base, size, offset in mem.regions:
            if base <= gpa < base + size:
                return self._host_base + offset + gpa - base
        raise QueueConfigError(f"guest address 0x{gpa:x} is outside guest RAM")

    def _check_queue(self, mem, q):
        """QueueConfigError unless the driver's queue can be handed over (checked before anything is sent)."""
        if not 0 <= q.index < self.num_queues:
            raise QueueConfigError(f"queue {q.index} does not exist")
        if not 1 <= q.size <= self.queue_max_sizes[q.index] or q.size & (q.size - 1):
            raise QueueConfigError(f"queue {q.index}: size {q.size} is not a power of two up to "
                                   f"{self.queue_max_sizes[q.index]}")
        for what, addr, align, length in (("descriptor table", q.desc, 16, 16 * q.size),
                                          ("available ring", q.driver, 2, 6 + 2 * q.size),
                                          ("used ring", q.device, 4, 6 + 8 * q.size)):
            if addr % align or not mem.contains(addr, length):
                raise QueueConfigError(f"queue {q.index}: {what} at 0x{addr:x}+0x{length:x} is not aligned "
                                       f"guest RAM")

    def _start_rings(self):
        _, queues, mem = self._active
        for q in queues:
            i = q.index
            self._exchange(vu.SET_VRING_NUM, vu.vring_state(i, q.size))
            self._exchange(vu.SET_VRING_BASE, vu.vring_state(i, self._bases.get(i, 0)))
            self._exchange(vu.SET_VRING_ADDR, vu.vring_addr(i, self._user_address(mem, q.desc),
                                                            self._user_address(mem, q.device),
                                                            self._user_address(mem, q.driver)))
            self._exchange(vu.SET_VRING_CALL, vu.vring_fd(i), [self._call_fd(q)])
            self._exchange(vu.SET_VRING_KICK, vu.vring_fd(i), [self.eventfds.notify_fd(i)])
            if self.backend_features & vu.F_PROTOCOL_FEATURES:
                self._exchange(vu.SET_VRING_ENABLE, vu.vring_state(i, 1))
        self._barrier()
        self._running = True

    def _call_fd(self, q):
        """The queue vector's irq eventfd; for a queue without a vector (a polling driver) an eventfd nobody
        reads, as QEMU gives: libvhost-user back ends (qemu-storage-daemon 7.2) write their call fd
        unconditionally and die on a missing one."""
        fd = self.eventfds.irq_fd(q.vector) if q.vector != NO_VECTOR else None
        if fd is None:
            if self._sink is None:
                self._sink = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fd = self._sink
        return fd

    def _stop_rings(self):
        """GET_VRING_BASE per ring: the back end stops it and says where; kept for the restart."""
        self._running = False
        for q in self._active[1]:
            if self.backend_features & vu.F_PROTOCOL_FEATURES:
                self._exchange(vu.SET_VRING_ENABLE, vu.vring_state(q.index, 0))
            self._bases[q.index] = self._exchange(
                vu.GET_VRING_BASE, vu.vring_state(q.index, 0),
                parse=lambda got, payload, i=q.index: vu.parse_vring_state(vu.GET_VRING_BASE, got, payload, i))

    def _nudge(self):
        """After a restart: one kick per ring and one interrupt per vector (see the module docstring)."""
        _, queues, _ = self._active
        for q in queues:
            os.eventfd_write(self.eventfds.notify_fd(q.index), 1)
            fd = self.eventfds.irq_fd(q.vector) if q.vector != NO_VECTOR else None
            if fd is not None:
                os.eventfd_write(fd, 1)

    # -- VirtioDevice -------------------------------------------------------------------------------
    def config_bytes(self):
        return self._config

    def activate(self, mem, features, queues):
        with self._lock:
            if self.state == "failed":
                raise QueueConfigError(self.reason)
            for q in queues:
                self._check_queue(mem, q)
            self._host_base = _host_address(mem.host_buffer())
            regions = [(gpa, size, self._host_base + offset, offset) for gpa, size, offset in mem.regions]
            try:
                extra = features & ~self.features
                if extra:
                    raise QueueConfigError(f"features 0x{extra:x} were not offered")
                protocol = self.backend_features & vu.F_PROTOCOL_FEATURES
                self._exchange(vu.SET_FEATURES, vu.u64(features | protocol))
                self._exchange(vu.SET_MEM_TABLE, vu.mem_table(regions), [mem.fd] * len(regions))
                self._active = (features, list(queues), mem)
                self._bases = {q.index: 0 for q in queues}
                if not self._paused:
                    self._start_rings()
            except PeerFailed as e:
                self._active = None
                raise QueueConfigError(str(e)) from None
            self.activations += 1

    def reset(self):
        with self._lock:
            if self._active is not None and self._running and self.state != "failed":
                try:
                    self._stop_rings()
                except PeerFailed:
                    pass                    # failed: the socket is shut, the back end stops on its own
            self._active = None
            self._running = False
            self._bases = {}

    def pause(self):
        """Stop every ring (GET_VRING_BASE); a failed back end has nothing to stop."""
        with self._lock:
            if self._paused:
                return
            self._paused = True
            self.pauses += 1
            if self._active is not None and self._running and self.state != "failed":
                try:
                    self._stop_rings()
                except PeerFailed:
                    pass                    # the watcher sees the socket shut and reports it

    def resume(self):
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            self.resumes += 1
            if self._active is not None and not self._running and self.state != "failed":
                try:
                    self._start_rings()
                    self._nudge()
                except PeerFailed:
                    pass

    @property
    def paused(self):
        return self._paused

    def status(self):
        return DeviceHealth(state=self.state, pid=self.backend_pid if self.state == "running" else None,
                            reason=self.reason, paused=self._paused)

    def counters(self):
        c = {"state": self.state, "pid": self.backend_pid, "socket": self.path, "requests": self.requests,
             "backend_features": f"0x{self.backend_features:x}", "protocol_features": f"0x{self.protocol_features:x}",
             "queues": self.num_queues, "activations": self.activations, "pauses": self.pauses,
             "resumes": self.resumes, "rings_running": self._running, "paused": self._paused}
        if self.reason:
            c["reason"] = self.reason
        return c

    # -- the back end hanging up, and closing ------------------------------------------------------
    def _hung_up(self):
        """The watcher's thread: the socket hung up (the back end died or closed it, or we shut it)."""
        self._loop.remove(self.sock.fileno())
        with self._lock:
            if self.state != "failed":
                self._fail(f"{self._where()} closed the connection")
            active, self._active = self._active, None
            self._running = False
            self.sock.close()
        if active is not None:
            self.events.needs_reset(self.reason)

    def close(self):
        if self._loop is not None:
            self._loop.stop()
            if self._watcher is not threading.current_thread():
                self._watcher.join(5)
            self._loop.close()
            self._loop = None
        with self._lock:
            self._active = None
            self._running = False
            if self.sock.fileno() >= 0:
                self.sock.close()         # the back end sees EOF and stops serving the rings
            if self._sink is not None:
                os.close(self._sink)
                self._sink = None
            if self.state != "failed":
                self.state = "stopped"


class VhostUserBlk(VhostUserDevice):
    """virtio-blk: the config space is the back end's (GET_CONFIG); queues as its num_queues says (with MQ)."""

    device_type = VIRTIO_ID_BLOCK
    name = "vhost-user-blk"
    # SIZE_MAX, SEG_MAX, GEOMETRY, RO, BLK_SIZE, FLUSH, TOPOLOGY, MQ, DISCARD, WRITE_ZEROES: what the first
    # CONFIG_SIZE bytes of config describe.  Not CONFIG_WCE: the config space stays read-only for the guest.
    device_features = sum(1 << b for b in (1, 2, 4, 5, 6, 9, 10, 12, 13, 14))
    CONFIG_SIZE = 60                    # struct virtio_blk_config up to write_zeroes_may_unmap and its padding
    F_MQ = 1 << 12
    NUM_QUEUES_AT = 34

    def describe_device(self, max_queues):
        if not self.protocol_features & vu.PF_CONFIG:
            self._refuse("offers no CONFIG protocol feature (a blk front end reads the disk's config from it)")
        config = bytearray(self._exchange(vu.GET_CONFIG, vu.config(0, self.CONFIG_SIZE),
                                          parse=lambda got, payload: vu.parse_config(got, payload, 0, self.CONFIG_SIZE)))
        nq = 1
        if self.backend_features & self.F_MQ:
            nq = int.from_bytes(config[self.NUM_QUEUES_AT:self.NUM_QUEUES_AT + 2], "little")
            if nq < 1 or max_queues is not None and nq > max_queues:
                self._refuse(f"its config says {nq} queues, GET_QUEUE_NUM {max_queues}")
            nq = min(nq, MAX_QUEUES)
            config[self.NUM_QUEUES_AT:self.NUM_QUEUES_AT + 2] = nq.to_bytes(2, "little")
        self.num_queues = nq
        self.queue_max_sizes = (self.queue_max_size,) * nq
        self._config = bytes(config)


class VhostUserFs(VhostUserDevice):
    """virtio-fs: the config space is ours (the tag, one request queue); queue 0 is hiprio, 1 the requests."""

    device_type = VIRTIO_ID_FS
    name = "vhost-user-fs"
    queue_max_size = 128
    TAG_BYTES = 36

    def __init__(self, sock, tag, path="", timeout=REQUEST_TIMEOUT):
        raw = tag.encode()
        if not 1 <= len(raw) <= self.TAG_BYTES:
            raise ValueError(f"tag {tag!r} is not 1..{self.TAG_BYTES} bytes")
        self.tag = tag
        super().__init__(sock, path, timeout)

    def describe_device(self, max_queues):
        if max_queues is not None and max_queues < 2:
            self._refuse(f"GET_QUEUE_NUM says {max_queues} queues (virtio-fs needs 2)")
        self.num_queues = 2
        self.queue_max_sizes = (self.queue_max_size,) * 2
        self._config = self.tag.encode().ljust(self.TAG_BYTES, b"\0") + (1).to_bytes(4, "little")


TYPES = {"blk": VhostUserBlk, "fs": VhostUserFs}


def connect(kind, path, timeout=REQUEST_TIMEOUT, **options):
    """A device of `kind` (blk, fs) served by the back end listening on unix socket `path`; PeerFailed if not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise PeerFailed(f"vhost-user-{kind}: cannot connect to {path}: {e.strerror or e} (is its back end "
                         f"running and listening there?)") from None
    try:
        return TYPES[kind](sock, path=path, timeout=timeout, **options)
    except BaseException:
        sock.close()
        raise
