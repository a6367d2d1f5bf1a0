"""Guests outlive their supervisor: kill -9 it (or stop it with --leave-guests) and the next supervisor on the same
runtime dir adopts the workers, device services and switches it finds running (docs/architecture.md, "Process
lifetimes").  Every guest here has a --timeout; every wait a bound.
"""
import json
import os
import shutil
import signal
import socket
import subprocess

import psutil

from hv import GUESTS, HVCTL, Supervisor, needs_kvm, wait_for
from pyhv.proto import codec, control as m
from pyhv.proto.control import CONTROL
from pyhv.proto.messages import Error

pytestmark = needs_kvm

# two of these on one switch broadcast HELLO every 300 ms and print "got HELLO from MAC" for each other's
CHATTER = (GUESTS / "virtio_net_driver.c").read_text()
MACS = {"n1": "52:54:00:00:ad:01", "n2": "52:54:00:00:ad:02"}
# raw16: prints ">", echoes COM1 input, exits 7 on "q"
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
LOOP = "1: jmp 1b\n"


def heard(sup, name):
    """How many HELLOs from the other guest `name` has printed so far."""
    with open(os.path.join(sup.dir, "guests", name, "console.log"), "rb") as f:
        return f.read().count(b"got HELLO from ")


def text(path):
    with open(path) as f:
        return f.read()


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def switch_processes(rundir, name):
    """Pids of the processes serving switch NAME of `rundir`."""
    lock = os.path.join(rundir, f"switch-{name}.lock")
    out = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if "pyhv.devices.net.switch" in argv and lock in argv and running(p.pid):
            out.append(p.pid)
    return out


def kill9(sup):
    sup.proc.send_signal(signal.SIGKILL)
    sup.proc.wait(10)
    sup.log.close()


def total_exits(stats):
    return sum(sum(v["exits"].values()) for v in stats["vcpus"])


