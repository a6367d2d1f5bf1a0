"""SMP raw guests: every vCPU starts at the entry with its index, and locked atomics on shared memory are exact."""
import pathlib

import pytest
from hv import GUESTS

SOURCE = (GUESTS / "atomic_counter.c").read_text()


@pytest.mark.parametrize("vcpus,iterations", [(1, 1_000_000), (2, 1_000_000), (4, 1_000_000), (64, 10_000)])
def test_user64_atomic_counter_is_exact_across_vcpus(build_c_guest, run_guest, vcpus, iterations):
    # Ring 3 runs natively here, so this is real contention on real cores (64 vCPUs on 2 host cores).
    img = build_c_guest(SOURCE, "user64", cflags=(f"-DITERATIONS={iterations}",))
    r = run_guest(img, "--boot", "user64", "--vcpus", vcpus, "--timeout", "100", timeout=120)
    assert r.stdout == f"{vcpus * iterations}\n".encode()
    assert r.returncode == 100 + vcpus


@pytest.mark.parametrize("vcpus", [2, 4, 64])
def test_raw64_atomic_counter_is_exact_across_vcpus(build_c_guest, run_guest, vcpus):
    # Ring 0 is emulated on nested machines: keep the work small.
    iterations = 2000
    img = build_c_guest(SOURCE, "raw64", cflags=(f"-DITERATIONS={iterations}",))
    r = run_guest(img, "--boot", "raw64", "--vcpus", vcpus, "--timeout", "100", timeout=120)
    assert r.stdout == f"{vcpus * iterations}\n".encode()
    assert r.returncode == 100 + vcpus


def test_every_vcpu_starts_with_its_own_index(build_guest, run_guest):
    # Each vCPU sets bit RDI in a shared mask; vCPU 0 exits with the mask once all bits are in.
    src = r"""
    lea mask(%rip), %rbx
    lock bts %rdi, (%rbx)
    test %rdi, %rdi
    jnz 2f
    mov $1, %rax
    mov %rsi, %rcx
    shl %cl, %rax
    dec %rax                     /* all-ones mask for RSI vCPUs */
1:  cmp (%rbx), %rax
    jne 1b
    mov $0x501, %dx
    out %al, %dx
2:  jmp 2b
.balign 8
mask: .quad 0
"""
    r = run_guest(build_guest(src, "raw64"), "--boot", "raw64", "--vcpus", 4, "--timeout", "60", timeout=90)
    assert r.returncode == 0b1111
