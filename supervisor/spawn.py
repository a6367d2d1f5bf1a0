"""Worker processes: one per guest with its RAM memfd, forked by the zygote (or spawned directly); how each ended.

The supervisor owns guest RAM: it creates the memfd and hands it to the
worker, so nobody opens guest RAM by path.  A worker runs in its own session
(a Ctrl-C on the supervisor's terminal does not reach it), its stdout is the
append-only console log, its stderr the worker log.

Workers normally come from the zygote (supervisor/zygote.py): a pre-imported
fork server, so a worker costs a fork instead of a fresh interpreter.  The
zygote double-forks and the supervisor is a child subreaper, so every worker
it starts is its child either way and is watched by pid (WorkerProcess).
Workers do not die with the supervisor: a worker runs its guest on when the
supervisor is killed, crashes or is upgraded, and the next supervisor adopts
it (supervisor/procs.py).  So a worker runs only once its identity is saved
in the guest's record: it waits for a "go" byte on a pipe, which the
supervisor writes after the record says "running" with the worker's pid, and
exits without running anything at EOF (the supervisor died first, or gave up
on the start).  Asking the zygote is asynchronous: the supervisor goes on
serving while the zygote forks, up to MAX_IN_FLIGHT starts at once, and
finishes each start when the answer comes.  If the zygote is dead or hung,
the starts it owes fall back to direct spawns (`python -m
pyhv.vcpu_worker.worker`) and a new zygote is started (at most once per
ZYGOTE_RESTART_BACKOFF).  HV_ZYGOTE=0 in the supervisor's environment
disables the zygote: every worker is spawned directly, as before.

Being a subreaper means any orphaned descendant becomes our child; workers
start no processes, and the orphans a failed zygote may leave are reaped
for a few seconds after it is dropped (_reap_strays).  The zygote's spare
worker is our child too: the zygote tells us its pid, and we reap it if it
dies unused (or at EOF once its zygote is gone), as we do a worker whose
start we gave up on after asking for it.
"""
import base64
import json
import os
import signal
import subprocess
import sys
import time

from pyhv.devices.guest_memory import create_memfd
from pyhv.devices.restarts import RestartPolicy
from pyhv.proto import codec, guest as guest_msgs, runtime, sandbox
from pyhv.proto.errors import EXIT_STOPPED, EXIT_VM_FAILED
from pyhv.supervisor import procs
ZYGOTE_RESTART_BACKOFF = 5.0    # seconds between restarts of a zygote that keeps dying
MAX_IN_FLIGHT = 32              # starts the zygote may owe us at once (bounds its socket buffer and our fds)


def zygote_enabled(environ=os.environ):
    return environ.get("HV_ZYGOTE", "1").strip().lower() not in ("0", "no", "off", "false")


class WorkerProcess:
    """A worker we are the parent of, watched by pid (it may come from the zygote: no Popen then).

    poll/wait/kill mirror subprocess.Popen: returncode is the exit status, or
    -N for a worker killed by signal N.  `identity` is what the guest's record
    keeps so that a later supervisor can adopt the worker (procs.Adopted).
    """

    live = {}                           # pid -> WorkerProcess not yet reaped

    def __init__(self, pid, via, popen=None):
        self.pid = pid
        self.via = via                  # "zygote" or "spawn"
        self.popen = popen
        self.returncode = None
        WorkerProcess.live[pid] = self
        self.identity = procs.identity(pid)     # our unreaped child: the pid cannot have been reused

    def _reaped(self, status):
        WorkerProcess.live.pop(self.pid, None)
        self.returncode = os.waitstatus_to_exitcode(status)
        if self.popen is not None:
            self.popen.returncode = self.returncode   # keep Popen from waiting on a pid we reaped
        return self.returncode

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:   # not our child (cannot happen unless reaped elsewhere)
                WorkerProcess.live.pop(self.pid, None)
                self.returncode = 255
                return self.returncode
            if pid:
                return self._reaped(status)
        return self.returncode

    def wait(self):
        while self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                WorkerProcess.live.pop(self.pid, None)
                self.returncode = 255
                break
            self._reaped(status)
        return self.returncode

    def kill(self):
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)     # still our unreaped child: the pid cannot be reused
            except ProcessLookupError:
                pass

    def close(self):
        """(An Adopted worker has a pidfd to close; ours has nothing.)"""


