"""The supervisor: robust to bad requests, runs guests in isolated workers, reports their ends.

Every guest here has a bound: --timeout, `hvctl wait --timeout`, or the
subprocess timeout of each hvctl call.
"""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest
import zmq

from pyhv.proto import codec, control as m
from pyhv.proto.control import CONTROL
from pyhv.proto.messages import Error, Ok

from hv import HVCTL, REPO, Supervisor, needs_kvm, wait_for

# raw16 guests.  EXIT7: prints "hi", exits 7.  ECHO: prints ">", echoes COM1 input, exits 7 on "q".
# LOOP: prints "x" and spins.
EXIT7 = r"""
    mov $0x3f8, %dx
    mov $'h', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0x501, %dx
    mov $7, %al
    out %al, %dx
1:  jmp 1b
"""
ECHO = r"""
    mov $0x3f8, %dx
    mov $'>', %al
    out %al, %dx
1:  mov $0x3fd, %dx
    in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    out %al, %dx
    cmp $'q', %al
    jne 1b
    mov $0x501, %dx
    mov $7, %al
    out %al, %dx
2:  jmp 2b
"""
LOOP = r"""
    mov $0x3f8, %dx
    mov $'x', %al
    out %al, %dx
1:  jmp 1b
"""


def raw_request(endpoint, frames, sock_type=zmq.DEALER, timeout=5.0):
    """Send raw frames; the reply frames, or None if none came."""
    sock = zmq.Context.instance().socket(sock_type)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        return sock.recv_multipart() if sock.poll(int(timeout * 1000)) else None
    finally:
        sock.close()


def error_kind(frame):
    reply = codec.decode(frame, CONTROL)
    assert isinstance(reply, Error), reply
    assert "\n" not in reply.message
    return reply.kind


def guest(build_guest, source):
    return str(build_guest(source, "raw16"))


# --- control socket robustness ---------------------------------------------

def test_malformed_requests_get_error_replies(sup):
    ep = sup.endpoint
    for payload in (b"garbage", b"", msgpack.packb([1, 2]),
                    msgpack.packb({"v": 99, "type": "Ping", "fields": {}}),
                    msgpack.packb({"v": 1, "type": "Nope", "fields": {}}),
                    msgpack.packb({"v": 1, "type": "Start", "fields": {"name": 3}}),
                    msgpack.packb({"v": 1, "type": "Start", "fields": {"name": "a", "x": 1}}),
                    codec.encode(Ok(), CONTROL)):                        # a reply is not a request
        reply = raw_request(ep, [b"", payload])
        assert reply is not None and reply[0] == b"" and len(reply) == 2
        assert error_kind(reply[1]) == "protocol"
    # wrong number of frames, and no empty delimiter
    reply = raw_request(ep, [b"", b"a", b"b"])
    assert reply[0] == b"" and error_kind(reply[1]) == "protocol"
    reply = raw_request(ep, [codec.encode(m.Ping(), CONTROL)])
    assert len(reply) == 1 and isinstance(codec.decode(reply[0], CONTROL), m.Pong)
    # a REQ socket sending garbage
    reply = raw_request(ep, [b"\xc1\xc1"], sock_type=zmq.REQ)
    assert error_kind(reply[0]) == "protocol"
    # a frame over ZMQ_MAXMSGSIZE: the peer is dropped, no reply, the supervisor carries on
    assert raw_request(ep, [b"", b"\x00" * (codec.MAX_MESSAGE_BYTES + 10)], timeout=0.5) is None
    # unknown guest through a valid request
    reply = raw_request(ep, [b"", codec.encode(m.Info("nosuch"), CONTROL)])
    assert error_kind(reply[1]) == "no-such-guest"
    # still serving
    assert isinstance(codec.decode(raw_request(ep, [b"", codec.encode(m.Ping(), CONTROL)])[1], CONTROL), m.Pong)
    assert sup.proc.poll() is None
    sup.hvctl("list", check=0)


