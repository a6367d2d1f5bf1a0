"""Tests for the Linux loader (vcpu_worker/boot/linux.py) and the host LZ4 decoder; no KVM needed.

Test kernels are built at test time: an ELF "vmlinux" from assembly with
`as` + `ld` (PT_LOADs at physical 0x1000000, linked at 0xffffffff81000000),
and synthetic bzImages wrapping it (a setup header + the ELF compressed with
the `lz4 -l` CLI, gzip, xz, ...).  Hostile files must raise KernelImageError
with a useful message, never another exception.
"""
import bz2
import gzip
import lzma
import os
import pathlib
import random
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest

from pyhv.devices.guest_memory import HIGH_RAM_START, GuestMemory, create_memfd
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.boot import layout
from pyhv.vcpu_worker.boot.linux import (KernelImageError, LinuxBoot, detect_kernel_format, e820_map,
                                    load_linux)

MiB = 1 << 20
from hv import GUESTS, REPO
from linux_images import HDR_LEN, lz4_legacy, make_bzimage, need, payload_for, run, size_trailer  # noqa: F401
PHYS = 0x1000000
VIRT = 0xFFFFFFFF81000000
ELF_ENTRY_PHYS = PHYS + 0x10      # _start follows 16 bytes of marker text

TEST_KERNEL_S = """\
    .code64
    .section .text, "ax"
    .globl _start
head:
    .ascii "TESTKERNEL-TEXT!"
_start:
    lea     data_marker(%rip), %rax
    hlt
    jmp     _start
    .section .data, "aw"
    .balign 4096
data_marker:
    .ascii "TESTKERNEL-DATA!"
    .section .bss, "aw", @nobits
    .balign 4096
bss_area:
    .skip 3 * 4096 + 123
bss_end:
"""

TEST_KERNEL_LD = f"""\
ENTRY(_start)
SECTIONS
{{
  . = 0x{VIRT:x};
  .text : AT(0x{PHYS:x}) {{ *(.text) }}
  .data : AT(0x{PHYS:x} + (ADDR(.data) - 0x{VIRT:x})) {{ *(.data) }}
  .bss  : AT(0x{PHYS:x} + (ADDR(.bss) - 0x{VIRT:x})) {{ *(.bss) }}
  /DISCARD/ : {{ *(.note*) *(.comment) }}
}}
"""


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def elf_kernel(tmp_path_factory):
    """(ELF bytes, {symbol: physical address}) of the test vmlinux."""
    need("as", "ld", "nm")
    d = tmp_path_factory.mktemp("kernel")
    (d / "k.S").write_text(TEST_KERNEL_S)
    (d / "k.ld").write_text(TEST_KERNEL_LD)
    run(["as", "--64", "-o", str(d / "k.o"), str(d / "k.S")])
    run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "--build-id=none", "-z", "max-page-size=0x1000",
         "-z", "noexecstack", "-T", str(d / "k.ld"), "-o", str(d / "k.elf"), str(d / "k.o")])
    syms = {}
    for line in run(["nm", str(d / "k.elf")], text=True).stdout.splitlines():
        value, _kind, name = line.split()
        value = int(value, 16)
        if value >= VIRT:
            syms[name] = value - VIRT + PHYS
    return (d / "k.elf").read_bytes(), syms


@pytest.fixture(scope="session")
def probe_elf(tmp_path_factory):
    """tests/support/guests/linux_probe.S built exactly as its header comment says."""
    need("as", "ld")
    d = tmp_path_factory.mktemp("probe")
    run(["as", "--64", "-o", str(d / "linux_probe.o"), str(GUESTS / "linux_probe.S")])
    run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "--build-id=none", "-N", "--no-warn-rwx-segments",
         "-z", "noexecstack", "-Ttext=0x1000000", "-e", "_start", "-o", str(d / "linux_probe.elf"),
         str(d / "linux_probe.o")])
    return (d / "linux_probe.elf").read_bytes()


def make_mem(size):
    fd = create_memfd(size)
    mem = GuestMemory(fd, size)
    mem.test_fd = fd
    return mem


def free_mem(mem):
    mem.close()
    os.close(mem.test_fd)


