"""`hvctl top`: a refreshing table of every guest, with rates computed from successive stats samples.

Counters are cumulative in the worker (per-vCPU C counters, read on demand),
so rates are deltas between two samples here; nothing is added to the exit
path.
"""
import sys
import time

COLUMNS = ("NAME", "STATE", "VCPUS", "MEM", "EXITS/S", "TOP EXIT", "GUEST%", "CPU%", "RSS", "PSS", "STATUS")


def _totals(stats):
    exits, by_reason, in_guest, in_vmm = 0, {}, 0, 0
    for v in stats.get("vcpus", []):
        for reason, n in v.get("exits", {}).items():
            exits += n
            by_reason[reason] = by_reason.get(reason, 0) + n
        in_guest += v.get("ns_in_guest", 0)
        in_vmm += v.get("ns_in_vmm", 0)
    return exits, by_reason, in_guest, in_vmm


def _mib(n):
    return "-" if n is None else f"{n / (1 << 20):.1f}M"


class Top:
    """Keeps the previous sample per guest to turn counters into rates."""

    def __init__(self):
        self._prev = {}        # name -> (time, exits, by_reason, ns_in_guest, ns_in_vmm, cpu_seconds)

    def rows(self, guests, fetch_stats):
        now = time.monotonic()
        rows = []
        for g in guests:
            row = {"NAME": g["name"], "STATE": g["state"], "VCPUS": str(g["vcpus"]), "MEM": _mib(g["mem_bytes"]),
                   "EXITS/S": "-", "TOP EXIT": "-", "GUEST%": "-", "CPU%": "-", "RSS": "-", "PSS": "-",
                   "STATUS": "" if g["exit_status"] is None else str(g["exit_status"])}
            stats = fetch_stats(g["name"]) if g["state"] in ("running", "paused") else None
            if stats:
                exits, by_reason, in_guest, in_vmm = _totals(stats)
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
                    d_guest, d_vmm = in_guest - prev[3], in_vmm - prev[4]
                    if d_guest + d_vmm > 0:
                        row["GUEST%"] = f"{100 * d_guest / (d_guest + d_vmm):.0f}"
                    row["CPU%"] = f"{100 * (cpu_s - prev[5]) / dt:.0f}"
                self._prev[g["name"]] = (now, exits, by_reason, in_guest, in_vmm, cpu_s)
            rows.append(row)
        return rows


def render(rows):
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def run(list_guests, fetch_stats, interval=1.0, iterations=None, out=sys.stdout):
    """Refresh every `interval` seconds; `iterations` bounds it (for scripts and tests)."""
    top = Top()
    clear = out.isatty()
    n = 0
    while iterations is None or n < iterations:
        rows = top.rows(list_guests(), fetch_stats)
        text = render(rows)
        if clear:
            out.write("\x1b[H\x1b[2J")
        out.write(f"{time.strftime('%H:%M:%S')}  {len(rows)} guests\n{text}\n")
        out.flush()
        n += 1
        if iterations is None or n < iterations:
            time.sleep(interval)
