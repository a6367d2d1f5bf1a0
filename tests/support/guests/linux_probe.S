# linux_probe.S: a tiny 64-bit "kernel" for the Linux boot path (load_linux + the 64-bit boot protocol).
#
# Entered like vmlinux's startup_64: 64-bit mode, identity-mapped paging,
# interrupts off, RSI = guest-physical address of struct boot_params, no
# stack.  It writes to COM1 (port 0x3F8, one `out` per byte):
#
#     cmdline=<the command line at boot_params.hdr.cmd_line_ptr>\n
#     e820=<boot_params.e820_entries, decimal>\n
#
# then writes 0x2A to the exit port 0x501 (so the VM ends with status 42).
# The command line is printed up to its NUL, at most 4096 bytes; a zero
# cmd_line_ptr prints nothing after "cmdline=".  Only RIP-relative
# addressing is used, so the code runs wherever it is linked.
#
# Build an ELF "vmlinux" with a single PT_LOAD (text, rodata, bss) at
# physical = virtual 0x1000000, entry _start = 0x1000000:
#
#   as --64 -o linux_probe.o tests/guests/linux_probe.S
#   ld -m elf_x86_64 -nostdlib -static --build-id=none -N --no-warn-rwx-segments \
#      -z noexecstack -Ttext=0x1000000 -e _start -o linux_probe.elf linux_probe.o
#
# (-N keeps the ELF headers out of the loaded image; without it ld adds a
# PT_LOAD for them at 0xfff000.  `readelf -l linux_probe.elf` shows the one
# PT_LOAD; its stack is .bss, which load_linux zero-fills.)

	.code64
	.set	COM1, 0x3f8
	.set	EXIT_PORT, 0x501
	.set	EXIT_VALUE, 0x2a
	.set	BP_EXT_CMD_LINE_PTR, 0x0c8
	.set	BP_E820_ENTRIES, 0x1e8
	.set	BP_CMD_LINE_PTR, 0x228
	.set	CMDLINE_PRINT_MAX, 4096

	.text
	.globl	_start
_start:
	cli
	cld
	lea	stack_top(%rip), %rsp
	mov	%rsi, %rbx			# rbx = boot_params for the rest of the run

	lea	msg_cmdline(%rip), %rdi
	call	puts
	mov	BP_CMD_LINE_PTR(%rbx), %eax	# hdr.cmd_line_ptr: low 32 bits (mov zero-extends)
	mov	BP_EXT_CMD_LINE_PTR(%rbx), %edx	# ext_cmd_line_ptr: high 32 bits
	shl	$32, %rdx
	or	%rdx, %rax
	jz	1f
	mov	%rax, %rdi
	mov	$CMDLINE_PRINT_MAX, %ecx
	call	putn
1:	mov	$'\n', %al
	call	putc

	lea	msg_e820(%rip), %rdi
	call	puts
	movzbl	BP_E820_ENTRIES(%rbx), %eax
	call	putdec
	mov	$'\n', %al
	call	putc

	mov	$EXIT_VALUE, %al
	mov	$EXIT_PORT, %dx
	out	%al, %dx
2:	cli					# the exit port ends the VM; never get here
	hlt
	jmp	2b

# putc: write AL to COM1.
putc:
	push	%rdx
	mov	$COM1, %dx
	out	%al, %dx
	pop	%rdx
	ret

# puts: write the NUL-terminated string at RDI.  putn: the same, at most RCX bytes.
# Clobber RAX, RCX, RDI.
puts:
	mov	$-1, %rcx
putn:
1:	test	%rcx, %rcx
	jz	2f
	mov	(%rdi), %al
	test	%al, %al
	jz	2f
	call	putc
	inc	%rdi
	dec	%rcx
	jmp	1b
2:	ret

# putdec: write EAX in decimal.  Clobbers RAX, RCX, RDX, RDI.
putdec:
	lea	numbuf_end(%rip), %rdi
	mov	$10, %ecx
1:	xor	%edx, %edx
	div	%ecx
	add	$'0', %dl
	dec	%rdi
	mov	%dl, (%rdi)
	test	%eax, %eax
	jnz	1b
	lea	numbuf_end(%rip), %rcx
	sub	%rdi, %rcx
	jmp	putn

	.section .rodata
msg_cmdline:
	.asciz	"cmdline="
msg_e820:
	.asciz	"e820="

	.bss
	.balign	16
numbuf:
	.skip	16
numbuf_end:
	.balign	16
stack:
	.skip	4096
stack_top:
