"""Thin handles over the KVM API: the system (/dev/kvm), a VM, and a vCPU.

Every failing ioctl raises KvmError naming the ioctl and errno, so a failure
reads "KVM_CREATE_VCPU failed: EINVAL" rather than an OSError from nowhere.
"""
import errno as _errno
import os

from pyhv.proto.errors import HvError, StateError, VmFailure
from pyhv.vcpu_worker._kvm import ffi, lib

KVM_API_VERSION = 12
XSAVE_MXCSR_WORD = 6          # byte 24 of the legacy FXSAVE area
XSAVE_XSTATE_BV_WORD = 128    # byte 512: the XSAVE header's XSTATE_BV
XFEATURE_SSE = 1 << 1


class KvmError(HvError, OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""
    exit_status = VmFailure.exit_status

    def __init__(self, name, err):
        code = _errno.errorcode.get(err, str(err))
        super().__init__(err, f"{name} failed: {code} ({os.strerror(err)})")
        self.ioctl = name


class KvmUnavailable(VmFailure):
    """/dev/kvm cannot be used on this machine."""


def _check(name, r):
    if r < 0:
        raise KvmError(name, -r)
    return r


def _get_blob(fd, ioctl_name, ctype, setup=None):
    """A KVM_GET_* of `ctype` as bytes (its whole struct: the kernel's layout, checked by size on the way back)."""
    p = ffi.new(f"{ctype} *")
    if setup is not None:
        setup(p)
    ioctl(fd, ioctl_name, p)
    return bytes(ffi.buffer(p))


def _set_blob(fd, ioctl_name, ctype, blob, fix=None):
    """A KVM_SET_* of `ctype` from bytes `_get_blob` made (a StateError unless the size is this kernel's)."""
    size = ffi.sizeof(ctype)
    if not isinstance(blob, bytes) or len(blob) != size:
        raise StateError(f"saved {ctype} is {len(blob) if isinstance(blob, bytes) else '?'} bytes, "
                         f"this host's is {size} (a snapshot from another kernel?)")
    p = ffi.new(f"{ctype} *")
    ffi.memmove(p, blob, size)
    if fix is not None:
        fix(p)
    ioctl(fd, ioctl_name, p)


def ioctl(fd, name, arg=None):
    """Issue ioctl `name` (a KVM_* constant name) with a cffi pointer or an int."""
    req = getattr(lib, name)
    if arg is None or isinstance(arg, int):
        return _check(name, lib.hv_ioctl_int(fd, req, arg or 0))
    return _check(name, lib.hv_ioctl(fd, req, arg))


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path="/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}; KVM is needed (run as root on a machine with /dev/kvm)") from None
        version = ioctl(self.fd, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            raise KvmUnavailable(f"KVM API version {version}, expected {KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap_name):
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap_name))

    def supported_cpuid(self):
        """KVM's supported CPUID entries, as one cdata array that owns them.

        Not a list of `ents[i]`: those elements do not keep `ents` alive, so
        once it was freed they read whatever reused the memory (seen as APs
        triple-faulting in zygote-forked workers only).
        """
        ents = ffi.new("struct kvm_cpuid_entry2[256]")
        n = _check("KVM_GET_SUPPORTED_CPUID", lib.hv_get_supported_cpuid(self.fd, ents, 256))
        out = ffi.new("struct kvm_cpuid_entry2[]", n)
        ffi.memmove(out, ents, ffi.sizeof("struct kvm_cpuid_entry2") * n)
        return out

    def msr_indices(self):
        """Every MSR KVM can save and restore (KVM_GET_MSR_INDEX_LIST), in its order."""
        if getattr(self, "_msr_indices", None) is None:
            head = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
            r = lib.hv_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, head)    # E2BIG, and the count
            if r < 0 and r != -_errno.E2BIG:
                raise KvmError("KVM_GET_MSR_INDEX_LIST", -r)
            n = head.nmsrs
            full = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
            ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", full)
            self._msr_indices = [full.indices[i] for i in range(full.nmsrs)]
        return self._msr_indices

    def create_vm(self):
        return Vm(self, ioctl(self.fd, "KVM_CREATE_VM", 0))

    def close(self):
        os.close(self.fd)


