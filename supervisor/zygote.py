"""The zygote: a fork server that has imported everything a worker needs and forks one worker per guest.

A fresh `python -m pyhv.vcpu_worker.worker` costs ~150 ms of CPU in imports and
~10-20 MiB of private memory.  The zygote pays the imports once, calls
gc.freeze() so its objects' GC headers are never written again, and forks.
A forked worker shares the zygote's pages copy-on-write, so it starts in a few
milliseconds and its PSS is a fraction of a fresh interpreter's.

The zygote opens no /dev/kvm and creates no VM: KVM binds a VM to the mm of
the process that created it, so the worker creates its VM after the fork.  It
starts no threads either (fork copies only the calling thread).

Protocol (a SOCK_SEQPACKET socketpair: the supervisor's end and ours), JSON:
  zygote -> supervisor, once:  {"ready": pid}
  supervisor -> zygote:        {"id", "argv": [...], "cwd", "name", "supervisor_pid"}
                               with SCM_RIGHTS fds [guest RAM memfd, console log, worker log,
                               the read end of the supervisor's "go" pipe]
  zygote -> supervisor:        {"id", "pid": worker pid} or {"id", "error": "one line"}
  zygote -> supervisor:        {"spare": pid} when a spare is ready (the supervisor's child: it
                               reaps it if it dies unused)
Requests are answered as their workers are ready, not necessarily in order:
the zygote forks the next worker while the previous ones are still being
born.  EOF on the socket (the supervisor went away) ends the zygote.

The zygote double-forks: its child (the "middle" process) forks the worker
and exits at once, so the worker is re-parented to the supervisor, which has
made itself a child subreaper (PR_SET_CHILD_SUBREAPER) and can therefore
waitpid() the worker for its exit status.  The zygote answers only once the
middle process is a zombie (its pidfd is readable), i.e. once the worker is
the supervisor's child.  The worker waits for two things before it runs the
guest: the go byte, which the supervisor writes only once the guest's record
holds the worker's pid (if the request failed or timed out, or the
supervisor died, the pipe closes instead and the worker exits: a guest never
gets two workers, nor one nobody knows of), and the re-parenting.  The
worker does not die with the supervisor (a new one adopts it); the zygote
does (PR_SET_PDEATHSIG): a new supervisor starts its own.

While no request is waiting the zygote forks one spare the same way (see
_Spare): re-parented to the supervisor, with its VM built, it waits on a
socket of its own; the next request and its fds are passed to it unchanged
and answered at once with its pid, so neither the fork nor the VM's creation
is on a guest's start path.  Requests that come while no spare is ready are
forked as above.

The zygote runs at a higher priority than workers (nice -10 where allowed):
it is on every guest's start path and uses little CPU; a worker gets the
zygote's original nice value back.  A spare builds its VM at nice 19, and
only where the zygote could raise its own priority (so the spare can take
a worker's back when it is ready).

This module is both sides: `Zygote` is the supervisor's handle; `main()` is
the zygote process (`python -m pyhv.supervisor.zygote --fd N --supervisor-pid P`).
"""
import gc
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
MAX_MSG = 1 << 16
NFDS = 4                        # memfd, console log, worker log, go pipe (read end)
WORKER_MEM_FD = 3               # where the worker finds guest RAM (its --mem-fd)
READY_TIMEOUT = 10.0            # the zygote's imports (~0.3 s; more with cold bytecode on a loaded host)
REPLY_TIMEOUT = 5.0             # a worker's birth takes milliseconds; past this the zygote is hung
                                # (both well under hvctl's 30 s: a Start never outlives its client)
REPARENT_TIMEOUT = 5.0          # the worker waits this long for the middle process to exit
ZYGOTE_NICE = -10
ZYGOTE_COMM = "hv-zygote"       # its name in ps (/proc/PID/comm); workers are "hvw-GUEST"
SPARE_COMM = "hv-spare"         # a worker forked ahead, until it gets its guest
SPARE_NICE = 19                 # a spare builds its VM at the lowest priority, where it can raise it again after
SPARE_GIVE_UP = 3               # spares that die before they are ready, in a row: then the zygote makes no more


class ZygoteError(RuntimeError):
    """The zygote cannot make workers (dead, hung, or broken); the caller falls back."""


