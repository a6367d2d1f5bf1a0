"""The Python API for stress tests and experiments: `from pyhv import Client`, typed calls for what hvctl does.

    from pyhv import Client

    with Client.start_supervisor("/tmp/lab") as hv:            # or Client("/tmp/lab") for a running one
        g = hv.create("web", kernel="guest.bin", boot="raw64", vcpus=2, mem="64M", start=True)
        print(g.wait(timeout=30), g.logs())
        guests = hv.create_many([hv.config(f"g{i}", kernel="guest.bin", boot="raw64") for i in range(100)],
                                start=True)                    # pipelined: one socket, many in flight
        hv.wait_all(guests, timeout=60)

Guest options are `hvctl run`'s, as keyword arguments (mem="64M", disks=[...],
nets=["switch:lab"], rng=True, vconsole=True, timeout=30...).  Every failure
raises the HvError the supervisor replied with (NoSuchGuest, UserError,
BadState...; proto/errors.py), with the same one-line message hvctl prints.
A Client is for one thread: it keeps one socket, on which requests may be in
flight together (each carries its own id, so replies can come back in any
order); `close()` or the `with` block ends it.
"""
import itertools
import os
import subprocess
import time

import zmq

from pyhv.devices.virtio.kinds import KINDS
from pyhv.proto import codec, control as m
from pyhv.proto.control import CONTROL
from pyhv.proto.errors import EXIT_TIMEOUT, NotResponding, PeerFailed, from_wire
from pyhv.proto.messages import Error
from pyhv.proto.runtime import RuntimeDir, child_env, default_dir, python_module
from pyhv.supervisor.config import build_config

# keyword -> the kind whose option it is (disks=[...] for --disk, nets=[...] for --net, rng=True, ...)
DEVICE_KEYWORDS = {"disks": "blk", "nets": "net", "rng": "rng", "vconsole": "console", "vhost_user": "vhost-user"}
START_TIMEOUT = 15.0


def _absolute_paths(config):
    """`config` with its kernel and initrd paths made absolute from this process's directory."""
    def absolute(path):
        return os.path.abspath(path) if isinstance(path, str) else path     # (anything else: the supervisor says)
    return config.replace(kernel=absolute(config.kernel), initrd=absolute(config.initrd))


