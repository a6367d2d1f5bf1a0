"""The worker's side of a device plugin: each guest access sent to the plugin's process, all-ones once it failed.

A plugin is started by the worker's launcher with a socket pair per vCPU
(proto/plugin.py), so a vCPU waiting for the plugin's answer holds no lock
and no socket another vCPU needs: the others run on, and queue at the
plugin only when they touch it too.  The first failure (the plugin raised,
returned the wrong size, gave no answer within `timeout`, or its process
ended) is for good: the reason is kept for `hvctl info`, one line goes to
stderr (the worker log, or the terminal of `hvctl run`), the process is
killed, and from then on reads return all-ones and writes are dropped.  No
failure of a plugin ends its guest.
"""
import os
import queue
import socket
import struct
import sys
import threading

import msgpack

from pyhv.proto import codec, plugin as wire
from pyhv.proto.device_service import DeviceHealth
from pyhv.proto.errors import ProtocolError, StateError, UserError
from pyhv.proto.guest import declaration_text

ACCESS_TIMEOUT = 5.0         # seconds one access may take before the plugin counts as hung
HELLO_TIMEOUT = 30.0         # its imports and constructor, on a loaded machine


class PluginStartError(UserError):
    """The plugin could not be loaded, or declared something unusable: the guest does not start."""


class PluginDevice:
    def __init__(self, name, spec, socks, irq_fd, process, timeout=ACCESS_TIMEOUT):
        """`spec` is the guest's PluginSpec; `socks` the worker's ends; `process` a ServiceProcess."""
        self.name, self.spec, self.what = name, spec, spec.what
        self.process = process
        self.irq_fd = irq_fd
        self.timeout = timeout
        self.hello = None
        self.reason = None                       # set once, by the first failure
        self.accesses = self.dropped = 0
        self._socks = socks
        self._free = queue.SimpleQueue()         # sockets no vCPU is using: as many as vCPUs, so get() never waits
        self._lock = threading.Lock()

    @classmethod
    def start(cls, name, spec, index, launcher, mem_fd, sockets, timeout=ACCESS_TIMEOUT):
        """Plugin `index`'s process started by `launcher`, its hello received and checked: a running PluginDevice."""
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(sockets)]
        irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ours = [a for a, _ in pairs]
        try:
            fds = wire.PluginFds(mem_fd, irq_fd, [b.fileno() for _, b in pairs])
            process = launcher.start_plugin(index, fds)
        except BaseException:
            for s in ours:
                s.close()
            os.close(irq_fd)
            raise
        finally:
            for _, b in pairs:
                b.close()                        # the plugin holds its ends: EOF on ours means it is gone
        plugin = cls(name, spec, ours, irq_fd, process, timeout)
        try:
            plugin._receive_hello()
        except BaseException:
            plugin.close()
            raise
        return plugin

    def _receive_hello(self):
        s = self._socks[0]
        s.settimeout(HELLO_TIMEOUT)
        try:
            data = s.recv(wire.MAX_REPLY)
        except TimeoutError:
            raise PluginStartError(f"{self.what}: the plugin did not start within {HELLO_TIMEOUT:g} s") from None
        except OSError:
            data = b""
        if not data:
            raise PluginStartError(f"{self.what}: the plugin ended before it started ({self._exit_text()})")
        if data[:1] != wire.OK:
            raise PluginStartError(data[1:].decode(errors="replace"))
        try:
            self.hello = codec.decode(data[1:], wire.PLUGIN, expect=wire.PluginHello)
        except ProtocolError as e:
            raise PluginStartError(f"{self.what}: a malformed hello from the plugin: {e}") from None
        h, spec = self.hello, self.spec
        if (h.pio, h.mmio, h.irq) != (spec.pio, spec.mmio, spec.irq):
            raise PluginStartError(f"{self.what}: the plugin now declares {declaration_text(h)}, not "
                                   f"{declaration_text(spec)} as when the guest was created; create the guest again")
        # A kernel timeout (SO_RCVTIMEO) on a blocking socket, not Python's: Python would poll() before every
        # send and recv, two more system calls on each guest access.  A timed-out recv raises BlockingIOError.
        limit = struct.pack("ll", int(self.timeout), int(self.timeout % 1 * 1e6))
        for sock in self._socks:
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            self._free.put(sock)

    def _exit_text(self):
        try:
            self.process.wait(1.0)
        except TimeoutError:
            return "still running"
        return self.process.describe_exit()

    # -- the guest's accesses (vCPU threads) -----------------------------------

    def _access(self, op, space, index, offset, size, data=b""):
        if self.reason is not None:
            self.dropped += 1
            return None
        s = self._free.get()
        try:
            s.send(wire.REQUEST.pack(op, space, index, size, offset) + data)
            reply = s.recv(wire.MAX_REPLY)
        except (BlockingIOError, TimeoutError):
            self._fail(f"no answer within {self.timeout:g} s (the plugin hangs)")
            return None                          # this socket may still get the late answer: never reused
        except OSError:
            reply = b""
        self._free.put(s)
        if reply[:1] == wire.OK:
            self.accesses += 1
            return reply[1:]
        self._fail(reply[1:].decode(errors="replace") if reply else self._exit_text())
        return None

    def read(self, space, index, offset, size):
        out = self._access(wire.READ, space, index, offset, size)
        return out if out is not None and len(out) == size else b"\xff" * size

    def write(self, space, index, offset, data):
        self._access(wire.WRITE, space, index, offset, len(data), data)

    def _fail(self, reason):
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        self.dropped += 1
        print(f"pyhv: {self.name} ({self.what}) failed: {reason}; its reads return all-ones from now on",
              file=sys.stderr, flush=True)
        self.process.kill()

    # -- state (the guest is paused) ---------------------------------------------

    def snapshot(self):
        """The plugin's own state (plain values from its snapshot()); StateError if it cannot give one."""
        if self.reason is not None:
            raise StateError(f"{self.name} ({self.what}) has failed ({self.reason}): its state is lost")
        return msgpack.unpackb(self._state_call(wire.SNAPSHOT, b"", "snapshot"))

    def restore(self, state):
        self._state_call(wire.RESTORE, msgpack.packb(state), "restore")

    def _state_call(self, op, payload, what):
        s = self._free.get()
        try:
            s.send(wire.REQUEST.pack(op, 0, 0, 0, 0) + payload)
            reply = s.recv(wire.REQUEST.size + wire.MAX_STATE)
        except OSError as e:           # BlockingIOError: SO_RCVTIMEO ran out
            self._fail(f"no answer to {what}() within {self.timeout:g} s" if isinstance(e, BlockingIOError)
                       else f"{what}(): {e}")
            raise StateError(f"{self.name} ({self.what}) did not {what} its state: {self.reason}") from None
        self._free.put(s)
        if reply[:1] != wire.OK:
            if reply[:1] != wire.REFUSED:
                self._fail(reply[1:].decode(errors="replace") or "its process ended")
            raise StateError(f"{self.name} ({self.what}) cannot {what} its state: "
                             f"{reply[1:].decode(errors='replace') or self.reason}")
        return reply[1:]

    # -- the manager's view ------------------------------------------------------

    def status(self):
        failed = self.reason is not None
        return DeviceHealth(state="failed" if failed else "running", pid=None if failed else self.process.pid,
                            reason=self.reason or "")

    def counters(self):
        return {"accesses": self.accesses, "dropped": self.dropped}

    def close(self):
        for s in self._socks:
            s.close()                            # the plugin sees EOF and exits
        self._socks = []
        try:
            self.process.wait(1.0)
        except TimeoutError:
            self.process.kill()
            self.process.wait(5.0)
        self.process.close()
        if self.irq_fd is not None:
            os.close(self.irq_fd)
            self.irq_fd = None


class PluginRange:
    """What a bus holds for one of a plugin's ranges: accesses at offsets into it (one past its end is dropped)."""
    __slots__ = ("plugin", "space", "index", "length")

    def __init__(self, plugin, space, index, length):
        self.plugin, self.space, self.index, self.length = plugin, space, index, length

    def read(self, offset, size):
        if offset + size > self.length:
            return b"\xff" * size
        return self.plugin.read(self.space, self.index, offset, size)

    def write(self, offset, data):
        if offset + len(data) <= self.length:
            self.plugin.write(self.space, self.index, offset, data)