class Spawner:
    """Makes workers: through the zygote when it is enabled and healthy, else directly.

    start_worker(guest, done) calls done(None) once guest.proc is set, or
    done("reason") if no worker could be made; with the zygote that happens
    later, from collect() (the server polls fileno() for the answers) or
    drain().  Use from the supervisor's main thread only.
    """

    def __init__(self, use_zygote=None, log=None):
        self.use_zygote = zygote_enabled() if use_zygote is None else use_zygote
        self.log = log                  # where the zygote's stderr goes (None: ours)
        self.zygote = None
        self.pending = {}               # request id -> (guest, go pipe write end, done, submitted at); guest None:
        #                                 a start given up on (its worker exits at EOF on the go pipe; reap it)
        self.given_up = set()           # pids of such workers, to reap
        self.spares = set()             # pids of the zygote's unused spare workers (our children), to reap
        self._ids = 0
        self._restarts = RestartPolicy(interval=ZYGOTE_RESTART_BACKOFF)
        self._strays_until = 0.0        # after a zygote failure: reap orphans it left us until then
        self.fallbacks = 0              # workers that had to be spawned directly although the zygote is on

    # -- the zygote's life -----------------------------------------------------

    def start(self):
        """Become a child subreaper and start the zygote (call from the main thread, before any spawn)."""
        if not self.use_zygote:
            return
        from pyhv.supervisor import zygote
        try:
            zygote.set_child_subreaper()
        except OSError as e:
            print(f"supervisor: no zygote: PR_SET_CHILD_SUBREAPER failed: {e}", file=sys.stderr, flush=True)
            self.use_zygote = False
            return
        self._start_zygote()

    def _start_zygote(self):
        from pyhv.supervisor import zygote
        self._restarts.record()
        try:
            self.zygote = zygote.Zygote(runtime.child_env(), self.log)
        except OSError as e:
            print(f"supervisor: cannot start the zygote: {e}", file=sys.stderr, flush=True)
            self.zygote = None
            return
        print(f"supervisor: zygote pid {self.zygote.pid}", file=sys.stderr, flush=True)

    def _drop_zygote(self, why):
        """Give up on the zygote: kill it, spawn what it still owed us directly."""
        rc = self.zygote.proc.poll()
        if rc is None and "went away" in why:
            try:                        # its socket closed as it died: in a moment it is a zombie to read
                rc = self.zygote.proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        if rc is not None and rc < 0:
            why = f"{why} ({sandbox.killed_by(-rc)})"
        print(f"supervisor: zygote pid {self.zygote.pid}: {why}; workers are spawned directly until it is back",
              file=sys.stderr, flush=True)
        self.zygote.close()
        self.zygote = None
        self.given_up |= self.spares        # they exit at EOF from the zygote: reap them then
        self.spares.clear()
        self._strays_until = time.monotonic() + 5.0
        pending, self.pending = self.pending, {}
        for guest, go_w, done, _ in pending.values():
            if guest is None:
                continue
            os.close(go_w)              # EOF: a worker the zygote made anyway exits without running
            self.fallbacks += 1
            self._directly(guest, done)

    def watch(self):
        """Each tick: collect answers, notice a dead or hung zygote, restart it (at most once per backoff)."""
        if not self.use_zygote:
            return
        if self._strays_until and time.monotonic() < self._strays_until:
            _reap_strays(exclude={self.zygote_pid})
        _reap(self.given_up)
        if self.zygote is not None:
            if not self.zygote.alive():
                self.collect()          # what it answered before it died still counts
                if self.zygote is not None:
                    rc = self.zygote.proc.returncode
                    self._drop_zygote(sandbox.killed_by(-rc) if rc < 0 else f"exited with status {rc}")
            else:
                self.collect()
                if not self.pending:        # a spare the zygote is handing a request to is not reaped
                    _reap(self.spares)
                if self.zygote is not None and self.pending:
                    oldest = min(t for *_, t in self.pending.values())
                    if time.monotonic() > self.zygote.deadline(oldest):
                        self._drop_zygote("no answer in time")
            return
        if self._restarts.due():
            self._start_zygote()

    @property
    def zygote_pid(self):
        return self.zygote.pid if self.zygote is not None else None

    def fileno(self):
        """The fd to poll for the zygote's answers, or None when none are awaited."""
        if self.zygote is not None and (self.pending or not self.zygote.ready):
            return self.zygote.fileno()
        return None

    # -- workers -------------------------------------------------------------------

    def start_worker(self, guest, done, prepare=None):
        """Allocate the guest's RAM and start its worker; done(None or reason) when guest.proc is set (or not).

        `prepare()` runs once the worker has been asked for and before it may run
        the guest: a restore loads the guest's RAM there while the worker reads
        the snapshot's state.  If it raises, the worker exits without running,
        done is not called, and the exception propagates.
        """
        for path in (guest.files.result, guest.files.console_sock, guest.files.worker_sock):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if guest.restore is None:           # a restore brings its memfd, loaded from the snapshot
            try:
                guest.mem_fd = create_memfd(guest.config.mem_bytes, name=f"guest-ram-{guest.name}")
            except OSError as e:
                _call(done, f"cannot allocate guest RAM: {e}")
                return
        if self.use_zygote and len(self.pending) >= MAX_IN_FLIGHT:
            self._wait_for_answers(MAX_IN_FLIGHT - 1)
        if self.use_zygote and self.zygote is not None and self._submit(guest, done):
            try:
                if prepare is not None:
                    prepare()           # the go byte is written by collect(), from the loop, after this
            except BaseException:
                _, go_w, _, submitted = self.pending[self._ids]
                self.pending[self._ids] = (None, None, None, submitted)
                os.close(go_w)          # EOF: the worker exits without running
                raise
            return
        if self.use_zygote:
            self.fallbacks += 1
        self._directly(guest, done, prepare)

    def _submit(self, guest, done):
        from pyhv.supervisor.zygote import WORKER_MEM_FD, ZygoteError
        out = err = go_r = go_w = None
        try:
            out, err = _open_logs(guest)
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            self._ids += 1
            self.zygote.submit(self._ids, worker_argv(guest, WORKER_MEM_FD), (guest.mem_fd, out, err, go_r),
                               guest.dir, guest.name)
        except (OSError, ZygoteError) as e:
            if go_w is not None:
                os.close(go_w)
            if isinstance(e, ZygoteError):
                self._drop_zygote(str(e))
            else:
                print(f"supervisor: cannot ask the zygote for a worker: {e}", file=sys.stderr, flush=True)
            return False
        finally:
            for fd in (out, err, go_r):
                if fd is not None:
                    os.close(fd)
        self.pending[self._ids] = (guest, go_w, done, time.monotonic())
        return True

    def collect(self):
        """Finish the starts the zygote has answered (never blocks)."""
        if self.zygote is None:
            return
        from pyhv.supervisor.zygote import ZygoteError
        try:
            replies = self.zygote.replies()
        except ZygoteError as e:
            self._drop_zygote(str(e))
            return
        for reply in replies:
            if "spare" in reply:
                if type(reply["spare"]) is int and reply["spare"] > 0:
                    self.spares.add(reply["spare"])
                continue
            self.spares.discard(reply.get("pid"))      # a spare given a guest is that guest's worker now
            entry = self.pending.pop(reply.get("id"), None)
            if entry is None:
                continue                # an answer to a request we already gave up on
            guest, go_w, done, _ = entry
            pid = reply.get("pid")
            if guest is None:           # its start failed after the request: the worker exits, we reap it
                if type(pid) is int and pid > 0:
                    self.given_up.add(pid)
                continue
            if type(pid) is int and pid > 0:
                guest.proc = WorkerProcess(pid, "zygote")
                _started(done, go_w)
            else:
                os.close(go_w)
                print(f"supervisor: zygote could not fork a worker for {guest.name}: {reply.get('error')}",
                      file=sys.stderr, flush=True)
                self.fallbacks += 1
                self._directly(guest, done)

    def drain(self):
        """Block until every start the zygote owes us is finished (or handed to a direct spawn)."""
        self._wait_for_answers(0)

    def _wait_for_answers(self, at_most):
        """Block until the zygote owes us at most `at_most` starts (failing over to direct spawns if it hangs)."""
        import select
        while len(self.pending) > at_most and self.zygote is not None:
            oldest = min(t for *_, t in self.pending.values())
            left = self.zygote.deadline(oldest) - time.monotonic()
            if left <= 0 or not self.zygote.alive():
                self.collect()
                if self.pending and self.zygote is not None:
                    self._drop_zygote("no answer in time" if left <= 0 else "it died")
                break
            select.select([self.zygote.fileno()], [], [], min(left, 0.2))
            self.collect()

    def _directly(self, guest, done, prepare=None):
        """`python -m pyhv.vcpu_worker.worker` in a fresh interpreter (it waits for the go byte, as a forked one)."""
        out = err = go_r = go_w = None
        try:
            out, err = _open_logs(guest)
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            cmd = (runtime.python_module("vcpu_worker.worker") + worker_argv(guest, guest.mem_fd) +
                   ["--go-fd", str(go_r)])
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     pass_fds=(guest.mem_fd, go_r), start_new_session=True,
                                     env=runtime.child_env(), cwd=guest.dir)
        except OSError as e:
            if go_w is not None:
                os.close(go_w)
            release_memory(guest)
            _call(done, str(e))
            return
        finally:
            for fd in (out, err, go_r):
                if fd is not None:
                    os.close(fd)
        if prepare is not None:
            try:
                prepare()
            except BaseException:
                os.close(go_w)          # EOF: it exits without running
                popen.kill()
                popen.wait()
                raise
        guest.proc = WorkerProcess(popen.pid, "spawn", popen)
        _started(done, go_w)

    def close(self):
        self.drain()
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None


def _go(go_w):
    """Let a worker whose start is recorded run its guest."""
    try:
        os.write(go_w, b"g")
    except BrokenPipeError:
        pass                            # it died already: the next poll reports it
    os.close(go_w)


def _reap(pids):
    """Reap those of `pids` (our children) that have exited, and forget them."""
    for pid in list(pids):
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        except ChildProcessError:
            pass
        pids.discard(pid)


def _started(done, go_w):
    """The worker exists and guest.proc is set: done(None, go) records it and writes the go byte (`go`) before it
    replies, so that the reply is off the guest's path; if done fails or forgets, the byte is written anyway."""
    sent = []

    def go():
        if not sent:
            sent.append(True)
            _go(go_w)
    _call(done, None, go)
    go()


def _call(done, error, *go):
    """Run a start's completion callback; a bug in it must not stop the supervisor's loop."""
    try:
        done(error, *go)
    except Exception:
        import traceback
        traceback.print_exc()


def _open_logs(guest):
    """(console log fd, worker log fd), append-only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    out = os.open(guest.files.console_log, flags, 0o644)
    try:
        return out, os.open(guest.files.worker_log, flags, 0o644)
    except OSError:
        os.close(out)
        raise


def _reap_strays(exclude=()):
    """Reap zombie children we do not track: workers a failed zygote forked after we gave up on it.

    Tracked workers and the zygote are left alone (their owners reap them).
    """
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in WorkerProcess.live or pid in exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] == b"Z" and int(fields[1]) == me:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def worker_argv(guest, mem_fd):
    """The worker's command-line arguments (after `python -m pyhv.vcpu_worker.worker`)."""
    argv = ["--config", base64.b64encode(codec.encode(guest.config, guest_msgs.GUEST)).decode(),
            "--mem-fd", str(mem_fd), "--runtime-dir", guest.files.runtime.path]
    if guest.restore is not None:
        snapshot_dir, paused = guest.restore
        argv += ["--restore", snapshot_dir] + (["--paused"] if paused else [])
    return argv


def release_memory(guest):
    """Close the supervisor's memfd: the RAM is freed once the worker is gone too."""
    if guest.mem_fd is not None:
        os.close(guest.mem_fd)
        guest.mem_fd = None


def read_outcome(guest, returncode):
    """(state, exit_status, reason) for a worker that exited with `returncode`: its exit status as our child,
    procs.EXITED if it was adopted (its status is unknown), None if it ended while no supervisor ran."""
    try:
        with open(guest.files.result) as f:
            result = json.load(f)
        status, reason = result["status"], result["reason"]
        if type(status) is int and isinstance(reason, str):
            return "stopped", status, reason
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if guest.stop_reason:
        return "stopped", EXIT_STOPPED, guest.stop_reason
    if returncode is None:
        how = "ended while no supervisor was running, without a result"
    elif returncode == procs.EXITED:
        how = "ended without a result (an earlier supervisor started it: its exit status is unknown)"
    elif returncode < 0:
        how = sandbox.killed_by(-returncode, "signal ")
    else:
        how = f"exited with status {returncode} without a result"
    return "failed", EXIT_VM_FAILED, f"worker {how} (see {guest.files.worker_log})"
