"""A port/MMIO device plugin's process: the user's class loaded and checked, then the worker's accesses served.

    python -m pyhv.devices.plugin.host --spec BASE64(msgpack PluginProcess)
    python -m pyhv.devices.plugin.host --describe BASE64(JSON PluginSpec)  (prints what the class declares, JSON)

The plugin is the user's code: it may raise, return the wrong thing, never
return or kill its process.  It runs here, never in the worker, so none of
that reaches the guest's vCPUs: the first exception (or a read that does not
return `size` bytes) is answered FAILED with its reason and this process
exits; the worker then answers the guest's reads with all-ones and drops its
writes (devices/plugin/proxy.py).  One thread serves every vCPU's socket, so
the plugin sees one access at a time, as a device on one bus would.  The
process ends when the worker closes its sockets or dies (the kernel closes
them): a watcher thread ends it even while the plugin's code is stuck.  The
plugin's stdout goes where its stderr goes (the worker log).
"""
import argparse
import base64
import json
import os
import select
import selectors
import socket
import sys
import threading

import msgpack

from pyhv.devices.guest_memory import GuestMemory
from pyhv.devices.plugin.loader import PluginError, declared, describe, exception_text, load
from pyhv.proto import codec, sandbox
from pyhv.proto import plugin as wire
from pyhv.proto.errors import EXIT_USAGE, ProtocolError, one_line
from pyhv.proto.guest import PluginSpec


class PluginContext:
    """What a plugin's optional `attach(ctx)` is given: guest RAM through the checked accessor, its interrupt line."""

    def __init__(self, memory, irq_fd):
        self.memory = memory
        self._irq_fd = irq_fd

    def interrupt(self):
        """Pulse the line the plugin declared in `irq` (an edge); nothing reaches the guest if it declared none."""
        os.eventfd_write(self._irq_fd, 1)


def _failed(text):
    return wire.FAILED + text[:wire.MAX_REASON].encode(errors="replace")


def answer(instance, hello, request):
    """The reply datagram to one request datagram (see proto/plugin.py)."""
    try:
        op, space, index, size, offset = wire.REQUEST.unpack_from(request)
    except Exception as e:
        return _failed(f"the worker sent a malformed request ({one_line(e)})")
    if op == wire.SNAPSHOT:
        return _state_call(instance, hello, "snapshot", lambda f: wire.OK + msgpack.packb(f()))
    if op == wire.RESTORE:
        def restore(f):
            f(msgpack.unpackb(request[wire.REQUEST.size:]))
            return wire.OK
        return _state_call(instance, hello, "restore", restore)
    ranges = hello.pio if space == wire.PIO else hello.mmio
    if op not in (wire.READ, wire.WRITE) or index >= len(ranges) or not 0 < size <= wire.MAX_ACCESS \
            or offset + size > ranges[index].length:
        return _failed("the worker sent a request outside the declared ranges")
    data = request[wire.REQUEST.size:]
    where = f"{'read' if op == wire.READ else 'write'}(0x{offset:x}, {size if op == wire.READ else data.hex()})"
    try:
        if op == wire.WRITE:
            instance.write(offset, bytes(data))
            return wire.OK
        out = instance.read(offset, size)
    except Exception as e:
        return _failed(f"{hello.name}.{where} raised {exception_text(e)}")
    if not isinstance(out, (bytes, bytearray, memoryview)) or len(out) != size:
        kind = f"{len(out)} bytes" if isinstance(out, (bytes, bytearray, memoryview)) else type(out).__name__
        return _failed(f"{hello.name}.{where} returned {kind}, not {size} bytes")
    return wire.OK + bytes(out)


def _state_call(instance, hello, method, call):
    """A snapshot()/restore() request, answered REFUSED (the plugin serves on) if it cannot be done."""
    f = getattr(instance, method, None)
    if not callable(f):
        return wire.REFUSED + f"{hello.name} has no {method}() method (docs/plugins.md)".encode()
    try:
        reply = call(f)
    except Exception as e:
        return wire.REFUSED + f"{hello.name}.{method}() raised {exception_text(e)}"[:wire.MAX_REASON].encode()
    if len(reply) > wire.MAX_STATE:
        return wire.REFUSED + f"{hello.name}.{method}() gave {len(reply)} bytes of state (at most {wire.MAX_STATE})" \
            .encode()
    return reply


def serve(instance, hello, socks):
    """Answer requests until every socket is closed (0) or the plugin failed (1)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    open_socks = len(socks)
    buf = bytearray(wire.REQUEST.size + wire.MAX_STATE)     # one buffer: no allocation per access
    view = memoryview(buf)
    while open_socks:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                n = s.recv_into(buf)
            except OSError:
                n = 0
            request = view[:n]
            if not n:
                sel.unregister(s)
                s.close()
                open_socks -= 1
                continue
            reply = answer(instance, hello, request)
            try:
                s.send(reply)
            except OSError:
                pass                  # that vCPU's side gave up (timeout): it has marked us failed
            if reply[:1] == wire.FAILED:
                print(f"plugin {hello.name}: {reply[1:].decode(errors='replace')}", file=sys.stderr, flush=True)
                return 1
    return 0


def _watch_worker(sock):
    """Exit as soon as the worker's end of socket 0 is gone, even while the plugin's code is stuck."""
    poll = select.poll()
    poll.register(sock, select.POLLHUP)     # reported whatever the mask; waits without reading
    while True:
        for _, ev in poll.poll():
            if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


def _start(proc):
    """Load and check the plugin of a PluginProcess; its hello (or why not) is the first datagram on socket 0."""
    socks = [socket.socket(fileno=fd) for fd in proc.fds.sockets]
    if not socks:
        print("pyhv-plugin: no sockets", file=sys.stderr)
        return EXIT_USAGE
    threading.Thread(target=_watch_worker, args=(socks[0],), name="worker-watch", daemon=True).start()
    what = proc.plugin.what
    try:
        instance = load(proc.plugin)
        pio, mmio, irq = declared(instance, what)
        hello = wire.PluginHello(name=type(instance).__name__, pio=pio, mmio=mmio, irq=irq)
        attach = getattr(instance, "attach", None)
        if callable(attach):
            try:
                memory = GuestMemory(proc.fds.mem, proc.mem_size, readonly_views=True)    # writes: logged ones
                attach(PluginContext(memory, proc.fds.irq))
            except Exception as e:
                raise PluginError(f"{what}: {hello.name}.attach() raised {exception_text(e)}") from None
    except PluginError as e:
        socks[0].send(_failed(str(e)))
        return EXIT_USAGE
    socks[0].send(wire.OK + codec.encode(hello, wire.PLUGIN))
    return serve(instance, hello, socks)


def main(argv=None):
    p = argparse.ArgumentParser(prog="pyhv-plugin")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--spec", help="base64 msgpack PluginProcess")
    g.add_argument("--describe", help="base64 JSON PluginSpec: print what its class declares as JSON and exit")
    args = p.parse_args(argv)
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                     # the plugin's prints go to the log, never onto a socket or the console
    sandbox.apply("plugin")           # before any of the user's code runs: docs/plugins.md says what it may not do
    try:
        if args.describe:
            spec = codec.from_plain(PluginSpec, json.loads(base64.b64decode(args.describe)))
            print(json.dumps(describe(spec)), file=result, flush=True)
            return 0
        proc = codec.decode(base64.b64decode(args.spec), wire.PLUGIN_SPEC, expect=wire.PluginProcess)
    except (ProtocolError, ValueError) as e:
        print(f"pyhv-plugin: bad argument: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    return _start(proc)


if __name__ == "__main__":
    sys.exit(main())
