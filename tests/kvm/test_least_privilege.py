"""Least privilege per role with real guests (proto/sandbox.py): while guests with every device kind run, every
process of every role shows NoNewPrivs 1 and Seccomp 2, services, switches and plugins hold no capability, and
each holds only the fds it was given; a forbidden system call made by any role (driven from outside with gdb,
as an exploited bug would make it) kills that process alone with SIGSYS, and its death is reported as such.
"""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from hv import GUESTS, REPO, Supervisor, wait_for
from pyhv.proto import sandbox

SPIN = r'long guest_main(long i, long n, long khz) { for (;;) __asm__ volatile("pause"); return 0; }'
POKE = r"""long guest_main(long i, long n, long khz) {          /* reads the plugin's port 0x300 now and then */
    for (;;) {
        unsigned char v;
        __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"((unsigned short)0x300));
        for (int k = 0; k < 100000; k++) __asm__ volatile("pause");
    }
    return 0;
}"""
SUPPORT = GUESTS.parent
PLUGIN = f"{SUPPORT / 'testplugins.py'}:Scratch"
VIRTIO_PLUGIN = f"{REPO / 'examples' / 'plugins' / 'seeded_rng.py'}:SeededRng,seed=1"
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb (setup.sh installs it)")


@pytest.fixture
def fleet(build_c_guest, tmp_path):
    """A supervisor, guest "all" with every device kind (blk, net on a switch, rng, vconsole, a port plugin, a
    virtio plugin) and guest "other" with a disk and a NIC of its own on the same switch; both running."""
    spin, poke = build_c_guest(SPIN), build_c_guest(POKE)
    sup = Supervisor()
    try:
        for name in ("all", "other"):
            disk = tmp_path / f"{name}.img"
            disk.write_bytes(bytes(1 << 20))
            extra = ("--rng", "--vconsole", "--device", PLUGIN, "--device", VIRTIO_PLUGIN) if name == "all" else ()
            sup.hvctl("create", name, "--kernel", poke if name == "all" else spin, "--boot", "raw64", "--disk", disk, "--net", "switch:lp",
                      *extra, "--start", check=0)
        wait_for(lambda: all(d.get("state") == "running" for d in sup.info("all")["devices"].values()), 30)
        yield sup
    finally:
        sup.stop()
        shutil.rmtree(sup.dir, ignore_errors=True)


def pids_by_role(sup):
    """{label: pid} of every process of guest "all" plus the supervisor and the zygote."""
    info = sup.info("all")
    out = {"supervisor": sup.proc.pid, "worker": info["pids"]["worker"]}
    for label, pid in info["pids"].items():
        if label.startswith(("device:", "switch:")):
            out[label] = pid
    wait_for(lambda: zygote_pid(sup) is not None, 20)
    out["zygote"] = zygote_pid(sup)
    return out


def zygote_pid(sup):
    import json
    r = sup.hvctl("stats", "all", "--json")
    return json.loads(r.stdout)["host"].get("zygote", {}).get("pid") if r.returncode == 0 else None


def role_of(label, info):
    if label.startswith("switch:"):
        return "switch"
    if label.startswith("device:"):
        return "plugin" if info["devices"][label[len("device:"):]].get("kind", "") == "plugin" or \
            "plugin" in label else "service"
    return label


def test_every_role_runs_with_no_new_privs_a_seccomp_filter_and_only_its_own_fds(fleet):
    info = fleet.info("all")
    pids = pids_by_role(fleet)
    kinds = {role_of(label, info) for label in pids}
    assert kinds == {"supervisor", "zygote", "worker", "service", "switch", "plugin"}, pids
    assert len([label for label in pids if label.startswith("device:")]) == 6, pids     # 4 services, 2 plugins
    other_ram = "guest-ram-other"
    for label, pid in pids.items():
        st = sandbox.proc_status(pid)
        assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2"), (label, st)
        role = role_of(label, info)
        if role in sandbox.NO_CAPS and os.geteuid() == 0:
            assert int(st["CapEff"], 16) == int(st["CapBnd"], 16) == int(st["CapPrm"], 16) == 0, (label, st)
        targets = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                targets[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
        text = " ".join(targets.values())
        if role != "supervisor":                # the registry, the locks, the other guests are the supervisor's
            assert "supervisor.lock" not in text and other_ram not in text and "/other/" not in text, (label, text)
            assert "control.sock" not in text, (label, text)
        if role in ("service", "switch", "plugin"):
            assert "/dev/kvm" not in text and "kvm-vm" not in text and "kvm-vcpu" not in text, (label, text)
        if role == "switch":
            assert "guest-ram" not in text, (label, text)
        if role == "zygote":                    # no VM, no guest RAM: workers get theirs after the fork
            assert "kvm" not in text and "guest-ram" not in text, (label, text)
    stats = __import__("json").loads(fleet.hvctl("stats", "all", "--json", check=0).stdout)
    assert stats["sandbox"]["role"] == "worker" and stats["sandbox"]["mode"] == "enforce"
    assert all(p["seccomp"] == 2 and p["no_new_privs"] == 1 for p in stats["host"].values()), stats["host"]
    for name in ("all", "other"):              # their ends, every process's shutdown path, stay inside the lists
        fleet.hvctl("stop", name, check=0)
        assert fleet.info(name)["state"] == "stopped", fleet.info(name)
    time.sleep(1)
    logs = open(os.path.join(fleet.dir, "test-supervisor.log")).read() + "".join(
        open(os.path.join(fleet.dir, "guests", n, "worker.log")).read() for n in ("all", "other"))
    assert "SIGSYS" not in logs, logs


def forbidden_call(pid):
    """Make process `pid` call ptrace(2), which no role's list holds, from its main thread (gdb's `call`)."""
    nr = sandbox.syscall_number("ptrace")
    r = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx", "-ex", f"call (long)syscall({nr}, 0, 0, 0, 0)"],
                       capture_output=True, text=True, timeout=180)
    return r.stdout + r.stderr


