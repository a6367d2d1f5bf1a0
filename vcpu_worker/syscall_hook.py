"""The SYSCALL hook (compat profile `nested`): system calls of unmodified guest kernels on hosts where SYSCALL stays in ring 3.

On nested kvm_pvm hosts a ring-3 `syscall` loads RIP from LSTAR, RCX and
R11 and masks RFLAGS, but leaves the CPU in ring 3, so fetching the
kernel's entry code faults and an unmodified Linux kills init at its first
system call.  The VMM finishes the instruction instead:

- `arm()` reads the guest's IDT, the #PF gate (vector 14) and STAR, LSTAR and
  FMASK, and puts a hardware execute breakpoint on the #PF entry (DR0,
  through vcpu_worker/guest_debug.py; in ring 0, which KVM emulates here,
  such breakpoints fire).
- The C run loop (csrc/hv_kvm.c, `hv_hook_exit`) takes the KVM_EXIT_DEBUG
  there with the registers KVM left in kvm_run's sync-regs area, reads the
  frame the CPU pushed through the guest's page tables, and for a user-mode
  fault at RIP == LSTAR does what SYSCALL should have done: RIP = LSTAR,
  RSP = the user RSP from the frame (the frame is dropped), R11 cut to user
  flags with IF set, RFLAGS = that masked by FMASK, CS and SS from STAR, CPL
  0.  Any other fault resumes past the entry's first instruction (endbr64,
  a NOP, clac or cld: done by moving RIP and RFLAGS, so DR0 does not fire
  again); one C cannot skip is single-stepped here.  The way back (sysretq,
  iretq) the emulator runs by itself.
- Every CPU writes LSTAR once it has loaded its IDT (Linux: syscall_init(),
  the boot CPU in trap_init(), APs at bring-up).  Those writes, and STAR and
  FMASK, reach us through an MSR filter (KVM_EXIT_X86_WRMSR): each vCPU arms
  itself on its own thread before its first user instruction, and re-arms
  when the guest sets LSTAR again.  A moved IDT or a rewritten #PF gate is
  seen on the vCPU's next exit of any kind (a compare against the sync-regs
  area and the gate's bytes, no ioctl) and re-armed before it runs on.  A
  restored or migrated guest is armed from its restored state.

Whether a host needs this is probed once per host boot (`host_facts`): a
throwaway VM runs a ring-3 `syscall`.  Measured figures: docs/kvm-notes.md.
"""
import json
import os
import threading
import time

from pyhv.proto import runtime
from pyhv.proto.errors import StateError
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.guest_debug import GuestDebug
from pyhv.vcpu_worker.kvm import KvmError, ioctl

OWNER = "syscall-hook"       # the probe's owner name (a live vCPU's owner is its SyscallHook)
HOOK_SLOT = 0                # DR0, reserved for the hook; a debugger gets DR1-DR3
MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
EFER_SCE, EFER_LMA = 1 << 0, 1 << 10
PF_VECTOR = 14
NO_GPA = (1 << 64) - 1
RFLAGS_IF, RFLAGS_DF, RFLAGS_AC = 1 << 9, 1 << 10, 1 << 18
LINUX_FMASK = 0x47700          # TF DF IF IOPL AC NT

# --- the entry's first instruction: what resuming past it does ---------------------------------

def _modrm_length(insn, i):
    """Length of a ModRM operand (ModRM, SIB, displacement) starting at insn[i], 64-bit addressing."""
    modrm = insn[i]
    mod, rm = modrm >> 6, modrm & 7
    n = 1
    if mod != 3 and rm == 4:
        sib = insn[i + 1]
        n += 1
        if mod == 0 and sib & 7 == 5:
            n += 4
    if mod == 0 and rm == 5:
        n += 4
    elif mod == 1:
        n += 1
    elif mod == 2:
        n += 4
    return n


