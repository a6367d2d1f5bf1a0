# gdb_user.S: a user64 (ring 3) guest for the GDB stub's tests: it writes `message` through the debug
# page (offset 1: a console byte) and exits with `exit_code` (offset 0).  `work` (0x100) stores to
# `counter` ten times; labels at fixed offsets from 0x100000: work 0x100, message 0x400, exit_code 0x480,
# counter 0x498.  The second vCPU, if any, halts... in ring 3 it cannot, so it spins on `pause`.
_start:
    test %rdi, %rdi
    jnz other
    mov $0xFEBFF000, %rbx
    jmp work

.org 0x100
work:
    mov $10, %rcx
1:  incq counter(%rip)
    dec %rcx
    jnz 1b
    lea message(%rip), %rsi
2:  movb (%rsi), %al
    test %al, %al
    jz 3f
    movb %al, 1(%rbx)
    inc %rsi
    jmp 2b
3:  movb exit_code(%rip), %al
    movb %al, (%rbx)
4:  jmp 4b

.org 0x200
other:
    pause
    jmp other

.org 0x400
message:
    .asciz "pyhv-user-marker\n"
.org 0x480
exit_code:
    .byte 9
.org 0x498
counter:
    .quad 0
