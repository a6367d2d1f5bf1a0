/* The demo guest: a raw64 program that greets on COM1 from every vCPU's view and exits with status 0.
 * Built by examples/Makefile; run with: hvctl run --boot raw64 --kernel examples/build/hello.bin */
.code64
.globl _start
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0x501, %dx
    xor %al, %al
    out %al, %dx
3:  jmp 3b
msg: .asciz "Hello from a pyhv guest: long mode, COM1 at 0x3f8, exit port 0x501.\r\n"
