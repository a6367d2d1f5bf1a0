"""Disk image locks (devices/virtio/image_lock.py) and who holds them: OFD locks, shared by every dup of the fd."""
import os

import pytest

from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.image_lock import ImageInUse, is_image, open_image
from pyhv.devices.virtio.service import read_spec
from pyhv.proto import device_service as ds, runtime
from pyhv.proto.errors import UserError
from pyhv.proto.guest import DeviceSpec, GuestConfig
from pyhv.supervisor.registry import Registry
from pyhv.supervisor.services import ServiceLauncher


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(bytes(4096))
    return str(p)


def test_one_writer_or_many_readers(image):
    w = open_image(image, read_only=False)
    with pytest.raises(ImageInUse, match="in use by another guest that may write"):
        open_image(image, read_only=False)
    with pytest.raises(ImageInUse, match="in use by another guest"):
        open_image(image, read_only=True)
    os.close(w)
    readers = [open_image(image, read_only=True) for _ in range(3)]
    with pytest.raises(ImageInUse, match="read-only by another guest.*,ro"):
        open_image(image, read_only=False)
    for fd in readers:
        os.close(fd)
    os.close(open_image(image, read_only=False))


def test_the_lock_belongs_to_the_open_file_so_every_dup_holds_it(image):
    fd = open_image(image, read_only=False)
    copy = os.dup(fd)                         # what a service inherits
    os.close(fd)
    with pytest.raises(ImageInUse):
        open_image(image, read_only=True)
    os.close(copy)
    os.close(open_image(image, read_only=True))


def test_is_image_checks_the_file_and_the_access_mode(image, tmp_path):
    other = tmp_path / "o.img"
    other.write_bytes(bytes(512))
    rw, ro = open_image(image, False), os.open(image, os.O_RDONLY)
    try:
        assert is_image(rw, image, read_only=False) and is_image(rw, image, read_only=True)
        assert is_image(ro, image, read_only=True) and not is_image(ro, image, read_only=False)
        assert not is_image(rw, str(other), read_only=False) and not is_image(rw, "/no/such", read_only=True)
    finally:
        os.close(rw)
        os.close(ro)


def test_an_unopenable_image_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot open"):
        open_image(str(tmp_path / "missing.img"), read_only=True)


def test_open_images_locks_every_disk_or_none(image, tmp_path):
    second = tmp_path / "e.img"
    second.write_bytes(bytes(512))
    devices = [DeviceSpec("rng"), DeviceSpec("blk", {"path": image}), DeviceSpec("blk", {"path": str(second)})]
    held = kinds.open_images(devices)
    assert sorted(held) == ["virtio-blk0", "virtio-blk1"]
    for fd in held.values():
        os.close(fd)
    blocker = open_image(str(second), read_only=False)
    with pytest.raises(ImageInUse):
        kinds.open_images(devices)
    os.close(blocker)
    os.close(open_image(image, read_only=False))     # the first one was let go again


class _Peer:
    def __init__(self, pid):
        self.pid = pid

    def getsockopt(self, level, opt, size):
        return self.pid.to_bytes(4, "little") + bytes(8)


class _Proc:
    def __init__(self, pid):
        self.pid = pid


def test_the_supervisor_holds_a_guests_images_and_hands_each_service_incarnation_the_same_fd(image, tmp_path):
    rd = runtime.RuntimeDir(tmp_path / "run")
    os.makedirs(rd.path)
    reg = Registry(rd)
    g = reg.add(GuestConfig(name="g", kernel="/k", mem_bytes=16 << 20, devices=[DeviceSpec("blk", {"path": image})]))
    h = reg.add(GuestConfig(name="h", kernel="/k", mem_bytes=16 << 20, devices=[DeviceSpec("blk", {"path": image})]))
    g.proc = _Proc(os.getpid())
    sl = ServiceLauncher(rd, reg)
    try:
        (fd,) = sl.open_images(g).values()
        with pytest.raises(ImageInUse):
            sl.open_images(h)
        assert "h" not in sl.images
        for incarnation in (1, 2):                # a restart gets the very same open file
            got = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(5)]
            try:
                sl._spawn(_Peer(os.getpid()), ds.SpawnService("g", "virtio-blk0", incarnation,
                                                              ds.ServiceFds.positions(1, 2)), got)
            finally:
                for e in got:
                    os.close(e)
            p = sl.procs["g"][-1]
            p.kill()
            p.wait()
            assert read_spec(p.args[-1]).fds.image == fd     # inherited at our number
        sl.guest_ended("g")
        assert "g" not in sl.images
        assert sorted(sl.open_images(h)) == ["virtio-blk0"]
    finally:
        sl.close()
