"""The device-service process: one virtio device model in its own process, over the guest's RAM memfd.

    python -m pyhv.devices.service --device rng|blk|console|net --mem-size N --mem-fd FD
        --control ipc://DIR/ctl.sock --events ipc://DIR/evt.sock
        --notify-fds FD[,FD...] --irq-fds FD[,FD...] [--lifeline FD] [--disk PATH[,ro]]
        [--console-sock PATH [--console-log PATH]]
        [--net tap:IFNAME|switch:ENDPOINT --mac MAC [--switch-dir DIR --switch-name NAME]]

Started by `devices.virtio.remote.RemoteBackend` (in the worker) with every fd
inherited through `pass_fds`: the guest RAM memfd, one notify eventfd per queue
(the transport's KVM ioeventfds) and one irq eventfd per MSI-X vector (its
irqfds), plus a lifeline pipe whose EOF means the worker is gone.  The
service maps the memfd itself (GuestMemory), builds the model (VirtioRng or
VirtioBlk, ThreadedBackends whose data-path thread runs here) and serves the
transport's control calls.  So the data path is guest -> ioeventfd -> this
process -> guest RAM -> irqfd -> guest, with no worker and no ZeroMQ on it.

Control (ZeroMQ, msgpack: the typed messages below, proto.codec's envelope and validation)
-----------------------------------------------------------------------
* `control`: a PAIR socket the worker binds and this process connects: one
  request, one reply, in order.  Requests: Describe -> Description,
  ConfigWrite -> Ok, Activate -> Ok, Reset -> Ok, GetCounters -> Counters,
  Shutdown -> Ok (then exit 0).  Anything malformed gets a one-line Error
  reply (kind "protocol" or "bad-argument") and the service keeps serving.
* `events`: a PUSH socket connected to the worker's bound PULL: ConfigChanged
  and NeedsReset, sent from whichever thread raised them (under a lock:
  ZeroMQ sockets are not thread-safe).
ZeroMQ carries no fds, which is why every fd is inherited at spawn and an
Activate names its eventfds by index (`notify_fd` = index into --notify-fds,
`irq_fd` = index into --irq-fds, i.e. the MSI-X vector).  Each incarnation of a
service gets fresh endpoints (the worker picks the names), so a restarted
service never inherits a half-finished exchange of its predecessor.  The
worker binds and the service connects, because ZeroMQ gives a connecting
socket its pipe at once: an event raised right after start-up is queued, not
dropped (a bound PUSH with no peer yet would refuse it).

Activate with `resume=True` (after a service restart) rebuilds each queue with
last_avail = used_idx = used.idx as found in guest RAM: chains the old process
had popped but not returned are served again.  For a raw image that is safe
(reads and writes are idempotent); see remote.py for what the guest sees.
"""
import argparse
import os
import subprocess
import sys
import threading

import zmq

from pyhv.devices.guest_memory import GuestMemory
from pyhv.devices.virtio.backend import QueueConfig, TransportEvents
from pyhv.devices.virtio.queue import QueueConfigError, VirtQueue

from pyhv.proto import codec, errors
from pyhv.proto.errors import ProtocolError
from pyhv.proto.messages import MESSAGES, Error, Message, Ok, message

MAX_CONTROL_BYTES = 64 << 10

# The device-service protocol has its own message namespace: same envelope and
# field validation as proto.codec, but these types are not hvctl/supervisor
# messages (and a supervisor message is not a device request).
SERVICE_MESSAGES = {"Ok": Ok, "Error": Error}


def service_message(cls):
    cls = message(cls)
    del MESSAGES[cls.TYPE]
    SERVICE_MESSAGES[cls.TYPE] = cls
    return cls


def encode(msg):
    return codec.encode(msg, registry=SERVICE_MESSAGES)


def decode(data, expect=None):
    """proto.codec.decode over SERVICE_MESSAGES: ProtocolError (one line) for anything malformed."""
    return codec.decode(data, expect, registry=SERVICE_MESSAGES, max_bytes=MAX_CONTROL_BYTES)


# --- messages (worker <-> device service) -------------------------------------------

@service_message
class Describe(Message):
    """Worker -> service: the static description, read once when the transport is built."""


@service_message
class Description(Message):
    device_type: int
    features: int
    num_queues: int
    queue_max_sizes: list[int]
    config: bytes
    name: str
    restartable: bool


