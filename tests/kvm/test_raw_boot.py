"""Raw boot modes through `hvctl run`: each guest prints on COM1 or the debug page and exits through the exit port."""
import pytest

PRINT16 = r"""
    mov $msg, %si
1:  mov (%si), %al
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, %dx
    inc %si
    jmp 1b
2:  mov $0x501, %dx
    mov $42, %al
    out %al, %dx
3:  jmp 3b
msg: .asciz "hello from real mode\n"
"""

# Prints the mode's register facts as text so the test checks them from outside.
PRINT32 = r"""
    mov $0x3f8, %dx
    mov %cr0, %eax
    and $1, %eax            /* PE */
    add $'0', %al
    out %al, %dx
    mov %edi, %eax          /* vCPU index */
    add $'0', %al
    out %al, %dx
    mov %esi, %eax          /* vCPU count */
    add $'0', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0x501, %dx
    mov $32, %al
    out %al, %dx
1:  jmp 1b
"""

PRINT64 = r"""
    mov $0xC0000080, %ecx   /* EFER */
    rdmsr                   /* clobbers edx */
    mov $0x3f8, %dx
    shr $10, %eax           /* LMA */
    and $1, %eax
    add $'0', %al
    out %al, %dx
    mov %cs, %ax            /* CPL */
    and $3, %al
    add $'0', %al
    out %al, %dx
    mov %rsi, %rax
    add $'0', %al
    out %al, %dx
    /* identity map: the image is readable at its physical address */
    lea msg(%rip), %rbx
    mov (%rbx), %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0x501, %dx
    mov $64, %al
    out %al, %dx
1:  jmp 1b
msg: .ascii "Z"
"""

USER64 = r"""
    mov $0xFEBFF000, %rbx
    mov %cs, %ax
    and $3, %al
    add $'0', %al
    movb %al, 1(%rbx)
    /* 100 million iterations: native in ring 3 (~0.1 s), hours through the emulator */
    mov $100000000, %rcx
1:  dec %rcx
    jnz 1b
    lea msg(%rip), %rsi
2:  movb (%rsi), %al
    test %al, %al
    jz 3f
    movb %al, 1(%rbx)
    inc %rsi
    jmp 2b
3:  movb $99, (%rbx)
4:  jmp 4b
msg: .asciz " ring3 done\n"
"""


def test_raw16_prints_and_exits_with_status(build_guest, run_guest):
    r = run_guest(build_guest(PRINT16, "raw16"), "--boot", "raw16", timeout=30)
    assert r.stdout == b"hello from real mode\n"
    assert r.returncode == 42


def test_raw32_starts_in_protected_mode_with_index_and_count(build_guest, run_guest):
    r = run_guest(build_guest(PRINT32, "raw32"), "--boot", "raw32", timeout=30)
    assert (r.stdout, r.returncode) == (b"101\n", 32)


def test_raw64_starts_in_long_mode_ring0_identity_mapped(build_guest, run_guest):
    r = run_guest(build_guest(PRINT64, "raw64"), "--boot", "raw64", timeout=30)
    assert (r.stdout, r.returncode) == (b"101Z\n", 64)


def test_user64_runs_in_ring3_natively_and_exits_through_debug_page(build_guest, run_guest):
    r = run_guest(build_guest(USER64, "user64"), "--boot", "user64", timeout=60)
    assert (r.stdout, r.returncode) == (b"3 ring3 done\n", 99)


def test_load_address_option_moves_the_image(build_guest, run_guest):
    src = PRINT64.replace("$64, %al", "$65, %al")
    r = run_guest(build_guest(src, "raw64", load_addr=0x200000), "--boot", "raw64", "--load-addr", "0x200000", timeout=30)
    assert (r.stdout, r.returncode) == (b"101Z\n", 65)


@pytest.mark.parametrize("mem", ["16M", "512M"])
def test_mem_option_sets_guest_ram(build_guest, run_guest, mem):
    # Touch the last byte of RAM: it must be writable and read back.
    size = {"16M": 16 << 20, "512M": 512 << 20}[mem]
    src = rf"""
    mov ${size - 1}, %rbx
    movb $0x5a, (%rbx)
    mov (%rbx), %al
    mov $0x501, %dx
    out %al, %dx
1:  jmp 1b
"""
    r = run_guest(build_guest(src, "raw64"), "--boot", "raw64", "--mem", mem, timeout=30)
    assert r.returncode == 0x5A


def test_raw_guests_get_the_tsc_frequency_in_rdx(build_guest, run_guest):
    # Each vCPU checks RDX against vCPU 0's copy; the exit status says whether all agreed and it is > 100 MHz.
    src = r"""
    lea khz(%rip), %rbx
    test %rdi, %rdi
    jnz 2f
    mov %rdx, (%rbx)
    lock incq 8(%rbx)
1:  cmpq %rsi, 8(%rbx)
    jne 1b
    cmpq $100000, (%rbx)
    jb 3f
    cmpq $0, 16(%rbx)
    jne 3f
    mov $0xFEBFF000, %rax
    movb $77, (%rax)
2:  cmpq $0, (%rbx)
    je 2b
    cmp (%rbx), %rdx
    je 4f
    lock incq 16(%rbx)          /* a mismatch */
4:  lock incq 8(%rbx)
5:  jmp 5b
3:  mov $0xFEBFF000, %rax
    movb $1, (%rax)
    jmp 5b
.balign 8
khz: .quad 0, 0, 0
"""
    r = run_guest(build_guest(src, "user64"), "--boot", "user64", "--vcpus", 2, "--timeout", "30", timeout=60)
    assert r.returncode == 77
