"""VMM-side fix-ups for instructions KVM's emulator cannot run on nested machines, and how failures are reported.

On kvm_pvm hosts guest kernel code is emulated, and a few instructions make
KVM_RUN fail with KVM_EXIT_INTERNAL_ERROR (emulation).  Where a fix-up is
safe we apply it and resume; otherwise the VM fails with the instruction
bytes and registers in the message (that is how every row of the table in
docs/kvm-notes.md was found).
"""
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.kvm import ioctl

BP_VECTOR = 3


def instruction_bytes(vcpu, mem, data):
    """The failing instruction's bytes: from KVM's report if it gave them, else read at RIP."""
    if len(data) >= 2 and data[0] & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        raw = b"".join(d.to_bytes(8, "little") for d in data[1:])
        return raw[1:1 + min(raw[0], 15)]
    rip = vcpu.get_regs().rip
    try:
        phys = vcpu.translate(rip)
        if phys is not None and mem.contains(phys, 15):
            return mem.read(phys, 15)
    except OSError:
        pass
    return b""


class _Decoded:
    """The parts of a 64-bit-mode instruction a fix-up needs: prefixes, opcode, ModRM operand."""

    def __init__(self, insn):
        i = 0
        self.segment = None
        self.addr32 = False
        self.rex = 0
        while i < len(insn) and insn[i] in LEGACY_PREFIXES:
            if insn[i] in (0x64, 0x65):
                self.segment = "fs" if insn[i] == 0x64 else "gs"
            self.addr32 |= insn[i] == 0x67
            i += 1
        if i < len(insn) and 0x40 <= insn[i] <= 0x4f:
            self.rex = insn[i]
            i += 1
        self.insn = insn
        self.pos = i

    def take_opcode(self, opcode):
        if self.insn[self.pos:self.pos + len(opcode)] != opcode:
            return False
        self.pos += len(opcode)
        return True

    def modrm_memory(self, regs):
        """(ModRM.reg, linear address, instruction length) for a memory operand; None if not one."""
        insn, i = self.insn, self.pos
        if i >= len(insn):
            return None
        modrm = insn[i]
        i += 1
        mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if mod == 3:
            return None
        gpr = _gprs(regs)
        rip_relative = False
        if rm == 4:
            sib = insn[i]
            i += 1
            scale, index, base = 1 << (sib >> 6), ((sib >> 3) & 7) | (self.rex & 2) << 2, (sib & 7)
            addr = gpr[index] * scale if index != 4 else 0
            if base == 5 and mod == 0:
                addr += int.from_bytes(insn[i:i + 4], "little", signed=True)
                i += 4
            else:
                addr += gpr[base | (self.rex & 1) << 3]
        elif rm == 5 and mod == 0:
            rip_relative = True
            addr = int.from_bytes(insn[i:i + 4], "little", signed=True)
            i += 4
        else:
            addr = gpr[rm | (self.rex & 1) << 3]
        if mod == 1:
            addr += int.from_bytes(insn[i:i + 1], "little", signed=True)
            i += 1
        elif mod == 2:
            addr += int.from_bytes(insn[i:i + 4], "little", signed=True)
            i += 4
        if rip_relative:
            addr += regs.rip + i
        if self.addr32:
            addr &= 0xFFFFFFFF
        return reg, addr, i


LEGACY_PREFIXES = frozenset((0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x66, 0x67, 0xf2, 0xf3))
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
MXCSR_RESERVED = 0xFFFF0000
GP_VECTOR = 13


def _gprs(regs):
    return [getattr(regs, name) for name in GPR_NAMES]


def _guest_linear(vcpu, mem, linear, length):
    """Guest-physical address of `length` bytes at a guest-virtual address (one page), or None."""
    if (linear & 0xFFF) + length > 0x1000:
        return None
    phys = vcpu.translate(linear & 0xFFFFFFFFFFFFFFFF)
    if phys is None or not mem.contains(phys, length):
        return None
    return phys