@service_message
class ConfigWrite(Message):
    offset: int
    data: bytes


@service_message
class WireQueue(Message):
    """QueueConfig.to_wire(), with the two fds as indexes into the service's fd lists."""
    index: int
    size: int
    desc: int
    driver: int
    device: int
    notify_fd: int
    irq_fd: int | None
    vector: int


@service_message
class Activate(Message):
    features: int
    queues: list[WireQueue]
    resume: bool = False         # after a restart: continue from used.idx in guest RAM


@service_message
class Reset(Message):
    pass


@service_message
class GetCounters(Message):
    pass


@service_message
class Counters(Message):
    counters: dict


@service_message
class Shutdown(Message):
    pass


@service_message
class ConfigChanged(Message):
    """Service -> worker (events socket)."""
    config: bytes


@service_message
class NeedsReset(Message):
    """Service -> worker (events socket)."""
    reason: str


REQUESTS = (Describe, ConfigWrite, Activate, Reset, GetCounters, Shutdown)


# --- the models --------------------------------------------------------------------

def build_model(device, disk=None, console_sock=None, console_log=None, net=None, mac=None,
                switch_dir=None, switch_name=None):
    """The backend for `device` ("rng" | "blk" | "console" | "net"); `disk` is "PATH[,ro]" for blk.

    A console serves its host side on the unix socket `console_sock` (one
    client at a time) and appends guest output to `console_log` if given.
    A net device's host end is `net` ("tap:IFNAME" or "switch:ENDPOINT"); with
    `switch_dir`/`switch_name` (a standalone guest) the switch is started if
    nobody serves it yet.
    """
    if device == "net":
        from pyhv.devices import net_ports
        from pyhv.devices.virtio.net import VirtioNet, parse_mac
        if not net or not mac:
            raise ValueError("--device net needs --net tap:IFNAME|switch:ENDPOINT and --mac")
        if switch_dir and switch_name:
            from pyhv.devices import net_switch
            try:
                net_switch.ensure(switch_dir, switch_name)
            except (RuntimeError, OSError) as e:
                raise ValueError(str(e)) from None
        model = VirtioNet(parse_mac(mac))
        try:
            model.port = net_ports.open_port(net, model.deliver)
        except net_ports.PortError as e:
            model.close()
            raise ValueError(str(e)) from None
        return model
    if device == "console":
        from pyhv.devices.virtio.console import HostedConsole
        if not console_sock:
            raise ValueError("--device console needs --console-sock PATH")
        return HostedConsole(console_sock, console_log)
    if device == "rng":
        from pyhv.devices.virtio.rng import VirtioRng
        return VirtioRng()
    if device == "blk":
        from pyhv.devices.virtio.blk import VirtioBlk
        if not disk:
            raise ValueError("--device blk needs --disk PATH[,ro]")
        path, ro = parse_disk(disk)
        return VirtioBlk(path, read_only=ro)
    raise ValueError(f"unknown device {device!r}")


def main_args_model(device, disk, extra_args):
    """build_model from service command-line options (in-process models, HV_DEVICE_SERVICES=0)."""
    opts = dict(zip(extra_args[::2], extra_args[1::2]))
    return build_model(device, disk, opts.get("--console-sock"), opts.get("--console-log"), opts.get("--net"),
                       opts.get("--mac"), opts.get("--switch-dir"), opts.get("--switch-name"))


def parse_disk(spec):
    """'PATH' or 'PATH,ro' -> (path, read_only)."""
    path, sep, opt = spec.rpartition(",")
    if sep and opt == "ro":
        return path, True
    return spec, False


def model_class(device):
    """The model class (for its static num_queues) without opening anything."""
    if device == "rng":
        from pyhv.devices.virtio.rng import VirtioRng
        return VirtioRng
    if device == "blk":
        from pyhv.devices.virtio.blk import VirtioBlk
        return VirtioBlk
    if device == "console":
        from pyhv.devices.virtio.console import VirtioConsole
        return VirtioConsole
    if device == "net":
        from pyhv.devices.virtio.net import VirtioNet
        return VirtioNet
    raise ValueError(f"unknown device {device!r}")


# console: the client reconnects; net: frames in flight are lost, as on a wire (a non-persistent TAP
# is re-created empty: its host-side address must be set again)
RESTARTABLE = {"rng": True, "blk": True, "console": True, "net": True}


