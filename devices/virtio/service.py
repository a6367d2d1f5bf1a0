"""The device-service process: one virtio model in a process of its own, over the guest's RAM memfd.

    python -m pyhv.devices.virtio.service --spec BASE64(msgpack ServiceSpec)

Started (by the worker for `hvctl run`, by the supervisor for supervised
guests: vcpu_worker/launchers.py) with its fds inherited at the numbers the
spec's ServiceFds names: the guest RAM memfd, one notify eventfd per queue
(the transport's KVM ioeventfds), one irq eventfd per MSI-X vector (its
irqfds), a lifeline pipe whose EOF means the worker is gone, and for a disk
its image, opened and locked by whoever started the service.  It maps the
memfd itself (GuestMemory), builds the spec's kind (devices/virtio/kinds.py)
and serves the proxy's requests (proto/device_service.py, one handler per
request type) until Shutdown or the lifeline.  So the data path is guest ->
ioeventfd -> this process -> guest RAM -> irqfd -> guest, with no worker and
no ZeroMQ on it.

The worker binds both sockets and this process connects, because ZeroMQ
gives a connecting socket its pipe at once: an event raised right after
start-up is queued, not dropped.  Each incarnation of a service gets fresh
endpoints, so a restarted service never inherits a half-finished exchange.
Anything malformed gets a one-line Error reply and the service keeps serving.
"""
import argparse
import base64
import os
import sys
import threading

import zmq

from pyhv.devices.guest_memory import GuestMemory
from pyhv.devices.loop import EventLoop
from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.device import Eventfds, TransportEvents
from pyhv.proto import codec, device_service as ds, sandbox
from pyhv.proto.errors import EXIT_USAGE, HvError, InternalError, ProtocolError, UserError, one_line
from pyhv.proto.messages import Error, Ok

# bench/blk_throughput.py only: HV_BLK_ZMQ_ROUNDTRIP=ENDPOINT makes every blk request wait for one ZeroMQ
# REQ/REP round trip to the echo the bench runs there, to show what a data path over ZeroMQ would cost.
ZMQ_ROUNDTRIP_ENV = "HV_BLK_ZMQ_ROUNDTRIP"