def died_of_sigsys(pid, timeout=30):
    """Wait until `pid` is gone (or a zombie)."""
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0]
             == "Z", timeout)


@needs_gdb
def test_a_forbidden_call_kills_only_that_process_and_its_death_is_reported(fleet):
    sup = fleet
    log = os.path.join(sup.dir, "test-supervisor.log")
    info = sup.info("all")
    devices = info["devices"]
    blk = next(n for n, d in devices.items() if n.startswith("virtio-blk"))
    plugin = next(n for n in devices if n.startswith("plugin") and devices[n].get("pid"))
    assert "virtio" not in plugin, devices         # the port plugin (the virtio one is a device service)

    # a device service: killed, named, restarted; the guest runs on
    pid = devices[blk]["pid"]
    forbidden_call(pid)
    died_of_sigsys(pid)
    wait_for(lambda: sup.info("all")["devices"][blk].get("restarts") == 1, 30)
    d = sup.info("all")["devices"][blk]
    assert sandbox.SIGSYS_TEXT in d["reason"] and d["state"] == "running", d
    wait_for(lambda: f"device service pid {pid} of guest all {sandbox.SIGSYS_TEXT}" in open(log).read(), 10)

    # a plugin process: it fails alone, for good (docs/plugins.md), and says why
    pid = devices[plugin]["pid"]
    forbidden_call(pid)
    died_of_sigsys(pid)
    wait_for(lambda: sandbox.SIGSYS_TEXT in (sup.info("all")["devices"][plugin].get("reason") or ""), 30)

    # the switch: restarted by the supervisor, its last exit named
    pid = devices["switch:lp"]["pid"]
    forbidden_call(pid)
    died_of_sigsys(pid)
    wait_for(lambda: sup.info("all")["devices"]["switch:lp"].get("restarts") == 1, 30)
    assert sup.info("all")["devices"]["switch:lp"]["last_exit"] == sandbox.SIGSYS_TEXT

    # the zygote: dropped and named in the supervisor's log; the guests do not notice
    pid = zygote_pid(sup)
    forbidden_call(pid)
    died_of_sigsys(pid)
    wait_for(lambda: f"zygote pid {pid}: " in open(log).read() and f"({sandbox.SIGSYS_TEXT})" in open(log).read(), 10)

    # a worker: its guest alone fails, with the reason
    pid = info["pids"]["worker"]
    forbidden_call(pid)
    wait_for(lambda: sup.info("all")["state"] == "failed", 30)
    failed = sup.info("all")
    assert failed["exit_status"] == 70 and f"worker {sandbox.SIGSYS_TEXT}" in failed["reason"], failed

    other = sup.info("other")
    assert other["state"] == "running" and all(d.get("restarts", 0) == 0 for n, d in other["devices"].items()
                                               if not n.startswith("switch:")), other      # (the switch is shared)

    # the supervisor: it dies of SIGSYS, the guest runs on, the next supervisor adopts it
    forbidden_call(sup.proc.pid)
    assert sup.proc.wait(30) == -signal.SIGSYS
    worker = other["pids"]["worker"]
    time.sleep(0.5)
    assert os.path.exists(f"/proc/{worker}")
    sup.log.close()
    nxt = Supervisor(rundir=sup.dir)
    try:
        assert nxt.info("other")["state"] == "running" and nxt.info("other")["pids"]["worker"] == worker
        nxt.hvctl("stop", "other", check=0)
        ended = nxt.info("other")
        assert ended["state"] == "stopped" and ended["exit_status"] == 0 or "stopped" in ended["reason"], ended
    finally:
        nxt.stop()
    sup.log = open(os.devnull, "ab")       # the fixture's stop() closes it again
