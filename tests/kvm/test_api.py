"""The Python API (`from pyhv import Client`): typed calls, pipelined many-guest starts, errors as HvErrors."""
import os
import shutil
import tempfile

import pytest

from pyhv import Client
from pyhv.proto import control as m
from pyhv.proto.errors import BadState, NoSuchGuest, NotResponding, UserError
from pyhv.proto.guest import GuestConfig

# raw64: prints its vCPU index's letter ('a' + RDI), then exits with 10 + the number of vCPUs
HELLO = r"""
    mov %rsi, %rbx
    lea 'a'(%rdi), %rax
    mov $0x3f8, %dx
    out %al, %dx
    lea 10(%rbx), %rax
    mov $0x501, %dx
    out %al, %dx
1:  jmp 1b
"""
SPIN = "1: jmp 1b\n"


@pytest.fixture
def hv():
    d = tempfile.mkdtemp(prefix="hv-api-", dir="/tmp")      # short: unix socket paths are limited
    with Client.start_supervisor(d) as client:
        yield client
    shutil.rmtree(d, ignore_errors=True)


def test_one_guest_from_create_to_destroy(hv, build_guest):
    image = build_guest(HELLO)
    g = hv.create("one", kernel=str(image), boot="raw64", mem="16M", timeout=30, start=True)
    assert g.wait(timeout=30) == 11
    assert g.logs() == b"a"
    info = g.info()
    assert (info.state, info.exit_status, info.config.mem_bytes) == ("stopped", 11, 16 << 20)
    g.destroy()
    with pytest.raises(NoSuchGuest, match="no such guest: one"):
        g.info()


def test_many_guests_pipelined_then_waited_for(hv, build_guest):
    image = str(build_guest(HELLO))
    guests = hv.create_many([hv.config(f"g{i}", kernel=image, boot="raw64", mem="8M", vcpus=1 + i % 2,
                                       timeout=30) for i in range(20)], start=True)
    statuses = hv.wait_all(guests, timeout=60)
    assert statuses == {f"g{i}": 11 + i % 2 for i in range(20)}
    assert {g.name for g in hv.guests()} == set(statuses)
    hv.destroy_all()
    assert hv.list() == []


def test_errors_are_the_supervisors_and_bad_input_changes_nothing(hv, build_guest):
    with pytest.raises(UserError, match="--mem"):
        hv.create("bad", kernel=str(build_guest(HELLO)), boot="raw64", mem="lots")
    assert hv.list() == []
    g = hv.create("spin", kernel=str(build_guest(SPIN)), boot="raw64", mem="8M", timeout=60, start=True)
    with pytest.raises(BadState, match="already exists"):
        hv.create("spin", kernel=str(build_guest(SPIN)), boot="raw64")
    with pytest.raises(NotResponding):
        g.wait(timeout=0.3)
    with pytest.raises(BadState, match="--force"):
        g.destroy()
    g.pause()
    assert g.state == "paused"
    g.resume()
    assert g.stats()["vcpus"][0]["index"] == 0
    g.destroy(force=True)
    assert hv.list() == []


def test_events_follow_every_change_in_order(hv, build_guest):
    events = hv.events(timeout=30)      # subscribed when it returns: the first Create is seen
    g = hv.create("ev", kernel=str(build_guest(SPIN)), boot="raw64", mem="16M", timeout=30, start=True)
    g.pause()
    g.resume()
    with pytest.raises(BadState, match="no keyboard driver"):
        g.shutdown(timeout=5)                   # a raw guest: refused, nothing changes
    assert g.shutdown(timeout=5, force=True) == 143
    g.destroy()
    seen = [next(events) for _ in range(6)]
    events.close()
    assert [(e.name, e.kind) for e in seen] == [("ev", k) for k in
                                                ("created", "running", "paused", "running", "stopped", "destroyed")]
    assert seen[4].exit_status == 143 and seen[4].reason
    assert all(a.time <= b.time for a, b in zip(seen, seen[1:]))


def test_a_relative_kernel_path_is_taken_from_the_callers_directory(hv, build_guest):
    """The supervisor (whose cwd is the caller's here) once checked a relative kernel path against its own
    directory while the worker opened it from the guest's: the API resolves it, a raw request is refused."""
    relative = os.path.relpath(build_guest(HELLO))
    assert not os.path.isabs(relative)
    config = GuestConfig(name="rel", kernel=relative, boot="raw64", mem_bytes=16 << 20, timeout=30.0)
    (g,) = hv.create_many([config], start=True)
    assert g.wait(timeout=30) == 11 and g.logs() == b"a"
    assert g.info().config.kernel == os.path.abspath(relative)
    with pytest.raises(UserError, match="relative"):
        hv.request(m.Create(config.replace(name="raw")))
    assert [i.name for i in hv.list()] == ["rel"]