class Vm:
    """A VM file descriptor: memory slots, irqchip, eventfds, vCPUs."""

    def __init__(self, kvm, fd):
        self.kvm = kvm
        self.fd = fd
        self.slots = []             # (guest_phys_addr, host_addr, size) by slot number
        self.dirty_logging = False

    def add_memory(self, guest_phys_addr, host_addr, size):
        """A memory slot (the next number); with dirty logging on, it is logged too."""
        self.slots.append((guest_phys_addr, host_addr, size))
        self._set_slot(len(self.slots) - 1)

    def _set_slot(self, slot):
        gpa, host, size = self.slots[slot]
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = lib.KVM_MEM_LOG_DIRTY_PAGES if self.dirty_logging else 0
        region.guest_phys_addr = gpa
        region.memory_size = size
        region.userspace_addr = host
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def set_dirty_logging(self, on):
        """KVM_MEM_LOG_DIRTY_PAGES on every slot (or off): from now on vCPU writes are logged per page.

        Changing a live slot's flags is allowed while vCPUs run.  Logging costs a write fault per page
        after each dirty_log() (and small pages), so it is on only while a migration copies RAM."""
        if bool(on) == self.dirty_logging:
            return
        self.dirty_logging = bool(on)
        try:
            for slot in range(len(self.slots)):
                self._set_slot(slot)
        except KvmError:
            self.dirty_logging = not self.dirty_logging
            for slot in range(len(self.slots)):
                try:
                    self._set_slot(slot)
                except KvmError:
                    pass
            raise

    def dirty_log(self, slot):
        """The pages of `slot` vCPUs wrote since logging began or the last call, one bit per page (LSB first
        within each byte), as bytes; KVM clears the log and write-protects those pages again."""
        pages = self.slots[slot][2] >> 12
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = bitmap
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap))

    def set_tss_addr(self, addr):
        ioctl(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr):
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", addr))

    def create_irqchip(self):
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit(self):
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl(self.fd, "KVM_CREATE_PIT2", cfg)

    def irq_line(self, irq, level):
        _check("KVM_IRQ_LINE", lib.hv_irq_line(self.fd, irq, 1 if level else 0))

    def irqfd(self, eventfd, gsi, deassign=False):
        arg = ffi.new("struct kvm_irqfd *")
        arg.fd = eventfd
        arg.gsi = gsi
        arg.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, "KVM_IRQFD", arg)

    def ioeventfd(self, eventfd, addr, length, pio=False, datamatch=None, deassign=False):
        arg = ffi.new("struct kvm_ioeventfd *")
        arg.addr = addr
        arg.len = length
        arg.fd = eventfd
        flags = lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            arg.datamatch = datamatch
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg.flags = flags
        ioctl(self.fd, "KVM_IOEVENTFD", arg)

    def set_gsi_routing(self, routes):
        """Replace the whole GSI routing table (KVM_SET_GSI_ROUTING).

        `routes`: (gsi, "irqchip", chip, pin) or (gsi, "msi", address, data)
        tuples.  The table replaces KVM's defaults, so a caller that adds MSI
        routes must include the irqchip routes for GSIs 0-23 itself
        (vcpu_worker.pci.default_irqchip_routes).
        """
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for e, (gsi, kind, a, b) in zip(table.entries, routes):
            e.gsi = gsi
            if kind == "irqchip":
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = a
                e.u.irqchip.pin = b
            elif kind == "msi":
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = a & 0xFFFFFFFF
                e.u.msi.address_hi = a >> 32
                e.u.msi.data = b
            else:
                raise ValueError(f"unknown GSI route kind {kind!r}")
        ioctl(self.fd, "KVM_SET_GSI_ROUTING", table)

    def signal_msi(self, address, data):
        """Inject one MSI now (KVM_SIGNAL_MSI): >0 delivered, 0 blocked by the guest, -1 no vCPU took it."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo = address & 0xFFFFFFFF
        msi.address_hi = address >> 32
        msi.data = data
        r = lib.hv_ioctl(self.fd, lib.KVM_SIGNAL_MSI, msi)
        if r == -_errno.EPERM:          # kvm_set_msi's -1: no destination accepted it
            return -1
        return _check("KVM_SIGNAL_MSI", r)

    def tsc_khz(self):
        """The VM's TSC frequency in kHz (a VM ioctl since Linux 6.0), or 0 if unknown."""
        try:
            return ioctl(self.fd, "KVM_GET_TSC_KHZ")
        except KvmError:
            return 0

    IRQCHIPS = (0, 1, 2)       # KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC

    def save_state(self):
        """The in-kernel PIC/IOAPIC, PIT and KVM clock, as {name: bytes}; call with every vCPU stopped."""
        state = {"pit2": _get_blob(self.fd, "KVM_GET_PIT2", "struct kvm_pit_state2"),
                 "clock": _get_blob(self.fd, "KVM_GET_CLOCK", "struct kvm_clock_data")}
        for chip in self.IRQCHIPS:
            state[f"irqchip{chip}"] = _get_blob(self.fd, "KVM_GET_IRQCHIP", "struct kvm_irqchip",
                                                lambda p, chip=chip: setattr(p, "chip_id", chip))
        return state

    def load_state(self, state):
        _set_blob(self.fd, "KVM_SET_PIT2", "struct kvm_pit_state2", state["pit2"])
        for chip in self.IRQCHIPS:
            _set_blob(self.fd, "KVM_SET_IRQCHIP", "struct kvm_irqchip", state[f"irqchip{chip}"],
                      lambda p, chip=chip: setattr(p, "chip_id", chip))
        # Only the clock value: the saved flags describe the old host's TSC (KVM_SET_CLOCK takes none of them).
        _set_blob(self.fd, "KVM_SET_CLOCK", "struct kvm_clock_data", state["clock"],
                  lambda p: setattr(p, "flags", 0))

    def create_vcpu(self, index):
        return Vcpu(self, index, ioctl(self.fd, "KVM_CREATE_VCPU", index))

    def close(self):
        os.close(self.fd)


class Vcpu:
    """A vCPU: registers, CPUID, and its mapped kvm_run area (mapped once)."""

    def __init__(self, vm, index, fd):
        self.vm = vm
        self.index = index
        self.fd = fd
        run = lib.hv_map_run(fd, vm.kvm.vcpu_mmap_size)
        if run == ffi.NULL:
            raise KvmError("mmap(kvm_run)", ffi.errno)
        self._run_map = run
        self.run = ffi.cast("struct kvm_run *", run)
        self.state = ffi.new("struct hv_vcpu *")
        self.state.fd = fd
        self.state.run = self.run
        self.exit = ffi.new("struct hv_exit *")

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs):
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs):
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_xsave(self):
        """The XSAVE image (FXSAVE legacy area first: x87, MXCSR, XMM) as bytes."""
        return _get_blob(self.fd, "KVM_GET_XSAVE", "struct kvm_xsave")

    def set_xsave(self, blob):
        _set_blob(self.fd, "KVM_SET_XSAVE", "struct kvm_xsave", blob)

    def get_mxcsr(self):
        """MXCSR, from the XSAVE image: KVM_GET_FPU leaves its mxcsr field unset on x86."""
        xsave = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, "KVM_GET_XSAVE", xsave)
        return xsave.region[XSAVE_MXCSR_WORD]

    def set_mxcsr(self, value):
        xsave = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, "KVM_GET_XSAVE", xsave)
        xsave.region[XSAVE_MXCSR_WORD] = value
        # KVM takes MXCSR only when XSTATE_BV says SSE state is present; the
        # buffer holds the current XMM values either way, so claiming it is exact.
        xsave.region[XSAVE_XSTATE_BV_WORD] |= XFEATURE_SSE
        ioctl(self.fd, "KVM_SET_XSAVE", xsave)

    def set_cpuid(self, entries):
        arr = ffi.new("struct kvm_cpuid_entry2[]", len(entries))
        for i, e in enumerate(entries):
            arr[i] = e
        _check("KVM_SET_CPUID2", lib.hv_set_cpuid(self.fd, arr, len(entries)))

    def set_mp_state(self, state):
        mp = ffi.new("struct kvm_mp_state *")
        mp.mp_state = state
        ioctl(self.fd, "KVM_SET_MP_STATE", mp)

    # Saved in this order (Firecracker's): MP state first, since reading it settles pending APIC events; LAPIC
    # before the MSRs on restore, since the TSC deadline MSR means something only in the restored LAPIC mode;
    # the events last.
    BLOBS = (("mp_state", "MP_STATE", "struct kvm_mp_state"), ("regs", "REGS", "struct kvm_regs"),
             ("sregs", "SREGS", "struct kvm_sregs"), ("xsave", "XSAVE", "struct kvm_xsave"),
             ("xcrs", "XCRS", "struct kvm_xcrs"), ("debugregs", "DEBUGREGS", "struct kvm_debugregs"),
             ("lapic", "LAPIC", "struct kvm_lapic_state"))

    def save_state(self, msr_indices):
        """Everything KVM holds of this (stopped) vCPU: {name: bytes}, plus "msrs": [[index, value]...]."""
        state = {name: _get_blob(self.fd, f"KVM_GET_{ioctl_name}", ctype) for name, ioctl_name, ctype in self.BLOBS}
        state["msrs"] = self.get_msrs(msr_indices)
        state["events"] = _get_blob(self.fd, "KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")
        return state

    def load_state(self, state):
        for name, ioctl_name, ctype in self.BLOBS:
            _set_blob(self.fd, f"KVM_SET_{ioctl_name}", ctype, state[name])
        self.set_msrs(state["msrs"])
        _set_blob(self.fd, "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events", state["events"],
                  lambda p: setattr(p, "flags", p.flags | lib.KVM_VCPUEVENT_VALID_NMI_PENDING
                                    | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR))

    def get_msrs(self, indices):
        """[[index, value]] of every MSR in `indices` this vCPU can read (KVM stops at the first it cannot)."""
        out, todo = [], list(indices)
        while todo:
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(todo), "entries": len(todo)})
            for e, index in zip(msrs.entries, todo):
                e.index = index
            n = ioctl(self.fd, "KVM_GET_MSRS", msrs)
            out.extend([msrs.entries[i].index, msrs.entries[i].data] for i in range(n))
            todo = todo[n + 1:]                      # skip the one it refused
        return out

    def set_msrs(self, pairs):
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(pairs), "entries": len(pairs)})
        for e, (index, value) in zip(msrs.entries, pairs):
            e.index, e.data = index, value
        n = ioctl(self.fd, "KVM_SET_MSRS", msrs)
        if n != len(pairs):
            raise StateError(f"this host's KVM refused MSR 0x{pairs[n][0]:x} = 0x{pairs[n][1]:x} of the snapshot")

    def translate(self, linear):
        """Guest-virtual to guest-physical, or None if not mapped."""
        tr = ffi.new("struct kvm_translation *")
        tr.linear_address = linear
        ioctl(self.fd, "KVM_TRANSLATE", tr)
        return tr.physical_address if tr.valid else None

    def tsc_khz(self):
        """The guest TSC frequency in kHz (0 if KVM does not know it)."""
        try:
            return ioctl(self.fd, "KVM_GET_TSC_KHZ")
        except KvmError:
            return 0

    def kick_prepare(self):
        """Make the next (or current) KVM_RUN return at once; a signal does the interrupting."""
        lib.hv_set_immediate_exit(self.run, 1)

    def kick_clear(self):
        lib.hv_set_immediate_exit(self.run, 0)

    def counters(self):
        s = self.state
        return {
            "exits": {i: s.exits[i] for i in range(lib.HV_NR_REASONS) if s.exits[i]},
            "io_fast": s.io_fast,
            "io_unclaimed": s.io_unclaimed,
            "ns_in_guest": s.ns_in_guest,
            "ns_in_vmm": s.ns_in_vmm,
        }

    def close(self):
        """The fd and the kvm_run mapping (which would otherwise keep the whole VM alive)."""
        if self._run_map is not None:
            lib.hv_unmap_run(self._run_map, self.vm.kvm.vcpu_mmap_size)
            self._run_map = None
        os.close(self.fd)
