"""VMM-side fix-ups for instructions KVM's emulator cannot run on nested machines, and how failures are reported.

On kvm_pvm hosts guest kernel code is emulated, and a few instructions make
KVM_RUN fail with KVM_EXIT_INTERNAL_ERROR (emulation).  Where a fix-up is
safe we apply it and resume; otherwise the VM fails with the instruction
bytes and registers in the message (that is how every row of the table in
docs/kvm-notes.md was found).
"""
from vcpu_worker._kvm import ffi, lib
from vcpu_worker.kvm import ioctl

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


def _skip(vcpu, length):
    regs = vcpu.get_regs()
    regs.rip += length
    vcpu.set_regs(regs)


def _inject_breakpoint(vcpu, length):
    """int3: advance past it and deliver #BP, as the CPU would have."""
    _skip(vcpu, length)
    events = ffi.new("struct kvm_vcpu_events *")
    ioctl(vcpu.fd, "KVM_GET_VCPU_EVENTS", events)
    events.exception.injected = 1
    events.exception.nr = BP_VECTOR
    events.exception.has_error_code = 0
    events.exception.pending = 0
    ioctl(vcpu.fd, "KVM_SET_VCPU_EVENTS", events)


# (instruction prefix, handler, name).  fwait: no x87 exception can be
# pending where kernels use it at init, so skipping it is exact.
FIXUPS = (
    (b"\xcc", _inject_breakpoint, "int3"),
    (b"\x9b", _skip, "fwait"),
)


def apply(vcpu, insn, enabled, counts):
    """Apply the fix-up for `insn` if the profile enables one; True if the vCPU may resume."""
    for prefix, handler, name in FIXUPS:
        if name in enabled and insn.startswith(prefix):
            handler(vcpu, len(prefix))
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
