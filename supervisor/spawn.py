"""Worker processes: spawning one per guest with its RAM memfd, and reading how it ended.

The supervisor owns guest RAM: it creates the memfd and passes the fd number
to the worker (pass_fds), so nobody opens guest RAM by path.  The worker runs
in its own session (a Ctrl-C on the supervisor's terminal does not reach
it), its stdout is the append-only console log, its stderr the worker log.
"""
import base64
import json
import os
import signal
import subprocess
import sys
import time

from devices.guest_memory import create_memfd
from proto import codec

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env():
    """os.environ with this checkout first on PYTHONPATH, so `-m` finds our packages uninstalled."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def spawn_worker(guest):
    """Allocate the guest's RAM and start its worker; sets guest.popen and guest.mem_fd."""
    for leaf in ("result.json", "console.sock", "worker.sock"):
        try:
            os.unlink(guest.path(leaf))
        except FileNotFoundError:
            pass
    guest.mem_fd = create_memfd(guest.config.mem_bytes, name=f"guest-ram-{guest.name}")
    out = os.open(guest.path("console.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = os.open(guest.path("worker.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        cmd = [sys.executable, "-m", "vcpu_worker.worker",
               "--config", base64.b64encode(codec.encode(guest.config)).decode(),
               "--mem-fd", str(guest.mem_fd), "--control", guest.control,
               "--console-sock", guest.path("console.sock"), "--result", guest.path("result.json"),
               "--parent-pid", str(os.getpid())]
        guest.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       pass_fds=(guest.mem_fd,), start_new_session=True,
                                       env=child_env(), cwd=guest.dir)
    except OSError:
        release_memory(guest)
        raise
    finally:
        os.close(out)
        os.close(err)


def release_memory(guest):
    """Close the supervisor's memfd: the RAM is freed once the worker is gone too."""
    if guest.mem_fd is not None:
        os.close(guest.mem_fd)
        guest.mem_fd = None


def read_outcome(guest, returncode):
    """(state, exit_status, reason) for a worker that exited with `returncode`."""
    try:
        with open(guest.path("result.json")) as f:
            result = json.load(f)
        status, reason = result["status"], result["reason"]
        if type(status) is int and isinstance(reason, str):
            return "stopped", status, reason
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if guest.stop_reason:
        return "stopped", 143, guest.stop_reason
    if returncode < 0:
        try:
            how = f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode} without a result"
    return "failed", 70, f"worker {how} (see {guest.path('worker.log')})"


def process_stats(pids):
    """{role: {"pid", "cpu_percent", "cpu_seconds", "rss", "pss"}} for live processes (psutil).

    cpu_percent is the average over the process's lifetime; pss is null where
    the kernel does not let us read smaps.
    """
    import psutil
    out = {}
    for role, pid in pids.items():
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t = p.cpu_times()
                cpu = t.user + t.system
                age = max(time.time() - p.create_time(), 1e-3)
                rss = p.memory_info().rss
            try:
                pss = p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                pss = None
            out[role] = {"pid": pid, "cpu_percent": round(100.0 * cpu / age, 1),
                         "cpu_seconds": round(cpu, 3), "rss": rss, "pss": pss}
        except psutil.Error:
            continue
    return out