def _prctl(option, arg):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_child_subreaper():
    """Orphaned descendants (the zygote's workers) become our children: we can reap them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


# --- the supervisor's side ---------------------------------------------------

class Zygote:
    """A running zygote process, seen from the supervisor.  Use from the supervisor's main thread only."""

    def __init__(self, env, log=None):
        self.sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyhv.supervisor.zygote", "--fd", str(peer.fileno()),
                 "--supervisor-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(peer.fileno(),),
                start_new_session=True, env=env, cwd="/")
        except OSError:
            self.sock.close()
            raise
        finally:
            peer.close()
        self.sock.setblocking(False)
        self.pid = self.proc.pid
        self.ready = False
        self.started = time.monotonic()

    def fileno(self):
        return self.sock.fileno()

    def submit(self, req_id, argv, fds, cwd, name):
        """Ask for a worker running vcpu_worker.worker with `argv` (its --mem-fd must be WORKER_MEM_FD).

        `fds` = (guest RAM memfd, console log fd, worker log fd, go pipe read
        end); they become the worker's fd 3, 1 and 2; the worker runs the guest
        once a byte arrives on the go pipe (EOF: it exits).  The answer comes
        later from replies().  Raises ZygoteError.
        """
        req = json.dumps({"id": req_id, "argv": argv, "cwd": cwd, "name": name,
                          "supervisor_pid": os.getpid()}).encode()
        try:
            self.sock.settimeout(REPLY_TIMEOUT)     # blocks only if the zygote stopped reading
            socket.send_fds(self.sock, [req], list(fds))
        except OSError as e:
            raise ZygoteError(f"cannot send a request: {e}") from None
        finally:
            self.sock.setblocking(False)

    def replies(self):
        """Every answer that has arrived, without blocking: [{"id", "pid"}, {"id", "error"} or {"spare": pid}]."""
        out = []
        while True:
            try:
                data = self.sock.recv(MAX_MSG)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as e:
                raise ZygoteError(str(e)) from None
            if not data:
                if out:
                    return out              # what it answered before it went away still counts
                raise ZygoteError("it went away")
            try:
                msg = json.loads(data)
            except ValueError:
                raise ZygoteError(f"bad message {data[:80]!r}") from None
            if "ready" in msg:
                self.ready = True
            elif "id" in msg or "spare" in msg:
                out.append(msg)

    def deadline(self, submitted):
        """When an answer to a request submitted at `submitted` (monotonic) is overdue."""
        if self.ready:
            return submitted + REPLY_TIMEOUT
        return max(submitted, self.started + READY_TIMEOUT) + REPLY_TIMEOUT

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        """Kill the zygote and reap it (its workers are not affected)."""
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# --- the zygote process ------------------------------------------------------

def _preload():
    """Import everything a worker imports, including what it imports lazily."""
    import argparse, base64, ctypes, json, random, selectors, threading, traceback  # noqa: F401,E401
    import zmq  # noqa: F401
    from pyhv.proto import codec, control, device_service, errors, guest, messages, runtime, snapshot  # noqa: F401
    from pyhv.vcpu_worker import (worker, machine, vcpu, fixups, cpuid, compat, kvm, bus, device_manager,  # noqa: F401
                                  irq_router, launchers, runner, snapshot as _snapshot)
    from pyhv.vcpu_worker.boot import cpu_state, layout, linux, mptable, acpi  # noqa: F401
    from pyhv.devices import console_host, guest_memory, loop  # noqa: F401
    from pyhv.devices.legacy import serial, i8042, debug_page, rtc  # noqa: F401
    from pyhv.devices.pci import config_space, root  # noqa: F401
    from pyhv.devices.virtio import blk, console, device, kinds, net, proxy, queue, rng, threaded  # noqa: F401
    from pyhv.devices.virtio.transport import common_config, msix, pci  # noqa: F401
    ctypes.CDLL(None, use_errno=True)       # the worker's prctl


