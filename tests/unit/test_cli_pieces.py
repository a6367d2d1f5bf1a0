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