def skip_rule(insn):
    """(length, RFLAGS bits cleared, RFLAGS bits set) for an instruction that only does that, else None.

    What Linux's exception entries start with: endbr64 (IBT kernels), the
    3-byte NOP or `clac` that ASM_CLAC patches to, `cld`.
    """
    try:
        if insn[:4] in (b"\xf3\x0f\x1e\xfa", b"\xf3\x0f\x1e\xfb"):      # endbr64, endbr32
            return 4, 0, 0
        if insn[:1] == b"\x90":                                          # nop
            return 1, 0, 0
        if insn[:2] == b"\x66\x90":
            return 2, 0, 0
        prefix = 1 if insn[:1] == b"\x66" else 0
        if insn[prefix:prefix + 2] == b"\x0f\x1f" and (insn[prefix + 2] >> 3) & 7 == 0:   # nopw/nopl r/m
            return prefix + 2 + _modrm_length(insn, prefix + 2), 0, 0
        if insn[:3] == b"\x0f\x01\xca":                                  # clac
            return 3, RFLAGS_AC, 0
        if insn[:3] == b"\x0f\x01\xcb":                                  # stac
            return 3, 0, RFLAGS_AC
        if insn[:1] == b"\xfc":                                          # cld
            return 1, RFLAGS_DF, 0
        if insn[:1] == b"\xfd":                                          # std
            return 1, 0, RFLAGS_DF
        if insn[:1] == b"\xfa":                                          # cli
            return 1, RFLAGS_IF, 0
    except IndexError:
        pass
    return None


def parse_gate(gate):
    """(present, handler address) of a 16-byte long-mode IDT gate, or (False, None) if it is not a valid one."""
    if len(gate) != 16:
        return False, None
    low = int.from_bytes(gate[0:8], "little")
    present, gate_type = bool(low >> 47 & 1), low >> 40 & 0xF
    if not present or gate_type not in (0xE, 0xF):          # interrupt or trap gate
        return False, None
    handler = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | int.from_bytes(gate[8:12], "little") << 32
    canonical = handler >> 47 in (0, 0x1FFFF)
    return canonical, handler if canonical else None


# --- the host: does SYSCALL leave ring 3 here? --------------------------------------------------

PROBE_MEM = 4 << 20
PROBE_USER_CODE = 0x200000      # the second 2 MiB page: user-accessible; the first is supervisor-only
PROBE_USER_STACK = 0x3FF000
PROBE_KERNEL_STACK = 0x80000
PROBE_LSTAR = 0x1000            # `hlt`: reached in ring 0 if SYSCALL works
PROBE_PF_ENTRY = 0x1010         # `hlt`: the #PF handler (DR0 on it)
PROBE_OTHER_ENTRY = 0x1020      # `hlt`: every other vector
PROBE_TIMEOUT = 2.0


def _probe_guest(mem):
    """A vCPU's worth of tables and code: ring-3 `syscall` with LSTAR, the #PF entry and other vectors in ring 0."""
    from pyhv.vcpu_worker.boot import cpu_state, layout
    cpu_state.write_tables(mem)
    mem.write_u64(layout.PD_ADDR, mem.read_u64(layout.PD_ADDR) & ~cpu_state.PDE_USER)   # 0-2 MiB: supervisor
    mem.write_u64(layout.TSS_ADDR + 4, PROBE_KERNEL_STACK)                            # RSP0
    for vector in range(16):
        entry = PROBE_PF_ENTRY if vector == PF_VECTOR else PROBE_OTHER_ENTRY
        low = (entry & 0xFFFF) | layout.SEL_CODE64 << 16 | 0x8E << 40 | (entry >> 16 & 0xFFFF) << 48
        mem.write(layout.IDT_ADDR + 16 * vector, low.to_bytes(8, "little") + (entry >> 32).to_bytes(8, "little"))
    for addr in (PROBE_LSTAR, PROBE_PF_ENTRY, PROBE_OTHER_ENTRY):
        mem.write(addr, b"\xf4")                                                      # hlt
    mem.write(PROBE_USER_CODE, b"\x0f\x05\xeb\xfe")                                   # syscall; jmp .
    return layout


