"""Installs that users make: a wheel in a fresh venv (source removed), an editable venv install, pipx, and pyhv beside supervisord.

Each one runs a guest through the environment's own `hvctl`, from outside the
checkout, and checks that the code it ran is the environment's.  pip reaches
PyPI (or its cache) for the dependencies, as a user's would.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from hv import REPO
HELLO = "Hello from a pyhv guest"
pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


def sh(*cmd, cwd=None, env=None, timeout=600):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    out = tmp_path_factory.mktemp("hello")
    sh("make", "-s", "-C", REPO / "examples", f"BUILD={out}")
    return out / "hello.bin"


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The committed tree plus the working tree's changes, without build products: what a clone has."""
    dst = tmp_path_factory.mktemp("src") / "pyhv"
    files = sh("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).stdout.split("\n")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    return dst


def venv(path, python=sys.executable):
    sh(python, "-m", "venv", path)
    return path / "bin"


def run_hello(hvctl, hello, cwd):
    r = subprocess.run([str(hvctl), "run", "--boot", "raw64", "--kernel", str(hello)], cwd=cwd,
                       capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                                        if k != "PYTHONPATH"})
    assert r.returncode == 0 and HELLO in r.stdout, r.stderr
    return r


def pyhv_file(python, cwd):
    return sh(python, "-c", "import pyhv.vcpu_worker.machine as m; print(m.__file__)", cwd=cwd).stdout.strip()


def test_wheel_in_a_fresh_venv_without_the_source(tmp_path, source_copy, hello):
    src = tmp_path / "src"
    shutil.copytree(source_copy, src)
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wheels", src)
    shutil.rmtree(src)
    bin_ = venv(tmp_path / "v")
    (wheel,) = (tmp_path / "wheels").glob("pyhv-*.whl")
    sh(bin_ / "pip", "install", "-q", wheel)
    run_hello(bin_ / "hvctl", hello, cwd=tmp_path)
    assert pyhv_file(bin_ / "python", tmp_path).startswith(str(tmp_path / "v"))
    r = sh(bin_ / "hvctl", "--version", cwd=tmp_path)
    assert r.stdout.startswith("hvctl (pyhv) ")
    # The guest-artefact fetcher ships in the wheel: with the artefacts cached it finds them all current
    # (the kernel's key hashes the config fragment, so the wheel's copy must be the same).
    cache = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))
    if (cache / "own" / "KEY").exists():
        r = sh(bin_ / "hvctl", "guests", "fetch", cwd=tmp_path)
        assert "own kernel: cached" in r.stdout and "initramfs: cached" in r.stdout, r.stdout
    assert "own/vmlinux" in sh(bin_ / "hvctl", "guests", "list", cwd=tmp_path).stdout


def test_editable_venv_install_runs_the_checkout(tmp_path, source_copy, hello):
    src = tmp_path / "src"
    shutil.copytree(source_copy, src)
    bin_ = venv(tmp_path / "v")
    sh(bin_ / "pip", "install", "-q", "-e", src)
    run_hello(bin_ / "hvctl", hello, cwd=tmp_path)
    assert pyhv_file(bin_ / "python", tmp_path) == str(src / "vcpu_worker" / "machine.py")


def test_pipx_install(tmp_path, source_copy, hello):
    tools = venv(tmp_path / "tools")
    sh(tools / "pip", "install", "-q", "pipx")
    env = {"PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
           "PIPX_MAN_DIR": str(tmp_path / "man")}
    sh(tools / "pipx", "install", source_copy, env=env)
    hvctl = tmp_path / "bin" / "hvctl"
    assert hvctl.is_symlink()
    run_hello(hvctl, hello, cwd=tmp_path)


def test_beside_supervisord(tmp_path, source_copy, hello):
    """supervisord's import package is `supervisor`; pyhv's layers live under `pyhv`, so both work."""
    bin_ = venv(tmp_path / "v")
    sh(bin_ / "pip", "install", "-q", "supervisor", source_copy)
    sh(bin_ / "python", "-c", "import supervisor.supervisord, supervisor.options", cwd=tmp_path)
    sh(bin_ / "supervisord", "--version", cwd=tmp_path)
    run_hello(bin_ / "hvctl", hello, cwd=tmp_path)