@pytest.fixture
def mem():
    m = make_mem(64 * MiB)
    yield m
    free_mem(m)


def zero_page(mem):
    return mem.read(layout.BOOT_PARAMS_ADDR, 4096)


def u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def u64(b, off):
    return struct.unpack_from("<Q", b, off)[0]


def e820_entries(bp):
    n = bp[0x1E8]
    return [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]


def check_common_zero_page(mem, bp, cmdline, boot):
    assert bp[0x210] == 0xFF                               # type_of_loader: undefined
    assert bp[0x211] & 0x81 == 0x81                        # LOADED_HIGH | CAN_USE_HEAP
    assert u16(bp, 0x224) != 0                             # heap_end_ptr
    assert u32(bp, 0x228) == layout.CMDLINE_ADDR           # cmd_line_ptr
    assert u32(bp, 0x0C8) == 0                             # ext_cmd_line_ptr
    raw = cmdline.encode()
    assert mem.read(layout.CMDLINE_ADDR, len(raw) + 1) == raw + b"\0"
    addr, size = boot.initrd or (0, 0)
    assert (u32(bp, 0x218), u32(bp, 0x21C)) == (addr, size)     # ramdisk_image, ramdisk_size
    assert (u32(bp, 0x0C0), u32(bp, 0x0C4)) == (0, 0)           # ext_ramdisk_image/size
    assert e820_entries(bp) == e820_map(mem.size)
    assert bp[0x1EF] == 0                                  # sentinel


def check_elf_loaded(mem, boot, syms):
    assert boot.entry == ELF_ENTRY_PHYS == syms["_start"]
    assert boot.boot_params == layout.BOOT_PARAMS_ADDR
    assert mem.read(PHYS, 16) == b"TESTKERNEL-TEXT!"
    assert mem.read(syms["data_marker"], 16) == b"TESTKERNEL-DATA!"
    bss = syms["bss_end"] - syms["bss_area"]
    assert mem.read(syms["bss_area"], bss) == bytes(bss)
    assert boot.kernel_end == syms["bss_end"]


def dirty(mem, addr, length, byte=0xAA):
    mem.write(addr, bytes([byte]) * length)


# --- ELF vmlinux -------------------------------------------------------------------------

def test_detect_kernel_format(elf_kernel):
    elf, _ = elf_kernel
    assert detect_kernel_format(elf) == "elf"
    assert detect_kernel_format(make_bzimage(payload_for("gzip", elf))) == "bzimage"


def test_elf_segments_land_at_physical_addresses(mem, elf_kernel):
    elf, syms = elf_kernel
    dirty(mem, PHYS, 2 * MiB)                      # bss must be zeroed, not found zero
    initrd = os.urandom(100_000)
    boot = load_linux(mem, elf, "console=ttyS0 root=/dev/vda", initrd=initrd)
    assert isinstance(boot, LinuxBoot) and boot.format == "elf"
    check_elf_loaded(mem, boot, syms)
    bp = zero_page(mem)
    check_common_zero_page(mem, bp, "console=ttyS0 root=/dev/vda", boot)
    # the header built from scratch, Firecracker style
    assert u16(bp, 0x1FE) == 0xAA55
    assert u32(bp, 0x202) == 0x53726448
    assert u16(bp, 0x206) >= 0x020C
    assert u32(bp, 0x230) == 0x1000000
    assert u32(bp, 0x238) == len("console=ttyS0 root=/dev/vda")
    # initrd: page aligned, as high as possible below min(0x37FFFFFF + 1, end of RAM), above the kernel
    addr, size = boot.initrd
    assert size == len(initrd) and addr % 4096 == 0
    assert addr >= boot.kernel_end and addr + size <= mem.size
    assert addr == (mem.size - size) & ~0xFFF
    assert mem.read(addr, size) == initrd


def test_elf_zero_page_has_nothing_else(mem, elf_kernel):
    elf, _ = elf_kernel
    dirty(mem, layout.BOOT_PARAMS_ADDR, 4096)
    load_linux(mem, elf, "x")
    bp = zero_page(mem)
    assert bp[:0x0C0] == bytes(0x0C0)              # screen_info, apm, ist, acpi_rsdp_addr, ... all zero
    assert bp[0xCD0:] == bytes(4096 - 0xCD0)       # after the e820 table
    assert e820_entries(bp)[0] == (0, layout.EBDA_START, 1)
    assert u32(bp, 0x218) == u32(bp, 0x21C) == 0   # no initrd