def probe(kvm):
    """Run a ring-3 `syscall` in a throwaway VM: {"syscall_leaves_ring3", "breakpoint_fires", "detail", "ms"}."""
    from pyhv.devices.guest_memory import GuestMemory, create_memfd
    from pyhv.vcpu_worker.boot import cpu_state
    t0 = time.monotonic()
    fd = create_memfd(PROBE_MEM, "pyhv-syscall-probe")
    vm = mem = vcpu = buf = None
    try:
        mem = GuestMemory(fd, PROBE_MEM)
        vm = kvm.create_vm()
        buf = ffi.from_buffer(mem.host_buffer())
        vm.add_memory(0, int(ffi.cast("uintptr_t", buf)), PROBE_MEM)
        layout = _probe_guest(mem)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        cpu_state.set_boot_sregs(sregs, "user64")
        sregs.idt.limit = 16 * 16 - 1
        sregs.efer |= EFER_SCE
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rsp, regs.rflags = PROBE_USER_CODE, PROBE_USER_STACK, cpu_state.RFLAGS_RESERVED
        vcpu.set_regs(regs)
        vcpu.set_msrs([[MSR_STAR, 0x23 << 48 | layout.SEL_CODE64 << 32], [MSR_LSTAR, PROBE_LSTAR],
                       [MSR_FMASK, LINUX_FMASK]])
        debug = GuestDebug(vcpu)
        debug.reserve(HOOK_SLOT, OWNER)
        debug.set_slot(OWNER, PROBE_PF_ENTRY)
        debug.apply()
        ports = ffi.new("uint8_t[65536]")
        vcpu.state.port_action = ports
        reason = _run_with_watchdog(vcpu)
        rip = vcpu.get_regs().rip
        e = vcpu.exit
        result = {"syscall_leaves_ring3": None, "breakpoint_fires": None}
        if reason == lib.KVM_EXIT_HLT and rip == PROBE_LSTAR + 1:
            result.update(syscall_leaves_ring3=True, detail="SYSCALL reached LSTAR in ring 0")
        elif reason == lib.KVM_EXIT_DEBUG and e.data[0] == PROBE_PF_ENTRY:
            frame = mem.read(vcpu.get_regs().rsp, 48)
            fault_rip, fault_cs = int.from_bytes(frame[8:16], "little"), int.from_bytes(frame[16:24], "little")
            result.update(syscall_leaves_ring3=not (fault_rip == PROBE_LSTAR and fault_cs & 3 == 3),
                          breakpoint_fires=True,
                          detail=f"ring-3 SYSCALL faulted at rip 0x{fault_rip:x} (LSTAR) with cs 0x{fault_cs:x}; "
                                 f"DR0 on the #PF entry fired")
        elif reason == lib.KVM_EXIT_HLT and rip == PROBE_PF_ENTRY + 1:
            result.update(syscall_leaves_ring3=False, breakpoint_fires=False,
                          detail="ring-3 SYSCALL faulted at LSTAR; DR0 on the #PF entry did not fire")
        else:
            result["detail"] = f"inconclusive: exit {reason} at rip 0x{rip:x}"
        return {**result, "ms": round((time.monotonic() - t0) * 1000, 1)}
    finally:
        if vcpu is not None:
            vcpu.close()
        if vm is not None:
            vm.close()
        if mem is not None:
            if buf is not None:
                ffi.release(buf)
            mem.close()
        os.close(fd)


def _run_with_watchdog(vcpu):
    """One hv_vcpu_run, kicked out after PROBE_TIMEOUT if the probe guest neither halts nor faults."""
    lib.hv_install_kick_handler(lib.SIGUSR1)        # the kick Machine uses (vcpu_worker/machine.py)
    me = threading.get_ident()

    def kick():
        vcpu.kick_prepare()
        lib.hv_kick_thread(me, lib.SIGUSR1)

    timer = threading.Timer(PROBE_TIMEOUT, kick)
    timer.start()
    try:
        return lib.hv_vcpu_run(vcpu.state, vcpu.exit)
    finally:
        timer.cancel()
        vcpu.kick_clear()