def _log(text):
    print(f"zygote[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def _close(fd):
    try:
        os.close(fd)
    except OSError:
        pass


class _Birth:
    """One request in flight: the middle process, its pid pipe and pidfd, the worker's pid once known."""
    __slots__ = ("req_id", "middle", "pid_r", "pidfd", "worker", "exited")

    def __init__(self, req_id, middle, pid_r, pidfd):
        self.req_id, self.middle, self.pid_r, self.pidfd = req_id, middle, pid_r, pidfd
        self.worker, self.exited = None, False


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="pyhv.supervisor.zygote", description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="our end of the supervisor's socketpair")
    p.add_argument("--supervisor-pid", type=int, required=True)
    args = p.parse_args(argv)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args.supervisor_pid:
        os._exit(1)                          # the supervisor died before the prctl
    initial = {s: signal.getsignal(s) for s in signal.valid_signals()
               if s not in (signal.SIGKILL, signal.SIGSTOP)}
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice + ZYGOTE_NICE)
    except OSError:
        pass
    for fd in (0, 1, 2):                     # received fds must never land on stdio numbers
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)
    _set_comm(ZYGOTE_COMM)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    _preload()
    from pyhv.vcpu_worker import worker
    worker.rehearse()
    gc.collect()
    gc.freeze()                              # forked workers never write to these objects' GC headers
    from pyhv.proto import sandbox
    sandbox.prepare("worker")                # compiled once here, so each forked worker only loads it
    sandbox.apply("zygote")                  # its workers narrow it further (sandbox.apply("worker"))
    sock.send(json.dumps({"ready": os.getpid()}).encode())

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    spare = _Spare(sel, sock, args.supervisor_pid, initial, nice,
                   SPARE_NICE if os.getpriority(os.PRIO_PROCESS, 0) < nice else nice)   # back to `nice` needs that
    while True:
        events = sel.select(0 if spare.wanted() else None)
        if not events:                       # idle: only now fork a spare, so it never delays a request
            spare.fork()
            continue
        for key, _ in events:
            birth = key.data
            if birth is spare:
                spare.readable()
                continue
            if birth is None:
                try:
                    msg, fds, flags, _ = socket.recv_fds(sock, MAX_MSG, NFDS + 1)
                except InterruptedError:
                    continue
                except OSError as e:
                    _log(f"socket error, exiting: {e}")
                    return
                if not msg and not fds:
                    return                   # the supervisor closed its end
                req_id = None
                try:
                    req_id = json.loads(msg).get("id")
                    _request(msg, fds, flags)
                    pid = spare.assign(msg, fds)
                    if pid is not None:
                        sock.send(json.dumps({"id": req_id, "pid": pid}).encode())
                        continue
                    birth = _fork_one(msg, fds, flags, initial, nice)
                except Exception as e:       # a bad request or a zygote bug: answer it, carry on
                    sock.send(json.dumps({"id": req_id, "error": f"{type(e).__name__}: {e}"}).encode())
                    continue
                finally:
                    for fd in fds:
                        _close(fd)
                sel.register(birth.pid_r, selectors.EVENT_READ, birth)
                if birth.pidfd is not None:
                    sel.register(birth.pidfd, selectors.EVENT_READ, birth)
                continue
            if key.fd == birth.pid_r:        # the middle process reports the worker's pid
                data = b""
                try:
                    data = os.read(birth.pid_r, 4)
                except OSError:
                    pass
                if len(data) == 4:
                    birth.worker = int.from_bytes(data, "little")
                sel.unregister(birth.pid_r)
                _close(birth.pid_r)
                birth.pid_r = -1
                if birth.pidfd is None:      # no pidfds: wait for the middle process here
                    os.waitpid(birth.middle, 0)
                    birth.exited = True
            else:                            # the middle process has exited: the worker is re-parented
                sel.unregister(birth.pidfd)
                _close(birth.pidfd)
                os.waitpid(birth.middle, 0)
                birth.exited = True
            if birth.exited and birth.pid_r == -1:
                if birth.worker:
                    reply = {"id": birth.req_id, "pid": birth.worker}
                else:
                    reply = {"id": birth.req_id, "error": "the middle process could not fork the worker"}
                sock.send(json.dumps(reply).encode())