def test_elf_initrd_respects_initrd_addr_max():
    need("as", "ld")
    m = make_mem(1024 * MiB)
    try:
        elf = build_probe_like_elf()
        boot = load_linux(m, elf, "", initrd=b"I" * 5000)
        addr, size = boot.initrd
        assert addr + size <= 0x38000000 and addr == (0x38000000 - size) & ~0xFFF
    finally:
        free_mem(m)


def python_elf(entry, segments):
    """A minimal ELF64 x86-64 executable: segments are (vaddr, paddr, data, memsz)."""
    phoff, n = 64, len(segments)
    off = phoff + 56 * n
    phdrs, body = b"", b""
    for vaddr, paddr, data, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off + len(body), vaddr, paddr, len(data), memsz, 0x1000)
        body += data
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, n, 64, 0, 0)
    return ehdr + phdrs + body


def build_probe_like_elf():
    """One PT_LOAD of 16 bytes + 4 KiB bss at physical 0x1000000, virtual high, high virtual entry."""
    return python_elf(VIRT, [(VIRT, PHYS, b"\xf4" * 16, 16 + 4096)])


def test_python_made_elf_translates_entry(mem):
    boot = load_linux(mem, build_probe_like_elf(), "")
    assert boot.entry == PHYS and boot.kernel_end == PHYS + 16 + 4096


def test_vmlinux_layout_physical_entry_and_percpu_segment(mem):
    """Like a real x86-64 vmlinux: e_entry is physical (phys_startup_64) and the percpu PT_LOAD has p_vaddr 0."""
    elf = python_elf(PHYS, [(VIRT, PHYS, b"T" * 64, 0x200000),
                            (0, PHYS + 0x200000, b"P" * 32, 0x8000),
                            (VIRT + 0x208000, PHYS + 0x208000, b"D" * 16, 0x1000)])
    boot = load_linux(mem, elf, "")
    assert boot.entry == PHYS
    assert mem.read(PHYS + 0x200000, 32) == b"P" * 32
    assert boot.kernel_end == PHYS + 0x209000


def test_linux_probe_builds_and_loads(mem, probe_elf):
    boot = load_linux(mem, probe_elf, "probe cmdline")
    assert boot.format == "elf" and boot.entry == 0x1000000
    assert mem.read(0x1000000, 2) == b"\xfa\xfc"   # cli; cld
    assert boot.kernel_end > 0x1000000


def test_high_ram_appears_in_e820(elf_kernel):
    elf, syms = elf_kernel
    size = 4 * 1024 * MiB + 512 * MiB              # sparse memfd: only touched pages cost memory
    m = make_mem(size)
    try:
        boot = load_linux(m, elf, "mem test", initrd=b"R" * 8192)
        check_elf_loaded(m, boot, syms)
        ents = e820_entries(zero_page(m))
        assert ents == [(0, layout.EBDA_START, 1), (layout.EBDA_START, 0x100000 - layout.EBDA_START, 2),
                        (0x100000, 0xC0000000 - 0x100000, 1), (HIGH_RAM_START, size - 0xC0000000, 1)]
        assert boot.initrd[0] + 8192 <= 0x38000000         # ELF default initrd_addr_max
    finally:
        free_mem(m)


def test_extra_e820_entries_are_carved_out(mem, elf_kernel):
    elf, _ = elf_kernel
    acpi = (mem.size - MiB, MiB, 3)                           # at the top of RAM: the initrd must go below
    nvs = (0x3000000, 0x10000, 4)                             # in the middle of RAM: splits the RAM entry
    mptable = (layout.MPTABLE_ADDR, 0x400, 2)
    boot = load_linux(mem, elf, "", initrd=b"i" * 10000, extra_e820=[acpi, nvs, mptable])
    ents = e820_entries(zero_page(mem))
    assert acpi in ents and nvs in ents and mptable in ents
    assert ents == sorted(ents)
    for (a, s, _), (b, _, _) in zip(ents, ents[1:]):
        assert a + s <= b, "e820 entries overlap"
    assert (0x100000, 0x3000000 - 0x100000, 1) in ents        # RAM on both sides of the NVS range survives
    assert (0x3010000, acpi[0] - 0x3010000, 1) in ents
    addr, size = boot.initrd
    assert addr + size <= acpi[0] and addr == (acpi[0] - size) & ~0xFFF


