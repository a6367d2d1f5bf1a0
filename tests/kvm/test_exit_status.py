"""How a guest ends decides `hvctl run`'s exit status (interface.md's table), and unclaimed accesses are harmless."""
import subprocess
import time

from conftest import HVCTL

SPIN = "1: jmp 1b\n"


def test_guest_that_never_exits_is_stopped_by_timeout_with_124(build_guest, run_guest):
    start = time.monotonic()
    r = run_guest(build_guest(SPIN, "raw64"), "--boot", "raw64", "--timeout", "1", timeout=30)
    assert r.returncode == 124
    assert time.monotonic() - start < 25


def test_halted_guest_is_stopped_by_timeout(build_guest, run_guest):
    # With an in-kernel irqchip, hlt sleeps in the kernel: only the timeout ends it.
    r = run_guest(build_guest("cli\nhlt\n" + SPIN, "raw64"), "--boot", "raw64", "--timeout", "1", timeout=30)
    assert r.returncode == 124


def test_triple_fault_is_a_reset_with_status_0(build_guest, run_guest):
    # Empty IDT: any exception escalates to a triple fault.
    r = run_guest(build_guest("ud2\n" + SPIN, "raw64"), "--boot", "raw64", "--timeout", "20", timeout=30)
    assert r.returncode == 0


def test_i8042_reset_command_ends_with_status_0(build_guest, run_guest):
    src = r"""
    mov $'r', %al
    mov $0x3f8, %dx
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
1:  jmp 1b
"""
    r = run_guest(build_guest(src, "raw64"), "--boot", "raw64", "--timeout", "20", timeout=30)
    assert (r.stdout, r.returncode) == (b"r", 0)


def test_debug_page_exit_works_from_ring0_too(build_guest, run_guest):
    src = r"""
    mov $0xFEBFF000, %rbx
    movb $'d', 1(%rbx)
    movb $17, (%rbx)
1:  jmp 1b
"""
    r = run_guest(build_guest(src, "raw64"), "--boot", "raw64", timeout=30)
    assert (r.stdout, r.returncode) == (b"d", 17)


def test_unclaimed_port_and_mmio_reads_return_all_ones(build_guest, run_guest):
    src = r"""
    mov $0x1234, %dx
    in %dx, %al             /* no device: 0xff */
    mov %al, %bl
    mov $0xD0000000, %rsi   /* in the MMIO hole, no device */
    movl $0x12345678, (%rsi) /* unclaimed write: ignored */
    mov (%rsi), %eax        /* 0xffffffff */
    and %ebx, %eax          /* 0xff only if both were all-ones */
    mov $0x501, %dx
    out %al, %dx
1:  jmp 1b
"""
    r = run_guest(build_guest(src, "raw64"), "--boot", "raw64", timeout=30)
    assert r.returncode == 0xFF


def test_vm_failure_is_70_with_a_one_line_reason(build_guest, run_guest):
    # Jumping into the MMIO hole: KVM cannot fetch instructions from unbacked memory.
    src = "mov $0xD0000000, %rax\njmp *%rax\n"
    r = run_guest(build_guest(src, "raw64"), "--boot", "raw64", "--timeout", "20", timeout=30)
    assert r.returncode == 70
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1
    assert "rip=0x" in err and "Traceback" not in err


def test_stdin_reaches_the_guest_com1(build_guest):
    # Echo COM1 input back, upper-cased, until newline.
    src = r"""
1:  mov $0x3fd, %dx     /* LSR */
    in %dx, %al
    test $1, %al        /* data ready */
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'\n', %al
    je 2f
    sub $32, %al
    out %al, %dx
    jmp 1b
2:  mov $0x501, %dx
    mov $5, %al
    out %al, %dx
3:  jmp 3b
"""
    img = build_guest(src, "raw64")
    p = subprocess.run(HVCTL + ["run", "--boot", "raw64", "--kernel", str(img), "--timeout", "20"],
                       input=b"ping\n", capture_output=True, timeout=30)
    assert (p.stdout, p.returncode) == (b"PING", 5)


def test_several_guests_run_at_once(build_guest):
    procs = []
    for i in range(6):
        src = rf"""
    mov $0x3f8, %dx
    mov ${ord('a') + i}, %al
    out %al, %dx
    mov $0x501, %dx
    mov ${10 + i}, %al
    out %al, %dx
1:  jmp 1b
"""
        img = build_guest(src, "raw64")
        procs.append(subprocess.Popen(HVCTL + ["run", "--boot", "raw64", "--kernel", str(img)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=60)
        assert (out, p.returncode) == (chr(ord("a") + i).encode(), 10 + i)
