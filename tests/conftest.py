"""Shared fixtures: test guests built from source at test time, and running them through hvctl."""
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import guestbuild  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
HVCTL = [sys.executable, str(REPO / "bin" / "hvctl")]


@pytest.fixture
def build_guest():
    """build_guest(asm_source, mode="raw64", load_addr=None) -> path of a flat binary."""
    return guestbuild.build_asm


@pytest.fixture
def build_c_guest():
    return guestbuild.build_c


def hvctl(*args, timeout=60, input=None, env=None):
    """Run bin/hvctl; returns CompletedProcess with bytes stdout/stderr."""
    return subprocess.run(HVCTL + [str(a) for a in args], capture_output=True, timeout=timeout,
                          input=input, env={**os.environ, **(env or {})})


@pytest.fixture
def run_guest():
    """run_guest(path, *options, timeout=60) -> CompletedProcess of `hvctl run --kernel path ...`."""
    def run(path, *options, timeout=60, input=None):
        return hvctl("run", "--kernel", path, *options, timeout=timeout, input=input)
    return run
