"""The supervised worker: one guest's Machine, driven over its control socket, with its console on a unix socket.

Started by the supervisor (supervisor/spawn.py) with the guest RAM memfd
passed as an fd: forked by the zygote (supervisor/zygote.py), which calls
main(argv) in the forked process, or as `python -m pyhv.vcpu_worker.worker`.
It does not die with the supervisor: nothing here depends on the supervisor
being alive except the start of a device service (vcpu_worker/launchers.py,
which waits for the next supervisor), so a killed or upgraded supervisor's
guests run on until a new one adopts them.
Its files are the guest's GuestDir (proto/runtime.py); stdout is the guest's
console log (append-only), stderr the worker log.  The main thread's event
loop serves the control requests (one handler per request type), sleeping
until a request, the guest's end or its timeout; a ConsoleHost serves
`hvctl console`.  When the guest ends, the worker writes result.json
({"status", "reason"}) atomically and exits 0.
"""
import argparse
import base64
import functools
import json
import os
import sys
import threading
import time
import traceback

import zmq

from pyhv.devices.console_host import ConsoleHost
from pyhv.devices.loop import EventLoop
from pyhv.proto import codec, control as m, guest as g, runtime, sandbox
from pyhv.vcpu_worker.console_log import ConsoleLog
from pyhv.proto.errors import (EXIT_STOPPED, EXIT_TIMEOUT, EXIT_VM_FAILED, BadState, HvError, InternalError,
                               ProtocolError, one_line)
from pyhv.proto.messages import Error, Ok

PAUSE_TIMEOUT = 1.0     # below the supervisor's worker timeout
MIGRATED_GRACE = 10.0   # after a migration out, for the supervisor's Stop


