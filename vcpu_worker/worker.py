"""The supervised worker: one guest's Machine, driven over a control socket, with a shared console.

Started by the supervisor (supervisor/spawn.py) with the guest RAM memfd
passed as an fd: forked by the zygote (supervisor/zygote.py), which calls
main(argv) in the forked process, or as `python -m pyhv.vcpu_worker.worker`.
stdout is the guest's console log (append-only), stderr the worker log.  The
main thread serves Pause/Resume/Stop/Stats/Ping on a ZeroMQ REP socket and
sleeps until a request, the guest's end or its timeout; a console thread
serves clients of the console unix socket (`hvctl console`).  When the guest
ends, the worker writes result.json ({"status", "reason"}) atomically and
exits 0.
"""
import argparse
import base64
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback

import zmq

from pyhv.proto import codec, errors, messages as m
from pyhv.proto.errors import ProtocolError

STATUS_FAILED, STATUS_TIMEOUT = 70, 124
PAUSE_TIMEOUT = 1.0     # below the supervisor's worker timeout


class ConsoleServer:
    """Console clients on a unix socket: guest output goes to all, their input to COM1.

    Output to a client that cannot keep up is dropped (the console log has it all).
    """

    def __init__(self, path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.clients = set()
        self.lock = threading.Lock()

    def start(self, feed):
        threading.Thread(target=self._serve, args=(feed,), name="console", daemon=True).start()

    def _serve(self, feed):
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is self.listener:
                    client, _ = sock.accept()
                    client.setblocking(False)
                    sel.register(client, selectors.EVENT_READ)
                    with self.lock:
                        self.clients.add(client)
                    continue
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    feed(data)
                else:
                    sel.unregister(sock)
                    with self.lock:
                        self.clients.discard(sock)
                    sock.close()

    def broadcast(self, data):
        with self.lock:
            for client in self.clients:
                try:
                    client.send(data)
                except BlockingIOError:
                    pass
                except OSError:
                    client.shutdown(socket.SHUT_RDWR)   # the console thread then drops it


def _write_all(fd, data):
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def write_result(path, status, reason):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"status": status, "reason": reason}, f)
    os.replace(tmp, path)


def _die_with_parent(parent_pid):
    """SIGKILL us if the supervisor dies: nobody else could manage this guest.

    The signal follows the parent *thread*: a worker forked by the zygote gets
    here only once it has been re-parented to the supervisor (zygote.py).
    """
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def _parse(argv):
    p = argparse.ArgumentParser(prog="pyhv.vcpu_worker.worker", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="GuestConfig message, msgpack in base64")
    src.add_argument("--config-fd", type=int, help="fd to read the GuestConfig message (msgpack) from")
    p.add_argument("--mem-fd", type=int, required=True, help="guest RAM memfd (inherited)")
    p.add_argument("--control", required=True, help="ZeroMQ endpoint to serve control requests on")
    p.add_argument("--console-sock", required=True, help="unix socket path for console clients")
    p.add_argument("--result", required=True, help="where to write the outcome (JSON)")
    p.add_argument("--parent-pid", type=int, default=0, help="exit if this process (the supervisor) dies")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    _die_with_parent(args.parent_pid)
    status, reason = serve(args)
    write_result(args.result, status, reason)
    print(f"worker: guest ended: {status} ({reason})", file=sys.stderr, flush=True)
    os._exit(0)        # vCPU threads may still sit in KVM_RUN


def serve(args):
    """Build and run the guest; returns (status, reason) once it has ended."""
    try:
        raw = base64.b64decode(args.config) if args.config else _read_fd(args.config_fd)
        config = codec.decode(raw, expect=m.GuestConfig)
        from pyhv.vcpu_worker.machine import Machine, MachineError
        from pyhv.vcpu_worker.vcpu import Outcome
    except Exception as e:
        traceback.print_exc()
        return STATUS_FAILED, f"worker could not start: {type(e).__name__}: {e}"

    console = ConsoleServer(args.console_sock)

    def console_out(data):
        _write_all(1, data)
        console.broadcast(data)

    try:
        machine = Machine(config, args.mem_fd, console_out,
                          runtime_dir=os.path.dirname(os.path.abspath(args.console_sock)))
    except MachineError as e:
        return e.status, str(e)
    except Exception as e:
        traceback.print_exc()
        return STATUS_FAILED, f"cannot build the VM: {type(e).__name__}: {e}"

    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
    rep.bind(args.control)
    console.start(machine.feed_console)
    machine.start()

    # Sleep until a request, the VM's end or the timeout: an idle guest costs its worker no CPU.
    ended_r, ended_w = os.pipe2(os.O_CLOEXEC)
    threading.Thread(target=lambda: (machine.wait(), os.write(ended_w, b"x")), name="ended", daemon=True).start()
    poller = zmq.Poller()
    poller.register(rep, zmq.POLLIN)
    poller.register(ended_r, zmq.POLLIN)
    deadline = None if config.timeout is None else time.monotonic() + config.timeout
    paused_at = None
    outcome = None
    try:
        while outcome is None:
            wait_ms = None
            if deadline is not None and paused_at is None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000) + 1)
            if rep in dict(poller.poll(wait_ms)):
                reply, outcome, paused_at, deadline = _handle(rep.recv(), machine, paused_at, deadline)
                rep.send(codec.encode(reply))
            outcome = outcome or machine.wait(0)
            if outcome is None and deadline is not None and paused_at is None and time.monotonic() >= deadline:
                machine.finish(Outcome(STATUS_TIMEOUT, f"timed out after {config.timeout:g} s"))
                outcome = machine.outcome
    finally:
        rep.close(linger=1000)       # deliver the last reply (Stop) before exiting
        ctx.term()
    return outcome.status, outcome.reason


def _handle(data, machine, paused_at, deadline):
    """(reply, outcome or None, paused_at, deadline) for one control request."""
    outcome = None
    try:
        msg = codec.decode(data)
        if isinstance(msg, m.Ping):
            reply = m.Pong(os.getpid(), "")
        elif isinstance(msg, m.Pause):
            if not machine.pause(PAUSE_TIMEOUT):
                raise RuntimeError(f"vCPUs did not stop within {PAUSE_TIMEOUT:g} s")
            paused_at = paused_at or time.monotonic()
            reply = m.Ok()
        elif isinstance(msg, m.Resume):
            machine.resume()
            if paused_at is not None and deadline is not None:
                deadline += time.monotonic() - paused_at     # paused time does not count
            paused_at = None
            reply = m.Ok()
        elif isinstance(msg, m.Stats):
            reply = m.StatsReply(json.loads(json.dumps(machine.stats(), default=str)))
        elif isinstance(msg, m.DeviceStatus):
            reply = m.StatsReply(json.loads(json.dumps(machine.device_status(), default=str)))
        elif isinstance(msg, m.Stop):
            outcome = machine.stop()
            reply = m.Ok()
        else:
            reply = m.Error(errors.PROTOCOL, f"the worker does not handle {msg.TYPE}")
    except ProtocolError as e:
        reply = m.Error(errors.PROTOCOL, str(e))
    except Exception as e:
        traceback.print_exc()
        reply = m.Error(errors.INTERNAL, f"{type(e).__name__}: {e}")
    return reply, outcome, paused_at, deadline


def _read_fd(fd):
    with os.fdopen(fd, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
