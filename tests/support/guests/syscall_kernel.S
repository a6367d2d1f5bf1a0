/* A minimal 64-bit kernel whose user space makes system calls with `syscall`, for the SYSCALL hook
 * (vcpu_worker/syscall_hook.py).  Booted as raw64 at 0x100000 on every vCPU (RDI = index, RSI = count).
 *
 * It sets up what Linux does and nothing of the VMM's: its own GDT (Linux's selector layout), a TSS
 * per CPU, an IDT whose #PF entry starts with PF_FIRST (endbr64, a NOP, cld, or `push %rax`, which the
 * hook cannot skip and single-steps), its own page tables (0-2 MiB kernel-only, 2-4 MiB user, 4-6 MiB
 * kernel data, 6-10 MiB mapped on first touch by the #PF handler), STAR/LSTAR/FMASK with wrmsr, and
 * then iretq to ring 3.  With -DKPTI user space runs on page tables of its own that lack the kernel
 * data, and every kernel entry switches CR3 first, as Linux with page-table isolation does.
 *
 * User space on each CPU checks, in order (the exit status names the first that failed):
 *  1  the kernel ran in ring 0 (CS 0x10, SS 0x18) with FMASK's flags clear
 *  2  back in ring 3 RFLAGS came from R11 (IF on)
 *  3  ROUNDS system calls all reached the kernel
 *  4  a user page fault elsewhere was handled by the kernel as an ordinary fault
 *  5  a jump to LSTAR with a forged R11 (IOPL 3, NT) entered the kernel without them
 *  6  `int1` from ring 3 reached the kernel's own #DB handler
 *  7  the kernel's own DR0 execute breakpoint fired into its #DB handler
 *  8  after CPU 0 rewrote the #PF gate (another entry, another first instruction) faults and calls still work
 *  9  after each CPU pointed LSTAR at a second entry, calls arrive there
 * CPU 0 then prints "syscall-kernel: ok CPUS SYSCALLS" and exits 0.  A user fault at LSTAR that reaches
 * the kernel's #PF handler (the hook missed it) ends the VM with 77; an unexpected exception with
 * 0x80 + vector.  With -DTICKS=N CPU 0 also prints "tick K" every ROUNDS calls up to N (snapshot tests).
 */
#ifndef ROUNDS
#define ROUNDS 200
#endif
#ifndef PF_FIRST
#define PF_FIRST endbr64
#endif
#ifndef TICKS
#define TICKS 0
#endif

#define KPML4 0x140000
#define KPDPT 0x141000
#define KPD 0x142000
#define UPML4 0x143000
#define UPDPT 0x144000
#define UPD 0x145000
#define GDT 0x146000
#define TSS 0x147000
#define IDT 0x148000
#define KSTACKS 0x150000                /* 0x8000 per CPU */
#define USER_CODE 0x200000
#define USTACKS 0x300000                /* 0x8000 per CPU */
#define SHARED 0x3F0000                 /* user-visible: barrier, ready flag */
#define PERCPU 0x400000                 /* kernel data: 0x100 per CPU (KPTI: not in user page tables) */
#define LAZY1 0x600000                  /* mapped on first touch, phase 1 */
#define LAZY2 0x800000                  /* phase 2 */
#define MAXCPUS 8

#define PC_INDEX 0
#define PC_CALLS 8
#define PC_DB 16
#define PC_ENTRY_B 24
#define PC_R11 32

#define SYS_EXIT 0
#define SYS_PUTC 1
#define SYS_INFO 2
#define SYS_R11 3
#define SYS_SET_PF_B 4
#define SYS_LSTAR_B 5
#define SYS_OWN_BP 6
#define SYS_CALLS 7
#define SYS_ENTRY_B 8
#define SYS_DB 9

.code64
.text
.globl _start
_start:
    mov %rdi, %r15                      /* cpu */
    mov %rsi, %r14                      /* count */
    mov %r15, %rsp
    shl $15, %rsp
    add $(KSTACKS + 0x8000), %rsp
    test %r15, %r15
    jnz wait_ready
    call setup_tables
    movq $1, SHARED + 8
    jmp ready
wait_ready:
    pause
    cmpq $1, SHARED + 8
    jne wait_ready
ready:
    lgdt gdtr(%rip)
    lea 1f(%rip), %rax
    push $0x10
    push %rax
    lretq
1:  mov $0x18, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov %r15, %rax                      /* TSS descriptor of this CPU */
    shl $4, %rax
    add $0x40, %rax
    ltr %ax
    lidt idtr(%rip)
    mov $KPML4, %rax
    mov %rax, %cr3
    /* GS base: this CPU's kernel data */
    mov $0xC0000101, %ecx
    mov %r15, %rax
    shl $8, %rax
    add $PERCPU, %rax
    mov %r15, (%rax)
    xor %edx, %edx
    wrmsr
    /* EFER.SCE, then STAR, LSTAR, FMASK as Linux's syscall_init() */
    mov $0xC0000080, %ecx
    rdmsr
    or $1, %eax
    wrmsr
    mov $0xC0000081, %ecx
    xor %eax, %eax
    mov $((0x23 << 16) | 0x10), %edx
    wrmsr
    mov $0xC0000082, %ecx
    lea syscall_entry(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    mov $0xC0000084, %ecx
    mov $0x47700, %eax                  /* TF DF IF IOPL AC NT */
    xor %edx, %edx
    wrmsr
    /* to ring 3: RDI = cpu, RSI = count */
    mov %r15, %rdi
    mov %r14, %rsi
    mov %r15, %rax
    shl $15, %rax
    add $(USTACKS + 0x8000), %rax
    push $0x2b
    push %rax
    push $0x202
    push $0x33
    push $USER_CODE
#ifdef KPTI
    mov $UPML4, %rax
    mov %rax, %cr3
#endif
    iretq

/* --- tables (CPU 0, once) ----------------------------------------------------------------------- */
setup_tables:
    /* mask the legacy PIC: user space runs with IF on */
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    /* kernel page tables: PD[0] kernel, PD[1] user, PD[2] kernel data; PD[3..4] lazy */
    mov $(KPDPT | 7), %rax
    mov %rax, KPML4
    mov $(KPD | 7), %rax
    mov %rax, KPDPT
    movq $(0x000000 | 0x83), KPD + 0
    movq $(0x200000 | 0x87), KPD + 8
    movq $(0x400000 | 0x83), KPD + 16
    /* user page tables (KPTI): the same without the kernel data */
    mov $(UPDPT | 7), %rax
    mov %rax, UPML4
    mov $(UPD | 7), %rax
    mov %rax, UPDPT
    movq $(0x000000 | 0x83), UPD + 0
    movq $(0x200000 | 0x87), UPD + 8
    /* GDT: Linux's layout */
    mov $0x00AF9A000000FFFF, %rax
    mov %rax, GDT + 0x10
    mov $0x00CF92000000FFFF, %rax
    mov %rax, GDT + 0x18
    mov $0x00CFFA000000FFFF, %rax
    mov %rax, GDT + 0x20
    mov $0x00CFF2000000FFFF, %rax
    mov %rax, GDT + 0x28
    mov $0x00AFFA000000FFFF, %rax
    mov %rax, GDT + 0x30
    /* a TSS per CPU: RSP0 = its kernel stack, descriptor at 0x40 + 16 * cpu */
    xor %ecx, %ecx
2:  mov %rcx, %rax
    shl $7, %rax
    add $TSS, %rax                      /* this TSS */
    mov %rcx, %rdx
    shl $15, %rdx
    add $(KSTACKS + 0x8000), %rdx
    mov %rdx, 4(%rax)                   /* RSP0 */
    movw $104, 102(%rax)                /* no I/O bitmap */
    mov %rcx, %rdi
    shl $4, %rdi
    add $(GDT + 0x40), %rdi
    mov %rax, %rdx                      /* low: limit 103, base[23:0], type 0x89, base[31:24] */
    and $0xFFFFFF, %rdx
    shl $16, %rdx
    or $103, %rdx
    mov $0x89, %rsi
    shl $40, %rsi
    or %rsi, %rdx
    mov %rax, %rsi
    shr $24, %rsi
    and $0xFF, %rsi
    shl $56, %rsi
    or %rsi, %rdx
    mov %rdx, (%rdi)
    mov %rax, %rsi
    shr $32, %rsi
    mov %rsi, 8(%rdi)
    inc %rcx
    cmp $MAXCPUS, %rcx
    jb 2b
    /* IDT: every vector fatal; #DB, #PF our own */
    xor %ebx, %ebx
3:  mov %rbx, %rdi
    lea fatal_stubs(%rip), %rsi
    cmp $32, %rbx
    jae 4f
    mov %rbx, %rax
    shl $3, %rax
    add %rax, %rsi
    jmp 5f
4:  lea fatal_irq(%rip), %rsi
5:  call set_gate
    inc %rbx
    cmp $256, %rbx
    jb 3b
    mov $1, %edi
    lea db_entry(%rip), %rsi
    call set_gate
    mov $14, %edi
    lea pf_entry_a(%rip), %rsi
    call set_gate
    /* user code to 0x200000 */
    lea user_begin(%rip), %rsi
    mov $USER_CODE, %rdi
    lea user_end(%rip), %rcx
    sub %rsi, %rcx
    rep movsb
    ret

set_gate:                               /* rdi = vector, rsi = entry: a DPL0 interrupt gate */
    mov %rdi, %rax
    shl $4, %rax
    add $IDT, %rax
    mov %rsi, %rdx
    and $0xFFFF, %edx
    or $(0x10 << 16), %rdx
    mov $0x8E, %rcx
    shl $40, %rcx
    or %rcx, %rdx
    mov %rsi, %rcx
    shr $16, %rcx
    and $0xFFFF, %ecx
    shl $48, %rcx
    or %rcx, %rdx
    mov %rdx, (%rax)
    mov %rsi, %rcx
    shr $32, %rcx
    mov %rcx, 8(%rax)
    ret

.balign 8
gdtr: .word 0x40 + 16 * MAXCPUS - 1
      .quad GDT
.balign 8
idtr: .word 4095
      .quad IDT

/* --- kernel entries ---------------------------------------------------------------------------- */
.macro to_kernel_cr3                    /* KPTI: the first thing an entry does */
#ifdef KPTI
    push %rax
    mov $KPML4, %rax
    mov %rax, %cr3
    pop %rax
#endif
.endm
.macro to_user_cr3
#ifdef KPTI
    push %rax
    mov $UPML4, %rax
    mov %rax, %cr3
    pop %rax
#endif
.endm

.balign 16
.globl syscall_entry
syscall_entry:                          /* ring 0 on the user's stack (SYSCALL does not switch stacks) */
    to_kernel_cr3
    incq %gs:PC_CALLS
    mov %r11, %gs:PC_R11
    cmp $SYS_EXIT, %rax
    je sys_exit
    cmp $SYS_PUTC, %rax
    je sys_putc
    cmp $SYS_INFO, %rax
    je sys_info
    cmp $SYS_R11, %rax
    je sys_r11
    cmp $SYS_SET_PF_B, %rax
    je sys_set_pf_b
    cmp $SYS_LSTAR_B, %rax
    je sys_lstar_b
    cmp $SYS_OWN_BP, %rax
    je sys_own_bp
    cmp $SYS_CALLS, %rax
    je sys_calls
    cmp $SYS_ENTRY_B, %rax
    je sys_entry_b
    cmp $SYS_DB, %rax
    je sys_db
    mov $-38, %rax
sysret_path:
    to_user_cr3
    sysretq

.balign 16
syscall_entry_b:                        /* LSTAR after SYS_LSTAR_B */
    to_kernel_cr3
    incq %gs:PC_ENTRY_B
    jmp syscall_entry + 0
    /* not reached: syscall_entry switches CR3 again, harmless */

sys_exit:
    mov %edi, %eax
    out %al, $0x80                      /* an exit the C loop answers (port 0x80) before the exit port */
    mov $0x501, %dx
    out %al, %dx
    jmp .
sys_putc:
    mov %edi, %eax
    mov $0x3f8, %dx
    out %al, %dx
    xor %eax, %eax
    jmp sysret_path
sys_info:                               /* CS | SS << 16 | RFLAGS << 32, as the kernel sees them */
    pushfq
    pop %rax
    shl $32, %rax
    mov %ss, %rdx
    shl $16, %rdx
    or %rdx, %rax
    mov %cs, %rdx
    or %rdx, %rax
    jmp sysret_path
sys_r11:
    mov %gs:PC_R11, %rax
    jmp sysret_path
sys_calls:
    mov %gs:PC_CALLS, %rax
    jmp sysret_path
sys_entry_b:
    mov %gs:PC_ENTRY_B, %rax
    jmp sysret_path
sys_db:
    mov %gs:PC_DB, %rax
    jmp sysret_path
sys_set_pf_b:                           /* rewrite the #PF gate, then an exit (the VMM sees IDT changes at exits) */
    push %rdi
    push %rsi
    push %rcx
    push %rdx
    mov $14, %edi
    lea pf_entry_b(%rip), %rsi
    call set_gate
    out %al, $0x80                      /* answered in the C loop */
    pop %rdx
    pop %rcx
    pop %rsi
    pop %rdi
    xor %eax, %eax
    jmp sysret_path
sys_lstar_b:                            /* this CPU's LSTAR to the second entry */
    push %rcx
    push %rdx
    mov $0xC0000082, %ecx
    lea syscall_entry_b(%rip), %rax
    mov %rax, %rdx
    shr $32, %rdx
    wrmsr
    pop %rdx
    pop %rcx
    xor %eax, %eax
    jmp sysret_path
sys_own_bp:                             /* the kernel's own DR0 on own_bp_target: its #DB handler counts it */
    push %rcx
    push %rdx
    mov %gs:PC_DB, %rdx
    lea own_bp_target(%rip), %rax
    mov %rax, %dr0
    mov $0x401, %rax                    /* L0, execute */
    mov %rax, %dr7
    call own_bp_target
    xor %eax, %eax
    mov %rax, %dr7
    mov %gs:PC_DB, %rax
    sub %rdx, %rax                      /* #DBs taken */
    pop %rdx
    pop %rcx
    jmp sysret_path
own_bp_target:
    nop
    ret

.balign 64
pf_entry_a:
    PF_FIRST
pf_common:
    cld
    to_kernel_cr3
    push %rax
    push %rbx
    mov 32(%rsp), %rax                  /* the frame's CS (rbx, rax, error code, rip, cs) */
    test $3, %rax
    jz pf_fatal
    mov 24(%rsp), %rax                  /* a user fault at LSTAR: the hook missed a system call */
    lea syscall_entry(%rip), %rbx
    cmp %rbx, %rax
    je pf_missed
    lea syscall_entry_b(%rip), %rbx
    cmp %rbx, %rax
    je pf_missed
    mov %cr2, %rax                      /* map the lazy 2 MiB page it touched, in both page tables */
    shr $21, %rax
    cmp $3, %rax
    jb pf_fatal
    cmp $4, %rax
    ja pf_fatal
    mov %rax, %rbx
    shl $21, %rax
    or $0x87, %rax
    mov %rax, KPD(,%rbx,8)
    mov %rax, UPD(,%rbx,8)
    mov %cr2, %rax
    invlpg (%rax)
    pop %rbx
    pop %rax
    to_user_cr3
    add $8, %rsp                        /* error code */
    iretq
pf_missed:
    mov $'!', %al
    mov $0x3f8, %dx
    out %al, %dx
    mov $77, %al
    mov $0x501, %dx
    out %al, %dx
    jmp .
pf_fatal:
    mov $(0x80 + 14), %al
    mov $0x501, %dx
    out %al, %dx
    jmp .

.balign 64
pf_entry_b:                             /* the second #PF entry: another first instruction */
    xchg %ax, %ax
    jmp pf_common

.balign 64
db_entry:                               /* the kernel's own #DB: count, clear DR6, RF for its breakpoint */
    to_kernel_cr3
    push %rax
    incq %gs:PC_DB
    xor %eax, %eax
    mov %rax, %dr6
    orq $0x10000, 24(%rsp)              /* RF in the frame (rax, rip, cs, rflags) */
    pop %rax
    testq $3, 8(%rsp)
    jz 1f
    to_user_cr3
1:  iretq

.balign 8
fatal_stubs:                            /* vector N at fatal_stubs + 8 * N */
    .set vec, 0
    .rept 32
    .balign 8
    push $vec
    jmp fatal
    .set vec, vec + 1
    .endr
fatal_irq:
    push $0x40
fatal:
    pop %rax
    or $0x80, %al
    mov $0x501, %dx
    out %al, %dx
    jmp .

/* --- user space (copied to USER_CODE; position-independent) ------------------------------------- */
.macro sys nr
    mov $\nr, %eax
    syscall
.endm
.macro fail code
    mov $\code, %edi
    jmp user_fail
.endm
.macro barrier phase                    /* every CPU reaches it before any goes on */
    lock incq SHARED
    mov %r13, %rax
    imul $\phase, %rax
9:  pause
    cmp SHARED, %rax
    ja 9b
.endm

.balign 16
user_begin:
    mov %rdi, %r12                      /* cpu */
    mov %rsi, %r13                      /* count */
    /* 1: ring 0 with FMASK's flags clear */
    sys SYS_INFO
    mov %rax, %rbx
    and $0xFFFFFFFF, %ebx
    cmp $(0x18 << 16 | 0x10), %ebx
    jne 1f
    shr $32, %rax
    test $0x47700, %eax
    jz 2f
1:  fail 1
    /* 2: RFLAGS back from R11 */
2:  pushfq
    pop %rax
    test $0x200, %eax
    jnz 3f
    fail 2
    /* 3: ROUNDS calls */
3:  sys SYS_CALLS
    mov %rax, %rbp
    mov $ROUNDS, %ebx
4:  sys SYS_CALLS
    dec %ebx
    jnz 4b
    sub %rbp, %rax
    cmp $ROUNDS, %rax
    je 5f
    fail 3
    /* 4: an ordinary user fault (phase 1 lazy page) */
5:  lea LAZY1(,%r12,8), %rbx
    movq $0x1234, (%rbx)
    cmpq $0x1234, (%rbx)
    je 6f
    fail 4
    /* 5: a jump to LSTAR with R11 forged to IOPL 3 and NT */
6:  lea 7f(%rip), %rcx
    mov $0x7202, %r11
    mov $SYS_R11, %eax
    movabs $syscall_entry, %rdx
    jmp *%rdx
7:  test $0x7000, %eax
    jnz 8f
    test $0x200, %eax
    jz 8f
    pushfq
    pop %rax
    test $0x7000, %eax
    jz 10f
8:  fail 5
    /* 6: int1 from ring 3 to the kernel's #DB */
10: sys SYS_DB
    mov %rax, %rbp
    .byte 0xf1
    sys SYS_DB
    sub %rbp, %rax
    cmp $1, %rax
    je 11f
    fail 6
    /* 7: the kernel's own breakpoint */
11: sys SYS_OWN_BP
    cmp $1, %rax
    je 12f
    fail 7
12: barrier 1
    /* 8: CPU 0 rewrites the #PF gate; then faults and calls on every CPU */
    test %r12, %r12
    jnz 13f
    sys SYS_SET_PF_B
13: barrier 2
    lea LAZY2(,%r12,8), %rbx
    movq $0x5678, (%rbx)
    cmpq $0x5678, (%rbx)
    jne 14f
    sys SYS_CALLS
    mov %rax, %rbp
    sys SYS_CALLS
    sub %rbp, %rax
    cmp $1, %rax
    je 15f
14: fail 8
    /* 9: this CPU's LSTAR to the second entry */
15: sys SYS_LSTAR_B
    sys SYS_ENTRY_B
    mov %rax, %rbp
    mov $10, %ebx
16: sys SYS_CALLS
    dec %ebx
    jnz 16b
    sys SYS_ENTRY_B
    sub %rbp, %rax
    cmp $11, %rax
    je 17f
    fail 9
17: barrier 3
#if TICKS
    /* keep calling; CPU 0 prints "tick K" every ROUNDS calls, the others spin on calls until it is done */
    xor %r14d, %r14d
20: mov $ROUNDS, %ebx
21: sys SYS_CALLS
    dec %ebx
    jnz 21b
    test %r12, %r12
    jnz 22f
    inc %r14
    lea tick_text(%rip), %rsi
    call user_print
    mov %r14, %rax
    call user_print_dec
    mov $'\n', %edi
    sys SYS_PUTC
    cmp $TICKS, %r14
    jb 20b
    movq $1, SHARED + 16
    jmp 23f
22: cmpq $1, SHARED + 16
    jne 20b
23:
#endif
    barrier 4
    test %r12, %r12
    jnz 30f
    lea ok_text(%rip), %rsi
    call user_print
    mov %r13, %rax
    call user_print_dec
    mov $' ', %edi
    sys SYS_PUTC
    sys SYS_CALLS
    call user_print_dec
    mov $'\n', %edi
    sys SYS_PUTC
    xor %edi, %edi
    sys SYS_EXIT
30: jmp 30b                             /* the others wait in ring 3 */

user_fail:                              /* edi = code: print "FAIL code cpu" and exit with it */
    mov %edi, %ebp
    lea fail_text(%rip), %rsi
    call user_print
    mov %rbp, %rax
    call user_print_dec
    mov $' ', %edi
    sys SYS_PUTC
    mov %r12, %rax
    call user_print_dec
    mov $'\n', %edi
    sys SYS_PUTC
    mov %ebp, %edi
    sys SYS_EXIT

user_print:                             /* rsi = NUL-terminated text */
    movzbl (%rsi), %edi
    test %edi, %edi
    jz 1f
    push %rsi
    sys SYS_PUTC
    pop %rsi
    inc %rsi
    jmp user_print
1:  ret

user_print_dec:                         /* rax = value */
    mov $10, %ecx
    xor %r8d, %r8d
1:  xor %edx, %edx
    div %rcx
    push %rdx
    inc %r8
    test %rax, %rax
    jnz 1b
2:  pop %rdi
    add $'0', %edi
    push %r8
    sys SYS_PUTC
    pop %r8
    dec %r8
    jnz 2b
    ret

ok_text: .asciz "syscall-kernel: ok "
fail_text: .asciz "syscall-kernel: FAIL "
tick_text: .asciz "tick "
user_end:
