"""Initial x86 CPU state for each boot mode: GDT, identity page tables, segment and control registers.

raw16/raw32/raw64/user64 follow ../shared/docs/interface.md ("Raw boot
state"); Linux's 64-bit entry uses the raw64 state with __BOOT_CS/__BOOT_DS
selectors and RSI pointing at the zero page.
"""
import struct

from pyhv.vcpu_worker.boot import layout

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x40000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_RESERVED = 0x2

PDE_PRESENT, PDE_RW, PDE_USER, PDE_PS = 0x1, 0x2, 0x4, 0x80
TSS_SIZE = 104

# 8-byte GDT descriptors (flat, 4 GiB limit, granularity 4 KiB).
_GDT = {
    layout.SEL_CODE32: 0x00CF9A000000FFFF,            # 32-bit code, DPL0
    layout.SEL_CODE64: 0x00AF9A000000FFFF,            # 64-bit code, DPL0
    layout.SEL_DATA: 0x00CF92000000FFFF,              # data, DPL0
    layout.SEL_USER_DATA & ~3: 0x00CFF2000000FFFF,    # data, DPL3
    layout.SEL_USER_CODE64 & ~3: 0x00AFFA000000FFFF,  # 64-bit code, DPL3
}
GDT_LIMIT = layout.SEL_TSS + 16 - 1


def _tss_descriptor(base, limit):
    """The 16-byte 64-bit TSS descriptor (type 9: available)."""
    low = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x89 << 40 | ((limit >> 16) & 0xF) << 48 | ((base >> 24) & 0xFF) << 56
    return struct.pack("<QQ", low, base >> 32)


def write_tables(mem):
    """GDT, TSS, empty IDT and identity page tables for the first 4 GiB (2 MiB pages, user-accessible)."""
    gdt = bytearray(GDT_LIMIT + 1)
    for sel, desc in _GDT.items():
        struct.pack_into("<Q", gdt, sel, desc)
    gdt[layout.SEL_TSS:layout.SEL_TSS + 16] = _tss_descriptor(layout.TSS_ADDR, TSS_SIZE - 1)
    mem.write(layout.GDT_ADDR, bytes(gdt))
    mem.write(layout.TSS_ADDR, bytes(TSS_SIZE))

    flags = PDE_PRESENT | PDE_RW | PDE_USER
    mem.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | flags)
    mem.write(layout.PML4_ADDR + 8, bytes(4096 - 8))
    pdpt = bytearray(4096)
    for i in range(4):
        struct.pack_into("<Q", pdpt, i * 8, (layout.PD_ADDR + i * 4096) | flags)
    mem.write(layout.PDPT_ADDR, bytes(pdpt))
    pd = struct.pack("<2048Q", *(((i << 21) | flags | PDE_PS) for i in range(2048)))
    mem.write(layout.PD_ADDR, pd)


def _segment(seg, selector, *, code, long=False, dpl=0, big=True):
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3     # accessed execute/read code, accessed read/write data
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if long else (1 if big else 0)
    seg.s = 1
    seg.l = 1 if long else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def _tables(sregs):
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = GDT_LIMIT
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 0
    tr = sregs.tr
    tr.base = layout.TSS_ADDR
    tr.limit = TSS_SIZE - 1
    tr.selector = layout.SEL_TSS
    tr.type = 0xB                       # busy 64/32-bit TSS
    tr.present = 1
    tr.dpl = tr.db = tr.s = tr.l = tr.g = tr.avl = tr.unusable = 0


def set_real_mode(sregs):
    """CS:IP = 0000:load address; DS=ES=SS=0 (the rest of reset state is KVM's)."""
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0


def set_protected_mode(sregs):
    _tables(sregs)
    _segment(sregs.cs, layout.SEL_CODE32, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, layout.SEL_DATA, code=False)
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0


def set_long_mode(sregs, user=False):
    """Paging on through the identity map; ring 0, or ring 3 for user64."""
    _tables(sregs)
    if user:
        _segment(sregs.cs, layout.SEL_USER_CODE64, code=True, long=True, dpl=3)
        data_sel, dpl = layout.SEL_USER_DATA, 3
    else:
        _segment(sregs.cs, layout.SEL_CODE64, code=True, long=True)
        data_sel, dpl = layout.SEL_DATA, 0
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, data_sel, code=False, dpl=dpl)
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA


MODES = ("raw16", "raw32", "raw64", "user64")


def set_boot_sregs(sregs, mode):
    if mode == "raw16":
        set_real_mode(sregs)
    elif mode == "raw32":
        set_protected_mode(sregs)
    elif mode in ("raw64", "linux"):
        set_long_mode(sregs)
    elif mode == "user64":
        set_long_mode(sregs, user=True)
    else:
        raise ValueError(f"unknown boot mode {mode!r}")
