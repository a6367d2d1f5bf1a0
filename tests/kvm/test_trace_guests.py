"""--trace and hvctl trace on real guests: every exit counted, those the C loop answers included, on 1 to 64 vCPUs.

The guest (raw64, built here) has each vCPU write port 0x80 exactly
BASE + index times (the POST port: answered in C, never seen by Python),
read an unclaimed MMIO address three times, and meet the others at a
barrier; vCPU 0 then writes one byte to the debug page and two to COM1
(Python devices) and ends the VM through the exit port (C again), with
status 7.  So every count in the trace is known exactly; the other vCPUs'
only other exits are the kicks that end them (INTR).
"""
import json
import os
import signal
import subprocess

import pytest

from hv import HVCTL, hvctl, wait_for

GUEST = """
    mov ${base}, %ecx
    add %edi, %ecx              /* vCPU i: base + i writes to the POST port */
    mov $0x80, %dx
1:  out %al, %dx
    dec %ecx
    jnz 1b
    mov $0xD0000000, %rbx       /* three reads of an unclaimed address in the MMIO hole */
    mov $3, %ecx
2:  mov (%rbx), %eax
    dec %ecx
    jnz 2b
    lock incl done(%rip)
    test %edi, %edi
    jnz 9f
3:  mov done(%rip), %eax        /* vCPU 0 waits for everyone */
    cmp %esi, %eax
    jne 3b
    mov $0xFEBFF001, %rbx
    movb $'M', (%rbx)           /* debug page: console byte */
    mov $0x3f8, %dx
    mov $'T', %al
    out %al, %dx
    mov $'\\n', %al
    out %al, %dx
    mov $0x501, %dx
    mov $7, %al
    out %al, %dx
9:  pause
    jmp 9b
.balign 8
done: .long 0
"""


def traced_run(build_guest, tmp_path, vcpus, base, timeout=120):
    image = build_guest(GUEST.format(base=base))
    r = hvctl("run", "--boot", "raw64", "--kernel", image, "--vcpus", vcpus, "--timeout", timeout,
              "--trace", "exits.trace", cwd=tmp_path, timeout=timeout + 30)
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"MT\n"
    s = hvctl("trace", tmp_path / "exits.trace", "--json", text=True)
    assert s.returncode == 0, s.stderr
    return json.loads(s.stdout)


def check_exact(s, vcpus, base):
    posts = vcpus * base + vcpus * (vcpus - 1) // 2
    assert s["lost"] == 0 and not s["partial"]
    assert s["by_port"] == {"0x80": posts, "0x3f8": 2, "0x501": 1}
    assert s["by_address"] == {"0xd0000000": 3 * vcpus, "0xfebff001": 1}
    assert s["by_reason"]["IO"] == posts + 3
    assert s["by_reason"]["MMIO"] == 3 * vcpus + 1
    assert set(s["by_reason"]) <= {"IO", "MMIO", "INTR"}
    assert s["in_c"] == posts + 1                           # the POST writes and the exit port
    assert s["total"] == sum(s["by_reason"].values()) == sum(s["by_vcpu"].values())
    assert set(s["by_vcpu"]) == {str(i) for i in range(vcpus)}
    for i in range(vcpus):
        mine = s["per_vcpu"][str(i)]["by_reason"]
        assert mine["IO"] == base + i + (3 if i == 0 else 0)
        assert mine["MMIO"] == 3 + (1 if i == 0 else 0)
    ports = {p["port"]: p for p in s["ports"]}
    assert ports["0x80"]["writes"] == ports["0x80"]["in_c"] == posts
    assert ports["0x3f8"]["in_c"] == 0
    assert s["outcome"] == {"status": 7, "reason": "guest wrote 7 to the exit port"}


def test_a_trace_counts_every_one_of_200000_post_port_writes(build_guest, tmp_path):
    s = traced_run(build_guest, tmp_path, 1, 200_000)
    check_exact(s, 1, 200_000)
    assert s["by_port"]["0x80"] == 200_000
    human = hvctl("trace", tmp_path / "exits.trace", text=True)
    assert human.returncode == 0 and "200,000" in human.stdout and "none lost" in human.stdout


def test_a_trace_counts_every_exit_of_each_of_4_vcpus(build_guest, tmp_path):
    s = traced_run(build_guest, tmp_path, 4, 50_000)
    check_exact(s, 4, 50_000)


def test_a_trace_of_64_vcpus(build_guest, tmp_path):
    s = traced_run(build_guest, tmp_path, 64, 500, timeout=240)
    check_exact(s, 64, 500)


