"""`--vhost-user` in the worker, with the Python back end of tests/support/vhost_backend.py on a unix socket:
a supervised guest connects at start, `hvctl info` names the back end's pid, snapshot and migrate are refused,
a back end that hangs up leaves the device failed with the reason and the guest running; bad sockets are
refused before the guest starts.  (Real back ends and a Linux driver: tests/linux/test_vhost_user_linux.py.)"""
import os
import socket

from hv import hvctl, wait_for
from vhost_backend import FakeBackend

LOOP = r"""
    mov $0x3f8, %dx
    mov $'x', %al
    out %al, %dx
1:  jmp 1b
"""


def devices(sup, name):
    return sup.info(name)["devices"]


def test_a_supervised_guest_with_a_vhost_user_device_reports_it_and_survives_its_back_end(sup, build_guest, tmp_path):
    kernel = build_guest(LOOP, "raw16")
    listener = FakeBackend.listen(tmp_path / "fs.sock")
    try:
        sup.hvctl("create", "g", "--kernel", kernel, "--boot", "raw16", "--timeout", 120,
                  "--vhost-user", f"fs,socket={listener.path},tag=share", "--start", check=0)
        backend = listener.wait()
        wait_for(lambda: devices(sup, "g").get("vhost-user0", {}).get("state") == "running", timeout=30)
        assert backend.owner                                   # it got SET_OWNER
        info = sup.info("g")
        assert info["devices"]["vhost-user0"]["state"] == "running"
        assert info["pids"]["device:vhost-user0"] == os.getpid()     # the back end's pid, from SO_PEERCRED
        text = sup.hvctl("info", "g", check=0).stdout
        assert f"vhost-user:   fs,socket={listener.path},tag=share" in text
        assert f"vhost-user0: running (pid {os.getpid()})" in text
        stats = sup.hvctl("stats", "g", check=0).stdout
        assert f"vhost-user0  running  {os.getpid()}" in stats, stats

        # its back end's state cannot be saved: snapshot and migrate refuse at once, the guest runs on
        target = tmp_path / "snap"
        r = sup.hvctl("snapshot", "g", target, check=2)
        assert r.stderr.count("\n") == 1 and "cannot be snapshotted or migrated: vhost-user0" in r.stderr, r.stderr
        assert not target.exists()
        r = sup.hvctl("migrate", "g", "--to", tmp_path / "elsewhere", check=2)
        assert "cannot be snapshotted or migrated" in r.stderr
        assert sup.info("g")["state"] == "running"

        backend.hang_up()                                      # as its death looks from here
        wait_for(lambda: devices(sup, "g")["vhost-user0"]["state"] == "failed", timeout=30)
        d = devices(sup, "g")["vhost-user0"]
        assert "closed the connection" in d["reason"] and listener.path in d["reason"], d
        assert "device:vhost-user0" not in sup.info("g")["pids"]
        assert "vhost-user0: failed: vhost-user-fs back end" in sup.hvctl("info", "g", check=0).stdout
        assert sup.info("g")["state"] == "running"
        sup.hvctl("stop", "g", check=0)
        assert sup.info("g")["exit_status"] == 143
    finally:
        listener.close()


def test_hvctl_run_refuses_a_socket_nobody_serves(build_guest, tmp_path):
    kernel = build_guest(LOOP, "raw16")
    r = hvctl("run", "--kernel", kernel, "--boot", "raw16", "--timeout", 30,
              "--vhost-user", f"blk,socket={tmp_path / 'none.sock'}", text=True)
    assert r.returncode == 2 and "no back end listens on" in r.stderr and "Traceback" not in r.stderr, r.stderr
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))                  # a socket file nobody listens on
    try:
        r = hvctl("run", "--kernel", kernel, "--boot", "raw16", "--timeout", 30,
                  "--vhost-user", f"blk,socket={tmp_path / 'stale.sock'}", text=True)
    finally:
        stale.close()
    assert r.returncode == 70 and "cannot connect to" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