def test_guests_run_on_when_the_supervisor_is_killed_and_the_next_one_adopts_them(build_c_guest, build_guest,
                                                                                  tmp_path):
    chatter = build_c_guest(CHATTER, cflags=("-DCHATTER",))
    echo = build_guest(ECHO, "raw16")
    tmp = tmp_path / "tmp"                         # TMPDIR of every process: nothing may be left there
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    sup = Supervisor(env=env)
    sup2 = follow = None
    try:
        for name, mac in MACS.items():
            sup.hvctl("create", name, "--kernel", chatter, "--boot", "raw64", "--timeout", 600,
                      "--net", f"switch:lab,mac={mac}", "--start", check=0)
        for name in ("c", "e"):
            sup.hvctl("create", name, "--kernel", echo, "--boot", "raw16", "--timeout", 600, "--start", check=0)
        wait_for(lambda: heard(sup, "n1") and heard(sup, "n2"), 120)
        before = {name: sup.info(name) for name in ("n1", "n2", "c", "e")}
        workers = {name: i["pids"]["worker"] for name, i in before.items()}
        services = {name: before[name]["pids"]["device:virtio-net0"] for name in MACS}
        (switch,) = switch_processes(sup.dir, "lab")
        assert before["n1"]["pids"]["switch:lab"] == switch
        follow = subprocess.Popen(HVCTL + ["logs", "--follow", "n2"], stdout=subprocess.PIPE,
                                  env={**os.environ, "HV_RUNTIME_DIR": sup.dir})

        kill9(sup)
        # Nobody supervises now: every worker, device service and the switch runs on, and frames still flow.
        assert all(running(pid) for pid in [*workers.values(), *services.values(), switch])
        counts = {name: heard(sup, name) for name in MACS}
        wait_for(lambda: all(heard(sup, n) >= counts[n] + 3 for n in MACS), 60)
        # A device service that dies now waits for the next supervisor to be restarted...
        os.kill(services["n1"], signal.SIGKILL)
        # ...and a guest that ends now keeps its own status.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(before["e"]["console_sock"])
            s.sendall(b"q")
        result = os.path.join(sup.dir, "guests", "e", "result.json")
        wait_for(lambda: os.path.exists(result), 30)
        with open(result) as f:
            own = json.load(f)
        assert own["status"] == 7

        sup2 = Supervisor(sup.dir, env=env)
        guests = {g["name"]: g for g in json.loads(sup2.hvctl("list", "--json", check=0).stdout)}
        for name in ("n1", "n2", "c"):
            assert guests[name]["state"] == "running" and guests[name]["pids"] == {"worker": workers[name]}
        assert (guests["e"]["state"], guests["e"]["exit_status"], guests["e"]["reason"]) == ("stopped", 7, own["reason"])

        # the NIC service killed while nobody supervised is restarted by the new supervisor
        wait_for(lambda: sup2.info("n1")["devices"]["virtio-net0"]["restarts"] == 1, 60)
        n1 = sup2.info("n1")
        assert n1["devices"]["virtio-net0"]["state"] == "running"
        assert n1["pids"]["device:virtio-net0"] not in (services["n1"], None)
        assert sup2.info("n2")["pids"]["device:virtio-net0"] == services["n2"]
        # the switch is adopted, not started twice, and frames flow through it (and the new service)
        assert switch_processes(sup.dir, "lab") == [switch]
        assert n1["pids"]["switch:lab"] == switch and n1["devices"]["switch:lab"]["restarts"] == 0
        counts = {name: heard(sup, name) for name in MACS}
        wait_for(lambda: all(heard(sup, n) >= counts[n] + 3 for n in MACS), 60)
        assert switch_processes(sup.dir, "lab") == [switch]

        # stats, pause/resume, logs, console, stop and wait all reach the adopted workers
        first = json.loads(sup2.hvctl("stats", "n2", "--json", check=0).stdout)
        assert first["host"]["worker"]["pid"] == workers["n2"]
        assert first["host"]["switch:lab"]["pid"] == switch
        wait_for(lambda: total_exits(json.loads(sup2.hvctl("stats", "n2", "--json", check=0).stdout))
                 > total_exits(first), 30)
        sup2.hvctl("pause", "n2", check=0)
        assert sup2.info("n2")["state"] == "paused"
        sup2.hvctl("resume", "n2", check=0)
        assert f"got HELLO from {MACS['n2']}" in sup2.hvctl("logs", "n1", check=0).stdout
        r = subprocess.run(HVCTL + ["console", "c"], input=b"zq", capture_output=True, timeout=30,
                           env={**os.environ, "HV_RUNTIME_DIR": sup.dir})
        assert r.returncode == 0, r
        sup2.hvctl("wait", "c", "--timeout", 30, check=7)
        assert sup2.hvctl("logs", "c", check=0).stdout == ">zq"
        sup2.hvctl("stop", "n1", check=0)
        sup2.hvctl("wait", "n1", "--timeout", 30, check=143)
        assert not running(workers["n1"])
        wait_for(lambda: not running(n1["pids"]["device:virtio-net0"]), 10)

        # `logs --follow`, started under the first supervisor, followed n2 through the gap until it ended
        sup2.hvctl("stop", "n2", check=0)
        out, _ = follow.communicate(timeout=30)
        assert follow.returncode == 0 and out.count(b"got HELLO from ") == heard(sup, "n2")
        sup2.hvctl("destroy", "--all", "--force", check=0)
        sup2.hvctl("supervisor", "--stop", check=0)
        sup2.proc.wait(15)
        for pid in [*workers.values(), *services.values(), switch, n1["pids"]["device:virtio-net0"]]:
            wait_for(lambda: not running(pid), 10)
        assert switch_processes(sup.dir, "lab") == []
        assert os.listdir(tmp) == []
    finally:
        if follow is not None and follow.poll() is None:
            follow.kill()
            follow.wait()
        if sup2 is not None:
            sup2.stop()
        else:
            sup.stop()
        subprocess.run(HVCTL + ["supervisor", "--stop", "--force"], env={**os.environ, "HV_RUNTIME_DIR": sup.dir},
                       capture_output=True, timeout=60)
        for pid in switch_processes(sup.dir, "lab"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(sup.dir, ignore_errors=True)


def test_supervisor_stop_leaves_guests_running_only_when_asked(build_guest):
    image = build_guest(LOOP, "raw16")
    sup = Supervisor()
    try:
        sup.hvctl("create", "g", "--kernel", image, "--boot", "raw16", "--rng", "--timeout", 300, "--start", check=0)
        info = sup.info("g")
        worker, service = info["pids"]["worker"], info["pids"]["device:virtio-rng"]
        r = sup.hvctl("supervisor", "--stop", check=1)
        assert "still running (g)" in r.stderr and "--leave-guests" in r.stderr and len(r.stderr.splitlines()) == 1
        for bad in (["--stop", "--force", "--leave-guests"], ["--leave-guests"]):
            r = sup.hvctl("supervisor", *bad, check=2)
            assert len(r.stderr.splitlines()) == 1
        assert sup.proc.poll() is None and sup.info("g")["state"] == "running"

        waiter = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)      # a Wait, deferred before the stop
        waiter.connect(os.path.join(sup.dir, "hvctl.sock"))
        waiter.send(codec.encode(m.Wait("g"), CONTROL))
        r = sup.hvctl("supervisor", "--stop", "--leave-guests", check=0)
        assert "1 guest(s) left running" in r.stdout
        assert sup.proc.wait(15) == 0
        sup.log.close()
        waiter.settimeout(30)
        reply = codec.decode(waiter.recv(65536), CONTROL)
        waiter.close()
        assert isinstance(reply, Error) and "left guest g running" in reply.message, reply
        assert running(worker) and running(service)
        assert not os.path.exists(os.path.join(sup.dir, "control.sock"))

        sup = Supervisor(sup.dir)
        info = sup.info("g")
        assert info["state"] == "running" and info["pids"]["worker"] == worker
        assert info["pids"]["device:virtio-rng"] == service
        r = sup.hvctl("supervisor", "--stop", "--force", check=0)
        assert "stopped with 1 guest(s)" in r.stdout
        sup.proc.wait(15)
        sup.log.close()
        wait_for(lambda: not running(worker) and not running(service), 10)

        sup = Supervisor(sup.dir)
        info = sup.info("g")
        assert (info["state"], info["exit_status"], info["pids"]) == ("stopped", 143, {})
    finally:
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