def _host_key():
    """This boot and this KVM: the kernel, the boot id, the KVM modules loaded and their parameters."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    modules = []
    for name in sorted(n for n in os.listdir("/sys/module") if n.startswith("kvm")):
        params = os.path.join("/sys/module", name, "parameters")
        values = []
        for p in sorted(os.listdir(params)) if os.path.isdir(params) else ():
            try:
                with open(os.path.join(params, p)) as f:
                    values.append(f"{p}={f.read().strip()}")
            except OSError:
                pass
        modules.append(f"{name}({','.join(values)})")
    u = os.uname()
    return f"{u.release} {u.version} boot={boot} {' '.join(modules)}"


def read_host_facts():
    """The cached probe result for this boot and KVM, or None (no KVM needed: `hvctl info` reads it)."""
    path = runtime.host_facts_file()
    try:
        st = os.stat(path)
        if st.st_uid != os.geteuid():
            return None
        with open(path) as f:
            facts = json.load(f)
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and facts.get("key") == _host_key() else None


def host_facts(kvm):
    """The probe result for this host, probed now if this boot has none cached yet (then cached)."""
    facts = read_host_facts()
    if facts is not None:
        return facts
    try:
        found = probe(kvm)
    except (OSError, ValueError) as e:          # KvmError is an OSError: no hook, and no cache for this boot
        return {"syscall_leaves_ring3": None, "breakpoint_fires": None, "detail": f"the probe failed: {e}"}
    facts = {"key": _host_key(), "probed_at": time.time(), **found}
    path = runtime.host_facts_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(facts, f)
        os.replace(tmp, path)
    except OSError:
        pass                       # not cached: the next guest probes again
    return facts


def needed(facts):
    """Whether the hook goes on: SYSCALL stays in ring 3 and a breakpoint on the #PF entry fires."""
    return bool(facts.get("syscall_leaves_ring3") is False and facts.get("breakpoint_fires"))


def describe_host():
    """One line for `hvctl info`: what this host needs, from the cache (without KVM)."""
    facts = read_host_facts()
    if facts is None:
        return "on where SYSCALL stays in ring 3 (this host is probed when a guest starts)"
    if needed(facts):
        return f"on: {facts.get('detail')}"
    if facts.get("syscall_leaves_ring3"):
        return "off: SYSCALL works on this host"
    return f"unavailable on this host: {facts.get('detail')}"


# --- the VM and each vCPU ------------------------------------------------------------------------

def watch_syscall_msrs(vm):
    """Make the guest's writes to STAR, LSTAR and FMASK exit to us (KVM_EXIT_X86_WRMSR), other MSRs as before."""
    cap = ffi.new("struct kvm_enable_cap *")
    cap.cap = lib.KVM_CAP_X86_USER_SPACE_MSR
    cap.args[0] = lib.KVM_MSR_EXIT_REASON_FILTER
    ioctl(vm.fd, "KVM_ENABLE_CAP", cap)
    bitmap = ffi.new("uint8_t[1]", [0b0100])      # base STAR: STAR, LSTAR denied, CSTAR allowed, FMASK denied
    flt = ffi.new("struct kvm_msr_filter *")
    flt.flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW
    flt.ranges[0].flags = lib.KVM_MSR_FILTER_WRITE
    flt.ranges[0].base = MSR_STAR
    flt.ranges[0].nmsrs = 4
    flt.ranges[0].bitmap = bitmap
    ioctl(vm.fd, "KVM_X86_SET_MSR_FILTER", flt)   # KVM copies the bitmap