def _request(msg, fds, flags):
    """A worker request's fields (argv, cwd, name, supervisor_pid, id), checked; ValueError if malformed."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise ValueError("request or its fds were truncated")
    if len(fds) != NFDS:
        raise ValueError(f"expected {NFDS} fds, got {len(fds)}")
    req = json.loads(msg)
    if not (isinstance(req.get("argv"), list) and all(isinstance(a, str) for a in req["argv"])):
        raise ValueError("argv must be a list of strings")
    return req


class _Spare:
    """The zygote's one spare worker: forked while the zygote is idle, it is re-parented to the supervisor and
    builds a BareVm (vcpu_worker/machine.py) before any guest asks; the next request is handed to it over its
    socket (the request and its fds, unchanged) instead of forking, and answered at once with its pid: the two
    forks and the VM's creation, several milliseconds, are off that guest's start (a restore's first instruction
    comes that much sooner: bench/snapshot.py).

    A spare that dies before it is ready is replaced; after SPARE_GIVE_UP such deaths in a row the zygote makes
    no more (requests are forked as before).  When the zygote goes, the spare sees EOF and exits.
    """

    def __init__(self, sel, supervisor, sup_pid, initial, nice, build_nice):
        """`supervisor`: the zygote's socket to it, told each spare's pid (the spare is its child: it reaps it);
        `nice`: a worker's priority; `build_nice`: the spare's while it builds its VM."""
        self.sel, self.supervisor, self.sup_pid, self.initial = sel, supervisor, sup_pid, initial
        self.nice, self.build_nice = nice, build_nice
        self.sock = None                # the zygote's end of the current spare's socket
        self.pid = None                 # the spare's pid once it said it is ready
        self.failures = 0

    def wanted(self):
        return self.sock is None and self.failures < SPARE_GIVE_UP

    def fork(self):
        zygote_pid = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        ours = theirs = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            middle = os.fork()
        except OSError as e:                 # EMFILE, EAGAIN, ENOMEM: requests are forked as usual (or fail)
            for end in (ours, theirs):
                if end is not None:
                    end.close()
            self.failures += 1
            _log(f"cannot fork a spare worker: {e}")
            return
        if middle == 0:                      # the middle process: fork the spare, vanish (it is re-parented)
            try:
                if os.fork() == 0:
                    _become_spare(theirs.fileno(), self.sup_pid, zygote_pid, self.initial, self.nice,
                                  self.build_nice)
            finally:
                os._exit(0)
        theirs.close()
        os.waitpid(middle, 0)                # it only forks: a millisecond
        self.sock, self.pid = ours, None
        self.sel.register(ours, selectors.EVENT_READ, self)

    def readable(self):
        """The spare says it is ready ({"ready": pid}), or it died (EOF)."""
        try:
            data = self.sock.recv(MAX_MSG)
        except OSError:
            data = b""
        try:
            pid = json.loads(data).get("ready") if data else None
        except (ValueError, AttributeError):
            pid = None
        if type(pid) is int and pid > 0 and self.pid is None:
            self.pid, self.failures = pid, 0
            self.supervisor.send(json.dumps({"spare": pid}).encode())
            return
        self.failures += self.pid is None
        if self.failures == SPARE_GIVE_UP:
            _log(f"{SPARE_GIVE_UP} spare workers in a row died before they were ready; forking on demand only")
        self._drop()

    def assign(self, msg, fds):
        """Hand the request to the ready spare; its pid, or None (no spare ready, or it is gone)."""
        if self.pid is None:
            return None
        pid = self.pid
        try:
            socket.send_fds(self.sock, [msg], list(fds))
        except OSError:
            pid = None                       # it died since it was ready: fork as usual
        self._drop()
        return pid

    def _drop(self):
        self.sel.unregister(self.sock)
        self.sock.close()
        self.sock, self.pid = None, None


def _fork_one(msg, fds, flags, initial, nice):
    """Start one worker's double fork; the _Birth to follow it by."""
    req = _request(msg, fds, flags)
    argv, cwd, name, sup_pid = req["argv"], req["cwd"], req["name"], req["supervisor_pid"]
    zygote_pid = os.getpid()
    pid_r, pid_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    middle = os.fork()
    if middle == 0:                          # the middle process: fork the worker, report its pid, vanish
        try:
            worker = os.fork()
            if worker == 0:
                _become_worker(fds, argv, cwd, name, sup_pid, zygote_pid, initial, nice)
            os.write(pid_w, worker.to_bytes(4, "little"))
        finally:
            os._exit(0)
    os.close(pid_w)
    try:
        pidfd = os.pidfd_open(middle)
    except (AttributeError, OSError):
        pidfd = None
    return _Birth(req["id"], middle, pid_r, pidfd)


def _forked(become):
    """Decorate the body of a forked child: it never returns to the zygote's loop, its exit status is its
    SystemExit's (1 for anything else, after a traceback)."""
    def child(*args):
        status = 1
        try:
            become(*args)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(status)
    return child


@_forked
def _become_worker(fds, argv, cwd, name, sup_pid, zygote_pid, initial, nice):
    """In the forked worker: a clean process (fds, signals, session, seeds), then the worker's main. Never returns."""
    _keep_only({0, 1, 2, *fds})              # the zygote's socket and pipes go with the rest
    _detach(initial, nice)
    _run_worker(fds, argv, cwd, name, sup_pid, f"forked from zygote pid {zygote_pid}")