def test_stale_socket_is_replaced():
    d = tempfile.mkdtemp(prefix="hv-", dir="/tmp")
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(d, "control.sock"))
    s.close()
    sup = Supervisor(d)
    try:
        assert sup.hvctl("list", "--json", check=0).stdout.strip() == "[]"
    finally:
        sup.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_detach():
    d = tempfile.mkdtemp(prefix="hv-", dir="/tmp")
    env = {**os.environ, "HV_RUNTIME_DIR": d}
    try:
        r = subprocess.run(HVCTL + ["supervisor", "--detach"], capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0, r
        r = subprocess.run(HVCTL + ["list", "--json"], capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0 and json.loads(r.stdout) == []
    finally:
        with open(os.path.join(d, "supervisor.lock")) as f:
            pid = int(f.read())
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(os.path.join(d, "control.sock")))
        shutil.rmtree(d, ignore_errors=True)


# --- guests ----------------------------------------------------------------

def send_console(info, data):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(info["console_sock"])
        s.sendall(data)
        time.sleep(0.2)


@needs_kvm
def test_killed_worker_fails_only_its_guest(sup, build_guest):
    echo = guest(build_guest, ECHO)
    for name in ("a", "b"):
        sup.hvctl("create", name, "--kernel", echo, "--boot", "raw16", "--timeout", "60", check=0)
        sup.hvctl("start", name, check=0)
    a = sup.info("a")
    assert a["state"] == "running" and a["exit_status"] is None
    os.kill(a["pids"]["worker"], signal.SIGKILL)
    r = sup.hvctl("wait", "a", "--timeout", "20", check=70)
    assert "killed by signal SIGKILL" in r.stderr
    a = sup.info("a")
    assert (a["state"], a["exit_status"], a["pids"]) == ("failed", 70, {})
    b = sup.info("b")
    assert b["state"] == "running"
    wait_for(lambda: os.path.exists(b["console_sock"]))
    send_console(b, b"zq")
    sup.hvctl("wait", "b", "--timeout", "20", check=7)
    assert sup.hvctl("logs", "b", check=0).stdout == ">zq"
    guests = json.loads(sup.hvctl("list", "--json", check=0).stdout)
    assert [(g["name"], g["state"], g["exit_status"]) for g in guests] == [("a", "failed", 70), ("b", "stopped", 7)]
    for g in guests:
        assert {"name", "state", "vcpus", "mem_bytes", "exit_status", "pids", "config", "reason"} <= set(g)
        assert g["vcpus"] == 1 and g["mem_bytes"] == 128 << 20


@needs_kvm
def test_wait_info_logs(sup, build_guest):
    sup.hvctl("create", "g", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", "--mem", "16M", check=0)
    assert sup.info("g")["state"] == "created"
    sup.hvctl("start", "g", check=0)
    sup.hvctl("wait", "g", "--timeout", "20", check=7)
    info = sup.info("g")
    assert (info["state"], info["exit_status"], info["mem_bytes"]) == ("stopped", 7, 16 << 20)
    assert "7" in info["reason"]
    assert sup.hvctl("logs", "g", check=0).stdout == "hi\n"
    assert sup.hvctl("logs", "g", "--follow", check=0).stdout == "hi\n"
    sup.hvctl("start", "g", check=0)                 # a stopped guest can start again
    sup.hvctl("wait", "g", "--timeout", "20", check=7)
    assert sup.hvctl("logs", "g", check=0).stdout == "hi\nhi\n"
    before = time.time()
    stamped = sup.hvctl("logs", "g", "--timestamps", check=0).stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["hi", "hi"]
    first, second = (time.mktime(time.strptime(line.split(".")[0], "%Y-%m-%dT%H:%M:%S")) for line in stamped)
    assert first <= second <= before          # each line's time is when that run wrote it


@needs_kvm
def test_pause_resume_stats_stop(sup, build_guest):
    sup.hvctl("create", "g", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "60", check=0)
    sup.hvctl("start", "g", check=0)
    sup.hvctl("pause", "g", check=0)
    assert sup.info("g")["state"] == "paused"
    sup.hvctl("pause", "g", check=1)
    stats = json.loads(sup.hvctl("stats", "g", "--json", check=0).stdout)
    assert stats["vcpus"][0]["index"] == 0 and "devices" in stats
    assert stats["host"]["worker"]["rss"] > 0 and stats["host"]["worker"]["pid"] == sup.info("g")["pids"]["worker"]
    # where the vCPU is: LOOP spins on `jmp 1b` right after its 6-byte prologue (raw16: rip is IP)
    assert stats["vcpus"][0]["position"] == {"rip": hex(0x7C00 + 6), "cpl": 0}
    assert "0x7c06 (ring 0)" in sup.hvctl("stats", "g", check=0).stdout
    smap = os.path.join(sup.dir, "System.map")
    with open(smap, "w") as f:                       # a System.map for this guest: entry and a data symbol
        f.write("0000000000007c00 T entry\n0000000000007c03 D not_code\n0000000000007c10 t after\n")
    named = json.loads(sup.hvctl("stats", "g", "--json", "--symbols", smap, check=0).stdout)
    assert named["vcpus"][0]["position"]["symbol"] == "entry+0x6"
    assert "0x7c06 entry+0x6 (ring 0)" in sup.hvctl("stats", "g", "--symbols", smap, check=0).stdout
    bad = sup.hvctl("stats", "g", "--symbols", os.path.join(sup.dir, "missing.map"), check=2)
    assert "cannot read" in bad.stderr and len(bad.stderr.splitlines()) == 1
    sup.hvctl("resume", "g", check=0)
    assert json.loads(sup.hvctl("stats", "g", "--json", check=0).stdout)["vcpus"][0]["position"]["rip"] == "0x7c06"
    assert sup.info("g")["state"] == "running"
    r = sup.hvctl("wait", "g", "--timeout", "0.3", check=124)
    assert "still running" in r.stderr
    sup.hvctl("stop", "g", check=0)
    info = sup.info("g")
    assert (info["state"], info["exit_status"]) == ("stopped", 143)
    assert "stopped by request" in info["reason"]
    sup.hvctl("wait", "g", check=143)
    assert sup.hvctl("logs", "g", check=0).stdout == "x"


@needs_kvm
def test_timeout_and_follow(sup, build_guest):
    sup.hvctl("create", "g", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "1", check=0)
    sup.hvctl("start", "g", check=0)
    assert sup.hvctl("logs", "g", "--follow", check=0).stdout == "x"
    assert sup.info("g")["state"] == "stopped"
    sup.hvctl("wait", "g", check=124)


@needs_kvm
def test_destroy_refuses_a_running_guest_unless_forced_and_keeps_its_logs(sup, build_guest):
    sup.hvctl("create", "g", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "60",
              "--start", check=0)                          # create --start: one request
    info = sup.info("g")
    assert info["state"] == "running"
    r = sup.hvctl("destroy", "g", check=1)
    assert "--force" in r.stderr and len(r.stderr.splitlines()) == 1
    assert sup.info("g")["state"] == "running"             # refused: nothing changed
    wait_for(lambda: open(info["console_log"]).read() == "x")
    sup.hvctl("destroy", "g", "--force", check=0)
    sup.hvctl("info", "g", check=1)
    assert not os.path.exists(os.path.dirname(info["console_log"]))
    with pytest.raises(ProcessLookupError):
        os.kill(info["pids"]["worker"], 0)
    kept = os.path.join(sup.dir, "logs", "g", "console.log")
    assert open(kept).read() == "x"
    assert sup.hvctl("logs", "g", check=0).stdout == "x"   # a destroyed guest's log, from where it was kept
    sup.hvctl("create", "h", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", "--start", check=0)
    sup.hvctl("wait", "h", check=7)
    sup.hvctl("destroy", "h", "--purge", check=0)          # a stopped guest: no --force needed
    assert not os.path.exists(os.path.join(sup.dir, "logs", "h"))


@needs_kvm
def test_unusable_image_is_reported(sup, tmp_path):
    k = tmp_path / "notakernel"
    k.write_text("hello\n")
    sup.hvctl("create", "g", "--kernel", k, check=0)
    sup.hvctl("start", "g", check=0)
    r = sup.hvctl("wait", "g", "--timeout", "20", check=2)
    assert "not a Linux kernel" in r.stderr and len(r.stderr.splitlines()) == 1


@needs_kvm
def test_restarted_supervisor_lists_guests(build_guest):
    sup = Supervisor()
    try:
        sup.hvctl("create", "done", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", check=0)
        sup.hvctl("start", "done", check=0)
        sup.hvctl("wait", "done", "--timeout", "20", check=7)
        sup.hvctl("create", "busy", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", check=0)
        sup.hvctl("start", "busy", check=0)
        pid = sup.info("busy")["pids"]["worker"]
        sup.stop()                                   # SIGTERM: workers are ended too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        sup = Supervisor(sup.dir)
        guests = {g["name"]: g for g in json.loads(sup.hvctl("list", "--json", check=0).stdout)}
        assert (guests["done"]["state"], guests["done"]["exit_status"]) == ("stopped", 7)
        assert (guests["busy"]["state"], guests["busy"]["exit_status"]) == ("stopped", 143)
        sup.hvctl("start", "done", check=0)
        sup.hvctl("wait", "done", "--timeout", "20", check=7)
    finally:
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


SPIN64 = "1: jmp 1b\n"


@needs_kvm
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two host CPUs to pin to")
def test_pinned_vcpus_run_on_the_named_host_cpus(sup, build_guest):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    img = build_guest(SPIN64, "user64")
    sup.hvctl("create", "p", "--kernel", img, "--boot", "user64", "--vcpus", "3",
              "--pin", f"{cpus[1]},{cpus[0]}", "--timeout", "60", check=0)
    sup.hvctl("start", "p", check=0)
    stats = json.loads(sup.hvctl("stats", "p", "--json", check=0).stdout)
    placed = {v["index"]: v["host_cpus"] for v in stats["vcpus"]}
    assert placed == {0: [cpus[1]], 1: [cpus[0]], 2: [cpus[1]]}
    tids = {v["host_tid"] for v in stats["vcpus"]}
    assert len(tids) == 3 and all(os.path.exists(f"/proc/{sup.info('p')['pids']['worker']}/task/{t}") for t in tids)
    sup.hvctl("stop", "p", check=0)


@needs_kvm
def test_top_shows_rates_for_running_guests(sup, build_guest):
    # A guest that keeps exiting on a Python-handled port (COM1 scratch) so the exit rate is non-zero.
    busy = "mov $0x3ff, %dx\n1: out %al, %dx\njmp 1b\n"
    sup.hvctl("create", "busy", "--kernel", guest(build_guest, busy), "--boot", "raw16", "--timeout", "60", check=0)
    sup.hvctl("create", "idle", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", check=0)
    sup.hvctl("start", "busy", check=0)
    sup.hvctl("start", "idle", check=0)
    sup.hvctl("wait", "idle", "--timeout", "30", check=7)
    out = sup.hvctl("top", "--iterations", "2", "--interval", "0.5", check=0).stdout
    table = out.strip().splitlines()[-3:]           # the second refresh: header + 2 guests
    header = table[0].split()
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert header[:5] == ["NAME", "STATE", "VCPUS", "MEM", "EXITS/S"]
    assert rows["busy"][1] == "running" and int(rows["busy"][4].replace(",", "")) > 0
    assert rows["busy"][5] == "IO"
    assert rows["idle"][1] == "stopped" and rows["idle"][-1] == "7"
    sup.hvctl("stop", "busy", check=0)


def test_info_lists_the_compatibility_profile(sup, build_guest):
    from pyhv.vcpu_worker.compat import NESTED_KERNEL_ARGS
    img = guest(build_guest, EXIT7)
    sup.hvctl("create", "c1", "--kernel", img, "--boot", "raw16", check=0)
    sup.hvctl("create", "c2", "--kernel", img, "--boot", "raw16", "--compat", "none", check=0)
    nested = sup.info("c1")["compat_profile"]
    assert nested["name"] == "nested" and nested["kernel_args"] == list(NESTED_KERNEL_ARGS)
    assert any("CX16" in m for m in nested["cpuid_masks"]) and "int3" in nested["fixups"]
    assert nested["syscall_hook"].startswith(("on", "off", "unavailable"))    # as this host's probe found
    assert sup.info("c2")["compat_profile"] == {"name": "none", "cpuid_masks": [], "kernel_args": [], "fixups": [],
                                               "syscall_hook": "off", "tsc_early_khz": False}
    text = sup.hvctl("info", "c1", check=0).stdout
    assert "compat:" in text and "noxsave" in text and "syscall_hook:" in text


def test_service_requests_from_anyone_but_the_guests_worker_are_refused(sup, build_guest):
    """RUNTIME/services.sock starts device services only for the worker of a running guest."""
    from pyhv.proto import device_service as ds, runtime
    from pyhv.proto.errors import PeerFailed
    from pyhv.vcpu_worker.launchers import SupervisorLauncher
    sup.hvctl("create", "g", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--rng", "--timeout", "60",
              check=0)
    sup.hvctl("start", "g", check=0)
    rd = runtime.RuntimeDir(sup.dir)
    launch = SupervisorLauncher(rd.services_sock, "g", rd.guest("g"), timeout=5)
    r, w = os.pipe()
    fds = ds.ServiceFds(r, r, [r], [r, r])
    try:
        with pytest.raises(PeerFailed, match="is not the worker of guest g"):
            launch.start("virtio-rng", 1, fds)
        with pytest.raises(PeerFailed, match="no such guest"):
            SupervisorLauncher(rd.services_sock, "nope", rd.guest("nope")).start("virtio-rng", 1, fds)
    finally:
        os.close(r)
        os.close(w)
    # garbage on the socket: refused, and the supervisor goes on
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(rd.services_sock)
        s.send(b"\x93not msgpack")
        assert b"cannot start the device service" in s.recv(4096)
    assert sup.info("g")["state"] == "running"


def test_supervisor_stop_refuses_while_guests_run_unless_forced(sup, build_guest):
    sup.hvctl("create", "g", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "60", "--start",
              check=0)
    r = sup.hvctl("supervisor", "--stop", check=1)
    assert "still running (g)" in r.stderr and len(r.stderr.splitlines()) == 1
    assert sup.proc.poll() is None
    r = sup.hvctl("supervisor", "--stop", "--force", check=0)
    assert "stopped with 1 guest(s)" in r.stdout
    assert sup.proc.wait(10) == 0
    sup.hvctl("list", check=1)                          # nobody serves the runtime dir now


def test_shutdown_of_a_guest_without_a_keyboard_driver_is_refused_unless_forced(sup, build_guest):
    # A raw guest never sets the i8042 up, so Ctrl-Alt-Del would go unheard: say so rather than wait.
    sup.hvctl("create", "raw", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "60",
              "--start", check=0)
    r = sup.hvctl("shutdown", "raw", check=1)
    assert "no keyboard driver" in r.stderr and len(r.stderr.splitlines()) == 1
    assert sup.info("raw")["state"] == "running"
    sup.hvctl("shutdown", "raw", "--force", check=143)
    assert sup.info("raw")["state"] == "stopped"
    sup.hvctl("shutdown", "raw", check=1)                  # not running any more


def test_run_detached_hands_the_guest_to_the_supervisor_and_events_show_it(sup, build_guest):
    env = {**os.environ, "HV_RUNTIME_DIR": sup.dir}
    events = subprocess.Popen(HVCTL + ["events", "--json", "bg"], stdout=subprocess.PIPE, env=env, text=True)
    try:
        time.sleep(0.5)                            # subscribed before the guest is made
        r = sup.hvctl("run", "-d", "--name", "bg", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16",
                      check=0)
        assert r.stdout == "bg\n"
        sup.hvctl("wait", "bg", "--timeout", "30", check=7)
        kinds = [json.loads(events.stdout.readline())["kind"] for _ in range(3)]
        assert kinds == ["created", "running", "stopped"]
    finally:
        events.terminate()
        events.wait(10)
    named = sup.hvctl("run", "-d", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", check=0).stdout.strip()
    assert named.startswith("run-") and sup.hvctl("wait", named, "--timeout", "30", check=7)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_reach_the_supervisor_even_under_umask_000():
    d = os.path.join(tempfile.mkdtemp(prefix="hv-", dir="/tmp"), "rt")
    env = {**os.environ, "HV_RUNTIME_DIR": d}
    subprocess.run(HVCTL + ["supervisor", "--detach"], env=env, umask=0, check=True, timeout=60,
                   capture_output=True)
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        probe = ("import os, socket, sys\n"
                 "os.setgid(65534); os.setuid(65534)\n"
                 "for path, kind in ((sys.argv[1], socket.SOCK_SEQPACKET), (sys.argv[2], socket.SOCK_STREAM)):\n"
                 "    try:\n"
                 "        socket.socket(socket.AF_UNIX, kind).connect(path)\n"
                 "        print('connected', path)\n"
                 "    except PermissionError:\n"
                 "        print('refused')\n")
        r = subprocess.run([sys.executable, "-c", probe, os.path.join(d, "hvctl.sock"),
                            os.path.join(d, "control.sock")], capture_output=True, text=True, timeout=30)
        assert r.stdout.split() == ["refused", "refused"], r
        r = subprocess.run(HVCTL + ["list"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.startswith("NAME")         # its own user still gets in
    finally:
        subprocess.run(HVCTL + ["supervisor", "--stop", "--force"], env=env, timeout=60)
        shutil.rmtree(os.path.dirname(d), ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a small tmpfs")
def test_a_full_disk_fails_the_request_not_the_supervisor(build_guest):
    mnt = tempfile.mkdtemp(prefix="hv-full-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", mnt], check=True)
    s = None
    try:
        s = Supervisor(mnt)
        s.hvctl("create", "a", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "60", "--start",
                check=0)
        with open(os.path.join(mnt, "filler"), "wb") as f:       # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        r = s.hvctl("create", "b", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", check=1)
        assert "No space left on device" in r.stderr and len(r.stderr.splitlines()) == 1
        s.hvctl("stop", "a", check=0)                          # its state cannot be saved: logged, still tracked
        assert sup_state(s, "a") == ("stopped", 143)
        assert "b" not in s.hvctl("list", check=0).stdout
        os.unlink(os.path.join(mnt, "filler"))
        s.hvctl("create", "b", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", "--start", check=0)
        s.hvctl("wait", "b", "--timeout", "30", check=7)
    finally:
        if s is not None:
            s.stop()
        subprocess.run(["umount", "-l", mnt])
        shutil.rmtree(mnt, ignore_errors=True)


def sup_state(s, name):
    info = s.info(name)
    return info["state"], info["exit_status"]


FLOOD = "mov $0x3f8, %dx\nmov $'x', %al\n1: out %al, %dx\njmp 1b\n"


def test_a_flooding_guest_cannot_grow_its_console_log_past_the_limit(build_guest):
    s = Supervisor(env={"HV_CONSOLE_LOG_MAX": "4096"})
    try:
        s.hvctl("create", "f", "--kernel", guest(build_guest, FLOOD), "--boot", "raw16", "--timeout", "60",
                "--start", check=0)
        log = s.info("f")["console_log"]
        wait_for(lambda: json.loads(s.hvctl("stats", "f", "--json", check=0).stdout)["console_log"]["log_dropped"]
                 > 100_000, timeout=60)
        data = open(log, "rb").read()
        assert data.startswith(b"x" * 4096) and data.endswith(b"later output is not logged (hvctl console shows it)]\n")
        assert s.info("f")["state"] == "running"
    finally:
        s.stop()


def test_stop_of_a_guest_never_started_says_so(sup, build_guest):
    sup.hvctl("create", "new", "--kernel", guest(build_guest, EXIT7), "--boot", "raw16", check=0)
    r = sup.hvctl("stop", "new", check=1)
    assert "has not been started" in r.stderr and len(r.stderr.splitlines()) == 1
    assert sup.info("new")["state"] == "created"


def test_a_hung_worker_does_not_hold_up_other_clients(sup, build_guest):
    for name in ("hung", "fine"):
        sup.hvctl("create", name, "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "60",
                  "--start", check=0)
    worker = sup.info("hung")["pids"]["worker"]
    os.kill(worker, signal.SIGSTOP)
    try:
        env = {**os.environ, "HV_RUNTIME_DIR": sup.dir}
        slow = subprocess.Popen(HVCTL + ["info", "hung", "--json"], stdout=subprocess.PIPE, env=env, text=True)
        time.sleep(0.2)                                  # its request is at the supervisor, waiting on the worker
        assert sup.info("fine")["state"] == "running"    # served meanwhile, not after it ...
        assert slow.poll() is None                       # ... while the first still waits (2 s for the worker)
        assert sup.hvctl("stats", "fine", "--json", check=0).returncode == 0
        hung = json.loads(slow.communicate(timeout=30)[0])
        assert hung["devices"]["worker"]["state"] == "not responding"
        r = sup.hvctl("pause", "hung", check=1)
        assert "worker not responding" in r.stderr and len(r.stderr.splitlines()) == 1
    finally:
        os.kill(worker, signal.SIGCONT)
    sup.hvctl("stop", "hung", check=0)
    sup.hvctl("stop", "fine", check=0)


def test_waits_nobody_listens_to_any_more_are_forgotten(sup, build_guest):
    """A deferred Wait lives only while its client listens: one whose hvctl.sock connection closed, or whose
    ZeroMQ client's timeout has passed, costs the supervisor nothing more (they once piled up until the guest
    ended: an fd each for the first kind)."""
    sup.hvctl("create", "g", "--kernel", guest(build_guest, LOOP), "--boot", "raw16", "--timeout", "120", "--start",
              check=0)

    def fds():
        return len(os.listdir(f"/proc/{sup.proc.pid}/fd"))
    before = fds()
    conns = []
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(os.path.join(sup.dir, "hvctl.sock"))
        s.send(codec.encode(m.Wait("g"), CONTROL))
        conns.append(s)
    wait_for(lambda: fds() >= before + 50)              # each Wait waits on its connection
    for s in conns:
        s.close()
    wait_for(lambda: fds() <= before + 2)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(sup.endpoint)
        for _ in range(20):
            dealer.send_multipart([b"", codec.encode(m.Wait("g", timeout=0.2), CONTROL)])
        time.sleep(3.0)                                  # past their timeout, and the grace after it
        listening = subprocess.Popen(HVCTL + ["wait", "g"], env={**os.environ, "HV_RUNTIME_DIR": sup.dir})
        time.sleep(0.5)
        sup.hvctl("stop", "g", check=0)
        assert listening.wait(30) == 143                 # a Wait still listened to is answered
        assert not dealer.poll(1000)                     # the abandoned ones were not
    finally:
        dealer.close()
