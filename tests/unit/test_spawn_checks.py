"""The supervisor's device-service spawn: what a worker may ask for, checked against the guest's own config."""
import os
import socket
import struct

import pytest

from pyhv.devices.virtio.service import read_spec
from pyhv.proto import device_service as ds, runtime
from pyhv.proto.errors import NoSuchGuest, UserError
from pyhv.proto.guest import DeviceSpec, GuestConfig
from pyhv.supervisor.registry import Registry
from pyhv.supervisor.services import ServiceLauncher


class Peer:
    """A connection whose SO_PEERCRED says `pid`."""

    def __init__(self, pid):
        self.pid = pid

    def getsockopt(self, level, opt, size):
        assert (level, opt) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return struct.pack("<iii", self.pid, 0, 0)


class Proc:
    def __init__(self, pid):
        self.pid = pid


@pytest.fixture
def launcher(tmp_path):
    rd = runtime.RuntimeDir(tmp_path)
    reg = Registry(rd)
    g = reg.add(GuestConfig(name="g", kernel="/k", mem_bytes=16 << 20, devices=[DeviceSpec("rng")]))
    g.proc = Proc(os.getpid())
    sl = ServiceLauncher(rd, reg)
    yield sl, g
    sl.close()


def fds(n):
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def test_only_the_guests_worker_asking_for_one_of_its_devices_with_the_right_fds_gets_a_service(launcher):
    sl, g = launcher
    ok = ds.SpawnService("g", "virtio-rng", 1, ds.ServiceFds.positions(1, 2))
    for conn, msg, n, err, words in (
            (Peer(1), ok, 5, UserError, "is not the worker"),
            (Peer(os.getpid()), ok.replace(guest="other"), 5, NoSuchGuest, "no such guest"),
            (Peer(os.getpid()), ok.replace(device="virtio-blk0"), 5, UserError, "has no device"),
            (Peer(os.getpid()), ok, 4, UserError, "wrong roles"),
            (Peer(os.getpid()), ok.replace(fds=ds.ServiceFds(0, 0, [0], [0, 0])), 5, UserError, "wrong roles"),
            (Peer(os.getpid()), ok.replace(incarnation=0), 5, UserError, "incarnation")):
        got = fds(n)
        try:
            with pytest.raises(err, match=words):
                sl._spawn(conn, msg, got)
        finally:
            for fd in got:
                os.close(fd)
    assert not sl.procs
    got = fds(5)
    try:
        pid, pidfd = sl._spawn(Peer(os.getpid()), ok, got)
    finally:
        for fd in got:
            os.close(fd)
    os.close(pidfd)
    (p,) = sl.procs["g"]
    p.kill()
    p.wait()
    assert p.pid == pid
    spec = read_spec(p.args[-1])      # what the service was told: all from the supervisor's copy of the config
    files = g.files
    assert (spec.kind, spec.name, spec.mem_size, spec.options) == ("rng", "virtio-rng", 16 << 20, {})
    assert spec.control == files.service_endpoint("virtio-rng", 1, "ctl")
    assert spec.events == files.service_endpoint("virtio-rng", 1, "evt")
    assert spec.fds == ds.ServiceFds.positions(1, 2).renumbered(got)     # our numbers, inherited as they are
