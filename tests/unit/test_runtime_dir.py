"""The runtime dir is private: created 0700 whatever the umask, refused when another user owns it, others can write
to it or it is a symlink (its sockets take commands that run guests as the supervisor's user)."""
import os
import stat

import pytest

from pyhv.proto.errors import UserError
from pyhv.proto.runtime import RuntimeDir


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_0700_even_under_umask_000(tmp_path):
    old = os.umask(0)
    try:
        RuntimeDir(tmp_path / "rt").make_private()
    finally:
        os.umask(old)
    assert mode(tmp_path / "rt") == 0o700


def test_an_existing_readable_dir_of_ours_is_narrowed(tmp_path):
    (tmp_path / "rt").mkdir(mode=0o755)
    os.chmod(tmp_path / "rt", 0o755)
    RuntimeDir(tmp_path / "rt").make_private()
    assert mode(tmp_path / "rt") == 0o700


@pytest.mark.parametrize("bits", [0o777, 0o720, 0o702])
def test_a_dir_others_can_write_is_refused_and_left_alone(tmp_path, bits):
    (tmp_path / "rt").mkdir()
    os.chmod(tmp_path / "rt", bits)
    with pytest.raises(UserError, match="writable by others"):
        RuntimeDir(tmp_path / "rt").make_private()
    assert mode(tmp_path / "rt") == bits


def test_a_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "rt").symlink_to(tmp_path / "real")
    with pytest.raises(UserError, match="not a directory"):
        RuntimeDir(tmp_path / "rt").make_private()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_another_users_dir_is_refused(tmp_path):
    (tmp_path / "rt").mkdir(mode=0o700)
    os.chown(tmp_path / "rt", 65534, 65534)
    with pytest.raises(UserError, match="belongs to uid 65534"):
        RuntimeDir(tmp_path / "rt").make_private()