class Guest:
    """One guest of a Client: its name, and the calls about it."""

    def __init__(self, client, name):
        self.client, self.name = client, name

    def __repr__(self):
        return f"Guest({self.name!r})"

    def info(self):
        """The guest as the supervisor sees it (proto.control.GuestInfo: state, exit_status, pids, config...)."""
        return self.client.request(m.Info(self.name))

    @property
    def state(self):
        return self.info().state

    def start(self):
        return self.client.request(m.Start(self.name), timeout=30.0)

    def stop(self):
        """Hard stop (status 143); returns once the guest has ended."""
        return self.client.request(m.Stop(self.name), timeout=30.0)

    def shutdown(self, timeout=60.0, force=False):
        """Ask the guest to power off (Ctrl-Alt-Del) and wait up to `timeout` s: its exit status, 124 if it still
        runs then; force=True stops it at that point (143).  BadState for a guest with no keyboard driver."""
        from pyhv.supervisor.shutdown import shutdown
        return shutdown(lambda msg, t: self.client.request(msg, timeout=t), self.name, timeout, force)

    def pause(self):
        return self.client.request(m.Pause(self.name))

    def resume(self):
        return self.client.request(m.Resume(self.name))

    def destroy(self, force=False, purge=False):
        """Forget the guest; a running one only with force=True, which stops it first.  Logs are kept unless purge."""
        return self.client.request(m.Destroy(self.name, force=force, purge=purge), timeout=30.0)

    def wait(self, timeout=None):
        """The guest's exit status once it has ended; NotResponding if it is still running after `timeout` s."""
        return self.client.request(m.Wait(self.name, timeout=timeout), timeout=timeout).exit_status

    def logs(self):
        """Its console output so far (bytes)."""
        try:
            with open(self.info().console_log, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def stats(self):
        """Exits per vCPU, device counters, host CPU/memory per process (what `hvctl stats --json` prints)."""
        return self.client.request(m.Stats(self.name)).stats


class Client:
    def __init__(self, runtime_dir=None, timeout=10.0):
        self.runtime = RuntimeDir(runtime_dir or default_dir())
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
        self._sock.connect(self.runtime.control_endpoint)
        self._ids = itertools.count(1)
        self._replies = {}                 # request id -> reply that arrived before it was asked for
        self._supervisor = None            # the process, when start_supervisor() made it

    # -- the supervisor ---------------------------------------------------------------
    @classmethod
    def start_supervisor(cls, runtime_dir, **kw):
        """A Client of a new supervisor on `runtime_dir` (a child of this process; stopped by close())."""
        rd = RuntimeDir(runtime_dir)
        rd.make_private()
        log = open(rd.supervisor_log, "ab")
        proc = subprocess.Popen(python_module("supervisor.cli") + ["supervisor", "--runtime-dir", rd.path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env(),
                                start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(rd.control_sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise PeerFailed(f"the supervisor did not start (see {rd.supervisor_log})")
            time.sleep(0.01)
        client = cls(rd.path, **kw)
        client._supervisor = proc
        client.ping()
        return client

    def ping(self):
        """The supervisor's pid (and that it answers)."""
        return self.request(m.Ping()).pid

    # -- requests ---------------------------------------------------------------------
    def send(self, msg):
        """Send a request without waiting; the id to collect its reply with receive()."""
        req_id = next(self._ids)
        self._sock.send_multipart([str(req_id).encode(), b"", codec.encode(msg, CONTROL)])
        return req_id

    def receive(self, req_id, timeout=None):
        """The reply to request `req_id`; raises the HvError it carries, or NotResponding after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while req_id not in self._replies:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sock.poll(None if left is None else int(left * 1000) + 1):
                raise NotResponding(f"no answer from the supervisor on {self.runtime.path} within {timeout:g} s")
            frames = self._sock.recv_multipart()
            if len(frames) != 3 or frames[1] != b"":
                continue                   # not one of ours
            self._replies[int(frames[0])] = frames[2]
        reply = codec.decode(self._replies.pop(req_id), CONTROL)
        if isinstance(reply, Error):
            raise from_wire(reply.kind, reply.message)
        return reply

    def request(self, msg, timeout=-1):
        """Send `msg` and return its reply (timeout=-1: the client's default; None: wait for ever)."""
        return self.receive(self.send(msg), self.timeout if timeout == -1 else timeout)

    # -- guests -----------------------------------------------------------------------
    @staticmethod
    def config(name, kernel, **options):
        """A checked GuestConfig from hvctl's run options as keywords (devices: disks=, nets=, rng=, vconsole=)."""
        devices = {}
        for key, kind in DEVICE_KEYWORDS.items():
            if key in options:
                devices[kind] = options.pop(key)
        for kind in (k.name for k in KINDS.values() if k.own_option):
            if kind in options:
                devices[kind] = options.pop(kind)
        for key in ("mem", "vcpus", "timeout", "load_addr"):
            if key in options and options[key] is not None:
                options[key] = str(options[key])
        if "pin" in options and isinstance(options["pin"], (list, tuple)):
            options["pin"] = ",".join(map(str, options["pin"]))
        return build_config(name, kernel, devices=devices, **options)

    def guest(self, name):
        return Guest(self, name)

    def create(self, name, kernel, start=False, **options):
        """Define a guest (and start it); its Guest handle."""
        return self.create_many([self.config(name, kernel, **options)], start=start)[0]

    def create_many(self, configs, start=False, timeout=120.0):
        """Create (and start) every GuestConfig, all requests in flight at once; their Guests, in order.

        A relative kernel or initrd path is taken from this process's directory, as hvctl does: the supervisor
        (and the guest's worker, in the guest's own dir) would not know what it was relative to."""
        deadline = time.monotonic() + timeout
        configs = [_absolute_paths(c) for c in configs]
        ids = [self.send(m.Create(c)) for c in configs]
        for i in ids:
            self.receive(i, max(0.0, deadline - time.monotonic()))
        guests = [Guest(self, c.name) for c in configs]
        if start:
            ids = [self.send(m.Start(g.name)) for g in guests]
            for i in ids:
                self.receive(i, max(0.0, deadline - time.monotonic()))
        return guests

    def list(self):
        """Every guest as the supervisor sees it ([GuestInfo])."""
        return self.request(m.List()).guests

    def guests(self):
        return [Guest(self, g.name) for g in self.list()]

    def wait_all(self, guests=None, timeout=None):
        """{name: exit status} once every guest (default: all that are running) has ended.

        A guest still running when `timeout` runs out gets EXIT_TIMEOUT (124) here; it keeps running.
        """
        if guests is None:
            guests = [Guest(self, g.name) for g in self.list() if g.state in ("running", "paused")]
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = {g.name: self.send(m.Wait(g.name, timeout=timeout)) for g in guests}
        out = {}
        for name, i in ids.items():
            try:
                out[name] = self.receive(i, None if deadline is None else max(0.0, deadline - time.monotonic())
                                         ).exit_status
            except NotResponding:
                out[name] = EXIT_TIMEOUT
        return out

    def events(self, timeout=None):
        """Every guest change from now on (proto.control.Event: name, kind, exit_status, reason, time), as a
        generator; NotResponding if none comes within `timeout` s, PeerFailed when the supervisor ends;
        closing it ends the subscription."""
        from pyhv.proto.client import SeqClient
        return SeqClient(self.runtime.hvctl_sock, timeout=self.timeout).stream(m.Events(), timeout)

    def destroy_all(self, force=True, purge=False):
        for g in self.guests():
            g.destroy(force=force, purge=purge)

    # -- the end ------------------------------------------------------------------------
    def close(self):
        self._sock.close()
        self._ctx.term()
        proc, self._supervisor = self._supervisor, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