def test_e820_map_rejects_bad_extra_entries():
    with pytest.raises(ValueError):
        e820_map(64 * MiB, [(0x1000, 0, 2)])
    with pytest.raises(ValueError):
        e820_map(64 * MiB, [(0x1000, 0x1000, 2), (0x1800, 0x1000, 2)])
    with pytest.raises(ValueError):
        e820_map(64 * MiB, [(i * 0x2000 + 0x200000, 0x1000, 2) for i in range(130)])


# --- bzImage -------------------------------------------------------------------------------

@pytest.mark.parametrize("comp", ["lz4", "gzip", "xz", "bzip2", "lzma", "none"])
def test_bzimage_payload_is_decompressed_and_loaded_as_elf(mem, elf_kernel, comp):
    elf, syms = elf_kernel
    image = make_bzimage(payload_for(comp, elf))
    dirty(mem, PHYS, 2 * MiB)
    dirty(mem, layout.BOOT_PARAMS_ADDR, 4096)
    initrd = os.urandom(300_000)
    cmdline = "console=ttyS0 panic=-1"
    boot = load_linux(mem, image, cmdline, initrd=initrd)
    assert boot.format == f"bzimage-{comp}->elf"
    check_elf_loaded(mem, boot, syms)
    bp = zero_page(mem)
    check_common_zero_page(mem, bp, cmdline, boot)
    # The image's setup header is copied: fields we do not own keep the file's values.
    hdr_end = 0x202 + image[0x201]
    for off, size in [(0x1F1, 1), (0x1F2, 2), (0x1FA, 2), (0x1FE, 2), (0x200, 2), (0x202, 4), (0x206, 2),
                      (0x214, 4), (0x22C, 4), (0x230, 4), (0x234, 1), (0x235, 1), (0x236, 2), (0x238, 4),
                      (0x248, 8), (0x258, 8), (0x260, 4), (0x264, 4), (0x268, 4)]:
        assert bp[off:off + size] == image[off:off + size], f"header field at 0x{off:x} not copied"
    assert hdr_end == 0x26C
    assert u64(bp, 0x250) == 0                     # setup_data is the loader's: we pass none
    assert bp[hdr_end:0x290] == bytes(0x290 - hdr_end)
    assert bp[:0x0C0] == bytes(0x0C0) and bp[0x0CC:0x1E8] == bytes(0x1E8 - 0x0CC)
    addr, size = boot.initrd
    assert addr % 4096 == 0 and addr >= boot.kernel_end and mem.read(addr, size) == initrd
    assert addr == (mem.size - size) & ~0xFFF     # initrd_addr_max 0x7FFFFFFF is above this guest's RAM


def test_bzimage_lz4_with_lying_size_trailer_still_loads(mem, elf_kernel):
    elf, syms = elf_kernel
    payload = lz4_legacy(elf) + struct.pack("<I", 10)
    boot = load_linux(mem, make_bzimage(payload), "")
    check_elf_loaded(mem, boot, syms)


def test_bzimage_lz4_multi_frame_payload(mem, elf_kernel):
    elf, syms = elf_kernel
    half = len(elf) // 2
    payload = lz4_legacy(elf[:half]) + lz4_legacy(elf[half:]) + size_trailer(elf)
    boot = load_linux(mem, make_bzimage(payload), "")
    check_elf_loaded(mem, boot, syms)


def test_bzimage_lzma_cli_stream(mem, elf_kernel):
    """`lzma -9` reading a pipe writes an unknown size and an end marker, as the kernel build does."""
    need("lzma")
    elf, syms = elf_kernel
    payload = run(["lzma", "-9", "-c"], input=elf).stdout + size_trailer(elf)
    boot = load_linux(mem, make_bzimage(payload), "")
    assert boot.format == "bzimage-lzma->elf"
    check_elf_loaded(mem, boot, syms)


