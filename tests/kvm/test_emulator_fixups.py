"""VMM-side fix-ups for instructions KVM's emulator cannot run (compat profile `nested`), proven by ring-0 guests.

On nested hosts guest ring-0 code goes through KVM's instruction emulator,
which has no case for ldmxcsr/stmxcsr; Linux's kernel_fpu_begin() runs
ldmxcsr.  On hosts with hardware virtualization the instructions run
natively and the same guest must print the same thing.
"""
import json

import pytest

# Loads MXCSR through four addressing forms (rip-relative, rsp+disp8, SIB
# with index*scale, REX.B base r12), stores it back after each, and prints
# each stored value in hex.  Then a value with a reserved bit must raise
# #GP(0), which the guest's own IDT handler reports.
MXCSR_GUEST = r"""
    lea stack_top(%rip), %rsp
    mov %cr4, %rax
    or $0x600, %rax                 /* OSFXSR | OSXMMEXCPT */
    mov %rax, %cr4
    mov %cr0, %rax
    and $~4, %rax                   /* EM off */
    or $2, %rax                     /* MP on */
    mov %rax, %cr0
    fwait

    ldmxcsr val_rip(%rip)
    stmxcsr out(%rip)
    call print_out

    movl $0x3f80, 4(%rsp)
    ldmxcsr 4(%rsp)
    stmxcsr out(%rip)
    call print_out

    lea table(%rip), %rbx
    mov $2, %rcx
    ldmxcsr (%rbx,%rcx,4)           /* table[2] */
    stmxcsr out(%rip)
    call print_out

    lea table(%rip), %r12
    ldmxcsr 4(%r12)                 /* table[1] */
    stmxcsr 12(%r12)                /* table[3] */
    mov 12(%r12), %eax
    mov %eax, out(%rip)
    call print_out

    /* IDT with a #GP handler, then a reserved MXCSR bit */
    lea gp_handler(%rip), %rax
    lea idt(%rip), %rdi
    mov %ax, 13*16(%rdi)
    mov %cs, %dx
    mov %dx, 13*16+2(%rdi)
    movw $0x8e00, 13*16+4(%rdi)
    shr $16, %rax
    mov %ax, 13*16+6(%rdi)
    shr $16, %rax
    mov %eax, 13*16+8(%rdi)
    mov %rdi, idtr+2(%rip)
    lidt idtr(%rip)
    ldmxcsr bad(%rip)
    mov $'X', %al                   /* not reached */
    mov $0x3f8, %dx
    out %al, %dx
    mov $0x501, %dx
    mov $1, %al
    out %al, %dx
1:  jmp 1b

gp_handler:
    pop %rax                        /* error code */
    add $'0', %al
    mov $0x3f8, %dx
    mov $'G', %bl
    xchg %al, %bl
    out %al, %dx
    mov $'P', %al
    out %al, %dx
    mov %bl, %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    stmxcsr out(%rip)               /* unchanged by the faulting load */
    call print_out
    mov $0x501, %dx
    mov $0, %al
    out %al, %dx
2:  jmp 2b

print_out:                          /* four hex digits of out's low 16 bits and a newline */
    mov out(%rip), %eax
    mov $4, %ecx
3:  rol $4, %ax
    mov %eax, %ebx
    and $0xf, %ebx
    lea hex(%rip), %rsi
    mov (%rsi,%rbx), %bl
    push %rax
    mov %bl, %al
    mov $0x3f8, %dx
    out %al, %dx
    pop %rax
    dec %ecx
    jnz 3b
    mov $'\n', %al
    mov $0x3f8, %dx
    out %al, %dx
    ret

hex:     .ascii "0123456789abcdef"
val_rip: .long 0x7f80               /* round toward zero */
table:   .long 0x1f80, 0x5f80, 0x3fc0, 0
bad:     .long 0x11f80              /* reserved bit 16 */
out:     .long 0
idtr:    .word 16*32-1
         .quad 0
    .balign 16
idt:     .fill 32*16, 1, 0
    .fill 512, 1, 0
stack_top:
"""


def test_mxcsr_loads_and_stores_work_in_guest_ring0(build_guest, run_guest, tmp_path):
    stats = tmp_path / "stats.json"
    r = run_guest(build_guest(MXCSR_GUEST), "--boot", "raw64", "--stats-json", stats, timeout=60)
    assert r.stdout.decode() == "7f80\n3f80\n3fc0\n5f80\nGP0\n5f80\n", r.stderr.decode()
    assert r.returncode == 0


def test_compat_none_reports_the_instruction_it_cannot_emulate(build_guest, run_guest):
    """Without the fix-up the VM fails with the decoded bytes, unless the host runs ldmxcsr natively."""
    r = run_guest(build_guest(MXCSR_GUEST), "--boot", "raw64", "--compat", "none", timeout=60)
    if r.returncode == 0:
        pytest.skip("this host runs ring-0 guest code natively: nothing to fix up")
    assert r.returncode == 70
    assert "emulation failure: instruction 9b 0f ae 15" in r.stderr.decode()  # fwait, then ldmxcsr


CPUID_GUEST = r"""
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    mov %ecx, %ebx
    mov $0x3f8, %dx
    mov $5, %esi                    /* bits: PCLMULQDQ(1) SSSE3(9) CX16(13) SSE4.1(19) SSE4.2(20) AES(25) */
    lea bits(%rip), %rdi
1:  movzbl (%rdi), %ecx
    mov %ebx, %eax
    shr %cl, %eax
    and $1, %eax
    add $'0', %al
    out %al, %dx
    inc %rdi
    dec %esi
    jns 1b
    mov $'\n', %al
    out %al, %dx
    mov $0x501, %dx
    xor %al, %al
    out %al, %dx
2:  jmp 2b
bits: .byte 1, 9, 13, 19, 20, 25
"""


def test_nested_profile_clears_cx16_in_the_guests_cpuid(build_guest, run_guest):
    """CPUID.1:ECX.CX16 is masked (lock cmpxchg16b cannot be emulated); the other bits are as KVM reports them.

    On kvm_pvm hosts only some leaf-1 bits can be cleared through KVM_SET_CPUID2
    (CX16 yes; SSSE3, SSE4.x, AES, PCLMULQDQ no: the profile uses clearcpuid= for
    those); this guest prints PCLMULQDQ SSSE3 CX16 SSE4.1 SSE4.2 AES as 0/1.
    """
    nested = run_guest(build_guest(CPUID_GUEST), "--boot", "raw64", timeout=30)
    assert nested.returncode == 0 and len(nested.stdout) == 7, nested.stderr
    assert nested.stdout[2:3] == b"0"                               # CX16
    plain = run_guest(build_guest(CPUID_GUEST), "--boot", "raw64", "--compat", "none", timeout=30)
    assert plain.returncode == 0
    for i in (0, 1, 3, 4, 5):                                       # everything else untouched
        assert nested.stdout[i] == plain.stdout[i]