def test_a_recorded_pid_that_now_names_another_process_is_not_adopted(build_guest):
    image = build_guest(LOOP, "raw16")
    sup = Supervisor()
    other = subprocess.Popen(["sleep", "300"])
    try:
        sup.hvctl("create", "g", "--kernel", image, "--boot", "raw16", "--timeout", 300, "--start", check=0)
        worker = sup.info("g")["pids"]["worker"]
        kill9(sup)
        os.kill(worker, signal.SIGKILL)                 # it ends without a result while nobody supervises
        wait_for(lambda: not running(worker), 10)
        record = os.path.join(sup.dir, "guests", "g", "guest.json")
        with open(record) as f:
            saved = json.load(f)
        assert saved["state"] == "running" and saved["worker"]["pid"] == worker
        saved["worker"]["pid"] = other.pid              # as if the pid had been reused since
        with open(record, "w") as f:
            json.dump(saved, f)

        sup = Supervisor(sup.dir)
        info = sup.info("g")
        assert (info["state"], info["exit_status"], info["pids"]) == ("failed", 70, {})
        assert "ended while no supervisor was running" in info["reason"]
        sup.hvctl("destroy", "g", check=0)
        sup.hvctl("supervisor", "--stop", check=0)
        sup.proc.wait(15)
        assert other.poll() is None                     # neither adopted nor killed
    finally:
        other.kill()
        other.wait()
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


def test_an_adopted_guest_can_be_snapshotted_and_migrated_with_its_ram(build_c_guest, tmp_path):
    """The adopting supervisor reopens the worker's RAM memfd (/proc/PID/fd), so a migration hands the very RAM
    on: the counting guest (support/guests/count.c) prints every number once across both supervisors."""
    counter = build_c_guest((GUESTS / "count.c").read_text())
    a, b = Supervisor(), Supervisor()
    try:
        a.hvctl("create", "c", "--boot", "raw64", "--kernel", counter, "--vcpus", "2", "--timeout", "120", "--start",
                check=0)
        log = os.path.join(a.dir, "guests", "c", "console.log")
        wait_for(lambda: text(log).count("\n") >= 20, 30)
        a.hvctl("pause", "c", check=0)                  # held from here: nothing depends on timing
        kill9(a)
        a = Supervisor(a.dir)
        assert a.info("c")["state"] == "paused"
        a.hvctl("snapshot", "c", tmp_path / "snap", check=0)
        assert a.info("c")["state"] == "paused"
        a.hvctl("migrate", "c", "--to", b.dir, check=0)
        assert a.info("c")["reason"] == f"migrated to {b.dir}"
        assert b.info("c")["state"] == "paused"
        b.hvctl("resume", "c", check=0)
        assert b.hvctl("wait", "c", "--timeout", 60, timeout=90).returncode == 0
        assert text(log) + text(os.path.join(b.dir, "guests", "c", "console.log")) == "".join(
            f"{n}\n" for n in range(401))
    finally:
        for s in (a, b):
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)