def guest_ram(mem, host_base):
    """The C view of guest RAM (struct hv_guest_ram) for a mapping at `host_base`."""
    ram = ffi.new("struct hv_guest_ram *")
    if len(mem.regions) > lib.HV_GUEST_RAM_MAX:
        raise ValueError(f"{len(mem.regions)} RAM regions, the hook handles {lib.HV_GUEST_RAM_MAX}")
    ram.n = len(mem.regions)
    for i, (gpa, size, offset) in enumerate(mem.regions):
        ram.gpa[i], ram.size[i] = gpa, size
        ram.host[i] = ffi.cast("uint8_t *", host_base + offset)
    return ram


class HookGroup:
    """The hooks of one guest: a change to the (shared) IDT seen on one vCPU re-arms them all.

    `kick(index)` makes vCPU `index` leave KVM_RUN (Machine's kick); the vCPU re-arms on its own thread
    (`SyscallHook.on_kick`), and the one that saw the change waits for that, up to REARM_WAIT seconds (a
    paused vCPU re-arms when it resumes).
    """
    REARM_WAIT = 1.0

    def __init__(self, kick):
        self.hooks = []
        self.kick = kick
        self._cond = threading.Condition()

    def rearm_all(self, seen_by):
        seen_by.arm()
        with self._cond:
            others = [h for h in self.hooks if h is not seen_by and h.c.watching]
            for h in others:
                h.rearm_pending = True
        for h in others:
            self.kick(h.vcpu.index)
        with self._cond:
            self._cond.wait_for(lambda: not any(h.rearm_pending for h in others), self.REARM_WAIT)

    def rearmed(self, hook):
        with self._cond:
            hook.rearm_pending = False
            self._cond.notify_all()


class SyscallHook:
    """The hook on one vCPU: arming from the guest's state, and the rare exits the C loop hands up."""

    def __init__(self, vcpu, debug, mem, ram, group=None):
        self.vcpu, self.debug, self.mem, self.ram = vcpu, debug, mem, ram
        self.group = group if group is not None else HookGroup(lambda index: None)
        self.group.hooks.append(self)
        debug.reserve(HOOK_SLOT, self)
        self.c = ffi.new("struct hv_syscall_hook *")
        self.c.ram = ram
        self.c.gate_gpa = self.c.insn_gpa = NO_GPA
        self.not_armed = "the guest has not set LSTAR"
        self.rearm_pending = False
        self.stepping = False
        self.steps = 0
        self.msr_writes = 0

    # -- arming --------------------------------------------------------------------------------------

    def arm(self):
        """Watch this vCPU and put DR0 on the guest's #PF entry; False (and `not_armed` says why) if it cannot yet."""
        c, vcpu = self.c, self.vcpu
        sregs = vcpu.get_sregs()
        msrs = dict(vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_FMASK]))
        c.star, c.lstar, c.fmask = msrs.get(MSR_STAR, 0), msrs.get(MSR_LSTAR, 0), msrs.get(MSR_FMASK, 0)
        c.idt_base, c.idt_limit = sregs.idt.base, sregs.idt.limit
        c.gate_gpa = NO_GPA
        lib.hv_hook_attach(vcpu.state, c)
        c.watching = 1
        why = self._arm(sregs)
        self.not_armed = why
        if why is not None:
            c.armed = 0
            if self.debug.slots[HOOK_SLOT] is not None:
                self.debug.clear_slot(self, HOOK_SLOT)
                self.debug.apply()
            return False
        return True

    def _arm(self, sregs):
        c = self.c
        if not sregs.efer & EFER_LMA:
            return "the guest is not in long mode"
        if not c.lstar:
            return "the guest has not set LSTAR"
        if sregs.idt.limit < 16 * PF_VECTOR + 15:
            return f"the IDT (limit 0x{sregs.idt.limit:x}) has no #PF gate"
        gate_va = sregs.idt.base + 16 * PF_VECTOR
        gate = self._read_virtual(gate_va, 16)
        if gate is None:
            return f"the #PF gate at 0x{gate_va:x} is not mapped"
        c.gate_gpa = self.vcpu.translate(gate_va)
        ffi.memmove(c.gate, gate, 16)
        ok, handler = parse_gate(gate)
        if not ok:
            return f"the #PF gate at 0x{gate_va:x} is not a present interrupt or trap gate"
        insn = self._read_virtual(handler, 15, whole=False)
        if not insn:
            return f"the #PF entry 0x{handler:x} is not mapped"
        rule = skip_rule(insn)
        c.handler = handler
        c.insn_gpa = self.vcpu.translate(handler)
        ffi.memmove(c.insn, insn.ljust(16, b"\0"), 16)
        c.skip_len, c.skip_clear, c.skip_set = rule if rule is not None else (0, 0, 0)
        self._set_breakpoint(handler)
        if not self.stepping:
            self.debug.apply()
        c.armed = 1
        return None

    def _read_virtual(self, va, length, whole=True):
        """Bytes at a guest-virtual address (through KVM_TRANSLATE and the checked accessor), up to the page end
        unless `whole`; None if not mapped."""
        in_page = min(length, 0x1000 - (va & 0xFFF))
        if whole and in_page < length:
            return None
        try:
            phys = self.vcpu.translate(va & 0xFFFFFFFFFFFFFFFF)
        except KvmError:
            return None
        if phys is None or not self.mem.contains(phys, in_page):
            return None
        return self.mem.read(phys, in_page)

    # -- exits the C loop hands up ---------------------------------------------------------------

    def on_wrmsr(self, index, value):
        """The guest wrote STAR, LSTAR or FMASK: write it for the guest, then re-arm.  False: refused (#GP)."""
        try:
            self.vcpu.set_msrs([[index, value]])
        except (KvmError, StateError):
            return False
        self.msr_writes += 1
        self.arm()
        return True

    def on_hook_exit(self, suberror, rsp):
        """HV_EXIT_HOOK: None to go on, or a one-line reason the VM cannot (a frame the hook cannot read)."""
        if suberror == lib.HV_HOOK_REARM:
            self.group.rearm_all(self)
            return None
        if suberror == lib.HV_HOOK_STEP:
            # Single-step the entry's first instruction with DR0 off, so the breakpoint does not fire again.
            self.stepping = True
            self.steps += 1
            self.debug.clear_slot(self, HOOK_SLOT)
            self.debug.set_step(self, True)
            self.debug.apply()
            return None
        if suberror == lib.HV_HOOK_NO_FRAME:
            return f"syscall hook: the #PF frame at rsp=0x{rsp:x} is not in guest RAM"
        return f"syscall hook: unknown request {suberror}"

    def _set_breakpoint(self, handler):
        self.debug.clear_slot(self, HOOK_SLOT)
        self.debug.set_slot(self, handler)          # the first free slot of ours: DR0, which we reserved

    def on_debug(self, ctx, event):
        """GuestDebug's owner interface: a KVM_EXIT_DEBUG for the hook the C loop did not take: the end of a
        single-step, or DR0 while the loop was not watching (re-arm; the breakpoint fires again and the loop takes
        it).  Always runs on (None)."""
        if self.stepping and event.step:
            self.stepping = False
            self.debug.set_step(self, False)
            if self.c.armed and self.c.skip_len == 0:      # an entry C never skips: DR0 back, nothing to re-read
                self._set_breakpoint(self.c.handler)
                self.debug.apply()
                return None
        self.arm()                                          # (the entry's bytes changed: decode them again)
        return None

    def on_kick(self):
        """This vCPU left KVM_RUN for a kick: re-arm if another vCPU saw the IDT change."""
        if self.rearm_pending:
            self.arm()
            self.group.rearmed(self)

    def counters(self):
        c = self.c
        return {"armed": bool(c.armed), "not_armed": self.not_armed if not c.armed else None,
                "handler": f"0x{c.handler:x}" if c.armed else None, "lstar": f"0x{c.lstar:x}",
                "syscalls": c.syscalls, "faults": c.faults, "rearms": c.rearms, "steps": self.steps,
                "msr_writes": self.msr_writes}