class _Events(TransportEvents):
    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()

    def _send(self, msg):
        with self.lock:
            try:
                self.sock.send(encode(msg), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass                  # over the high-water mark: the worker is not reading

    def config_changed(self, config):
        self._send(ConfigChanged(config=bytes(config)))

    def needs_reset(self, reason):
        self._send(NeedsReset(reason=str(reason)[:500]))


class Service:
    def __init__(self, model, mem, notify_fds, irq_fds, device):
        self.model = model
        self.mem = mem
        self.notify_fds = notify_fds
        self.irq_fds = irq_fds
        self.device = device
        self.requests = 0
        self.bad_requests = 0
        self.resumes = 0

    def handle(self, data):
        """One control request (bytes) -> (reply message, stop?)."""
        self.requests += 1
        try:
            req = decode(data, expect=REQUESTS)
            return self._dispatch(req)
        except ProtocolError as e:
            self.bad_requests += 1
            return Error(kind=errors.PROTOCOL, message=_line(e)), False
        except (ValueError, QueueConfigError, RuntimeError) as e:
            self.bad_requests += 1
            return Error(kind=errors.BAD_ARGUMENT, message=_line(e)), False
        except Exception as e:           # a model bug: report, keep serving
            self.bad_requests += 1
            return Error(kind=errors.INTERNAL, message=_line(f"{type(e).__name__}: {e}")), False

    def _dispatch(self, req):
        m = self.model
        if isinstance(req, Describe):
            return Description(device_type=m.device_type, features=m.features, num_queues=m.num_queues,
                               queue_max_sizes=list(m.queue_max_sizes), config=bytes(m.config_bytes()),
                               name=m.name, restartable=RESTARTABLE[self.device]), False
        if isinstance(req, ConfigWrite):
            cfg_len = len(m.config_bytes())
            if not (0 <= req.offset and req.offset + len(req.data) <= cfg_len):
                raise ValueError(f"config write {req.offset}+{len(req.data)} outside {cfg_len} bytes")
            m.config_write(req.offset, req.data)
            return Ok(), False
        if isinstance(req, Activate):
            self._activate(req)
            return Ok(), False
        if isinstance(req, Reset):
            m.reset()
            return Ok(), False
        if isinstance(req, GetCounters):
            c = dict(m.counters())
            c.update(service_requests=self.requests, service_bad_requests=self.bad_requests,
                     service_resumes=self.resumes, pid=os.getpid())
            return Counters(counters=c), False
        if isinstance(req, Shutdown):
            return Ok(), True
        raise ProtocolError(f"unexpected message {req.TYPE}")   # pragma: no cover

    def _activate(self, req):
        if len(req.queues) > self.model.num_queues:
            raise ValueError(f"{len(req.queues)} queues for a device with {self.model.num_queues}")
        qcs = []
        for wq in req.queues:
            if wq.notify_fd >= len(self.notify_fds):
                raise ValueError(f"queue {wq.index}: notify fd #{wq.notify_fd} of {len(self.notify_fds)}")
            if wq.irq_fd is not None and wq.irq_fd >= len(self.irq_fds):
                raise ValueError(f"queue {wq.index}: irq fd #{wq.irq_fd} of {len(self.irq_fds)}")
            if wq.index >= self.model.num_queues or wq.size > self.model.queue_max_sizes[wq.index]:
                raise ValueError(f"queue {wq.index} of size {wq.size} does not exist")
            qcs.append(QueueConfig(wq.index, wq.size, wq.desc, wq.driver, wq.device,
                                   self.notify_fds[wq.notify_fd],
                                   None if wq.irq_fd is None else self.irq_fds[wq.irq_fd], wq.vector))
        if req.resume:
            self.resumes += 1
            self.model.make_queue = _resuming(self.model.make_queue, self.mem)
        try:
            self.model.activate(self.mem, req.features, qcs)
        finally:
            self.model.__dict__.pop("make_queue", None)


def _resuming(make_queue, mem):
    """A make_queue that continues a queue an earlier process served: from used.idx in guest RAM."""
    def make(mem_, features, qc):
        vq = make_queue(mem_, features, qc)
        if not mem.contains(qc.device, 4):
            return vq
        used = mem.read_u16(qc.device + 2)
        st = vq.state()
        vq.close()
        st.update(last_avail_idx=used, used_idx=used)
        return VirtQueue.restore(mem_, st)
    return make


# --- benchmark mode: a ZeroMQ round trip per blk request ---------------------------------
# HV_BLK_ZMQ_ROUNDTRIP=1 in the service's environment (hvctl's, inherited) makes every blk request wait
# for one ZeroMQ REQ/REP round trip to an echo process before it is carried out: what the data path would
# cost if each request went through another process over ZeroMQ instead of ioeventfd/irqfd alone.
# For bench/blk_throughput.py only; off unless that variable is set.
ZMQ_ROUNDTRIP_ENV = "HV_BLK_ZMQ_ROUNDTRIP"
_ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.REP)
s.connect(sys.argv[1])
p = zmq.Poller()
p.register(s, zmq.POLLIN)
p.register(0, zmq.POLLIN)
while True:
    ready = dict(p.poll())
    if 0 in ready:
        break
    s.send(s.recv())