@_forked
def _become_spare(sock_fd, sup_pid, zygote_pid, initial, nice, build_nice):
    """In a spare (see _Spare): a clean process, re-parented, with a BareVm; then the guest's worker. Never
    returns.  Until a request comes its stdout and stderr are the zygote's (the supervisor's log)."""
    _keep_only({0, 1, 2, sock_fd})
    null = os.open(os.devnull, os.O_RDONLY)
    if sock_fd == WORKER_MEM_FD:
        sock_fd = os.dup(sock_fd)
    os.dup2(null, WORKER_MEM_FD)         # held for the guest's RAM: the VM's fds go above it
    if null != WORKER_MEM_FD:
        os.close(null)
    _detach(initial, build_nice)
    _set_comm(SPARE_COMM)
    _wait_reparented(sup_pid)            # the supervisor must be our parent before the zygote gives our pid
    from pyhv.vcpu_worker.machine import BareVm
    from pyhv.vcpu_worker.kvm import KvmUnavailable
    try:
        bare = BareVm(wants_hook=True)   # the default (nested) profile's; Machine replaces it for another
    except KvmUnavailable:
        bare = None                      # its guest's start says so
    except Exception as e:
        bare = None
        _log(f"spare {os.getpid()}: no VM built ahead ({type(e).__name__}: {e}); its guest builds its own")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)     # ready: a worker's priority from here on
    except OSError:
        pass
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    sock.send(json.dumps({"ready": os.getpid()}).encode())
    msg, fds, flags, _ = socket.recv_fds(sock, MAX_MSG, NFDS + 1)
    sock.close()
    if not msg:
        os._exit(0)                      # the zygote went away: so does its spare
    req = _request(msg, fds, flags)      # the zygote checked it; so does the process that runs it
    _run_worker(fds, req["argv"], req["cwd"], req["name"], sup_pid,
                f"forked from zygote pid {zygote_pid} (a spare, its VM built ahead)", bare)


def _keep_only(keep):
    """Close every inherited fd not in `keep`."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd not in keep:
            _close(fd)


def _detach(initial, nice):
    """Our own session, the zygote's original priority and signal handlers, fresh random seeds."""
    os.setsid()                              # no terminal Ctrl-C, no process group of the supervisor's
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass
    signal.set_wakeup_fd(-1)
    for s, handler in initial.items():
        try:
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        except (OSError, ValueError, TypeError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    import random
    random.seed()                            # (os.register_at_fork does it too; be explicit)


def _wait_reparented(sup_pid):
    """Until the middle process has exited and we are the supervisor's child (exit if that does not happen)."""
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != sup_pid:
        if os.getppid() == 1 or time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.0002)


def _run_worker(fds, argv, cwd, name, sup_pid, how, bare=None):
    """The request's fds in place (RAM at WORKER_MEM_FD, logs at 1 and 2), then the worker's main, which runs the
    guest once the supervisor's go byte comes.  Never returns."""
    mem, out, err, go_r = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    if go_r == WORKER_MEM_FD:
        go_r = os.dup(go_r)
    if mem != WORKER_MEM_FD:
        os.dup2(mem, WORKER_MEM_FD)
    for fd in {out, err, mem} - {0, 1, 2, WORKER_MEM_FD, go_r}:
        _close(fd)
    _set_comm(f"hvw-{name}")
    os.chdir(cwd)
    sys.argv = ["pyhv.vcpu_worker.worker"] + argv

    def go():
        if os.read(go_r, 1) != b"g":
            os._exit(1)                      # the supervisor did not get our pid: it runs the guest elsewhere
        os.close(go_r)
        _wait_reparented(sup_pid)
        try:
            print(f"worker: pid {os.getpid()} {how}", file=sys.stderr, flush=True)
        except OSError:                      # a full disk must not end the guest
            pass
    from pyhv.vcpu_worker import worker
    worker.main(argv, bare=bare, go=go)      # os._exit()s


def _set_comm(comm):
    """The process name in ps/top (15 bytes)."""
    import ctypes
    buf = ctypes.create_string_buffer(comm.encode()[:15])
    ctypes.CDLL(None).prctl(PR_SET_NAME, buf, 0, 0, 0)


if __name__ == "__main__":
    main()
