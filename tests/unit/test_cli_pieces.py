"""Pieces of hvctl that need no guest: `logs --tail`'s seek, the status table, fleet spec files."""
import io
import json

import pytest

from pyhv.proto.errors import UserError
from pyhv.supervisor import fleet
from pyhv.supervisor.cli.client import table
from pyhv.supervisor.cli.console import _seek_to_last_lines


@pytest.mark.parametrize("data", [b"a\nb\nc\n", b"a\nb\nc", b"", b"only", b"x\n" * 50000, b"\n\n\n"])
@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_tail_starts_at_the_last_n_lines(data, n):
    f = io.BytesIO(data)
    _seek_to_last_lines(f, n, block=7)
    lines = data.splitlines(keepends=True)
    assert f.read() == (b"".join(lines[-n:]) if n else b"")


def test_table_pads_columns_to_their_widest_cell():
    assert table(("NAME", "STATUS"), [("a", "0"), ("longer", "124")]).splitlines() == \
        ["NAME    STATUS", "a       0", "longer  124"]


def test_fleet_specs_expand_counts_defaults_and_relative_paths(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps({"defaults": {"kernel": "k.bin", "mem": "8M"},
                                                 "guest": [{"name": "w", "count": 3, "vcpus": 2},
                                                           {"name": "x", "kernel": "/abs/k", "disks": ["d.img"]}]}))
    got = fleet.read(str(tmp_path / "f.json"))
    assert [n for n, _ in got] == ["w-0", "w-1", "w-2", "x"]
    assert got[0][1] == {"kernel": str(tmp_path / "k.bin"), "mem": "8M", "vcpus": 2}
    assert got[3][1]["kernel"] == "/abs/k" and got[3][1]["disks"] == [str(tmp_path / "d.img")]
    for spec, words in (({"guest": []}, "at least one"), ({"guest": [{"count": 2}]}, "needs a name"),
                        ({"guest": [{"name": "a", "count": -1}]}, "count")):
        (tmp_path / "bad.json").write_text(json.dumps(spec))
        with pytest.raises(UserError, match=words):
            fleet.read(str(tmp_path / "bad.json"))


def test_fleet_traces_are_one_file_per_guest(tmp_path):
    spec = {"defaults": {"kernel": "k.bin"}, "guest": [{"name": "w", "count": 2, "trace": "t/{name}.trace"},
                                                       {"name": "x", "trace": "x.trace"}]}
    (tmp_path / "f.json").write_text(json.dumps(spec))
    assert [o["trace"] for _, o in fleet.read(str(tmp_path / "f.json"))] == \
        [str(tmp_path / "t" / "w-0.trace"), str(tmp_path / "t" / "w-1.trace"), str(tmp_path / "x.trace")]
    spec["guest"][0]["trace"] = "shared.trace"
    (tmp_path / "f.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="cannot share one trace file"):
        fleet.read(str(tmp_path / "f.json"))


def test_stats_text_is_three_tables_with_services_and_nonzero_counters():
    from pyhv.supervisor.cli.inspect import stats_text
    stats = {"vcpus": [{"index": 0, "exits": {"IO": 5, "HLT": 9}, "ns_in_guest": 2_500_000_000, "ns_in_vmm": 10**7,
                        "position": {"rip": "0x7c06", "cpl": 0, "symbol": "entry+0x6"}, "host_tid": 41,
                        "host_cpus": [0, 1, 2, 5]}],
             "devices": {"serial": {"tx_bytes": 3, "rx_bytes": 0},
                         "pci": {"bar_conflicts": 0, "virtio-net0": {"notify_exits": 2, "backend": {
                             "state": "running", "pid": 77, "tx_frames": 1, "port": {"sent": 4, "dropped": 0}}}}},
             "pio_unclaimed": 1,
             "host": {"worker": {"pid": 40, "cpu_percent": 12.5, "cpu_seconds": 1.0, "rss": 3 << 20, "pss": None},
                      "switch:sw0": {"pid": 42, "cpu_percent": 0.0, "cpu_seconds": 0.0, "rss": 1 << 20,
                                     "pss": 1 << 20}}}
    vcpus, devices, host = (t.splitlines() for t in stats_text(stats).split("\n\n"))
    assert vcpus[1].split() == ["0", "0x7c06", "entry+0x6", "(ring", "0)", "14", "HLT", "9,", "IO", "5", "2.50",
                                "0.01", "41", "0-2,5"]
    assert devices[1].split() == ["serial", "-", "-", "tx_bytes", "3"]
    assert devices[3].split() == ["virtio-net0", "running", "77", "notify_exits", "2,", "tx_frames", "1,",
                                  "port.sent", "4"]
    assert devices[-1].split() == ["unclaimed", "-", "-", "pio_unclaimed", "1"]
    assert [line.split()[0] for line in host[1:]] == ["worker", "switch:sw0"]
    assert host[1].split()[-1] == "-"


def test_console_line_times_pair_each_line_with_its_first_byte(tmp_path, monkeypatch):
    from pyhv.proto import console_times
    from pyhv.supervisor.cli.console import _Stamper
    times = iter([100.0, 200.0, 300.0])
    monkeypatch.setattr(console_times.time, "time", lambda: next(times))
    clock = console_times.LineClock(tmp_path / "console.times", offset=0)
    log = b""
    for chunk in (b"one\ntw", b"o\n", b"three\nfour"):     # lines split across writes, and several per write
        clock.wrote(chunk)
        log += chunk
    clock.close()
    records = console_times.read(tmp_path / "console.times")
    assert records == [(0, 100.0), (4, 100.0), (8, 300.0), (14, 300.0)]
    stamper = _Stamper(tmp_path / "console.times")
    out = stamper(log[:6], 0) + stamper(log[6:], 6)           # as `logs --follow` reads it, in two pieces
    lines = out.decode().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["one", "two", "three", "four"]
    stamps = [line.split(" ", 1)[0] for line in lines]
    assert stamps[0] == stamps[1] != stamps[2] == stamps[3]
    assert _Stamper(tmp_path / "missing")(b"x\n", 0) == b"-" * 23 + b" x\n"


def test_the_console_log_stops_at_its_limit_with_one_marker_and_counts_the_rest(tmp_path):
    import os
    from pyhv.vcpu_worker.console_log import ConsoleLog
    fd = os.open(tmp_path / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = ConsoleLog(fd, tmp_path / "console.times", limit=100)
    for _ in range(30):
        log.write(b"0123456789")              # a flooding guest: 300 bytes
    os.close(fd)
    data = (tmp_path / "console.log").read_bytes()
    assert data.startswith(b"0123456789" * 10) and data.count(b"[pyhv: the console log reached 100 bytes") == 1
    assert log.counters() == {"log_bytes": len(data), "log_dropped": 200}


def test_terminal_queries_are_not_replayed_onto_the_users_terminal():
    from pyhv.supervisor.cli.console import TERMINAL_QUERY
    log = b"/ # \x1b[6nls\r\n\x1b[1;32mgreen\x1b[0m \x1b[c\x1b[>c\x1b[5n\x1b[2J"
    assert TERMINAL_QUERY.sub(b"", log) == b"/ # ls\r\n\x1b[1;32mgreen\x1b[0m \x1b[2J"    # colours stay