def _log(line):
    """A line in the worker log (stderr); a full disk must not end the guest."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def write_result(path, status, reason):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"status": status, "reason": reason}, f)
    os.replace(tmp, path)


def _wait_for_go(fd):
    """Run the guest only once the supervisor has recorded us (one byte); EOF: it gave up on us, or died."""
    try:
        go = os.read(fd, 1)
    finally:
        os.close(fd)
    if go != b"g":
        os._exit(1)


@functools.cache
def _parser():
    """Built once (in the zygote, by rehearse()): building it is most of the ~1 ms that parsing costs."""
    p = argparse.ArgumentParser(prog="pyhv.vcpu_worker.worker", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="GuestConfig message, msgpack in base64")
    src.add_argument("--config-fd", type=int, help="fd to read the GuestConfig message (msgpack) from")
    p.add_argument("--mem-fd", type=int, required=True, help="guest RAM memfd (inherited)")
    p.add_argument("--runtime-dir", required=True, help="the supervisor's runtime dir (the guest's files are below)")
    p.add_argument("--go-fd", type=int, help="run the guest once a byte arrives on this pipe (EOF: exit)")
    p.add_argument("--restore", metavar="DIR", help="continue from this snapshot (its RAM is already in the memfd)")
    p.add_argument("--paused", action="store_true", help="with --restore: hold the vCPUs until Resume")
    return p


def _parse(argv):
    return _parser().parse_args(argv)


def main(argv=None, bare=None, go=None):
    """Run the guest of `argv`; never returns.

    `bare`: a BareVm a spare worker built before it knew its guest
    (vcpu_worker/machine.py).  `go()` returns once the supervisor has recorded
    this worker (else it exits); by default that is the byte on --go-fd.  What
    touches nothing outside this process and writes nothing to guest RAM (the
    arguments, the config, a snapshot's state, a restored guest's VM and
    vCPUs) is done before it, off a restored guest's path to its first
    instruction.
    """
    args = _parse(argv)
    raw = base64.b64decode(args.config) if args.config else _read_fd(args.config_fd)
    try:
        config = codec.decode(raw, g.GUEST, expect=g.GuestConfig)
    except ProtocolError as e:
        print(f"worker: bad config: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    guest = runtime.RuntimeDir(args.runtime_dir).guest(config.name)
    state = failed = None
    if args.restore is not None:
        from pyhv.proto.snapshot import Snapshot
        try:
            state = Snapshot(args.restore, handover=True).state     # its RAM: in the memfd by the go byte
        except HvError as e:
            failed = e
    if go is None:
        go = (lambda: _wait_for_go(args.go_fd)) if args.go_fd is not None else (lambda: None)
    if failed is not None:
        go()
        status, reason = failed.exit_status, str(failed)
    else:
        status, reason = serve(config, args.mem_fd, guest, state, args.paused, bare, go)
    write_result(guest.result, status, reason)
    print(f"worker: guest ended: {status} ({reason})", file=sys.stderr, flush=True)
    os._exit(0)        # vCPU threads may still sit in KVM_RUN


class Worker:
    """The control handlers over one running Machine."""

    def __init__(self, machine, config, console_log=None):
        self.machine = machine
        self.config = config
        self.console_log = console_log
        self.deadline = None if config.timeout is None else time.monotonic() + config.timeout
        self.paused_at = time.monotonic() if machine.paused else None
        self.outcome = None
        self.loop = None                # the control loop, once serve() has one
        self.answer_later = None        # set for each request: answer_later(reply) answers it from any thread
        self.migration = None           # the migration out in progress (vcpu_worker/migration.py)
        self.handlers = {m.Ping: self.ping, m.Pause: self.pause, m.Resume: self.resume, m.Stats: self.stats,
                         m.DeviceStatus: self.device_status, m.Stop: self.stop, m.CtrlAltDel: self.shutdown,
                         m.SnapshotGuest: self.snapshot, m.MigrateOut: self.migrate_out}

    def handle(self, data):
        """The reply to one request, or None: answer_later() gives it."""
        try:
            msg = codec.decode(data, m.CONTROL)
            handler = self.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(f"the worker does not handle {msg.TYPE}")
            if self.migration is not None and type(msg) in (m.Pause, m.Resume, m.SnapshotGuest, m.MigrateOut):
                raise BadState(f"guest {self.config.name} is being migrated")
            return handler(msg)
        except HvError as e:
            return Error.of(e)
        except Exception as e:
            traceback.print_exc()
            return Error.of(InternalError(f"{type(e).__name__}: {one_line(e)}"))

    def ping(self, msg):
        return m.Pong(os.getpid(), "")

    def pause(self, msg):
        if not self.machine.pause(PAUSE_TIMEOUT):
            raise InternalError(f"vCPUs did not stop within {PAUSE_TIMEOUT:g} s")
        self.paused_at = self.paused_at or time.monotonic()
        return Ok()

    def resume(self, msg):
        self.machine.resume()
        if self.paused_at is not None and self.deadline is not None:
            self.deadline += time.monotonic() - self.paused_at     # paused time does not count
        self.paused_at = None
        return Ok()

    def snapshot(self, msg):
        """Hold the guest, write its snapshot, let it go on (or end it with --stop); a failure leaves it as it was.

        A migration's hand-over (state only) leaves the guest held: the supervisor stops it once the guest runs
        under its new supervisor, or resumes it if that failed."""
        from pyhv.devices.virtio.kinds import check_snapshottable
        from pyhv.vcpu_worker.snapshot import write_snapshot
        check_snapshottable(self.config.devices, self.config.name)      # before the guest is held
        if self.machine.debugger is not None and self.machine.debugger.client is not None:
            raise BadState(f"{self.config.name}: a GDB client is attached (its breakpoints are in guest memory); "
                           f"detach it first")
        held = time.monotonic()
        was_paused = self.machine.paused
        if not was_paused and not self.machine.pause(PAUSE_TIMEOUT):
            self.machine.resume()
            raise InternalError(f"vCPUs did not stop within {PAUSE_TIMEOUT:g} s; no snapshot taken")
        try:
            size = write_snapshot(self.machine, self.config, msg.dir, handover=msg.handover)
        except BaseException:
            if not was_paused:
                self.machine.resume()
            raise
        if msg.stop:
            from pyhv.vcpu_worker.vcpu import Outcome
            self.machine.finish(Outcome(EXIT_STOPPED, "stopped after its snapshot"))
            self.outcome = self.machine.outcome
        elif msg.handover:
            self.paused_at = self.paused_at or held
        elif not was_paused:
            self.machine.resume()
        return m.SnapshotReply(msg.dir, size, time.monotonic() - held)

    def migrate_out(self, msg):
        """Stream the guest to a receiver (`migrate --copy`) from a thread; answered when the outcome is known."""
        from pyhv.devices.virtio.kinds import check_snapshottable
        from pyhv.vcpu_worker.migration import Outgoing
        from pyhv.vcpu_worker.vcpu import Outcome
        check_snapshottable(self.config.devices, self.config.name)      # a vhost-user back end writes RAM unlogged
        if self.machine.debugger is not None and self.machine.debugger.client is not None:
            raise BadState(f"{self.config.name}: a GDB client is attached (its breakpoints are in guest memory); "
                           f"detach it first")
        answer = self.answer_later

        def gone():
            self.machine.finish(Outcome(EXIT_STOPPED, f"migrated to {msg.to or msg.address}"))

        def done(reply):
            self.migration = None
            answer(reply)
            if reply.outcome == "done":         # the supervisor stops us; if it has gone, we end ourselves
                self.loop.call_soon(lambda: self.loop.call_at(time.monotonic() + MIGRATED_GRACE, gone))
        self.migration = Outgoing(self.machine, self.config, msg, self._in_loop, self._hold, self._let_go, done)
        self.migration.start()
        return None

    def _hold(self):
        """Hold the guest for a migration's last pass (its clock stops); True if it was running."""
        if self.machine.paused:
            return False
        if not self.machine.pause(PAUSE_TIMEOUT):
            self.machine.resume()
            raise InternalError(f"vCPUs did not stop within {PAUSE_TIMEOUT:g} s")
        self.paused_at = time.monotonic()
        return True

    def _let_go(self):
        self.resume(None)

    def _in_loop(self, fn):
        """fn() on the control loop's thread (from another thread); its result, or what it raised."""
        done, box = threading.Event(), []

        def call():
            try:
                box.append((True, fn()))
            except BaseException as e:
                box.append((False, e))
            done.set()
        self.loop.call_soon(call)
        while not done.wait(0.5):
            if self.loop.stopped:
                raise InternalError("the worker is ending")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stats(self, msg):
        stats = self.machine.stats()
        if self.console_log is not None:
            stats["console_log"] = self.console_log.counters()
        stats["sandbox"] = sandbox.status()
        return m.StatsReply(json.loads(json.dumps(stats, default=str)))

    def device_status(self, msg):
        return m.StatsReply(self.machine.device_status())

    def stop(self, msg):
        self.outcome = self.machine.stop()
        return Ok()

    def shutdown(self, msg):
        return m.CtrlAltDelReply(self.machine.devices.i8042.press_ctrl_alt_del())


