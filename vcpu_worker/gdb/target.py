"""The guest as a GDB target: its vCPUs' registers, memory through their page tables, breakpoints, holds and stops.

The GDB session (stub.py) calls this from its own thread, and only while
the vCPUs it touches are parked (Machine.debug_hold): a vCPU ioctl from
another thread of the worker is fine then, and would wait for KVM_RUN
otherwise, so every access checks first.  The vCPU threads call in through
GuestDebug (vcpu_worker/guest_debug.py), whose owner this is: a debug exit
or a planted int3 becomes a Stop for the session, and the vCPU parks.

Memory is reached the way GDB means it, through the guest's page tables
(KVM_TRANSLATE, page by page) and then the checked accessor: an address that
is not mapped, or maps outside RAM (device memory), is an error, never a
physical fallback.  Software breakpoints are int3 bytes written into guest
RAM, shadowed so GDB always reads the original bytes; hardware ones and
watchpoints take GuestDebug slots on every vCPU.
"""
from pyhv.proto.errors import EXIT_STOPPED, HvError
from pyhv.vcpu_worker.gdb.registers import BY_NAME, GPRS, SELECTORS, abridged_tag_word, full_tag_word
from pyhv.vcpu_worker.guest_debug import NOT_MINE
from pyhv.vcpu_worker.kvm import KvmError
from pyhv.vcpu_worker.vcpu import Outcome

PAGE = 4096
INT3 = 0xCC
USER_HALF_END = 0x0000_8000_0000_0000        # canonical lower half: where user space lives
MSR_KERNEL_GS_BASE = 0xC000_0102
SIGINT, SIGTRAP = 2, 5
HOLD_TIMEOUT = 5.0
# Z packet types -> GuestDebug slot kinds (1: execute; 2: write; 4: access; 3, read-only, x86 cannot do)
HW_KINDS = {1: "x", 2: "w", 4: "rw"}
WATCH_REASONS = {"w": "watch", "rw": "awatch"}
RING3_FACT = ("on this host guest ring 3 runs natively under nested KVM, where hardware breakpoints, "
              "single-step and int3 do not reach the VMM (docs/debugging.md)")
WATCH_FACT = ("watchpoints do not fire on this host: nested KVM delivers no data breakpoint, in ring 0 or 3; "
              "for ring-0 code `set can-use-hw-watchpoints 0` makes GDB watch by single-stepping "
              "(docs/debugging.md)")

# FXSAVE area offsets (the first 512 bytes of the XSAVE image)
FCW, FSW, FTW, FOP, FIP, FDP, MXCSR, ST0, XMM0, XSTATE_BV = 0, 2, 4, 6, 8, 16, 24, 32, 160, 512


class DebugRefused(HvError):
    """What the debugger asked cannot be done (an address not mapped, no free debug register, ring 3 here)."""


class Stop:
    """Why the guest stopped, as a stop reply says it: the vCPU, the signal, and a reason GDB knows."""
    __slots__ = ("index", "signal", "reason", "address")

    def __init__(self, index, signal=SIGTRAP, reason=None, address=None):
        self.index, self.signal, self.reason, self.address = index, signal, reason, address

    def __repr__(self):
        return f"Stop({self.index}, {self.signal}, {self.reason!r}, {self.address})"


