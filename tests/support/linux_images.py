"""Synthetic Linux kernel images for the loader and boot-protocol tests: bzImages around a payload, compressed every way."""
import bz2
import gzip
import lzma
import shutil
import struct
import subprocess

import pytest


def need(*tools):
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (binutils / lz4 package); needed to build this test's input")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


# --- building synthetic bzImages ----------------------------------------------------------

def size_trailer(raw):
    """What the kernel build appends after most compressed payloads (scripts/Makefile.lib size_append)."""
    return struct.pack("<I", len(raw))


def lz4_legacy(raw):
    need("lz4")
    return run(["lz4", "-l", "-9", "-c"], input=raw).stdout


def payload_for(comp, elf):
    if comp == "lz4":
        return lz4_legacy(elf) + size_trailer(elf)
    if comp == "gzip":
        return gzip.compress(elf, mtime=0)     # gzip's own ISIZE trailer is the size
    if comp == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]
        return lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters) + size_trailer(elf)
    if comp == "lzma":
        return lzma.compress(elf, format=lzma.FORMAT_ALONE) + size_trailer(elf)
    if comp == "bzip2":
        return bz2.compress(elf) + size_trailer(elf)
    if comp == "none":
        return elf
    raise AssertionError(comp)


HDR_LEN = 0x26C - 0x202          # protocol 2.15 header


def make_bzimage(payload, *, version=0x020F, setup_sects=4, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF,
                 xloadflags=0x3, init_size=0x2000000, payload_offset=0x400, hdr_len=HDR_LEN, loadflags=0x01,
                 relocatable=1, kernel_alignment=0x200000, tail=0x123):
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1F2, 1)               # root_flags
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)          # vid_mode "normal"
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = hdr_len
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)        # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21                                     # min_alignment
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    struct.pack_into("<Q", setup, 0x250, 0xDEADBEEF)      # setup_data: loader-owned, must not be copied
    struct.pack_into("<Q", setup, 0x258, 0x1000000)       # pref_address
    struct.pack_into("<I", setup, 0x260, init_size)
    struct.pack_into("<I", setup, 0x264, 0x190)           # handover_offset
    struct.pack_into("<I", setup, 0x268, 0x1234)          # kernel_info_offset
    pm = bytearray(payload_offset)
    pm[0:4] = b"PM32"                                     # marks startup_32 (load address)
    pm[0x200:0x204] = b"PM64"                             # marks startup_64 (load address + 0x200)
    return bytes(setup) + bytes(pm) + payload + bytes(tail)
