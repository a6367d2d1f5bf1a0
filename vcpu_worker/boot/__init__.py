"""Booting a guest: its image into guest RAM and every vCPU's first registers, for each boot mode, behind one entry point.

`load()` puts the kernel (Linux through the 64-bit boot protocol, or a raw
image at its load address) and the VMM's tables into RAM and returns where
the boot vCPU starts; `setup_vcpu()` gives a vCPU the state interface.md
promises for the mode.  Bad images are UserErrors with one line that names
the file.
"""
import os

from pyhv.proto.errors import UserError
from pyhv.vcpu_worker._kvm import lib
from pyhv.vcpu_worker.boot import acpi, cpu_state, layout, mptable

RAW_LOAD_ADDR = {"raw16": layout.RAW16_LOAD_ADDR, "raw32": layout.HIMEM_START,
                 "raw64": layout.HIMEM_START, "user64": layout.HIMEM_START}
VMM_TABLES = (layout.GDT_ADDR, layout.PD_ADDR + 4 * 4096)


class BootEntry:
    """Where the boot vCPU starts: RIP, and RSI for Linux (the zero page; None for raw boots)."""
    __slots__ = ("rip", "boot_params")

    def __init__(self, rip, boot_params=None):
        self.rip, self.boot_params = rip, boot_params


def read_image(path, what, limit):
    """The file's bytes; UserError if it cannot be read or is larger than `limit` (checked before reading:
    a 1 GiB file for a 128 MiB guest is refused, not read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise UserError(f"{what} file {path} is {size} bytes, more than the guest's {limit >> 20} MiB "
                                f"of RAM")
            return f.read(limit + 1)
    except OSError as e:
        raise UserError(f"cannot read {what} file {path}: {e.strerror}") from None


def load(config, mem, profile, tsc_khz):
    """Put `config`'s kernel (and initrd) into `mem`; the BootEntry of the boot vCPU."""
    image = read_image(config.kernel, "kernel", config.mem_bytes)
    initrd = read_image(config.initrd, "initrd", config.mem_bytes) if config.initrd else None
    if config.boot == "linux":
        from pyhv.vcpu_worker.boot.linux import KernelImageError, load_linux
        try:
            info = load_linux(mem, image, profile.kernel_cmdline(config.cmdline or "", tsc_khz), initrd)
        except KernelImageError as e:
            raise UserError(f"{config.kernel}: {e}") from None
        cpu_state.write_tables(mem)
        mptable.write(mem, config.vcpus)
        acpi.write(mem, config.vcpus)
        return BootEntry(info.entry, info.boot_params)
    load_addr = config.load_addr if config.load_addr is not None else RAW_LOAD_ADDR[config.boot]
    end = load_addr + len(image)
    if not mem.contains(load_addr, len(image)):
        raise UserError(f"{config.kernel}: image of {len(image)} bytes at 0x{load_addr:x} does not fit in guest RAM")
    if config.boot == "raw16" and end > 0x10000:
        raise UserError(f"{config.kernel}: raw16 images must end below 0x10000 (CS=0); this one ends at 0x{end:x}")
    if config.boot != "raw16":
        if load_addr < VMM_TABLES[1] and end > VMM_TABLES[0]:
            raise UserError(f"{config.kernel}: image at 0x{load_addr:x}-0x{end:x} overlaps the VMM's tables "
                            f"(0x{VMM_TABLES[0]:x}-0x{VMM_TABLES[1]:x}); load it at 0x100000 or above")
        cpu_state.write_tables(mem)
    mem.write(load_addr, image)
    return BootEntry(load_addr)


def setup_vcpu(vcpu, index, count, boot, entry):
    """vCPU `index` of `count`'s first state: segments per mode; registers and runnability per interface.md.

    Linux APs wait for INIT/SIPI from the boot CPU; every raw vCPU starts at
    the entry with RDI = index, RSI = count, RDX = TSC kHz, RFLAGS = 0x2.
    """
    sregs = vcpu.get_sregs()
    cpu_state.set_boot_sregs(sregs, boot)
    vcpu.set_sregs(sregs)
    if boot == "linux" and index > 0:
        return
    regs = vcpu.get_regs()
    regs.rip = entry.rip
    regs.rflags = cpu_state.RFLAGS_RESERVED
    if boot == "linux":
        regs.rsi = entry.boot_params
    else:
        regs.rdi, regs.rsi, regs.rdx = index, count, vcpu.tsc_khz()
    vcpu.set_regs(regs)
    if index > 0:
        vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
