"""supervisor/registry.py's guest records: what a successor supervisor reads back, even after a failed save."""
import os

import pytest

from pyhv.proto import runtime
from pyhv.proto.errors import HostError
from pyhv.proto.guest import GuestConfig
from pyhv.supervisor.registry import ARRIVING, Registry


def test_a_committed_guest_is_not_left_marked_arriving_when_its_record_cannot_be_written(tmp_path):
    """A successor kills a guest still marked arriving; the mark goes even when the disk refuses the record."""
    rd = runtime.RuntimeDir(str(tmp_path / "run"))
    os.makedirs(rd.path)
    g = Registry(rd).add(GuestConfig(name="g", kernel="/k", mem_bytes=16 << 20))
    g.arriving = True
    g.save()
    assert Registry(rd).get("g").arriving
    os.mkdir(g.files.record + ".tmp")          # the record cannot be written now (as with ENOSPC)
    g.arriving = False
    with pytest.raises(HostError):
        g.save()
    assert not os.path.exists(g.files.file(ARRIVING))
    assert not Registry(rd).get("g").arriving