class MachineTarget:
    """One Machine as GDB sees it; vCPU index i is GDB thread i + 1."""

    def __init__(self, machine):
        self.machine = machine
        self.vcpus = machine.vcpus
        self.mem = machine.mem
        self.debug = machine.guest_debug
        self.nested = machine.profile.name == "nested"     # RING3_FACT and WATCH_FACT hold here
        self.sw_breakpoints = {}       # guest-virtual address -> (guest-physical address, original byte)
        self.hw_breakpoints = {}       # (Z type, address, length) -> {vCPU index: slot}
        self.on_stop = None            # the session's: Stop -> True if the vCPU should park for it
        for debug in self.debug:       # the guest's own debug exceptions stop here while a client is attached
            debug.set_debugger(self)

    @property
    def count(self):
        return len(self.vcpus)

    # -- holding ------------------------------------------------------------------------------------------
    def hold(self, indices):
        """Hold these vCPUs (and release the others); True once the held ones are parked."""
        self.machine.debug_hold(indices)
        return self.machine.wait_parked(indices, HOLD_TIMEOUT)

    def hold_all(self):
        return self.hold(range(self.count))

    def hold_nowait(self, indices):
        """Hold these vCPUs and release the others, without waiting (from a vCPU thread, too)."""
        self.machine.debug_hold(indices)

    def release_all(self):
        self.machine.debug_hold(())

    def ended(self):
        return self.machine.outcome

    def _parked(self, index):
        if not self.machine.is_parked(index):
            raise DebugRefused(f"vCPU {index} is running: stop it first")
        return self.vcpus[index]

    # -- vCPU state ---------------------------------------------------------------------------------------
    def ring(self, index):
        return self._parked(index).get_sregs().cs.dpl

    def describe(self, index):
        """For `info threads`: the vCPU and its ring."""
        try:
            return f"vCPU {index}, ring {self.ring(index)}"
        except (DebugRefused, OSError):
            return f"vCPU {index}"

    def registers(self, index):
        """{name: value} of every register in registers.REGISTERS."""
        vcpu = self._parked(index)
        r, s = vcpu.get_regs(), vcpu.get_sregs()
        values = {name: getattr(r, name) for name in GPRS}
        values.update(rip=r.rip, eflags=r.rflags, fs_base=s.fs.base, gs_base=s.gs.base, cr0=s.cr0, cr2=s.cr2,
                      cr3=s.cr3, cr4=s.cr4, cr8=s.cr8, efer=s.efer)
        values.update({name: getattr(s, name).selector for name in SELECTORS})
        msrs = dict(vcpu.get_msrs([MSR_KERNEL_GS_BASE]))
        values["k_gs_base"] = msrs.get(MSR_KERNEL_GS_BASE, 0)
        values.update(_fpu_values(vcpu.get_xsave()))
        return values

    def set_registers(self, index, changes):
        """Write the registers in `changes` ({name: value}); the rest keep their values."""
        vcpu = self._parked(index)
        bad = [n for n in changes if n in SELECTORS]
        if bad:
            raise DebugRefused(f"cannot set {bad[0]}: a segment selector loads a descriptor from the guest's GDT")
        try:
            regs = [n for n in changes if n in GPRS or n in ("rip", "eflags")]
            if regs:
                r = vcpu.get_regs()
                for n in regs:
                    setattr(r, "rflags" if n == "eflags" else n, changes[n])
                vcpu.set_regs(r)
            sys_regs = [n for n in changes if n in ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
            if sys_regs:
                s = vcpu.get_sregs()
                for n in sys_regs:
                    if n.endswith("_base"):
                        getattr(s, n[:2]).base = changes[n]
                    else:
                        setattr(s, n, changes[n])
                vcpu.set_sregs(s)
            if "k_gs_base" in changes:
                vcpu.set_msrs([[MSR_KERNEL_GS_BASE, changes["k_gs_base"]]])
            fpu = {n: v for n, v in changes.items() if BY_NAME[n].feature.endswith(("core", "sse"))
                   and n not in regs and n not in SELECTORS}
            if fpu:
                vcpu.set_xsave(_with_fpu_values(vcpu.get_xsave(), fpu))
        except (KvmError, HvError) as e:
            raise DebugRefused(f"KVM refused the registers: {e}") from None

    # -- memory -------------------------------------------------------------------------------------------
    def _pages(self, index, address, length):
        """[(guest-physical, length)] for `length` bytes at guest-virtual `address`, stopping at the first gap."""
        vcpu = self._parked(index)
        out, done = [], 0
        while done < length:
            a = address + done
            if a >= 1 << 64:
                break
            n = min(length - done, PAGE - (a & (PAGE - 1)))
            phys = vcpu.translate(a)
            if phys is None or not self.mem.contains(phys, n):
                break
            out.append((phys, n))
            done += n
        return out

    def read_memory(self, index, address, length):
        """Up to `length` bytes at guest-virtual `address` (fewer where the mapping ends), breakpoints hidden."""
        data = bytearray()
        for phys, n in self._pages(index, address, length):
            data += self.mem.read(phys, n)
        for bp, (_, original) in self.sw_breakpoints.items():
            if address <= bp < address + len(data):
                data[bp - address] = original
        return bytes(data)

    def write_memory(self, index, address, data):
        """All of `data` at guest-virtual `address`, or nothing (DebugRefused) if any byte is not guest RAM."""
        pages = self._pages(index, address, len(data))
        if sum(n for _, n in pages) < len(data):
            raise DebugRefused(f"cannot write {len(data)} bytes at 0x{address:x}: not all mapped to guest RAM")
        data = bytearray(data)
        for bp, (phys, _) in list(self.sw_breakpoints.items()):
            if address <= bp < address + len(data):        # a planted int3 stays; GDB's byte is what it restores
                self.sw_breakpoints[bp] = (phys, data[bp - address])
                data[bp - address] = INT3
        done = 0
        for phys, n in pages:
            self.mem.write(phys, bytes(data[done:done + n]))
            done += n

    # -- breakpoints --------------------------------------------------------------------------------------
    def _refuse_ring3(self, address, what):
        if not self.nested or address >= USER_HALF_END:
            return
        rings = [i for i in range(self.count) if self.machine.is_parked(i) and self.ring(i) == 3]
        if rings:
            raise DebugRefused(f"{what} at 0x{address:x} refused: vCPU {rings[0]} runs in ring 3, and {RING3_FACT}")

    def insert_breakpoint(self, index, ztype, address, length):
        """Z packets: 0 software, 1 hardware, 2 write and 4 access watchpoints."""
        if ztype == 0:
            return self._insert_software(index, address)
        if ztype not in HW_KINDS:
            raise DebugRefused("read watchpoints are not possible on x86 (use awatch)")
        kind = HW_KINDS[ztype]
        if kind != "x" and self.nested:
            raise DebugRefused(WATCH_FACT)
        self._refuse_ring3(address, "a hardware breakpoint" if kind == "x" else "a watchpoint")
        key = (ztype, address, 1 if kind == "x" else length)
        if key in self.hw_breakpoints:
            return
        slots = {}
        try:
            for i, debug in enumerate(self.debug):
                slot = debug.set_slot(self, address, kind, key[2])
                if slot is None:
                    raise DebugRefused(f"no free debug register on vCPU {i} (GDB has {len(debug.free_slots(self))} "
                                       f"of DR0-DR3 left)")
                slots[i] = slot
        except ValueError as e:
            raise DebugRefused(str(e)) from None
        finally:
            if len(slots) != self.count:
                for i, slot in slots.items():
                    self.debug[i].clear_slot(self, slot)
        self.hw_breakpoints[key] = slots

    def _insert_software(self, index, address):
        if address in self.sw_breakpoints:
            return
        self._refuse_ring3(address, "a breakpoint")
        pages = self._pages(index, address, 1)
        if not pages:
            raise DebugRefused(f"cannot set a breakpoint at 0x{address:x}: not mapped to guest RAM")
        phys = pages[0][0]
        self.sw_breakpoints[address] = (phys, self.mem.read(phys, 1)[0])
        self.mem.write(phys, bytes((INT3,)))
        for debug in self.debug:
            debug.set_software_breakpoints(self, True)

    def remove_breakpoint(self, ztype, address, length):
        if ztype == 0:
            entry = self.sw_breakpoints.pop(address, None)
            if entry is not None:
                self._restore(*entry)
            return
        kind = HW_KINDS.get(ztype)
        slots = self.hw_breakpoints.pop((ztype, address, 1 if kind == "x" else length), {})
        for i, slot in slots.items():
            self.debug[i].clear_slot(self, slot)

    def _restore(self, phys, original):
        if self.mem.read(phys, 1)[0] == INT3:          # unless the guest has rewritten that code since
            self.mem.write(phys, bytes((original,)))

    def remove_all(self):
        """Every breakpoint and watchpoint out, stepping off: what detaching leaves (vCPUs parked)."""
        for phys, original in self.sw_breakpoints.values():
            self._restore(phys, original)
        self.sw_breakpoints.clear()
        self.hw_breakpoints.clear()
        for debug in self.debug:
            debug.clear(self)
        self.apply()

    def apply(self, step=()):
        """Give each parked vCPU its guest-debug state: single-step for those in `step`."""
        for i, debug in enumerate(self.debug):
            debug.set_step(self, i in step)
            if self.machine.is_parked(i):
                debug.apply()

    def check_step(self, index):
        """Refuse a step the machine cannot report: in ring 3, or of an instruction that enters ring 3."""
        if not self.nested:
            return
        if self.ring(index) == 3:
            raise DebugRefused(f"cannot single-step vCPU {index} in ring 3: {RING3_FACT}")
        into = self._enters_ring3(index)
        if into:
            raise DebugRefused(f"cannot single-step vCPU {index} over {into} into ring 3 (the step would reach the "
                               f"guest as a debug exception): {RING3_FACT}")

    def _enters_ring3(self, index):
        """The name of the instruction at RIP if it returns to ring 3 (iret to an RPL-3 CS, sysret, sysexit)."""
        r = self.vcpus[index].get_regs()
        code = self.read_memory(index, r.rip, 4)
        i = 0
        while i < len(code) and (code[i] == 0x66 or 0x40 <= code[i] <= 0x4F):
            i += 1
        wide = any(0x48 <= b <= 0x4F for b in code[:i])
        op = code[i:i + 2]
        if op[:1] == b"\xcf":
            size = 8 if wide else 4                     # iretq pops 8-byte slots, iretd 4-byte ones: RIP, then CS
            cs = self.read_memory(index, r.rsp + size, 2)
            return "iretq" if len(cs) == 2 and int.from_bytes(cs, "little") & 3 == 3 else None
        return {b"\x0f\x07": "sysret", b"\x0f\x35": "sysexit"}.get(bytes(op))

    def kill(self):
        self.machine.finish(Outcome(EXIT_STOPPED, "killed from GDB"))

    # -- stops, from the vCPU threads (GuestDebug's owner interface) ----------------------------------------
    def on_debug(self, ctx, event):
        index = ctx.vcpu.index
        if event.slots:
            slot = event.slots[0][1]
            stop = Stop(index, SIGTRAP, "hwbreak") if slot.kind == "x" else \
                Stop(index, SIGTRAP, WATCH_REASONS[slot.kind], slot.address)
        else:
            stop = Stop(index, SIGTRAP)
        return self._stopped(ctx, stop)

    def attached(self):
        return self.on_stop is not None

    def on_software_breakpoint(self, ctx, rip):
        entry = self.sw_breakpoints.get(rip)
        if entry is None or self.mem.read(entry[0], 1)[0] != INT3:
            return NOT_MINE
        return self._stopped(ctx, Stop(ctx.vcpu.index, SIGTRAP, "swbreak"))

    def _stopped(self, ctx, stop):
        """Tell the session; park until it lets this vCPU go (or the VM ends: its Outcome)."""
        on_stop = self.on_stop
        if on_stop is None or not on_stop(stop):
            return None
        return ctx.on_kick(ctx)


def _fpu_values(xsave):
    """x87 and SSE registers from an XSAVE image (its legacy FXSAVE area)."""
    u16 = lambda o: int.from_bytes(xsave[o:o + 2], "little")     # noqa: E731
    u64 = lambda o: int.from_bytes(xsave[o:o + 8], "little")     # noqa: E731
    st = [xsave[ST0 + 16 * i:ST0 + 16 * i + 10] for i in range(8)]
    fip, fdp = u64(FIP), u64(FDP)
    values = {f"st{i}": st[i] for i in range(8)}
    values.update({f"xmm{i}": xsave[XMM0 + 16 * i:XMM0 + 16 * i + 16] for i in range(16)})
    values.update(fctrl=u16(FCW), fstat=u16(FSW), ftag=full_tag_word(xsave[FTW], u16(FSW), st), fop=u16(FOP),
                  fioff=fip & 0xFFFFFFFF, fiseg=(fip >> 32) & 0xFFFF, fooff=fdp & 0xFFFFFFFF,
                  foseg=(fdp >> 32) & 0xFFFF, mxcsr=int.from_bytes(xsave[MXCSR:MXCSR + 4], "little"))
    return values


def _with_fpu_values(xsave, changes):
    """The XSAVE image with x87/SSE registers from `changes`, marked present so KVM takes them."""
    b = bytearray(xsave)

    def put(offset, value, size):
        b[offset:offset + size] = value[:size].ljust(size, b"\0") if isinstance(value, bytes) else \
            (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    for name, value in changes.items():
        if name.startswith("st"):
            put(ST0 + 16 * int(name[2:]), value, 10)
        elif name.startswith("xmm"):
            put(XMM0 + 16 * int(name[3:]), value, 16)
        elif name == "ftag":
            b[FTW] = abridged_tag_word(value)
        elif name in ("fioff", "fiseg", "fooff", "foseg"):
            at = FIP if name.startswith("fi") else FDP
            old = int.from_bytes(b[at:at + 8], "little")
            new = (old & ~0xFFFFFFFF) | (value & 0xFFFFFFFF) if name.endswith("off") else \
                (old & ~(0xFFFF << 32)) | ((value & 0xFFFF) << 32)
            put(at, new, 8)
        else:
            put({"fctrl": FCW, "fstat": FSW, "fop": FOP, "mxcsr": MXCSR}[name], value, 4 if name == "mxcsr" else 2)
    bv = int.from_bytes(b[XSTATE_BV:XSTATE_BV + 8], "little") | 3           # x87 and SSE state present
    b[XSTATE_BV:XSTATE_BV + 8] = bv.to_bytes(8, "little")
    return bytes(b)