def test_bzimage_zstd_falls_back_to_guest_decompression(mem):
    payload = b"\x28\xb5\x2f\xfd" + os.urandom(5000) + struct.pack("<I", 3 * MiB)
    image = make_bzimage(payload, init_size=0x1800000)
    setup_size = (image[0x1F1] + 1) * 512
    boot = load_linux(mem, image, "earlyprintk=serial", initrd=b"z" * 4096)
    assert boot.format == "bzimage"
    assert boot.entry == 0x100000 + 0x200
    assert mem.read(0x100000, len(image) - setup_size) == image[setup_size:]
    assert mem.read(0x100200, 4) == b"PM64"
    # runtime start = max(align_up(0x100000, 2 MiB), pref_address 16 MiB); the decompressor needs init_size from there
    assert boot.kernel_end == 0x1000000 + 0x1800000
    assert boot.initrd[0] >= boot.kernel_end
    bp = zero_page(mem)
    assert u32(bp, 0x214) == 0x100000              # code32_start
    check_common_zero_page(mem, bp, "earlyprintk=serial", boot)


def test_bzimage_cmdline_limit_is_the_kernels(mem, elf_kernel):
    elf, _ = elf_kernel
    image = make_bzimage(payload_for("gzip", elf), cmdline_size=255)
    load_linux(mem, image, "a" * 255)
    with pytest.raises(KernelImageError, match="at most 255"):
        load_linux(mem, image, "a" * 256)


def test_bzimage_initrd_addr_max_is_the_kernels(mem, elf_kernel):
    elf, _ = elf_kernel
    image = make_bzimage(payload_for("gzip", elf), initrd_addr_max=0x02FFFFFF)
    boot = load_linux(mem, image, "", initrd=b"x" * 10000)
    addr, size = boot.initrd
    assert addr + size <= 0x03000000 and addr == (0x03000000 - size) & ~0xFFF


# --- hostile and broken files ---------------------------------------------------------------

