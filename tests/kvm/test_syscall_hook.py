"""The SYSCALL hook (compat profile `nested`): user space of an unmodified kernel makes system calls where SYSCALL stays in ring 3.

support/guests/syscall_kernel.S is a small kernel that sets up its IDT,
page tables and STAR/LSTAR/FMASK the way Linux does, nothing of ours, and
runs user space that checks itself on every vCPU (its exit status names the
first check that failed; 77 means a system call reached the kernel's own
#PF handler, i.e. the hook missed it).  On a host whose SYSCALL works the
same guest passes without the hook.
"""
import json
import os
import pathlib

import pytest

from hv import GUESTS, Supervisor, hvctl, wait_for

from pyhv.vcpu_worker import syscall_hook
from pyhv.vcpu_worker._kvm import lib
from pyhv.vcpu_worker.kvm import Kvm

ROUNDS = 200
CALLS_PER_CPU = ROUNDS + 44          # what CPU 0 reports: ROUNDS plus the checks' own calls


@pytest.fixture(scope="module")
def hook_needed():
    kvm = Kvm()
    try:
        return syscall_hook.needed(syscall_hook.host_facts(kvm))
    finally:
        kvm.close()


def kernel(build_guest, **defines):
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return build_guest(head + (GUESTS / "syscall_kernel.S").read_text(), "raw64")


def run(path, tmp_path, *options, vcpus=2):
    stats = tmp_path / "stats.json"
    r = hvctl("run", "--boot", "raw64", "--kernel", path, "--vcpus", vcpus, "--timeout", 60,
              "--stats-json", stats, *options, timeout=90, text=True)
    return r, json.loads(stats.read_text()) if stats.exists() else {}


def test_the_probe_tells_what_this_host_does_with_syscall():
    kvm = Kvm()
    try:
        facts = syscall_hook.probe(kvm)
    finally:
        kvm.close()
    if pathlib.Path("/sys/module/kvm_pvm").exists():
        assert facts["syscall_leaves_ring3"] is False and facts["breakpoint_fires"] is True, facts
    else:
        assert facts["syscall_leaves_ring3"] is True, facts


@pytest.mark.parametrize("first, vcpus, defines", [
    ("endbr64", 4, {}),                               # IBT kernels' entries
    ("nopl (%rax)", 2, {}),                           # ASM_CLAC patched to a NOP
    ("cld", 2, {}),
    ("push %rax; pop %rax", 2, {}),                   # nothing the C loop skips: single-stepped
    ("endbr64", 4, {"KPTI": 1}),                      # user space on its own page tables
], ids=["endbr64-4cpus", "nopl", "cld", "single-step", "kpti-4cpus"])
def test_an_unmodified_kernel_s_user_space_makes_system_calls(build_guest, tmp_path, hook_needed, first, vcpus,
                                                              defines):
    r, stats = run(kernel(build_guest, PF_FIRST=first, ROUNDS=ROUNDS, **defines), tmp_path, vcpus=vcpus)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"syscall-kernel: ok {vcpus} {CALLS_PER_CPU}\n" in r.stdout
    hook = stats["syscall_hook"]
    if not hook_needed:
        assert hook is None
        return
    per = hook["vcpus"]
    assert len(per) == vcpus and all(v["armed"] for v in per)
    assert all(v["msr_writes"] == 4 for v in per)              # STAR, LSTAR, FMASK, then LSTAR again
    assert hook["syscalls"] >= vcpus * ROUNDS + CALLS_PER_CPU - ROUNDS
    assert hook["faults"] >= 1 and hook["rearms"] >= 1          # a lazy page; the rewritten #PF gate
    assert (hook["steps"] > 0) == first.startswith("push")
    exits = [v["exits"] for v in stats["vcpus"]]
    assert all(e.get("DEBUG", 0) >= ROUNDS for e in exits)
    assert "EMULATION_FIXUP" not in str(exits)


