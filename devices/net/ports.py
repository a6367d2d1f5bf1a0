"""Host ends of a virtio-net device: a TAP interface or a port on a ZeroMQ switch.

A port has `send(frame)` (called by the device's backend thread), feeds
received frames to `deliver(frame)` from a thread of its own, and has
`counters()` and `close()`.  `open_port(spec, deliver)` builds one from the
net kind's service option: "tap:IFNAME" or "switch:ENDPOINT".
"""
import collections
import fcntl
import os
import struct
import threading

from pyhv.devices.loop import EventLoop
from pyhv.proto import switch as wire
from pyhv.proto.errors import UserError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_READ = 65536
OUT_QUEUE = 1024                # frames waiting for the switch port's thread


class PortError(UserError):
    """The host end cannot be opened; the message says what to fix."""


class TapPort:
    """A Linux TAP interface (IFF_TAP | IFF_NO_PI): frames in and out, one per read/write.

    Opening needs CAP_NET_ADMIN, or a persistent TAP the user owns
    (`ip tuntap add dev NAME mode tap user $USER`).  The interface is not
    configured here: give it an address and bring it up on the host.
    """

    def __init__(self, ifname, deliver):
        self.ifname = ifname
        self.deliver = deliver
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise PortError(f"tap:{ifname}: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as e:
            os.close(self.fd)
            raise PortError(f"tap:{ifname}: cannot attach ({e.strerror}; it needs CAP_NET_ADMIN or a persistent "
                            f"TAP owned by this user: ip tuntap add dev {ifname} mode tap user $USER)") from None
        self.sent = self.received = self.send_errors = 0
        self._loop = EventLoop(f"tap-{ifname}")
        self._loop.add(self.fd, self._readable)
        self._thread = None

    def start(self):
        """Frames start flowing to `deliver` (a thread of its own, started only now: see open_port)."""
        self._thread = self._loop.start()

    def send(self, frame):
        try:
            os.write(self.fd, frame)
            self.sent += 1
        except OSError:                 # interface down, queue full: the frame is lost, as on a wire
            self.send_errors += 1

    def _readable(self):
        while True:
            try:
                frame = os.read(self.fd, MAX_READ)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._loop.remove(self.fd)      # the interface is gone
                return
            self.received += 1
            self.deliver(frame)

    def counters(self):
        return {"backend": f"tap:{self.ifname}", "sent": self.sent, "received": self.received,
                "send_errors": self.send_errors}

    def close(self):
        self._loop.stop()
        if self._thread is not None:
            self._thread.join(2.0)
        self._loop.close()
        os.close(self.fd)


class SwitchPort:
    """A DEALER on a switch's ROUTER.  One thread owns the socket: send() queues, the thread sends.

    ZeroMQ reconnects by itself if the switch restarts; the hello every
    HELLO_INTERVAL makes the switch (re)learn this port before its first frame.
    """

    def __init__(self, endpoint, deliver):
        import zmq
        self.zmq = zmq
        self.endpoint = endpoint
        self.deliver = deliver
        self.ctx = self.sock = self._thread = None
        self._out = collections.deque()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.sent = self.received = self.dropped = self.malformed = 0
        self._loop = EventLoop("switch-port")
        self._loop.add(self._wake, self._flush)
        self._loop.every(wire.HELLO_INTERVAL, lambda: self._send(wire.hello()))

    def start(self):
        """Connect and start forwarding (ZeroMQ's threads and ours start only now: see open_port)."""
        zmq = self.zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, OUT_QUEUE)
        self.sock.setsockopt(zmq.RCVHWM, OUT_QUEUE)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4096)
        self.sock.connect(self.endpoint)
        self._loop.add_socket(self.sock, self._receive)
        self._thread = self._loop.start()

    def send(self, frame):
        with self._lock:
            if len(self._out) >= OUT_QUEUE:
                self.dropped += 1
                return
            self._out.append(frame)
        os.eventfd_write(self._wake, 1)

    def _flush(self):
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while True:
            with self._lock:
                if not self._out:
                    return
                frame = self._out.popleft()
            if self._send(wire.frame(frame)):
                self.sent += 1

    def _receive(self):
        try:
            parts = self.sock.recv_multipart(self.zmq.NOBLOCK)
        except self.zmq.Again:
            return
        try:
            kind, payload = wire.decode(parts)
        except wire.BadSwitchMessage:
            self.malformed += 1
            return
        if kind == "frame":
            self.received += 1
            self.deliver(payload)

    def _send(self, parts):
        try:
            self.sock.send_multipart(parts, self.zmq.NOBLOCK)
            return True
        except self.zmq.ZMQError:       # not connected yet, or the switch's queue is full
            self.dropped += 1
            return False

    def counters(self):
        return {"backend": f"switch:{self.endpoint}", "sent": self.sent, "received": self.received,
                "dropped": self.dropped, "malformed": self.malformed}

    def close(self):
        self._loop.stop()
        if self._thread is not None:
            self._thread.join(3.0)
        self._loop.close()
        if self.sock is not None:
            self.sock.close()
            self.ctx.term()
        os.close(self._wake)


def open_port(spec, deliver):
    """'tap:IFNAME' or 'switch:ENDPOINT' -> a port that will feed `deliver` once start()ed.  Opening takes the
    host resource (a TAP needs CAP_NET_ADMIN); starting makes threads, so a device service sandboxes itself
    in between (Landlock binds only the threads started after it)."""
    kind, _, arg = spec.partition(":")
    if kind == "tap" and arg:
        return TapPort(arg, deliver)
    if kind == "switch" and arg:
        return SwitchPort(arg, deliver)
    raise PortError(f"net port {spec!r}: expected tap:IFNAME or switch:ENDPOINT")
