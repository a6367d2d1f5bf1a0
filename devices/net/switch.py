"""A learning Ethernet switch in its own process: connects the virtio-net ports of guests over ZeroMQ, no host networking.

    python -m pyhv.devices.net.switch --name NAME --endpoint ipc://PATH --lock PATH --stats PATH [--idle-exit S]

Whoever starts it (the supervisor for its guests, `hvctl run` for a
standalone one: vcpu_worker/launchers.py) names its files; one switch per
lock.  It holds an flock on the lock file for its whole life, writes its pid
into it (how a supervisor finds the switch it did not start:
supervisor/switches.py) and only then binds the endpoint, so a second one
started for the same name exits at once (status ALREADY_SERVED) and the
ports never see two.  It depends on no other process: it outlives whoever
started it.

Forwarding: the source MAC of every frame is learned (MAC -> port, forgotten
with the port after PORT_TIMEOUT of silence); a frame to a learned unicast
MAC goes to that port only, broadcast/multicast/unknown destinations are
flooded to every other live port.  Sends never block: a port that does not
keep up (its ZeroMQ queue holds QUEUE_FRAMES) loses frames, counted, as on a
real switch.  Malformed messages are dropped and counted.  Counters go to the
stats file every second; with --idle-exit it exits after that many seconds
without a port.
"""
import argparse
import fcntl
import json
import os
import signal
import sys
import time

from pyhv.devices.loop import EventLoop
from pyhv.proto import sandbox, switch as wire

ALREADY_SERVED = 3
QUEUE_FRAMES = 1024
STATS_INTERVAL = 1.0


class Switch:
    def __init__(self, name, endpoint, stats_path, idle_exit=0.0):
        import zmq
        self.zmq = zmq
        self.name, self.endpoint, self.stats_path, self.idle_exit = name, endpoint, stats_path, idle_exit
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, QUEUE_FRAMES)
        self.sock.setsockopt(zmq.RCVHWM, QUEUE_FRAMES)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4096)
        path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
        if path:
            try:
                os.unlink(path)             # stale: we hold the lock, so nobody serves it
            except FileNotFoundError:
                pass
        self._path = path
        self.sock.bind(endpoint)
        self.ports = {}                 # identity -> last heard (monotonic)
        self.macs = {}                  # mac -> identity
        self.counters = {"frames_in": 0, "unicast": 0, "flooded": 0, "delivered": 0, "dropped_full": 0,
                         "malformed": 0, "hellos": 0}
        self.last_heard = time.monotonic()
        self.loop = EventLoop(f"switch-{name}")
        self.loop.add_socket(self.sock, self._receive)
        self.loop.every(STATS_INTERVAL, self._tick)

    def _live_ports(self, now):
        for ident, seen in list(self.ports.items()):
            if now - seen > wire.PORT_TIMEOUT:
                del self.ports[ident]
                for mac in [m for m, i in self.macs.items() if i == ident]:
                    del self.macs[mac]
        return self.ports

    def _send(self, ident, payload):
        try:
            self.sock.send_multipart([ident] + wire.frame(payload), self.zmq.NOBLOCK)
            self.counters["delivered"] += 1
        except self.zmq.ZMQError:       # full (Again), or the peer is gone (ROUTER_MANDATORY is off: rare)
            self.counters["dropped_full"] += 1

    def _receive(self):
        try:
            parts = self.sock.recv_multipart(self.zmq.NOBLOCK, copy=True)
        except self.zmq.Again:
            return
        self.last_heard = now = time.monotonic()
        self.handle(parts, now)

    def handle(self, parts, now):
        if len(parts) < 2:
            self.counters["malformed"] += 1
            return
        ident, body = parts[0], parts[1:]
        try:
            kind, payload = wire.decode(body)
        except wire.BadSwitchMessage:
            self.counters["malformed"] += 1
            return
        self.ports[ident] = now
        if kind == "hello":
            self.counters["hellos"] += 1
            return
        self.counters["frames_in"] += 1
        dst, src = bytes(payload[0:6]), bytes(payload[6:12])
        if not src[0] & 1:
            self.macs[src] = ident
        out = self.macs.get(dst) if not dst[0] & 1 else None
        if out is not None and out in self.ports:
            if out != ident:
                self.counters["unicast"] += 1
                self._send(out, payload)
            return
        self.counters["flooded"] += 1
        for port in list(self._live_ports(now)):
            if port != ident:
                self._send(port, payload)

    def _tick(self):
        now = time.monotonic()
        self._live_ports(now)
        self.write_stats()
        if self.idle_exit and not self.ports and now - self.last_heard > self.idle_exit:
            self.loop.stop()

    def serve(self):
        self.loop.run()

    def write_stats(self):
        data = dict(self.counters, name=self.name, pid=os.getpid(), ports=len(self.ports),
                    macs=sorted(":".join(f"{b:02x}" for b in m) for m in self.macs))
        tmp = self.stats_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.stats_path)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        self.ctx.term()
        self.loop.close()
        if self._path:
            try:
                os.unlink(self._path)
            except OSError:
                pass


def take_lock(path):
    """The lock fd if this process may serve the switch whose lock file is `path`, else None."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def write_pid(lock):
    """Our pid into the lock file we hold (read by supervisor/switches.py); a full disk costs only that."""
    try:
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        print(f"switch: cannot write our pid into the lock file: {e}", file=sys.stderr, flush=True)


def is_served(lock_path):
    """Is a switch process holding this lock (i.e. serving that switch)?"""
    fd = take_lock(lock_path)
    if fd is None:
        return True
    os.close(fd)
    return False


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyhv.devices.net.switch")
    p.add_argument("--name", required=True)
    p.add_argument("--endpoint", required=True, help="the ZeroMQ endpoint to bind (ports connect to it)")
    p.add_argument("--lock", required=True, help="the lock file: who holds it serves the switch")
    p.add_argument("--stats", required=True, help="where to write the counters every second (JSON)")
    p.add_argument("--idle-exit", type=float, default=0.0, help="exit after this many seconds without ports (0: never)")
    a = p.parse_args(argv)
    lock = take_lock(a.lock)
    if lock is None:
        print(f"switch: {a.name} is already served (lock {a.lock})", file=sys.stderr)
        return ALREADY_SERVED
    write_pid(lock)
    sw = Switch(a.name, a.endpoint, a.stats, a.idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: sw.loop.stop())
    sandbox.apply("switch", writable=[os.path.dirname(os.path.abspath(a.stats))])   # its stats file
    print(f"switch: serving {a.name} on {a.endpoint} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        sw.serve()
    finally:
        sw.write_stats()
        sw.close()
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