def patched(data, off, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def elf_phdr_offset(elf, index=0):
    return u64(elf, 32) + index * u16(elf, 54)


HOSTILE_ELF = {
    "empty": (lambda elf: b"", "empty"),
    "garbage": (lambda elf: b"\x00" * 1000, "not a Linux kernel"),
    "gzip file": (lambda elf: gzip.compress(elf), "gzip"),
    "cpio": (lambda elf: b"070701" + bytes(200), "cpio"),
    "truncated header": (lambda elf: elf[:40], "truncated ELF header"),
    "32-bit": (lambda elf: patched(elf, 4, "B", 1), "32-bit"),
    "big-endian": (lambda elf: patched(elf, 5, "B", 2), "big-endian"),
    "wrong machine": (lambda elf: patched(elf, 18, "<H", 40), "machine 40"),
    "not executable": (lambda elf: patched(elf, 16, "<H", 1), "not an executable"),
    "phdrs past end": (lambda elf: patched(elf, 32, "<Q", len(elf) - 10), "program headers"),
    "huge phnum": (lambda elf: patched(elf, 56, "<H", 0xFFFE), "program headers"),
    "pn_xnum": (lambda elf: patched(elf, 56, "<H", 0xFFFF), "PN_XNUM"),
    "no phdrs": (lambda elf: patched(elf, 56, "<H", 0), "no program headers"),
    "small phentsize": (lambda elf: patched(elf, 54, "<H", 32), "program header size"),
    "segment data past end": (lambda elf: patched(elf, elf_phdr_offset(elf) + 8, "<Q", len(elf) - 4),
                              "runs past the end"),
    "filesz > memsz": (lambda elf: patched(elf, elf_phdr_offset(elf) + 40, "<Q", 0), "p_filesz"),
    "segment below 1 MiB": (lambda elf: patched(elf, elf_phdr_offset(elf) + 24, "<Q", layout.BOOT_PARAMS_ADDR),
                            "below 1 MiB"),
    "segment outside RAM": (lambda elf: patched(elf, elf_phdr_offset(elf) + 24, "<Q", 0xC0000000 - 4096),
                            "does not fit in guest RAM"),
    "segment addr overflow": (lambda elf: patched(elf, elf_phdr_offset(elf) + 24, "<Q", 2**64 - 16),
                              "does not fit in guest RAM"),
    "huge memsz": (lambda elf: patched(elf, elf_phdr_offset(elf) + 40, "<Q", 2**63), "overlap|does not fit"),
    "entry outside segments": (lambda elf: patched(elf, 24, "<Q", 0xFFFFFFFF90000000), "entry point"),
    "no PT_LOAD": (lambda elf: patched(patched(elf, elf_phdr_offset(elf), "<I", 4),
                                       elf_phdr_offset(elf, 1), "<I", 4), "no loadable"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_ELF))
def test_hostile_elf(mem, elf_kernel, name):
    elf, _ = elf_kernel
    make, message = HOSTILE_ELF[name]
    with pytest.raises(KernelImageError, match=message) as info:
        load_linux(mem, make(elf), "console=ttyS0")
    assert "\n" not in str(info.value)


def test_overlapping_segments_are_refused(mem):
    elf = python_elf(VIRT, [(VIRT, PHYS, b"a" * 16, 0x2000), (VIRT + 0x1000, PHYS + 0x1000, b"b", 16)])
    with pytest.raises(KernelImageError, match="overlap"):
        load_linux(mem, elf, "")


def test_elf_truncated_file(mem, elf_kernel):
    elf, _ = elf_kernel
    with pytest.raises(KernelImageError, match="runs past the end|truncated"):
        load_linux(mem, elf[:len(elf) // 2], "")


def test_segments_outside_small_guest(elf_kernel):
    elf, _ = elf_kernel
    m = make_mem(16 * MiB)                         # the kernel wants 16 MiB and up
    try:
        with pytest.raises(KernelImageError, match="does not fit in guest RAM"):
            load_linux(m, elf, "")
    finally:
        free_mem(m)


def test_segment_over_reserved_range(mem, elf_kernel):
    elf, _ = elf_kernel
    with pytest.raises(KernelImageError, match="VMM-reserved"):
        load_linux(mem, elf, "", extra_e820=[(PHYS + 0x1000, 0x1000, 2)])


def test_cmdline_too_long(mem, elf_kernel):
    elf, _ = elf_kernel
    load_linux(mem, elf, "a" * (layout.CMDLINE_MAX - 1))
    with pytest.raises(KernelImageError, match="command line"):
        load_linux(mem, elf, "a" * layout.CMDLINE_MAX)
    with pytest.raises(KernelImageError, match="NUL"):
        load_linux(mem, elf, "a\0b")


def test_initrd_too_big_writes_nothing(mem, elf_kernel):
    elf, _ = elf_kernel
    dirty(mem, PHYS, 4096, 0x55)
    dirty(mem, layout.BOOT_PARAMS_ADDR, 4096, 0x55)
    with pytest.raises(KernelImageError, match="initrd of .* does not fit"):
        load_linux(mem, elf, "", initrd=bytes(60 * MiB))
    # the load was planned first: nothing reached the guest
    assert mem.read(PHYS, 4096) == b"\x55" * 4096
    assert zero_page(mem) == b"\x55" * 4096


def good_bzimage(elf, comp="lz4", **kw):
    return make_bzimage(payload_for(comp, elf), **kw)


HOSTILE_BZ = {
    "truncated in header": (lambda elf: good_bzimage(elf)[:0x210], "truncated"),
    "truncated after magic": (lambda elf: good_bzimage(elf)[:0x207], "truncated inside its setup header"),
    "magic cut short": (lambda elf: good_bzimage(elf)[:0x205], "not a Linux kernel"),
    "old protocol": (lambda elf: good_bzimage(elf, version=0x020A), "too old"),
    "short header": (lambda elf: good_bzimage(elf, hdr_len=0x30), "too short"),
    "header past zero page area": (lambda elf: good_bzimage(elf, hdr_len=0xFF), "header area"),
    "bad boot flag": (lambda elf: patched(good_bzimage(elf), 0x1FE, "<H", 0x1234), "boot_flag"),
    "zImage": (lambda elf: good_bzimage(elf, loadflags=0), "zImage"),
    "setup past end": (lambda elf: good_bzimage(elf, setup_sects=200, tail=0)[:20 * 512], "setup code"),
    "payload_offset past end": (lambda elf: patched(good_bzimage(elf), 0x248, "<I", 0x7FFFFFF0), "runs past the end"),
    "payload_length past end": (lambda elf: patched(good_bzimage(elf), 0x24C, "<I", 0xFFFFFFFF), "runs past the end"),
    "no payload": (lambda elf: patched(good_bzimage(elf), 0x248, "<I", 0), "no payload"),
    "unknown compression": (lambda elf: make_bzimage(b"\x11\x22\x33\x44" + bytes(100)), "unknown compression"),
    "corrupt lz4": (lambda elf: make_bzimage(b"\x02\x21\x4c\x18" + struct.pack("<I", 100) + b"\xff" * 100
                                             + struct.pack("<I", 4096)), "LZ4 payload is corrupt"),
    "corrupt lz4 offset": (lambda elf: make_bzimage(b"\x02\x21\x4c\x18" + struct.pack("<I", 4) + b"\x10A\x09\x00"
                                                    + struct.pack("<I", 4096)), "LZ4 payload is corrupt"),
    "corrupt gzip": (lambda elf: make_bzimage(b"\x1f\x8b\x08\x00" + bytes(8) + os.urandom(200)), "gzip payload"),
    "truncated gzip": (lambda elf: make_bzimage(gzip.compress(elf)[:300]), "gzip payload is truncated"),
    "corrupt xz": (lambda elf: make_bzimage(b"\xfd7zXZ\x00" + os.urandom(100)), "xz payload is corrupt"),
    "corrupt bzip2": (lambda elf: make_bzimage(b"BZh9" + os.urandom(100)), "bzip2 payload is corrupt"),
    "not an elf inside": (lambda elf: make_bzimage(gzip.compress(b"hello" * 100)), "did not decompress to an ELF"),
    "bad elf inside": (lambda elf: make_bzimage(gzip.compress(elf[:100])), "vmlinux in the bzImage's gzip payload"),
    "zstd without 64-bit entry": (lambda elf: make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(64), xloadflags=0),
                                  "64-bit entry"),
    "zstd init_size too big": (lambda elf: make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(64), init_size=0xF0000000),
                               "does not fit in guest RAM"),
    "zstd bad alignment": (lambda elf: make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(64), kernel_alignment=0x3000),
                           "kernel_alignment"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BZ))
