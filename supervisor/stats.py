"""Host CPU and memory of a guest's processes (psutil), for `hvctl stats` and `top`."""
import time


def _confinement(pid):
    """What /proc says of a process's least privilege (proto/sandbox.py): no_new_privs, seccomp mode (2: a
    filter), effective capabilities."""
    from pyhv.proto import sandbox
    try:
        st = sandbox.proc_status(pid)
        return {"no_new_privs": int(st["NoNewPrivs"]), "seccomp": int(st["Seccomp"]), "cap_eff": st["CapEff"]}
    except (OSError, KeyError, ValueError):
        return {}


def process_stats(pids):
    """{role: {"pid", "cpu_percent", "cpu_seconds", "rss", "pss", "no_new_privs", "seccomp", "cap_eff"}} for
    live processes (psutil, /proc).

    cpu_percent is the average over the process's lifetime; pss is null where
    the kernel does not let us read smaps.
    """
    import psutil                # here: hvctl's other commands must not pay for it
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
                         "cpu_seconds": round(cpu, 3), "rss": rss, "pss": pss, **_confinement(pid)}
        except psutil.Error:
            continue
    return out
