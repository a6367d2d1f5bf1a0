"""What tests share for driving pyhv from outside: hvctl as a subprocess, a supervisor on a fresh runtime dir."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
GUESTS = pathlib.Path(__file__).resolve().parent / "guests"       # test guests' sources
HVCTL = [sys.executable, str(REPO / "bin" / "hvctl")]
HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)
needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="needs /dev/kvm")


def hvctl(*args, timeout=60, input=None, env=None, text=False, cwd=None):
    """Run bin/hvctl; the CompletedProcess (bytes unless text=True)."""
    return subprocess.run(HVCTL + [str(a) for a in args], capture_output=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})}, text=text, cwd=cwd)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


class Supervisor:
    """A supervisor subprocess on a fresh runtime dir, and hvctl pointed at it."""

    def __init__(self, rundir=None, env=None):
        self.dir = rundir or tempfile.mkdtemp(prefix="hv-", dir="/tmp")
        self.log = open(os.path.join(self.dir, "test-supervisor.log"), "ab")
        self.proc = subprocess.Popen(HVCTL + ["supervisor", "--runtime-dir", self.dir],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     env={**os.environ, **(env or {})})
        self.endpoint = "ipc://" + os.path.join(self.dir, "control.sock")
        deadline = time.monotonic() + 15
        while not self.alive():
            assert self.proc.poll() is None and time.monotonic() < deadline, "supervisor did not start"
            time.sleep(0.05)

    def alive(self):
        """Both its sockets answer (hvctl.sock is bound after control.sock)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(os.path.join(self.dir, "control.sock"))
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(os.path.join(self.dir, "hvctl.sock"))
            return True
        except OSError:
            return False

    def hvctl(self, *args, timeout=30, check=None):
        r = subprocess.run(HVCTL + list(map(str, args)), capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "HV_RUNTIME_DIR": self.dir})
        assert "Traceback" not in r.stderr, r.stderr
        if check is not None:
            assert r.returncode == check, r
        return r

    def info(self, name):
        return json.loads(self.hvctl("info", name, "--json", check=0).stdout)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