def test_hostile_bzimage(mem, elf_kernel, name):
    elf, _ = elf_kernel
    make, message = HOSTILE_BZ[name]
    with pytest.raises(KernelImageError, match=message) as info:
        load_linux(mem, make(elf), "console=ttyS0")
    assert "\n" not in str(info.value)


def test_lz4_decompression_bomb_is_refused(mem, monkeypatch):
    from pyhv.vcpu_worker.boot import linux
    monkeypatch.setattr(linux, "MAX_DECOMPRESSED", 4 * MiB)
    raw = bytes(6 * MiB)                          # compresses to almost nothing
    with pytest.raises(KernelImageError, match="more than"):
        load_linux(mem, make_bzimage(lz4_legacy(raw) + struct.pack("<I", 16)), "")
    with pytest.raises(KernelImageError, match="more than"):
        load_linux(mem, make_bzimage(gzip.compress(raw)), "")


@pytest.mark.parametrize("comp", ["lz4", "gzip"])
def test_fuzzed_images_only_raise_kernel_image_error(mem, elf_kernel, comp):
    elf, _ = elf_kernel
    rng = random.Random(1234)
    seeds = [elf, good_bzimage(elf, comp)]
    for i in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            where = rng.choice([rng.randrange(len(data)), rng.randrange(0x1F0, 0x270), rng.randrange(0, 128)])
            if where < len(data):
                data[where] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[:rng.randrange(len(data))]
        try:
            load_linux(mem, bytes(data), "console=ttyS0", initrd=b"i" * 4096)
        except KernelImageError as e:
            assert str(e) and "\n" not in str(e)


# --- the C LZ4 legacy decoder ---------------------------------------------------------------