def test_the_exits_the_hook_answers_in_c_are_traced_like_other_c_exits(build_guest, tmp_path, hook_needed):
    """--trace records every KVM_RUN return: the hook's breakpoint exits too, flagged as answered in C."""
    if not hook_needed:
        pytest.skip("this host's SYSCALL leaves ring 3: no hook, no breakpoint exits")
    from pyhv.proto import trace
    trace_path = tmp_path / "exits.trace"
    r, stats = run(kernel(build_guest, ROUNDS=ROUNDS), tmp_path, "--trace", trace_path, vcpus=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    hook = stats["syscall_hook"]
    t = trace.read(trace_path)
    debug = [(flags, addr) for v in range(t.vcpus) for _, addr, _, _, reason, _, flags, _, _ in t.iter_records(v)
             if reason == lib.KVM_EXIT_DEBUG]
    assert len(debug) == sum(v["exits"].get("DEBUG", 0) for v in stats["vcpus"])
    in_c = [addr for flags, addr in debug if flags & lib.HV_TRACE_IN_C]
    assert len(in_c) == hook["syscalls"] + hook["faults"] >= 2 * ROUNDS
    # at the #PF entry: the first one, then the one the guest rewrites its gate to (the hook re-arms)
    assert {v["handler"] for v in hook["vcpus"]} <= {f"0x{a:x}" for a in in_c} and len(set(in_c)) == 2


def test_without_the_hook_the_first_system_call_is_lost(build_guest, tmp_path, hook_needed):
    if not hook_needed:
        pytest.skip("this host's SYSCALL leaves ring 3: nothing is lost without the hook")
    r, stats = run(kernel(build_guest), tmp_path, "--compat", "none", vcpus=1)
    assert r.returncode == 77, r.stdout[-2000:] + r.stderr[-2000:]
    assert stats["syscall_hook"] is None


@pytest.fixture
def sup():
    s = Supervisor()
    yield s
    s.stop()


def console(sup, name):
    with open(os.path.join(sup.dir, "guests", name, "console.log")) as f:
        return f.read()


def test_a_restored_or_migrated_guest_is_armed_again(build_guest, tmp_path, sup, hook_needed):
    """KVM keeps no guest-debug state in a snapshot: a restore (and a migration) must arm from the guest's state."""
    ticks = 40                                            # of 500 calls each: seconds of guest time
    path = kernel(build_guest, ROUNDS=500, TICKS=ticks)
    sup.hvctl("create", "src", "--boot", "raw64", "--kernel", path, "--vcpus", 2, "--timeout", 120, "--start",
              check=0)
    wait_for(lambda: "tick 2\n" in console(sup, "src"), timeout=60)
    info = sup.hvctl("info", "src", check=0).stdout
    assert "syscall_hook:" in info and (("syscall_hook: on:" in info) == hook_needed), info
    snap = tmp_path / "snap"
    sup.hvctl("snapshot", "src", snap, "--stop", check=0)
    sup.hvctl("restore", snap, "--name", "copy", check=0)
    other = Supervisor()
    try:
        wait_for(lambda: "tick" in console(sup, "copy"), timeout=60)       # it runs, and makes calls
        assert sup.hvctl("migrate", "copy", "--to", other.dir, check=0).returncode == 0
        assert other.hvctl("wait", "copy", timeout=120).returncode == 0
        text = console(sup, "src") + console(sup, "copy") + console(other, "copy")
    finally:
        other.stop()
    assert [int(line[5:]) for line in text.splitlines() if line.startswith("tick ")] == list(range(1, ticks + 1))
    assert "syscall-kernel: ok 2 " in text, text[-2000:]


DB_GUEST = r"""
    lea stack_top(%rip), %rsp
    lea db_handler(%rip), %rax              /* IDT gate 1: the guest's own #DB handler */
    lea idt(%rip), %rdi
    mov %ax, 16(%rdi)
    movw $0x10, 18(%rdi)
    movw $0x8e00, 20(%rdi)
    shr $16, %rax
    mov %ax, 22(%rdi)
    shr $16, %rax
    mov %eax, 24(%rdi)
    mov %rdi, idtr+2(%rip)
    lidt idtr(%rip)
    mov $0xe9, %dx                          /* the test's device: a debug exit nobody asked for */
    out %al, %dx
    mov $2, %al                             /* not reached: the #DB comes first */
    mov $0x501, %dx
    out %al, %dx
1:  jmp 1b
db_handler:
    mov %dr6, %rax                          /* DR6 as the guest sees it: its low byte and BS */
    mov %eax, %ebx
    and $0x400f, %ebx
    mov $0x3f8, %dx
    mov $'D', %al
    out %al, %dx
    mov %ebx, %eax
    shr $12, %eax
    add $'0', %al
    out %al, %dx
    mov %ebx, %eax
    and $0xf, %eax
    add $'0', %al
    out %al, %dx
    mov $0x501, %dx
    mov $0, %al
    out %al, %dx
2:  jmp 2b
    .balign 8
idtr: .word 16 * 2 - 1
      .quad 0
    .balign 16
idt: .fill 32, 1, 0
    .fill 1024, 1, 0
stack_top:
"""


def test_a_debug_exit_nothing_of_ours_explains_reaches_the_guest_as_its_own_db(build_guest):
    """GuestDebug.deliver_to_guest: DR6 set as the CPU would, #DB injected (here from a device the guest writes)."""
    from pyhv.devices.guest_memory import create_memfd
    from pyhv.proto.guest import GuestConfig
    from pyhv.vcpu_worker.machine import Machine

    class Device:
        def write(self, offset, data):
            machine.guest_debug[0].deliver_to_guest(0xFFFF0FF0 | 1 << 14 | 1 << 2)    # BS and B2: no slot of ours

        def read(self, offset, size):
            return b"\xff" * size

    out = bytearray()
    cfg = GuestConfig(name="db", kernel=str(build_guest(DB_GUEST, "raw64")), boot="raw64", mem_bytes=32 << 20,
                      timeout=30)
    machine = Machine(cfg, create_memfd(32 << 20), out.extend, in_process=True)
    machine.pio.register(0xE9, 1, Device(), "test")
    machine.start()
    outcome = machine.wait(30)
    machine.stop()
    machine.join()
    assert outcome is not None and outcome.status == 0, (outcome, out)
    assert out == b"D44"                        # BS (bit 14 -> 4 after >> 12) and B2 (4)
    assert machine.guest_debug[0].delivered == 1