def _advance(vcpu, regs, length):
    regs.rip += length
    vcpu.set_regs(regs)


def _inject(vcpu, vector, error_code=None):
    events = ffi.new("struct kvm_vcpu_events *")
    ioctl(vcpu.fd, "KVM_GET_VCPU_EVENTS", events)
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = int(error_code is not None)
    events.exception.error_code = error_code or 0
    events.exception.pending = 0
    ioctl(vcpu.fd, "KVM_SET_VCPU_EVENTS", events)


def _skip(vcpu, mem, insn):
    """fwait: no x87 exception can be pending where kernels use it at init, so skipping it is exact."""
    _advance(vcpu, vcpu.get_regs(), 1)
    return True


def _inject_breakpoint(vcpu, mem, insn):
    """int3: advance past it and deliver #BP, as the CPU would have."""
    _advance(vcpu, vcpu.get_regs(), 1)
    _inject(vcpu, BP_VECTOR)
    return True


def _mxcsr(vcpu, mem, insn):
    """ldmxcsr / stmxcsr m32 (0f ae /2, /3): move MXCSR between guest memory and the vCPU's XSAVE state.

    Linux's kernel_fpu_begin() runs ldmxcsr; KVM's emulator has no case for
    it.  The operand's address is decoded here, translated with
    KVM_TRANSLATE and reached through the checked accessor; a reserved bit
    set in the new value raises #GP(0) as the CPU would.
    """
    d = _Decoded(insn)
    if not d.take_opcode(b"\x0f\xae"):
        return False
    regs = vcpu.get_regs()
    try:
        decoded = d.modrm_memory(regs)
    except IndexError:          # KVM gave fewer bytes than the operand needs
        return False
    if decoded is None or decoded[0] not in (2, 3) or d.segment is not None:
        return False
    reg, linear, length = decoded
    phys = _guest_linear(vcpu, mem, linear, 4)
    if phys is None:
        return False
    if reg == 2:
        value = mem.read_u32(phys)
        if value & MXCSR_RESERVED:
            _inject(vcpu, GP_VECTOR, 0)
            return True
        vcpu.set_mxcsr(value)
    else:
        mem.write_u32(phys, vcpu.get_mxcsr())
    _advance(vcpu, regs, length)
    return True


# (name, handler): a handler returns False when the instruction is not one it can complete.
FIXUPS = (
    ("int3", lambda insn: insn[:1] == b"\xcc", _inject_breakpoint),
    ("fwait", lambda insn: insn[:1] == b"\x9b", _skip),
    ("mxcsr", lambda insn: b"\x0f\xae" in insn[:7], _mxcsr),
)


def apply(vcpu, mem, insn, enabled, counts):
    """Apply the fix-up for `insn` if the profile enables one; True if the vCPU may resume."""
    for name, matches, handler in FIXUPS:
        if name in enabled and matches(insn) and handler(vcpu, mem, insn):
            counts[name] = counts.get(name, 0) + 1
            return True
    return False


def describe(insn):
    return " ".join(f"{b:02x}" for b in insn) if insn else "(bytes unavailable)"


def register_summary(vcpu):
    """One line of the registers that matter when reading a failure."""
    try:
        r, s = vcpu.get_regs(), vcpu.get_sregs()
    except OSError as e:
        return f"registers unavailable ({e})"
    return (f"rip=0x{r.rip:x} rsp=0x{r.rsp:x} rflags=0x{r.rflags:x} rax=0x{r.rax:x} rbx=0x{r.rbx:x} "
            f"rcx=0x{r.rcx:x} rdx=0x{r.rdx:x} rsi=0x{r.rsi:x} rdi=0x{r.rdi:x} cs=0x{s.cs.selector:x} "
            f"cpl={s.cs.dpl} cr0=0x{s.cr0:x} cr3=0x{s.cr3:x} cr4=0x{s.cr4:x} efer=0x{s.efer:x}")
