# gdb_smp.S: a 2-vCPU raw64 guest for the GDB stub's tests (tests/kvm/test_gdb.py), built with build_asm.
#
# vCPU 1 increments `counter` five times at `vcpu1_work`, sets `done1` and halts.
# vCPU 0 installs an IDT whose #BP handler prints '!', spins while `hold` is
# nonzero (a debugger sets it to catch the guest running), waits for
# `done1`, runs an int3 of its own (the handler prints '!'), prints
# `message` to COM1 one `out` per byte (`print_loop` runs once per byte,
# `emit` is the `out`), then writes `exit_code` (7) to the exit port.
# Output "!pyhv-gdb-marker\n", status 7.  Labels the tests use sit at fixed
# offsets (.org) from the load address 0x100000, so no symbol file is needed:
#   hold_loop 0x40  guest_int3 0xa0  print_loop 0x100  emit 0x108  vcpu1_work 0x200
#   message 0x400  exit_code 0x480  hold 0x488  done1 0x490  counter 0x498
_start:
    test %rdi, %rdi
    jnz vcpu1
    jmp vcpu0

.org 0x40
hold_loop:
    cmpb $0, hold(%rip)
    jne hold_loop
    jmp wait_vcpu1

.org 0x80
vcpu0:
    lea stack_top(%rip), %rsp
    call setup_idt
    jmp hold_loop
wait_vcpu1:
    cmpb $0, done1(%rip)
    je wait_vcpu1
    jmp guest_int3

.org 0xa0
guest_int3:
    int3
    lea message(%rip), %rsi
    jmp print_loop

.org 0x100
print_loop:
    movb (%rsi), %al
    test %al, %al
    jz printed
    nop
    nop
.org 0x108
emit:
    mov $0x3f8, %dx
    out %al, %dx
    inc %rsi
    jmp print_loop
printed:
    movb exit_code(%rip), %al
    mov $0x501, %dx
    out %al, %dx
1:  jmp 1b

.org 0x180
vcpu1:
    jmp vcpu1_work

.org 0x200
vcpu1_work:
    mov $5, %rcx
2:  incq counter(%rip)
    dec %rcx
    jnz 2b
    movb $1, done1(%rip)
    cli
3:  hlt
    jmp 3b

.org 0x280
setup_idt:                      # vector 3: a 64-bit interrupt gate to bp_handler in this code segment
    lea bp_handler(%rip), %rax
    lea idt+3*16(%rip), %rdi
    movw %ax, (%rdi)
    movw %cs, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    movw %ax, 6(%rdi)
    shr $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    lidt idtr(%rip)
    ret

bp_handler:
    push %rax
    push %rdx
    mov $'!', %al
    mov $0x3f8, %dx
    out %al, %dx
    pop %rdx
    pop %rax
    iretq

.org 0x400
message:
    .asciz "pyhv-gdb-marker\n"
.org 0x480
exit_code:
    .byte 7
.org 0x488
hold:
    .byte 0
.org 0x490
done1:
    .byte 0
.org 0x498
counter:
    .quad 0

.org 0x600
idt:
    .fill 4 * 16, 1, 0
idtr:
    .word 4 * 16 - 1
    .quad idt
.org 0x800
stack:
    .fill 0x400, 1, 0
stack_top:
