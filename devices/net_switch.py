"""A learning Ethernet switch in its own process: connects the virtio-net ports of guests over ZeroMQ, no host networking.

    python -m pyhv.devices.net_switch --dir RUNTIME_DIR --name NAME [--idle-exit S] [--detach]

One switch per NAME per runtime dir.  It holds an flock on
RUNTIME_DIR/switch-NAME.lock for its whole life and only then binds
ipc://RUNTIME_DIR/switch-NAME.sock, so a second one started for the same
name exits at once (status ALREADY_SERVED) and the ports never see two.

Forwarding: the source MAC of every frame is learned (MAC -> port, forgotten
with the port after PORT_TIMEOUT of silence); a frame to a learned unicast
MAC goes to that port only, broadcast/multicast/unknown destinations are
flooded to every other live port.  Sends never block: a port that does not
keep up (its ZeroMQ queue holds QUEUE_FRAMES) loses frames, counted, as on a
real switch.  Malformed messages are dropped and counted.

Who starts it: the supervisor, for its guests' `--net switch:NAME` (its
child, watched and restarted, never idle-exits); a standalone `hvctl run`
through `ensure()`, detached, exiting after --idle-exit seconds without a
port.  Counters go to RUNTIME_DIR/switch-NAME.json every second.
"""
import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from pyhv.proto import switch as wire

ALREADY_SERVED = 3
QUEUE_FRAMES = 1024
STATS_INTERVAL = 1.0


class Switch:
    def __init__(self, runtime_dir, name, idle_exit=0.0):
        import zmq
        self.zmq = zmq
        self.dir, self.name, self.idle_exit = runtime_dir, name, idle_exit
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, QUEUE_FRAMES)
        self.sock.setsockopt(zmq.RCVHWM, QUEUE_FRAMES)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4096)
        path = f"{runtime_dir}/switch-{name}.sock"
        try:
            os.unlink(path)             # stale: we hold the lock, so nobody serves it
        except FileNotFoundError:
            pass
        self.sock.bind(wire.endpoint(runtime_dir, name))
        self.ports = {}                 # identity -> last heard (monotonic)
        self.macs = {}                  # mac -> identity
        self.counters = {"frames_in": 0, "unicast": 0, "flooded": 0, "delivered": 0, "dropped_full": 0,
                         "malformed": 0, "hellos": 0}
        self.stop = False

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
        except self.zmq.Again:
            self.counters["dropped_full"] += 1
        except self.zmq.ZMQError:       # the peer is gone (ROUTER_MANDATORY is off: rare)
            self.counters["dropped_full"] += 1

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

    def serve(self):
        zmq = self.zmq
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        last_heard = time.monotonic()
        next_stats = 0.0
        while not self.stop:
            events = dict(poller.poll(int(STATS_INTERVAL * 1000)))
            now = time.monotonic()
            if self.sock in events:
                while True:
                    try:
                        parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self.handle(parts, now)
                last_heard = now
            if now >= next_stats:
                self._live_ports(now)
                self.write_stats()
                next_stats = now + STATS_INTERVAL
            if self.idle_exit and not self.ports and now - last_heard > self.idle_exit:
                break

    def write_stats(self):
        path = f"{self.dir}/switch-{self.name}.json"
        data = dict(self.counters, name=self.name, pid=os.getpid(), ports=len(self.ports),
                    macs=sorted(":".join(f"{b:02x}" for b in m) for m in self.macs))
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        self.ctx.term()
        for p in (f"{self.dir}/switch-{self.name}.sock",):
            try:
                os.unlink(p)
            except OSError:
                pass


def take_lock(runtime_dir, name):
    """The lock fd if this process may serve switch NAME, else None."""
    fd = os.open(wire.lock_path(runtime_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_served(runtime_dir, name):
    """Is a switch process holding NAME's lock (i.e. serving it)?"""
    fd = take_lock(runtime_dir, name)
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure(runtime_dir, name, idle_exit=15.0, timeout=10.0):
    """Make sure switch NAME runs under `runtime_dir` (start a detached one if not); returns its endpoint.

    For standalone guests (`hvctl run`); supervised guests' switches belong to
    the supervisor.  Raises RuntimeError if no switch could be started.
    """
    os.makedirs(runtime_dir, exist_ok=True)
    if not is_served(runtime_dir, name):
        from pyhv.supervisor.spawn import child_env
        r = subprocess.run([sys.executable, "-m", "pyhv.devices.net_switch", "--dir", runtime_dir, "--name", name,
                            "--idle-exit", str(idle_exit), "--detach"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=timeout, env=child_env())
        if r.returncode not in (0, ALREADY_SERVED):
            raise RuntimeError(f"switch {name}: could not start: {r.stderr.decode(errors='replace').strip()}")
    return wire.endpoint(runtime_dir, name)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyhv.devices.net_switch")
    p.add_argument("--dir", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--idle-exit", type=float, default=0.0, help="exit after this many seconds without ports (0: never)")
    p.add_argument("--detach", action="store_true", help="serve from a daemon child; exit once it serves")
    a = p.parse_args(argv)
    lock = take_lock(a.dir, a.name)
    if lock is None:
        print(f"net_switch: switch {a.name} is already served in {a.dir}", file=sys.stderr)
        return ALREADY_SERVED
    if a.detach:
        ready_r, ready_w = os.pipe()
        if os.fork():                   # parent: wait until the daemon has bound, then exit 0
            os.close(ready_w)
            ok = os.read(ready_r, 1)
            return 0 if ok else 1
        os.close(ready_r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
    sw = Switch(a.dir, a.name, a.idle_exit)
    signal.signal(signal.SIGTERM, lambda *_: setattr(sw, "stop", True))
    if a.detach:
        os.write(ready_w, b"1")
        os.close(ready_w)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    print(f"net_switch: serving {a.name} on {wire.endpoint(a.dir, a.name)} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    try:
        sw.serve()
    finally:
        sw.write_stats()
        sw.close()
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
