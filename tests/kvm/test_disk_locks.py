"""Disk images are locked like QEMU's: one guest writes an image at a time, any number read one, nobody writes it then.

Real guests on both sides: supervised ones (create --start, start), `hvctl
run`, a service killed and restarted, a migrated guest, restored clones.
A guest that is refused exits 2 with one line and nothing is left of it;
the one holding the image runs on.  The blk driver guest
(support/guests/virtio_blk_driver.c, exit 100) shows that the image works
through the locked fd.
"""
import os
import shutil
import signal
import subprocess

import pytest

from hv import GUESTS, HVCTL, Supervisor, hvctl, wait_for
from pyhv.devices.virtio.image_lock import open_image

SECTORS = 64


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"".join(bytes((s * 7 + j) & 0xFF for j in range(512)) for s in range(SECTORS)))
    return str(p)


@pytest.fixture
def spin(build_c_guest):
    return str(build_c_guest("long guest_main(long i, long n, long khz) { for (;;) __asm__ volatile(\"pause\"); }"))


@pytest.fixture
def driver(build_c_guest):
    return str(build_c_guest((GUESTS / "virtio_blk_driver.c").read_text(), cflags=("-mgeneral-regs-only",)))


def refused(r, words="in use"):
    """Exit 2, one line on stderr naming the conflict, no traceback."""
    assert r.returncode == 2, r
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode()
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def free(path, read_only=False):
    """Whether this process could take the image's lock now (then it lets go at once)."""
    try:
        os.close(open_image(path, read_only))
        return True
    except Exception:
        return False


def start(sup, name, kernel, disk, *more, check=0):
    return sup.hvctl("create", name, "--kernel", kernel, "--boot", "raw64", "--disk", disk, "--timeout", "120",
                     *more, "--start", check=check)


def test_a_writable_image_serves_one_guest_at_a_time(sup, spin, driver, image):
    start(sup, "a", spin, image)
    refused(start(sup, "b", spin, image, check=None), "in use by another guest")
    assert "b" not in sup.hvctl("list", check=0).stdout.split()          # a refused start leaves nothing
    sup.hvctl("create", "c", "--kernel", driver, "--boot", "raw64", "--disk", image, check=0)
    refused(sup.hvctl("start", "c"))
    assert sup.info("c")["state"] == "created"
    refused(hvctl("run", "--kernel", driver, "--boot", "raw64", "--disk", image, timeout=60))
    refused(hvctl("run", "--kernel", driver, "--boot", "raw64", "--disk", image + ",ro", timeout=60))
    assert sup.info("a")["state"] == "running"
    sup.hvctl("stop", "a", check=0)                     # answered once a's worker and services are gone...
    sup.hvctl("start", "c", check=0)                    # ...so the image is free for c, whose driver uses it
    assert sup.hvctl("wait", "c", timeout=120).returncode == 100
    assert free(image)


def test_read_only_images_are_shared_and_keep_writers_out(sup, spin, driver, image):
    start(sup, "r1", spin, image + ",ro")
    start(sup, "r2", spin, image + ",ro")
    r = hvctl("run", "--kernel", driver, "--boot", "raw64", "--disk", image + ",ro", "--timeout", "120",
              timeout=180)
    assert r.returncode == 100, r                       # reads work beside the others; its write got IOERR
    refused(hvctl("run", "--kernel", driver, "--boot", "raw64", "--disk", image, timeout=60), "read-only")
    refused(start(sup, "w", spin, image, check=None), "read-only")
    assert not free(image) and free(image, read_only=True)
    assert [sup.info(n)["state"] for n in ("r1", "r2")] == ["running", "running"]


def test_hvctl_run_holds_its_image_against_supervised_guests(sup, spin, image):
    p = subprocess.Popen(HVCTL + ["run", "--kernel", spin, "--boot", "raw64", "--disk", image, "--timeout", "120"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: not free(image, read_only=True), timeout=30)
        refused(start(sup, "b", spin, image, check=None))
        refused(start(sup, "b", spin, image + ",ro", check=None), "in use by another guest")
    finally:
        p.send_signal(signal.SIGINT)                    # Ctrl-C on hvctl run: the guest stops, its services end
        p.wait(30)
    wait_for(lambda: free(image), timeout=10)
    start(sup, "b", spin, image)


def test_a_restarted_disk_service_inherits_the_lock_instead_of_being_locked_out(sup, spin, image):
    start(sup, "a", spin, image)
    pid = sup.info("a")["devices"]["virtio-blk0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: sup.info("a")["devices"]["virtio-blk0"].get("restarts") == 1, 20)
    dev = sup.info("a")["devices"]["virtio-blk0"]
    assert dev["state"] == "running" and dev["pid"] != pid
    refused(start(sup, "b", spin, image, check=None))     # still a's


def test_a_guest_with_the_same_image_twice_is_refused(sup, spin, image):
    refused(start(sup, "a", spin, image, "--disk", image, check=None))
    start(sup, "a", spin, image + ",ro", "--disk", image + ",ro")       # read-only twice is sharing


@pytest.mark.parametrize("copy", [False, True], ids=["handover", "copy"])
def test_a_refused_migration_leaves_the_lock_with_the_source(spin, image, copy):
    a, b = Supervisor(), Supervisor()
    try:
        start(a, "g", spin, image)
        b.hvctl("create", "g", "--kernel", spin, "--boot", "raw64", check=0)     # the name is taken there
        r = a.hvctl("migrate", "g", "--to", b.dir, *(["--copy"] if copy else []))
        assert r.returncode == 1 and "runs on here" in r.stderr, r.stderr
        assert a.info("g")["state"] == "running" and not free(image)
        refused(start(a, "h", spin, image, check=None))        # still g's
    finally:
        for s in (a, b):
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)


@pytest.mark.parametrize("copy", [False, True], ids=["handover", "copy"])
def test_a_migrated_guest_takes_its_images_lock_along(spin, image, copy):
    a, b = Supervisor(), Supervisor()
    try:
        start(a, "g", spin, image)
        a.hvctl("migrate", "g", "--to", b.dir, *(["--copy"] if copy else []), check=0)
        assert b.info("g")["state"] == "running" and b.info("g")["devices"]["virtio-blk0"]["state"] == "running"
        wait_for(lambda: a.info("g")["state"] == "stopped")
        refused(start(a, "h", spin, image, check=None))       # the lock went with g, not away
        b.hvctl("stop", "g", check=0)
        start(a, "h", spin, image)
    finally:
        for s in (a, b):
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)

