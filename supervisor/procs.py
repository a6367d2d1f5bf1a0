"""Processes the supervisor knows by identity, not parenthood: how a new supervisor finds and watches what an earlier one started.

Workers, device services and switches outlive the supervisor that started
them (docs/architecture.md, "Process lifetimes").  A new supervisor finds a
worker again from the identity its predecessor saved in the guest's record:
the pid, the process's start time (field 22 of /proc/PID/stat, in clock
ticks since boot) and the boot id.  A pid alone could name an unrelated
process by now; pid, start time and boot together name one process ever.

The check cannot race with pid reuse: the pidfd is opened first, then the
identity is read from /proc, then the pidfd is asked whether its process is
still alive.  If it is, the process /proc described is the pidfd's (a pid is
only reused after its process has exited), and from then on the pidfd
follows that process alone: `Adopted` watches (poll) and signals
(pidfd_send_signal) through it, so a later reuse of the number cannot
misdirect a kill.  An adopted process is not our child, so its exit status
is not ours to read: `returncode` becomes EXITED, and a worker's outcome comes
from its result.json (spawn.read_outcome).
"""
import functools
import os
import select
import signal
import subprocess

from pyhv.devices.guest_memory import memfd_fits

EXITED = "exited"                     # an adopted process's returncode once it has gone: its status is unknown
BOOT_ID = "/proc/sys/kernel/random/boot_id"
GUEST_RAM_LINK = "/memfd:guest-ram-"  # readlink of a worker's guest RAM fd (spawn.py names the memfds so)


@functools.cache
def boot_id():
    with open(BOOT_ID) as f:
        return f.read().strip()


def start_time(pid):
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def identity(pid):
    """{"pid", "start", "boot"} of a live process: what a later supervisor recognizes it by."""
    return {"pid": pid, "start": start_time(pid), "boot": boot_id()}


def cmdline(pid):
    """The process's argv as a list of strings ([] if it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except (FileNotFoundError, ProcessLookupError):
        return []


def is_worker(pid, name):
    """Is process `pid` a worker of guest NAME?  Forked by the zygote, it is named hvw-NAME (comm: 15 bytes);
    spawned directly, it runs pyhv.vcpu_worker.worker."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read().rstrip(b"\n")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return comm == f"hvw-{name}".encode()[:15] or "pyhv.vcpu_worker.worker" in cmdline(pid)


class Adopted:
    """A live process we are not the parent of, watched and signalled through its pidfd.

    Quacks like the subprocess.Popen / spawn.WorkerProcess the supervisor
    keeps for its children: pid, returncode, poll(), wait(timeout), kill(),
    terminate(); plus close() for the pidfd.
    """

    def __init__(self, pid, pidfd):
        self.pid, self.pidfd = pid, pidfd
        self.returncode = None
        self.identity = None          # set by find(): what the record keeps

    @classmethod
    def open(cls, pid, is_it):
        """The process `pid` if it is alive and `is_it(pid)` says it is the one we look for, else None."""
        if not isinstance(pid, int) or pid <= 0:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            return None
        proc = cls(pid, pidfd)
        try:
            if is_it(pid) and proc.poll() is None:      # alive after the check: the check was about it
                return proc
        except OSError:
            pass
        proc.close()
        return None

    @classmethod
    def find(cls, recorded, also=lambda pid: True):
        """The process a record's identity ({"pid", "start", "boot"}) names, if it still runs and `also(pid)`
        agrees (e.g. is_worker); else None."""
        if not isinstance(recorded, dict):
            return None
        try:
            if recorded.get("boot") != boot_id():
                return None             # a process of an earlier boot: whatever has that pid now is not it
        except OSError:
            return None
        proc = cls.open(recorded.get("pid"), lambda pid: start_time(pid) == recorded.get("start") and also(pid))
        if proc is not None:
            proc.identity = dict(recorded)
        return proc

    def poll(self):
        if self.returncode is None and (self.pidfd is None or select.select([self.pidfd], [], [], 0)[0]):
            self.returncode = EXITED
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not select.select([self.pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self.returncode = EXITED
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass                    # exited just now: poll() will say so

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def guest_memory(proc, size):
    """A new fd on the guest RAM memfd that worker `proc` (an Adopted) holds, or None.

    Opened through /proc/PID/fd (the memfd's magic link reopens the same
    memory, no copy), then checked to be the guest's (RAM and dirty map), and kept only if
    the worker is still the pidfd's process afterwards.  Needs ptrace read
    access to the worker (same uid, or root), which a supervisor has.
    """
    base = f"/proc/{proc.pid}/fd"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            if not os.readlink(f"{base}/{entry}").startswith(GUEST_RAM_LINK):
                continue
            fd = os.open(f"{base}/{entry}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        if memfd_fits(fd, size) and proc.poll() is None:
            return fd
        os.close(fd)
    return None