class _Events(TransportEvents):
    """The model's events, onto the PUSH socket (a lock: ZeroMQ sockets are not thread-safe)."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()

    def _send(self, msg):
        with self.lock:
            try:
                self.sock.send(codec.encode(msg, ds.SERVICE), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass                  # over the high-water mark: the worker is not reading

    def config_changed(self, config):
        self._send(ds.ConfigChanged(config=bytes(config)))

    def needs_reset(self, reason):
        self._send(ds.NeedsReset(reason=one_line(reason, 500)))


class Service:
    """The request handlers over one model."""

    def __init__(self, model, mem):
        self.model = model
        self.mem = mem
        self.requests = self.bad_requests = 0
        self.stop = False
        self.handlers = {ds.Describe: self.describe, ds.ConfigWrite: self.config_write, ds.Activate: self.activate,
                         ds.Reset: self.reset, ds.PauseDevice: self.pause, ds.ResumeDevice: self.resume,
                         ds.Snapshot: self.snapshot, ds.Restore: self.restore, ds.GetCounters: self.counters,
                         ds.Shutdown: self.shutdown}

    def handle(self, data):
        """One request (bytes) -> the reply message."""
        self.requests += 1
        try:
            req = codec.decode(data, ds.SERVICE, expect=ds.REQUESTS, max_bytes=ds.MAX_CONTROL_BYTES)
            return self.handlers[type(req)](req)
        except HvError as e:
            self.bad_requests += 1
            return Error.of(e)
        except Exception as e:           # a model bug: report it, keep serving
            self.bad_requests += 1
            return Error.of(InternalError(f"{type(e).__name__}: {one_line(e)}"))

    def describe(self, req):
        m = self.model
        return ds.Description(device_type=m.device_type, features=m.features, num_queues=m.num_queues,
                              queue_max_sizes=list(m.queue_max_sizes), config=bytes(m.config_bytes()), name=m.name)

    def config_write(self, req):
        cfg_len = len(self.model.config_bytes())
        if not (0 <= req.offset and req.offset + len(req.data) <= cfg_len):
            raise UserError(f"config write {req.offset}+{len(req.data)} outside {cfg_len} bytes")
        self.model.config_write(req.offset, req.data)
        return Ok()

    def _check_queues(self, queues):
        m = self.model
        if len(queues) > m.num_queues:
            raise UserError(f"{len(queues)} queues for a device with {m.num_queues}")
        for q in queues:
            if not 0 <= q.index < m.num_queues or not 1 <= q.size <= m.queue_max_sizes[q.index]:
                raise UserError(f"queue {q.index} of size {q.size} does not exist")

    def activate(self, req):
        self._check_queues(req.queues)
        self.model.activate(self.mem, req.features, req.queues)
        return Ok()

    def reset(self, req):
        self.model.reset()
        return Ok()

    def pause(self, req):
        self.model.pause()
        return Ok()

    def resume(self, req):
        self.model.resume()
        return Ok()

    def snapshot(self, req):
        return ds.StateReply(state=self.model.snapshot())

    def restore(self, req):
        self._check_queues([q.config for q in req.state.queues])
        self.model.restore(self.mem, req.state, req.paused)
        return Ok()

    def counters(self, req):
        c = dict(self.model.counters())
        c.update(service_requests=self.requests, service_bad_requests=self.bad_requests, pid=os.getpid())
        return ds.Counters(counters=c)

    def shutdown(self, req):
        self.stop = True
        return Ok()


def _zmq_roundtrip(model, ctx, endpoint):
    """Make every blk request wait for one REQ/REP round trip to `endpoint` (the benchmark's echo)."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    inner = model._request

    def request(chain):              # only the data-path thread uses `sock`
        sock.send(b"r")
        sock.recv()
        return inner(chain)
    model._request = request
    return sock


def read_spec(text):
    try:
        return codec.decode(base64.b64decode(text, validate=True), ds.SPEC, expect=ds.ServiceSpec)
    except (ValueError, ProtocolError) as e:
        raise UserError(f"bad --spec: {one_line(e)}") from None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyhv.devices.virtio.service")
    p.add_argument("--spec", required=True, help="the ServiceSpec, msgpack in base64")
    a = p.parse_args(argv)
    try:
        spec = read_spec(a.spec)
        kind = kinds.kind(spec.kind)
        model = kind.build_checked(spec.options, spec.fds.image)
    except (HvError, OSError) as e:
        print(f"device-service: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    fds = spec.fds
    mem = GuestMemory(fds.mem, spec.mem_size)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    evt = ctx.socket(zmq.PUSH)
    for s in (ctl, evt):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, ds.MAX_CONTROL_BYTES)
    ctl.connect(spec.control)
    evt.connect(spec.events)
    model.attach(_Events(evt), Eventfds(fds.notify, fds.irq))
    echo = None
    if spec.kind == "blk" and os.environ.get(ZMQ_ROUNDTRIP_ENV):
        echo = _zmq_roundtrip(model, ctx, os.environ[ZMQ_ROUNDTRIP_ENV])
    svc = Service(model, mem)
    loop = EventLoop(f"service-{spec.name}")

    def request():
        try:
            data = ctl.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        ctl.send(codec.encode(svc.handle(data), ds.SERVICE))
        if svc.stop:
            loop.stop()
    loop.add_socket(ctl, request, during_pause=True)
    loop.add(fds.lifeline, loop.stop, during_pause=True)       # EOF: the worker is gone
    sandbox.apply("service")           # everything is open and connected: from here on, only the service's calls
    status = 0
    try:
        loop.run()
    except KeyboardInterrupt:
        status = 1
    finally:
        model.close()
        for s in (ctl, evt, echo):
            if s is not None:
                s.close()
        ctx.term()
        loop.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
