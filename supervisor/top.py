"""`hvctl top`: a refreshing table of every guest, with rates computed from successive stats samples.

Counters are cumulative in the worker (per-vCPU C counters, read on demand),
so rates are deltas between two samples here; nothing is added to the exit
path.  GUEST% is host CPU spent running guest code, in percent of one CPU:
the vCPU threads' CPU time less their time in the VMM.  (Time inside KVM_RUN
is not CPU time: a guest halted in `hlt` sits in KVM_RUN asleep.)  On a
terminal, q quits and space refreshes at once.
"""
import os
import select
import sys
import time

from pyhv.supervisor.cli.client import size_text

COLUMNS = ("NAME", "STATE", "VCPUS", "MEM", "EXITS/S", "TOP EXIT", "GUEST%", "CPU%", "RSS", "PSS", "STATUS")


def _totals(stats):
    exits, by_reason, in_vmm = 0, {}, 0
    for v in stats.get("vcpus", []):
        for reason, n in v.get("exits", {}).items():
            exits += n
            by_reason[reason] = by_reason.get(reason, 0) + n
        in_vmm += v.get("ns_in_vmm", 0)
    return exits, by_reason, _thread_cpu(stats), in_vmm


def _thread_cpu(stats):
    """CPU seconds of the worker's vCPU threads so far (psutil), 0.0 where they cannot be read."""
    import psutil
    pid = stats.get("host", {}).get("worker", {}).get("pid")
    tids = {v.get("host_tid") for v in stats.get("vcpus", [])}
    try:
        return sum(t.user_time + t.system_time for t in psutil.Process(pid).threads() if t.id in tids)
    except (psutil.Error, TypeError, ValueError):
        return 0.0


def _mib(n):
    return "-" if n is None else f"{n / (1 << 20):.1f}M"


class Top:
    """Keeps the previous sample per guest to turn counters into rates."""

    def __init__(self):
        self._prev = {}        # name -> (time, exits, by_reason, vcpu_cpu_seconds, ns_in_vmm, cpu_seconds)

    def rows(self, guests, fetch_stats):
        now = time.monotonic()
        rows = []
        for g in guests:
            row = {"NAME": g["name"], "STATE": g["state"], "VCPUS": str(g["vcpus"]), "MEM": size_text(g["mem_bytes"]),
                   "EXITS/S": "-", "TOP EXIT": "-", "GUEST%": "-", "CPU%": "-", "RSS": "-", "PSS": "-",
                   "STATUS": "" if g["exit_status"] is None else str(g["exit_status"])}
            stats = fetch_stats(g["name"]) if g["state"] in ("running", "paused") else None
            if stats:
                exits, by_reason, vcpu_cpu, in_vmm = _totals(stats)
                worker = stats.get("host", {}).get("worker", {})
                cpu_s = worker.get("cpu_seconds", 0.0)
                row["RSS"], row["PSS"] = _mib(worker.get("rss")), _mib(worker.get("pss"))
                prev = self._prev.get(g["name"])
                if prev:
                    dt = max(now - prev[0], 1e-6)
                    row["EXITS/S"] = f"{(exits - prev[1]) / dt:,.0f}"
                    delta = {r: n - prev[2].get(r, 0) for r, n in by_reason.items()}
                    top = max(delta, key=delta.get, default=None)
                    if top and delta[top] > 0:
                        row["TOP EXIT"] = top
                    guest_cpu = max(0.0, (vcpu_cpu - prev[3]) - (in_vmm - prev[4]) / 1e9)
                    row["GUEST%"] = f"{100 * guest_cpu / dt:.0f}"
                    row["CPU%"] = f"{100 * (cpu_s - prev[5]) / dt:.0f}"
                self._prev[g["name"]] = (now, exits, by_reason, vcpu_cpu, in_vmm, cpu_s)
            rows.append(row)
        return rows


def render(rows):
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def run(list_guests, fetch_stats, interval=1.0, iterations=None, out=sys.stdout, keys=sys.stdin):
    """Refresh every `interval` seconds; `iterations` bounds it (for scripts and tests)."""
    top = Top()
    clear = out.isatty()
    with _Keys(keys) as pressed:
        n = 0
        while iterations is None or n < iterations:
            rows = top.rows(list_guests(), fetch_stats)
            text = render(rows)
            if clear:
                out.write("\x1b[H\x1b[2J")
            hint = "  (q quits, space refreshes)" if pressed.live else ""
            out.write(f"{time.strftime('%H:%M:%S')}  {len(rows)} guest{'' if len(rows) == 1 else 's'}{hint}\n"
                      f"{text}\n")
            out.flush()
            n += 1
            if (iterations is None or n < iterations) and pressed.wait(interval) == "q":
                break


class _Keys:
    """Single key presses from a terminal (cbreak mode, restored on exit); without one, just a sleep."""

    def __init__(self, stream):
        self.fd = stream.fileno() if stream is not None and stream.isatty() else None
        self.live = self.fd is not None
        self._saved = None

    def __enter__(self):
        if self.live:
            import termios
            import tty
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, seconds):
        """The key pressed within `seconds` ("q", " ", ...), or None when the time ran out."""
        if not self.live:
            time.sleep(seconds)
            return None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                key = os.read(self.fd, 1).decode(errors="replace").lower()
                if key in ("q", " "):
                    return key
        return None
