"""Live migration's source side (`hvctl migrate --copy`): RAM streamed while the guest runs, then what it dirtied.

The worker does it because it owns KVM, hence the vCPUs' dirty log; what
device services and plugins write comes from the dirty map
(devices/guest_memory.py).  A thread of its own streams
(proto/migration.py, docs/migration.md): a first pass sends every page that
holds data (the memfd's data extents: pages never touched are holes), then
each round sends what the two logs say was written since the round before,
until one round's set was small enough to send within DOWNTIME_GOAL at the
speed seen so far, or MAX_ROUNDS passes have been made (a guest that
dirties RAM faster than it can be sent moves anyway, with a longer
downtime, and the reply says it did not converge).

Then, on the worker's loop thread (where devices are driven from): the
guest is held (vCPUs parked, then each device paused, which finishes and
logs the requests in hand), the logs are taken a last time and the state
read; the thread sends those pages and the state and the two-phase commit
decides.  Up to the moment Commit has been sent, any failure lets the guest
go on as it was (dirty logging off, resumed unless it was paused).  After
it, this side never runs the guest again: without the target's Committed
the outcome is in doubt, and the guest stays held here for the user to
decide (it may run there).
"""
import re
import threading
import time

from pyhv.devices.guest_memory import PAGE_SHIFT
from pyhv.proto import codec, control as m, migration as mig
from pyhv.proto.errors import HvError, one_line
from pyhv.proto.snapshot import SNAPSHOT, data_extents

MAX_ROUNDS = 30                 # passes over RAM while the guest runs, the first (full) one included
DOWNTIME_GOAL = 0.03            # seconds: a round that sent less than this takes is the last one while running
MIN_FINAL_BYTES = 256 << 10     # ... and so is one of at most this many bytes
PREPARE_TIMEOUT = 120.0         # for the target to build the guest, held, after the last byte
COMMIT_TIMEOUT = 30.0           # for the target to run it after Commit

_BITS = tuple(bytes((b >> i) & 1 for i in range(8)) for b in range(256))    # a dirty-log byte, one byte per page
_WRITTEN = re.compile(rb"[^\x00]+")


class DirtyLog:
    """What was written in guest RAM since the last take: KVM's log of the vCPUs' writes and the devices' map."""

    def __init__(self, vm, mem):
        if mem.dirty is None:
            raise mig.MigrationError("this guest's RAM has no dirty map (its memfd was not made by pyhv)")
        if len(vm.slots) != len(mem.regions):
            raise mig.MigrationError("internal: KVM's memory slots are not the guest's RAM regions")
        self.vm, self.mem = vm, mem
        self.pages = len(mem.dirty)
        self.slots = [(slot, off >> PAGE_SHIFT, length >> PAGE_SHIFT)
                      for slot, (_, length, off) in enumerate(mem.regions)]

    def start(self):
        """From now on every write is logged (the devices' marks so far are dropped: the first pass sends all)."""
        self.mem.clear_dirty()
        self.vm.set_dirty_logging(True)

    def stop(self):
        self.vm.set_dirty_logging(False)

    def take(self):
        """[(memfd offset, length)] of the pages written since start() or the last take, in order; both logs are
        cleared, so the caller copies the pages after this and a later write is in the next take."""
        vcpus = bytearray(self.pages)
        for slot, first, n in self.slots:
            vcpus[first:first + n] = b"".join(map(_BITS.__getitem__, self.vm.dirty_log(slot)))[:n]
        either = int.from_bytes(vcpus, "little") | int.from_bytes(self.mem.take_dirty(), "little")
        return [(w.start() << PAGE_SHIFT, (w.end() - w.start()) << PAGE_SHIFT)
                for w in _WRITTEN.finditer(either.to_bytes(self.pages, "little"))]


