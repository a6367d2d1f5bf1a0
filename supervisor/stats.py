"""Host CPU and memory of a guest's processes (psutil), for `hvctl stats` and `top`."""
import time


def process_stats(pids):
    """{role: {"pid", "cpu_percent", "cpu_seconds", "rss", "pss"}} for live processes (psutil).

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
                         "cpu_seconds": round(cpu, 3), "rss": rss, "pss": pss}
        except psutil.Error:
            continue
    return out
