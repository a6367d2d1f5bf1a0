/* The demo guest of examples/plugins/crc32dev.py: asks the device on ports 0x300-0x31F for the CRC-32 of a
 * message in guest RAM, computes the same in software, prints both and exits 0 if they agree (1 if not, 2 if
 * no device answers at 0x318).  Built by examples/Makefile; run with:
 *   hvctl run --boot raw64 --kernel examples/build/crc32_demo.bin --device examples/plugins/crc32dev.py:Crc32
 */
.code64
.globl _start
_start:
    lea stack_top(%rip), %rsp
    mov $0x318, %dx                 /* ID: "CRC3" */
    in %dx, %eax
    cmp $0x33435243, %eax
    jne no_device
    lea msg(%rip), %rax             /* identity-mapped: the guest-physical address */
    mov $0x300, %dx
    out %eax, %dx                   /* ADDR_LO */
    shr $32, %rax
    mov $0x304, %dx
    out %eax, %dx                   /* ADDR_HI */
    mov $(msg_end - msg), %eax
    mov $0x308, %dx
    out %eax, %dx                   /* LEN */
    mov $1, %eax
    mov $0x30c, %dx
    out %eax, %dx                   /* CMD: checksum */
    mov $0x310, %dx
    in %dx, %eax                    /* RESULT */
    mov %eax, %r12d
    lea s_device(%rip), %rsi
    call puts
    mov %r12d, %eax
    call puthex32

    mov $0xffffffff, %eax           /* the same CRC-32 (reflected, polynomial 0xEDB88320) in software */
    lea msg(%rip), %rsi
    mov $(msg_end - msg), %ecx
1:  xorb (%rsi), %al
    inc %rsi
    mov $8, %r8d
2:  shr $1, %eax
    jnc 3f
    xor $0xedb88320, %eax
3:  dec %r8d
    jnz 2b
    dec %ecx
    jnz 1b
    not %eax
    mov %eax, %r13d
    lea s_guest(%rip), %rsi
    call puts
    mov %r13d, %eax
    call puthex32
    xor %ebx, %ebx
    cmp %r12d, %r13d
    je 4f
    mov $1, %ebx
4:  lea s_same(%rip), %rsi
    lea s_differ(%rip), %rdi
    test %ebx, %ebx
    cmovnz %rdi, %rsi
    call puts
    mov %bl, %al
    jmp exit

no_device:
    lea s_none(%rip), %rsi
    call puts
    mov $2, %al
exit:
    mov $0x501, %dx
    out %al, %dx
5:  jmp 5b

puts:                               /* the NUL-terminated string at rsi to COM1 */
    mov $0x3f8, %dx
6:  lodsb
    test %al, %al
    jz 7f
    out %al, %dx
    jmp 6b
7:  ret

puthex32:                           /* eax as 8 hex digits to COM1 */
    mov %eax, %r9d
    mov $8, %ecx
    mov $0x3f8, %dx
8:  rol $4, %r9d
    mov %r9d, %eax
    and $15, %eax
    lea hex(%rip), %rsi
    movb (%rsi,%rax), %al
    out %al, %dx
    dec %ecx
    jnz 8b
    ret

hex:      .ascii "0123456789abcdef"
s_device: .asciz "crc32 by the device: "
s_guest:  .asciz ", by the guest: "
s_same:   .asciz ": the same\r\n"
s_differ: .asciz ": they differ\r\n"
s_none:   .asciz "no CRC-32 device at port 0x300 (add --device examples/plugins/crc32dev.py:Crc32)\r\n"
msg:      .ascii "The quick brown fox jumps over the lazy dog"
msg_end:
    .balign 16
    .skip 512
stack_top:
