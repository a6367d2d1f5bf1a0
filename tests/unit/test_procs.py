"""supervisor/procs.py: a process is recognized by pid, start time and boot id, never by its pid alone, and is
watched and signalled through a pidfd; a worker's RAM memfd is reachable through /proc."""
import os
import subprocess
import sys

import pytest

from pyhv.supervisor import procs

HOLDS_MEMFD = ("import os, sys, time\n"
               "from pyhv.devices.guest_memory import create_memfd\n"
               "fd = create_memfd(1 << 20, 'guest-ram-t')\n"          # RAM and its dirty map, as a worker's
               "os.pwrite(fd, b'ram!', 4096)\n"
               "print(fd, flush=True); time.sleep(60)\n")


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", HOLDS_MEMFD], stdout=subprocess.PIPE)
    p.fd = int(p.stdout.readline())
    yield p
    p.kill()
    p.wait()
    p.stdout.close()


def test_a_recorded_identity_finds_its_process_and_only_it(child):
    me = procs.identity(child.pid)
    assert me["pid"] == child.pid and me["start"] == procs.start_time(child.pid) and me["boot"] == procs.boot_id()
    found = procs.Adopted.find(me)
    try:
        assert found.pid == child.pid and found.poll() is None and found.identity == me
    finally:
        found.close()
    for other in ({**me, "start": me["start"] + 1},            # the pid reused by a later process
                  {**me, "boot": "an-earlier-boot"},           # a record from before a reboot
                  {**me, "pid": 0}, None, "junk"):
        assert procs.Adopted.find(other) is None
    assert procs.Adopted.find(me, lambda pid: procs.is_worker(pid, "t")) is None     # alive, but no guest's worker


def test_an_adopted_process_is_watched_and_killed_through_its_pidfd(child):
    me = procs.identity(child.pid)
    found = procs.Adopted.find(me)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            found.wait(0.05)
        found.kill()
        assert found.wait(10) == procs.EXITED and found.poll() == procs.EXITED
        child.wait(10)
        assert procs.Adopted.find(me) is None           # gone (reaped: no such pid; or a zombie: exited)
    finally:
        found.close()


def test_the_guest_ram_memfd_of_a_worker_is_reopened_from_proc(child):
    found = procs.Adopted.open(child.pid, lambda pid: True)
    try:
        fd = procs.guest_memory(found, 1 << 20)
        assert fd is not None and os.pread(fd, 4, 4096) == b"ram!"       # the same memory, not a copy
        os.close(fd)
        assert procs.guest_memory(found, 2 << 20) is None                # not the size the guest has
    finally:
        found.close()