def test_a_trace_file_that_cannot_be_created_is_refused_before_the_guest_runs(build_guest, tmp_path):
    image = build_guest(GUEST.format(base=10))
    for bad in (tmp_path / "no" / "such" / "dir" / "t.trace", tmp_path):
        r = hvctl("run", "--boot", "raw64", "--kernel", image, "--trace", bad, "--timeout", 30, text=True)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "--trace" in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []


def test_a_supervised_guest_created_with_a_trace_writes_it(build_guest, tmp_path, sup):
    image = build_guest(GUEST.format(base=20_000))
    env = {"HV_RUNTIME_DIR": sup.dir}
    r = hvctl("create", "traced", "--boot", "raw64", "--kernel", image, "--vcpus", 2, "--timeout", 120,
              "--trace", "sup.trace", cwd=tmp_path, env=env, text=True)          # relative to the client's cwd
    assert r.returncode == 0, r.stderr
    assert sup.info("traced")["config"]["trace"] == str(tmp_path / "sup.trace")
    assert not (tmp_path / "sup.trace").exists()                                # created when it starts
    sup.hvctl("start", "traced", check=0)
    assert sup.hvctl("wait", "traced", "--timeout", 150, timeout=160).returncode == 7
    s = json.loads(hvctl("trace", tmp_path / "sup.trace", "--json", text=True).stdout)   # complete once wait returns
    check_exact(s, 2, 20_000)
    r = hvctl("create", "bad", "--boot", "raw64", "--kernel", image, "--trace", "/nonexistent/dir/t.trace",
              env=env, text=True)
    assert r.returncode == 2 and "--trace" in r.stderr and r.stderr.count("\n") == 1
    assert [g["name"] for g in json.loads(sup.hvctl("list", "--json", check=0).stdout)] == ["traced"]


LOOP = """
    mov $0x80, %dx
1:  out %al, %dx
    jmp 1b
"""


def test_a_stopped_guests_trace_is_complete_and_stats_show_it(build_guest, tmp_path, sup):
    image = build_guest(LOOP)
    path = tmp_path / "loop.trace"
    sup.hvctl("create", "loop", "--boot", "raw64", "--kernel", image, "--trace", path, "--start", check=0)
    stats = {}
    for _ in range(100):
        stats = json.loads(sup.hvctl("stats", "loop", "--json", check=0).stdout)
        if stats.get("trace", {}).get("records", 0) > 5000:
            break
    assert stats["trace"]["file"] == str(path) and stats["trace"]["dropped"] == 0
    assert f"trace {path}: " in sup.hvctl("stats", "loop", check=0).stdout
    assert sup.hvctl("stop", "loop").returncode == 0
    sup.hvctl("wait", "loop", "--timeout", 30)
    s = json.loads(hvctl("trace", path, "--json", text=True).stdout)
    assert s["lost"] == 0 and s["by_port"]["0x80"] >= stats["trace"]["records"] - 10
    assert s["outcome"]["status"] == 143
    assert set(s["by_reason"]) <= {"IO", "INTR"}


def test_ctrl_c_on_hvctl_run_still_leaves_a_whole_trace(build_guest, tmp_path):
    image = build_guest(LOOP)
    path = tmp_path / "int.trace"
    p = subprocess.Popen(HVCTL + ["run", "--boot", "raw64", "--kernel", str(image), "--trace", str(path),
                                  "--timeout", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        wait_for(lambda: path.exists() and path.stat().st_size > 200_000, timeout=30)   # a few chunks written
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
    finally:
        p.kill()
        p.wait()
    s = json.loads(hvctl("trace", path, "--json", text=True).stdout)
    assert s["lost"] == 0 and s["by_port"]["0x80"] > 5000
    assert s["outcome"] == {"status": 130, "reason": "hvctl was interrupted"}


def test_tracing_off_records_nothing(build_guest, tmp_path):
    image = build_guest(GUEST.format(base=100))
    r = hvctl("run", "--boot", "raw64", "--kernel", image, "--stats-json", tmp_path / "s.json", "--timeout", 30)
    assert r.returncode == 7
    assert "trace" not in json.loads((tmp_path / "s.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["s.json"]


def test_hvctl_trace_plot_of_a_real_trace(build_guest, tmp_path):
    pytest.importorskip("matplotlib")          # without it: tests/unit/test_trace.py hides it and checks the hint
    s = traced_run(build_guest, tmp_path, 2, 2000)
    check_exact(s, 2, 2000)
    r = hvctl("trace", tmp_path / "exits.trace", "--plot", tmp_path / "t.png", text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