"""


def _zmq_roundtrip(model, ctx):
    """Wrap model._request with a round trip to an echo child (it exits on EOF of its stdin); returns the child."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://@pyhv-blk-echo-{os.getpid()}")         # abstract: nothing to clean up
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, f"ipc://@pyhv-blk-echo-{os.getpid()}"],
                            stdin=subprocess.PIPE)
    sock.send(b"ready?")             # wait for the echo to be up, so no request pays its start-up
    sock.recv()
    inner = model._request

    def request(chain):              # only the data-path thread uses `sock`
        sock.send(b"r")
        sock.recv()
        return inner(chain)
    model._request = request
    echo.sock = sock
    return echo


def _line(e):
    s = " ".join(str(e).split())
    return s[:300] or type(e).__name__


def _fd_list(text):
    return [int(x) for x in text.split(",") if x != ""] if text else []


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyhv.devices.service")
    p.add_argument("--device", required=True, choices=("rng", "blk", "console", "net"))
    p.add_argument("--mem-size", required=True, type=int)
    p.add_argument("--mem-fd", required=True, type=int)
    p.add_argument("--control", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--notify-fds", default="")
    p.add_argument("--irq-fds", default="")
    p.add_argument("--lifeline", type=int)
    p.add_argument("--disk")
    p.add_argument("--console-sock")
    p.add_argument("--console-log")
    p.add_argument("--net")
    p.add_argument("--mac")
    p.add_argument("--switch-dir")
    p.add_argument("--switch-name")
    a = p.parse_args(argv)
    try:
        model = build_model(a.device, a.disk, a.console_sock, a.console_log, a.net, a.mac,
                            a.switch_dir, a.switch_name)
    except (OSError, ValueError) as e:
        print(f"device-service: {_line(e)}", file=sys.stderr, flush=True)
        return 2
    mem = GuestMemory(a.mem_fd, a.mem_size)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    evt = ctx.socket(zmq.PUSH)
    for s in (ctl, evt):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES)
    ctl.connect(a.control)          # the worker bound both: a connecting socket queues at once,
    evt.connect(a.events)           # so no event is dropped while the connection is being made
    model.attach(_Events(evt))
    echo = None
    if a.device == "blk" and os.environ.get(ZMQ_ROUNDTRIP_ENV) == "1":
        echo = _zmq_roundtrip(model, ctx)
    svc = Service(model, mem, _fd_list(a.notify_fds), _fd_list(a.irq_fds), a.device)
    poller = zmq.Poller()
    poller.register(ctl, zmq.POLLIN)
    if a.lifeline is not None:
        poller.register(a.lifeline, zmq.POLLIN)
    status = 0
    try:
        while True:
            ready = dict(poller.poll())
            if a.lifeline is not None and a.lifeline in ready:
                break                           # EOF: the worker is gone
            if ctl in ready:
                try:
                    data = ctl.recv(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                reply, stop = svc.handle(data)
                ctl.send(encode(reply))
                if stop:
                    break
    except KeyboardInterrupt:
        status = 1
    finally:
        model.reset()
        close = getattr(model, "close", None)
        if close is not None:
            close()
        ctl.close()
        evt.close()
        if echo is not None:
            echo.sock.close()
            echo.stdin.close()
            echo.wait()
        ctx.term()
    return status


if __name__ == "__main__":
    sys.exit(main())