def serve(config, mem_fd, guest, state=None, paused=False, bare=None, go=lambda: None):
    """Build and run the guest (from MachineState `state`, if given); returns (status, reason) once it has ended.

    `go()` returns once the supervisor has recorded this worker (or exits): a restored guest's VM, RAM mapping
    and vCPUs are built before it, the rest (a boot's kernel, devices, the guest's files, the state) after it.
    """
    from pyhv.vcpu_worker.launchers import SupervisorLauncher
    from pyhv.vcpu_worker.machine import Machine
    from pyhv.vcpu_worker.vcpu import Outcome

    console = log = None
    recorded = []

    def console_out(data):
        log.write(data)
        if console is not None:
            console.write(data)

    def before_devices():
        nonlocal log
        go()
        recorded.append(True)
        log = ConsoleLog(1, guest.console_times)        # fd 1 is the console log

    try:
        launcher = SupervisorLauncher(guest.runtime.services_sock, config.name, guest)
        machine = Machine(config, mem_fd, console_out, host=guest, launcher=launcher, restore=state,
                          paused=paused and state is not None, bare=bare, before_devices=before_devices)
    except Exception as e:
        if not recorded:
            go()                    # a worker the supervisor called off says nothing, not even why it failed
        if isinstance(e, HvError):
            return e.exit_status, str(e)
        traceback.print_exc()
        return EXIT_VM_FAILED, f"cannot build the VM: {type(e).__name__}: {e}"
    sandbox.apply("worker")          # set up: from here on the guest runs, under the worker's filter
    machine.start()                  # before the sockets below: the guest needs neither to run (its output is
    #                                  logged meanwhile; requests and `hvctl console` wait for the bind)
    ctx = zmq.Context()
    try:
        console = ConsoleHost(guest.console_sock, machine.feed_console)
        rep = ctx.socket(zmq.ROUTER)            # not REP: a request may be answered later (a migration's)
        rep.setsockopt(zmq.MAXMSGSIZE, codec.MAX_MESSAGE_BYTES)
        rep.bind(guest.worker_endpoint)
    except (OSError, zmq.ZMQError) as e:
        machine.finish(Outcome(EXIT_VM_FAILED, f"cannot serve the guest's console and control sockets: {e}"))
        if console is not None:
            console.close()
        return machine.outcome.status, machine.outcome.reason
    _log(f"worker: vCPUs started at {machine.started_at:.6f}")      # bench/snapshot.py reads it
    worker = Worker(machine, config, log)
    loop = worker.loop = EventLoop("worker")
    ended_r, ended_w = os.pipe2(os.O_CLOEXEC)
    threading.Thread(target=lambda: (machine.wait(), os.write(ended_w, b"x")), name="ended", daemon=True).start()
    timer = []

    def arm():
        """The guest's timeout, which pausing moves."""
        if timer:
            loop.cancel(timer.pop())
        if worker.deadline is not None and worker.paused_at is None:
            timer.append(loop.call_at(worker.deadline, timed_out))

    def timed_out():
        machine.finish(Outcome(EXIT_TIMEOUT, f"timed out after {config.timeout:g} s"))

    def request():
        try:
            frames = rep.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        envelope = frames[:-1]              # the peer's identity, the empty delimiter
        worker.answer_later = lambda reply: loop.call_soon(lambda: answer(envelope, reply))
        reply = worker.handle(frames[-1])
        if reply is not None:
            answer(envelope, reply)

    def answer(envelope, reply):
        rep.send_multipart(envelope + [codec.encode(reply, m.CONTROL)])
        arm()
        if worker.outcome is not None:
            loop.stop()

    loop.add_socket(rep, request)
    loop.add(ended_r, loop.stop)
    arm()
    try:
        loop.run()
    finally:
        rep.close(linger=1000)       # deliver the last reply (Stop) before exiting
        ctx.term()
        console.close()
    outcome = worker.outcome or machine.wait(0)
    machine.close_trace()            # before result.json: once `hvctl wait` returns, the trace is complete
    return outcome.status, outcome.reason


def rehearse():
    """Run the worker's start-up code that needs no KVM, no guest and no thread once, in the zygote before it
    forks: the argument parser is built there (most of what parsing costs), and the bytecode Python specialises
    as it first runs is specialised once, shared by every forked worker rather than copied into each."""
    config = g.GuestConfig(name="rehearsal", kernel="/nonexistent", boot="raw64")
    raw = codec.encode(config, g.GUEST)
    args = _parse(["--config", base64.b64encode(raw).decode(), "--mem-fd", "3", "--runtime-dir", "/nonexistent",
                   "--restore", "/nonexistent", "--paused"])
    codec.decode(base64.b64decode(args.config), g.GUEST, expect=g.GuestConfig)
    runtime.RuntimeDir(args.runtime_dir).guest(config.name)
    from pyhv.proto.snapshot import SNAPSHOT, MachineState      # a restore's state: its schema is cached here
    state = MachineState(vcpus=[{"regs": b"", "msrs": [[0, 0]]}], vm={"clock": {"clock": 0}}, devices={"com1": {}})
    codec.decode(codec.encode(state, SNAPSHOT), SNAPSHOT, expect=MachineState)


def _read_fd(fd):
    with os.fdopen(fd, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