def c_decompress(src, cap):
    dst = bytearray(cap)
    n = lib.hv_lz4_legacy_decompress(ffi.from_buffer("uint8_t[]", src), len(src),
                                     ffi.from_buffer("uint8_t[]", dst), cap)
    return n, bytes(dst[:max(n, 0)])


def mixed_data(rng, size):
    """Half random, half repetitive: exercises literals, short and long matches."""
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.5:
            out += rng.randbytes(rng.randint(1, 3000))
        else:
            out += rng.randbytes(rng.randint(1, 40)) * rng.randint(1, 400)
    return bytes(out[:size])


@pytest.mark.parametrize("size", [1, 100, 65536, 3 * MiB, 9 * MiB + 12345])
def test_lz4_roundtrip_with_cli(size):
    rng = random.Random(size)
    raw = mixed_data(rng, size)
    comp = lz4_legacy(raw)
    n, out = c_decompress(comp, size + 8 * MiB)
    assert n == size and out == raw
    # with the kernel's size trailer after the stream
    n, out = c_decompress(comp + struct.pack("<I", size), size + 8 * MiB)
    assert n == size and out == raw


def test_lz4_roundtrip_with_the_kernel_build_flags():
    """scripts/Makefile.lib compresses with `lz4 -l -12 --favor-decSpeed`."""
    need("lz4")
    raw = mixed_data(random.Random(12), 10 * MiB)
    comp = run(["lz4", "-l", "-12", "--favor-decSpeed", "-c"], input=raw).stdout
    n, out = c_decompress(comp + size_trailer(raw), len(raw) + 8 * MiB)
    assert n == len(raw) and out == raw


def test_lz4_random_incompressible_data():
    raw = os.urandom(2 * MiB)
    n, out = c_decompress(lz4_legacy(raw), 2 * MiB + 8 * MiB)
    assert n == len(raw) and out == raw


def test_lz4_output_too_small_returns_minus_2():
    raw = mixed_data(random.Random(7), 100_000)
    n, _ = c_decompress(lz4_legacy(raw), 50_000)
    assert n == -2


@pytest.mark.parametrize("src", [
    b"", b"\x02\x21\x4c", b"\x03\x21\x4c\x18" + bytes(20),                        # no/short/wrong magic
    b"\x02\x21\x4c\x18" + struct.pack("<I", 8) + b"\xff" * 8,                       # literal length runs off
    b"\x02\x21\x4c\x18" + struct.pack("<I", 4) + b"\x10A\x05\x00",                  # match offset before output start
    b"\x02\x21\x4c\x18" + struct.pack("<I", 4) + b"\x10A\x00\x00",                  # match offset 0
    b"\x02\x21\x4c\x18" + struct.pack("<I", 3) + b"\x10A\x01",                      # offset cut short
    b"\x02\x21\x4c\x18" + struct.pack("<I", 5) + b"\x1fA\x01\x00\xff",              # match length runs off
])
def test_lz4_corrupt_input_returns_minus_1(src):
    n, _ = c_decompress(src, 9 * MiB)
    assert n == -1


def test_lz4_fuzz_never_crashes():
    """Mutated streams in a child process: a crash in C fails this test instead of killing pytest."""
    need("lz4")
    raw = mixed_data(random.Random(99), 200_000)
    comp = lz4_legacy(raw)
    script = textwrap.dedent("""
        import random, sys
        from pyhv.vcpu_worker._kvm import ffi, lib
        comp = sys.stdin.buffer.read()
        rng = random.Random(5)
        cap = 9 << 20
        dst = bytearray(cap)
        pdst = ffi.from_buffer("uint8_t[]", dst)
        counts = {}
        for i in range(3000):
            data = bytearray(comp)
            for _ in range(rng.randint(1, 10)):
                data[rng.randrange(4, len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                data = data[:rng.randrange(len(data))]
            n = lib.hv_lz4_legacy_decompress(ffi.from_buffer("uint8_t[]", bytes(data)), len(data), pdst, cap)
            assert n == -1 or 0 <= n <= cap, n
            counts[n == -1] = counts.get(n == -1, 0) + 1
        print(counts)
    """)
    proc = subprocess.run([sys.executable, "-c", script], input=comp, capture_output=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "True" in proc.stdout.decode()          # some mutations were detected as malformed
