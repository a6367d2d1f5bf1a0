"""Shared fixtures and the three tiers: tests/unit (no /dev/kvm), tests/kvm (real guests), tests/linux (slow Linux boots).

Test guests are built from source at test time (support/guestbuild.py);
helpers live in support/.  Tests under kvm/ and linux/ are skipped on a
machine without /dev/kvm; unit/ must pass there.
"""
import pathlib
import shutil
import sys

import pytest

SUPPORT = pathlib.Path(__file__).resolve().parent / "support"
sys.path.insert(0, str(SUPPORT))
import guestbuild  # noqa: E402
import hv  # noqa: E402

HVCTL = hv.HVCTL
hvctl = hv.hvctl


def pytest_collection_modifyitems(items):
    skip = pytest.mark.skip(reason="needs /dev/kvm")
    for item in items:
        tier = pathlib.Path(str(item.fspath)).parent.name
        if tier in ("kvm", "linux") and not hv.HAVE_KVM:
            item.add_marker(skip)


@pytest.fixture
def build_guest():
    """build_guest(asm_source, mode="raw64", load_addr=None) -> path of a flat binary."""
    return guestbuild.build_asm


@pytest.fixture
def build_c_guest():
    return guestbuild.build_c


@pytest.fixture
def run_guest():
    """run_guest(path, *options, timeout=60) -> CompletedProcess of `hvctl run --kernel path ...`."""
    def run(path, *options, timeout=60, input=None):
        return hv.hvctl("run", "--kernel", path, *options, timeout=timeout, input=input)
    return run


@pytest.fixture
def sup():
    s = hv.Supervisor()
    yield s
    s.stop()
    shutil.rmtree(s.dir, ignore_errors=True)