class Outgoing:
    """One migration out of this worker, answered with a MigrateReply through `reply(msg)` (from any thread).

    `hold()` / `let_go()` run on the worker's loop thread (given to `in_loop`): hold the guest (True if it was
    running) and let it go on as it was."""

    def __init__(self, machine, config, msg, in_loop, hold, let_go, reply):
        self.machine, self.config, self.msg = machine, config, msg
        self.in_loop, self.hold, self.let_go, self.reply = in_loop, hold, let_go, reply
        self.log = DirtyLog(machine.vm, machine.mem)
        self.held = False               # we paused it (not: it was paused already)
        self.held_at = None
        self.committed = False
        self.records = 0                # PAGES records sent
        self.result = m.MigrateReply(outcome="failed", copy=True)

    def start(self):
        threading.Thread(target=self._run, name="migrate-out", daemon=True).start()

    def _run(self):
        started = time.monotonic()
        stream = None
        r = self.result
        try:
            stream = mig.connect(self.msg.address)
            stream.send_preamble()
            stream.send_msg(mig.Hello(self.msg.token, self.config.name, self.config.mem_bytes, self.config.vcpus))
            self._precopy(stream)
            runs, state = self.in_loop(self._hold)
            sent, records = stream.send_ranges(self.machine.mem_fd, runs)
            r.bytes += sent
            r.held_bytes = sent
            self.records += records
            stream.send(mig.STATE, state)
            stream.send_msg(mig.Done(r.rounds, r.bytes, self.records))
            stream.settimeout(PREPARE_TIMEOUT)
            stream.recv_msg(mig.Prepared)
            stream.send_msg(mig.Commit())
            self.committed = True        # sent: the target may run it now; we never will
            stream.settimeout(COMMIT_TIMEOUT)
            stream.recv_msg(mig.Committed)
            r.outcome = "done"
            r.downtime = time.monotonic() - self.held_at
        except Exception as e:
            reason = one_line(e) if isinstance(e, HvError) else f"{type(e).__name__}: {one_line(e)}"
            if stream is not None and stream.send_failed:       # the target may have said why it closed
                reason = stream.peer_reason() or reason
            if not self.committed and stream is not None:
                try:
                    stream.settimeout(1.0)
                    stream.send_msg(mig.Abort(reason))
                except HvError:
                    pass
            r.outcome, r.reason = ("in-doubt" if self.committed else "failed"), reason
        finally:
            if stream is not None:
                stream.close()
        r.seconds = time.monotonic() - started
        try:
            self.in_loop(self._finish)
        except HvError as e:
            r.reason = f"{r.reason}; and then: {e}" if r.reason else str(e)
        self.reply(r)

    def _precopy(self, stream):
        """The first pass (every page with data), then rounds of what was written, while the guest runs."""
        r = self.result
        fd = self.machine.mem_fd
        self.log.start()
        runs = data_extents(fd, self.config.mem_bytes)
        sending = 0.0
        while True:
            t0 = time.monotonic()
            sent, records = stream.send_ranges(fd, runs)
            sending += time.monotonic() - t0
            r.bytes += sent
            self.records += records
            r.rounds += 1
            stream.send_msg(mig.Round(r.rounds, sent))
            if r.rounds > 1 and sent <= max(MIN_FINAL_BYTES, r.bytes / max(sending, 1e-6) * DOWNTIME_GOAL):
                r.converged = True
                return
            if r.rounds >= MAX_ROUNDS:
                r.converged = False
                return
            runs = self.log.take()

    def _hold(self):
        """(loop thread) Hold the guest; the pages written since the last round and its state, encoded."""
        self.held = self.hold()
        self.held_at = time.monotonic()
        return self.log.take(), codec.encode(self.machine.save_state(), SNAPSHOT)

    def _finish(self):
        """(loop thread) Logging off; unless the target has it (or may have it), the guest goes on as it was."""
        try:
            self.log.stop()
        finally:
            if self.result.outcome == "failed" and self.held:
                self.let_go()
