"""Loading a Linux kernel into guest RAM for the 64-bit boot protocol: image, zero page, command line, initrd.

KVM on these machines runs guest kernel code through its instruction
emulator, so a bzImage's own decompressor would take minutes (shared docs,
kvm-on-these-machines.md).
A bzImage's payload is therefore decompressed here on the host and the ELF
vmlinux inside it is loaded and entered directly, as Firecracker does with
vmlinux files.  Only payloads the host cannot decompress (zstd, lzo) fall
back to entering the bzImage's own 64-bit entry point.

The kernel file is untrusted: every header field is checked before use, a
bad file raises KernelImageError (one line saying what is wrong) and nothing
is written into the guest until the whole load has been planned.  The CPU
state (long mode, identity map, __BOOT_CS/__BOOT_DS, RSI) is
cpu_state.py's job, not this module's.

References: Documentation/arch/x86/boot.rst and zero-page.rst, and
arch/x86/include/uapi/asm/bootparam.h (the offsets below follow that header).
"""
import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass

from pyhv.devices.guest_memory import GuestMemory, ram_regions
from pyhv.proto.errors import UserError
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.boot import layout


class KernelImageError(UserError):
    """The kernel image (or the command line / initrd asked of it) cannot be booted; the message says why."""


@dataclass
class LinuxBoot:
    entry: int            # guest-physical 64-bit entry point (RIP)
    boot_params: int      # guest-physical address of the zero page (goes in RSI)
    kernel_end: int       # first byte after the loaded kernel image
    initrd: tuple | None  # (addr, size) or None
    format: str           # "elf", "bzimage-lz4->elf", "bzimage-gzip->elf", ..., "bzimage"


# --- struct boot_params (the zero page) -------------------------------------
BP_SIZE = 4096
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8           # u8
BP_HDR = 0x1F1                    # struct setup_header starts here ...
BP_HDR_LIMIT = 0x290              # ... and must end before edd_mbr_sig_buffer
BP_E820_TABLE = 0x2D0             # struct boot_e820_entry[128]: u64 addr, u64 size, u32 type
E820_ENTRY = struct.Struct("<QQI")
E820_MAX_ENTRIES = 128            # E820_MAX_ENTRIES_ZEROPAGE

# --- struct setup_header, at the same offsets in the bzImage file and the zero page
HDR_SETUP_SECTS = 0x1F1           # u8, 0 means 4
HDR_BOOT_FLAG = 0x1FE             # u16 0xAA55
HDR_JUMP = 0x200                  # "jmp short": 0xEB, then the byte whose value + 0x202 is the header's end
HDR_HEADER = 0x202                # u32 "HdrS"
HDR_VERSION = 0x206               # u16
HDR_TYPE_OF_LOADER = 0x210        # u8
HDR_LOADFLAGS = 0x211             # u8
HDR_CODE32_START = 0x214          # u32
HDR_RAMDISK_IMAGE = 0x218         # u32
HDR_RAMDISK_SIZE = 0x21C          # u32
HDR_HEAP_END_PTR = 0x224          # u16
HDR_EXT_LOADER_VER = 0x226        # u8
HDR_EXT_LOADER_TYPE = 0x227       # u8
HDR_CMD_LINE_PTR = 0x228          # u32
HDR_INITRD_ADDR_MAX = 0x22C       # u32, highest byte address the initrd may occupy
HDR_KERNEL_ALIGNMENT = 0x230      # u32
HDR_RELOCATABLE = 0x234           # u8
HDR_XLOADFLAGS = 0x236            # u16 (2.12+)
HDR_CMDLINE_SIZE = 0x238          # u32, maximum command line length without the NUL (2.06+)
HDR_HARDWARE_SUBARCH = 0x23C      # u32, 0 = PC
HDR_HARDWARE_SUBARCH_DATA = 0x240  # u64
HDR_PAYLOAD_OFFSET = 0x248        # u32, from the start of the protected-mode code (2.08+)
HDR_PAYLOAD_LENGTH = 0x24C        # u32
HDR_SETUP_DATA = 0x250            # u64, physical pointer to a struct setup_data list (2.09+)
HDR_PREF_ADDRESS = 0x258          # u64 (2.10+)
HDR_INIT_SIZE = 0x260             # u32 (2.10+)
HDR_MIN_END = 0x264               # a 2.12+ header reaches at least past init_size

HDR_MAGIC = 0x53726448            # "HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C             # 2.12: xloadflags and the 64-bit entry point
ELF_PROTOCOL = 0x020C             # what we claim in a header built for an ELF kernel (PVH claims the same)
LOADER_UNDEFINED = 0xFF
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
HEAP_END_PTR = 0xE000 - 0x200     # boot.rst's sample value; only real-mode setup code reads it
ELF_KERNEL_ALIGNMENT = 0x1000000  # as Firecracker
ELF_INITRD_ADDR_MAX = 0x37FFFFFF  # the protocol's default for kernels that do not say

E820_RAM = 1
E820_RESERVED = 2

BZIMAGE_LOAD_ADDR = layout.HIMEM_START   # where the protected-mode code of a bzImage goes
BZIMAGE_ENTRY64_OFFSET = 0x200           # startup_64 = load address + 0x200
IDENTITY_MAP_LIMIT = 1 << 32             # cpu_state's boot page tables map the first 4 GiB
PAGE = 4096

# --- ELF64 ------------------------------------------------------------------
ELF_HEADER = struct.Struct("<HHIQQQIHHHHHH")     # from e_type (offset 16) to e_shstrndx
ELF_PHDR = struct.Struct("<IIQQQQQQ")            # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PN_XNUM = 0xFFFF

# --- bzImage payloads ---------------------------------------------------------
MAX_DECOMPRESSED = 512 << 20      # a stripped vmlinux is tens of MiB; more means a hostile file
LZ4_BLOCK_MAX = 8 << 20           # each legacy LZ4 block decompresses to at most 8 MiB

# (magic, name) in the order they are tried; boot.rst "payload_offset" lists the magics.
PAYLOAD_MAGICS = (
    (b"\x7fELF", "none"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
    (b"\x1f\x9e", "gzip-1f9e"),
)
GUEST_DECOMPRESSES = ("zstd", "lzo", "gzip-1f9e")   # no decompressor on the host: the guest does it (slowly)

# Magics of things people pass as a kernel by mistake, for a better message.
NOT_A_KERNEL = (
    (b"\x1f\x8b", "a gzip file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"\x28\xb5\x2f\xfd", "a zstd file"),
    (b"\x02\x21\x4c\x18", "an LZ4 legacy file"),
    (b"\x04\x22\x4d\x18", "an LZ4 file"),
    (b"BZh", "a bzip2 file"),
    (b"070701", "a cpio archive (an initramfs?)"),
    (b"070702", "a cpio archive (an initramfs?)"),
    (b"MZ", "a PE/EFI executable without a Linux setup header"),
)


def _mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def _u16(data, off):
    return struct.unpack_from("<H", data, off)[0]


def _u32(data, off):
    return struct.unpack_from("<I", data, off)[0]


def _u64(data, off):
    return struct.unpack_from("<Q", data, off)[0]


# --- format detection ---------------------------------------------------------

def detect_kernel_format(data) -> str:
    """'elf' or 'bzimage'; anything else raises KernelImageError naming what the file looks like."""
    data = memoryview(data).cast("B")
    if len(data) == 0:
        raise KernelImageError("kernel file is empty")
    if data[:4] == b"\x7fELF":
        return "elf"
    if len(data) >= HDR_HEADER + 4 and _u32(data, HDR_HEADER) == HDR_MAGIC:
        return "bzimage"
    for magic, what in NOT_A_KERNEL:
        if data[:len(magic)] == magic:
            raise KernelImageError(f"kernel file is {what}, not a Linux kernel (need an ELF vmlinux or a bzImage)")
    raise KernelImageError("not a Linux kernel: neither an ELF vmlinux nor a bzImage (no 'HdrS' at offset 0x202)")


# --- ELF vmlinux --------------------------------------------------------------

@dataclass
class _Segment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int


def _parse_elf(data, what):
    """(segments, physical entry point) of a 64-bit x86-64 ELF executable; nothing written yet."""
    if len(data) < 64:
        raise KernelImageError(f"{what}: truncated ELF header ({len(data)} bytes, need 64)")
    if data[4] != 2:
        raise KernelImageError(f"{what}: 32-bit ELF (EI_CLASS {data[4]}); need a 64-bit x86-64 vmlinux")
    if data[5] != 1:
        raise KernelImageError(f"{what}: big-endian ELF (EI_DATA {data[5]}); need a little-endian x86-64 vmlinux")
    (e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ELF_HEADER.unpack_from(data, 16)
    if e_machine != EM_X86_64:
        raise KernelImageError(f"{what}: ELF for machine {e_machine}, not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise KernelImageError(f"{what}: ELF type {e_type} is not an executable (ET_EXEC) vmlinux")
    if e_phnum == 0:
        raise KernelImageError(f"{what}: ELF has no program headers")
    if e_phnum == PN_XNUM:
        raise KernelImageError(f"{what}: ELF with extended program header numbering (PN_XNUM) is not supported")
    if e_phentsize < ELF_PHDR.size:
        raise KernelImageError(f"{what}: ELF program header size {e_phentsize} is smaller than {ELF_PHDR.size}")
    if e_phoff > len(data) or e_phnum * e_phentsize > len(data) - e_phoff:
        raise KernelImageError(f"{what}: ELF program headers (offset 0x{e_phoff:x}, {e_phnum} x {e_phentsize} bytes) "
                               f"run past the end of the file ({len(data)} bytes)")
    segments = []
    for i in range(e_phnum):
        phdr = ELF_PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        p_type, _pflags, off, vaddr, paddr, filesz, memsz, _align = phdr
        if p_type != PT_LOAD:
            continue
        if filesz > memsz:
            raise KernelImageError(f"{what}: segment {i} has p_filesz 0x{filesz:x} > p_memsz 0x{memsz:x}")
        if memsz == 0:
            continue
        if off > len(data) or filesz > len(data) - off:
            raise KernelImageError(f"{what}: segment {i} (file offset 0x{off:x}, 0x{filesz:x} bytes) runs past the "
                                   f"end of the file ({len(data)} bytes): truncated?")
        segments.append(_Segment(paddr, vaddr, off, filesz, memsz))
    if not segments:
        raise KernelImageError(f"{what}: ELF has no loadable (PT_LOAD) segment")
    # No two segments may share physical memory: a real vmlinux never does, and
    # it bounds the work of loading by the size of guest RAM.
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise KernelImageError(f"{what}: PT_LOAD segments at physical 0x{a.paddr:x} and 0x{b.paddr:x} overlap")
    # e_entry is physical in a real vmlinux (ENTRY(phys_startup_64)); a high
    # virtual entry is translated through the segment whose p_vaddr range holds it.
    if any(s.paddr <= e_entry < s.paddr + s.memsz for s in segments):
        entry = e_entry
    else:
        seg = next((s for s in segments if s.vaddr <= e_entry < s.vaddr + s.memsz), None)
        if seg is None:
            raise KernelImageError(f"{what}: ELF entry point 0x{e_entry:x} is not inside any loadable segment")
        entry = e_entry - seg.vaddr + seg.paddr
    return segments, entry


def _check_placement(mem, ranges, reserved):
    """Each (what, addr, size) must be guest RAM above the first MiB, identity-mapped and clear of reserved ranges."""
    for what, addr, size in ranges:
        end = addr + size
        where = f"{what} at physical 0x{addr:x}-0x{end:x}"
        if addr < layout.HIMEM_START:
            raise KernelImageError(f"{where} is below 1 MiB, where the VMM keeps its tables")
        if not mem.contains(addr, size):
            raise KernelImageError(f"{where} does not fit in guest RAM ({_mib(mem.size)}); give the guest more memory")
        if end > IDENTITY_MAP_LIMIT:
            raise KernelImageError(f"{where} is above 4 GiB, outside the boot identity map")
        for a, s, t in reserved:
            if addr < a + s and a < end:
                raise KernelImageError(f"{where} overlaps the VMM-reserved range 0x{a:x}-0x{a + s:x} (e820 type {t})")


_ZEROS = memoryview(bytes(1 << 20))


def _zero_fill(mem, addr, length):
    while length:
        n = min(length, len(_ZEROS))
        mem.write(addr, _ZEROS[:n])
        addr += n
        length -= n


def _write_segments(mem, data, segments):
    for s in segments:
        if s.filesz:
            mem.write(s.paddr, data[s.offset:s.offset + s.filesz])
        _zero_fill(mem, s.paddr + s.filesz, s.memsz - s.filesz)


# --- bzImage ------------------------------------------------------------------

@dataclass
class _BzImage:
    header: bytes          # file bytes [0x1F1, header end): copied into the zero page
    version: int
    cmdline_size: int
    initrd_addr_max: int
    xloadflags: int
    kernel_alignment: int
    relocatable: int
    pref_address: int
    init_size: int
    pm: memoryview         # the protected-mode code (what loads at 0x100000)
    payload: memoryview


def _parse_bzimage(data):
    if len(data) < HDR_VERSION + 2:
        raise KernelImageError(f"bzImage truncated inside its setup header ({len(data)} bytes)")
    version = _u16(data, HDR_VERSION)
    if version < MIN_PROTOCOL:
        raise KernelImageError(f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is too old; "
                               f"the 64-bit entry needs 2.12 (Linux 3.8) or newer")
    # boot.rst: "The end of setup header can be calculated as 0x0202 + byte value at offset 0x0201".
    hdr_end = HDR_HEADER + data[HDR_JUMP + 1]
    if hdr_end < HDR_MIN_END:
        raise KernelImageError(f"bzImage setup header ends at 0x{hdr_end:x}, too short for protocol "
                               f"{version >> 8}.{version & 0xFF:02d} (needs 0x{HDR_MIN_END:x})")
    if hdr_end > BP_HDR_LIMIT:
        raise KernelImageError(f"bzImage setup header claims to end at 0x{hdr_end:x}, "
                               f"past the zero page's header area (0x{BP_HDR_LIMIT:x})")
    if len(data) < hdr_end:
        raise KernelImageError(f"bzImage truncated inside its setup header "
                               f"({len(data)} bytes, header ends at 0x{hdr_end:x})")
    if _u16(data, HDR_BOOT_FLAG) != BOOT_FLAG:
        raise KernelImageError(f"bzImage boot_flag is 0x{_u16(data, HDR_BOOT_FLAG):04x}, not 0xAA55")
    if not data[HDR_LOADFLAGS] & LOADED_HIGH:
        raise KernelImageError("a zImage (protected-mode code loaded at 0x10000) is not supported; need a bzImage")
    setup_sects = data[HDR_SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise KernelImageError(f"bzImage ends inside its setup code ({setup_sects} setup sectors, "
                               f"file is {len(data)} bytes): truncated?")
    pm = data[setup_size:]
    off, length = _u32(data, HDR_PAYLOAD_OFFSET), _u32(data, HDR_PAYLOAD_LENGTH)
    if off == 0 or length < 4:
        raise KernelImageError(f"bzImage has no payload (payload_offset 0x{off:x}, payload_length 0x{length:x})")
    if off > len(pm) or length > len(pm) - off:
        raise KernelImageError(f"bzImage payload (offset 0x{off:x}, length 0x{length:x}) runs past the end of the "
                               f"protected-mode code (0x{len(pm):x} bytes): truncated or corrupt file")
    return _BzImage(
        header=bytes(data[BP_HDR:hdr_end]),
        version=version,
        cmdline_size=_u32(data, HDR_CMDLINE_SIZE),
        initrd_addr_max=_u32(data, HDR_INITRD_ADDR_MAX),
        xloadflags=_u16(data, HDR_XLOADFLAGS),
        kernel_alignment=_u32(data, HDR_KERNEL_ALIGNMENT),
        relocatable=data[HDR_RELOCATABLE],
        pref_address=_u64(data, HDR_PREF_ADDRESS),
        init_size=_u32(data, HDR_INIT_SIZE),
        pm=pm,
        payload=pm[off:off + length],
    )


def _compression(payload):
    for magic, name in PAYLOAD_MAGICS:
        if payload[:len(magic)] == magic:
            return name
    head = " ".join(f"{b:02x}" for b in payload[:6])
    raise KernelImageError(f"bzImage payload has an unknown compression format (starts {head})")


def _too_big():
    return KernelImageError(f"bzImage payload decompresses to more than {_mib(MAX_DECOMPRESSED)}: "
                            f"corrupt or hostile file")


def _lz4_legacy(payload):
    # The build appends the uncompressed size as a u32 after the LZ4 frames
    # (scripts/Makefile.lib size_append); the C decoder stops at it.  With
    # 8 MiB of slack past that size a correct stream never returns -2, so -2
    # means the trailer lied: retry bigger, up to the cap.
    limit = MAX_DECOMPRESSED + LZ4_BLOCK_MAX + PAGE
    cap = min(_u32(payload, len(payload) - 4) + LZ4_BLOCK_MAX + PAGE, limit)
    src = ffi.from_buffer("uint8_t[]", payload)
    while True:
        dst = bytearray(cap)
        n = lib.hv_lz4_legacy_decompress(src, len(payload), ffi.from_buffer("uint8_t[]", dst), cap)
        if n == -1:
            raise KernelImageError("bzImage LZ4 payload is corrupt (malformed LZ4 legacy stream)")
        if n >= 0:
            if n > MAX_DECOMPRESSED:
                raise _too_big()
            return memoryview(dst)[:n]
        if cap >= limit:
            raise _too_big()
        cap = min(cap * 2, limit)


def _stream(decompressor, payload, name, errors):
    try:
        out = decompressor.decompress(payload, MAX_DECOMPRESSED + 1)
    except errors as e:
        raise KernelImageError(f"bzImage {name} payload is corrupt: {e}") from None
    if len(out) > MAX_DECOMPRESSED:
        raise _too_big()
    if not decompressor.eof:
        raise KernelImageError(f"bzImage {name} payload is truncated or corrupt (stream does not end)")
    return out


def _decompress(payload, name):
    """The uncompressed payload (an ELF vmlinux, possibly followed by relocation data)."""
    if name == "none":
        return payload
    if name == "lz4":
        return _lz4_legacy(payload)
    if name == "gzip":
        return _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), payload, name, zlib.error)
    if name == "xz":
        return _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), payload, name, lzma.LZMAError)
    if name == "lzma":
        return _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), payload, name, lzma.LZMAError)
    if name == "bzip2":
        return _stream(bz2.BZ2Decompressor(), payload, name, (OSError, ValueError))
    raise AssertionError(name)


def _bzimage_kernel_end(bz):
    """Where the bzImage's own decompressor may write: its runtime start + init_size (boot.rst, init_size)."""
    if bz.relocatable:
        align = bz.kernel_alignment
        if align == 0 or align & (align - 1):
            raise KernelImageError(f"bzImage kernel_alignment 0x{align:x} is not a power of two")
        start = (BZIMAGE_LOAD_ADDR + align - 1) & ~(align - 1)
        # arch/x86/boot/compressed/head_64.S never goes below LOAD_PHYSICAL_ADDR (= pref_address)
        start = max(start, bz.pref_address)
    else:
        start = bz.pref_address
    return max(BZIMAGE_LOAD_ADDR + len(bz.pm), start + bz.init_size)


# --- e820, zero page, command line, initrd ------------------------------------

def _check_extra_e820(extra):
    out = []
    for ent in extra:
        try:
            addr, size, typ = (int(v) for v in ent)
        except (TypeError, ValueError):
            raise ValueError(f"extra_e820 entry {ent!r} is not (addr, size, type)") from None
        if addr < 0 or size <= 0 or addr + size > 1 << 64 or not 0 < typ < 1 << 32:
            raise ValueError(f"extra_e820 entry (0x{addr:x}, 0x{size:x}, {typ}) is invalid")
        out.append((addr, size, typ))
    out.sort()
    for (a, s, _), (b, _, _) in zip(out, out[1:]):
        if a + s > b:
            raise ValueError(f"extra_e820 entries overlap at 0x{b:x}")
    return out


def e820_map(mem_size, extra=()):
    """The guest's e820 table: [(addr, size, type)], sorted.

    The VMM's own areas below 1 MiB (GDT, page tables, zero page, command
    line) stay inside the first usable entry, as Firecracker does: the
    kernel copies the zero page and command line before it allocates
    anything, builds its own GDT and page tables, and reserves the low
    memory it cares about itself (the whole first MiB since 5.13, 64 KiB
    before).  Marking them reserved would only take those pages from the
    guest for good.  [EBDA_START, 1 MiB) is reserved: the MP table lives at
    EBDA_START and legacy ROM/VGA sits above 0xA0000 on a PC.  `extra`
    entries are carved out of the RAM ranges they overlap, then added.
    """
    extra = _check_extra_e820(extra)
    regions = ram_regions(mem_size)
    low = regions[0][1]
    base = []
    if low > 0:
        base.append((0, min(layout.EBDA_START, low), E820_RAM))
    if low > layout.EBDA_START:
        base.append((layout.EBDA_START, min(layout.HIMEM_START, low) - layout.EBDA_START, E820_RESERVED))
    if low > layout.HIMEM_START:
        base.append((layout.HIMEM_START, low - layout.HIMEM_START, E820_RAM))
    base.extend((gpa, size, E820_RAM) for gpa, size, _ in regions[1:])
    for xa, xs, _ in extra:
        carved = []
        for a, s, t in base:
            if a < xa + xs and xa < a + s:
                if a < xa:
                    carved.append((a, xa - a, t))
                if xa + xs < a + s:
                    carved.append((xa + xs, a + s - (xa + xs), t))
            else:
                carved.append((a, s, t))
        base = carved
    table = sorted(base + extra)
    if len(table) > E820_MAX_ENTRIES:
        raise ValueError(f"e820 table has {len(table)} entries; the zero page holds {E820_MAX_ENTRIES}")
    return table


def _encode_cmdline(cmdline, limit):
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise KernelImageError("kernel command line contains a NUL byte")
    if len(raw) > limit:
        raise KernelImageError(f"kernel command line is {len(raw)} bytes; this kernel accepts at most {limit}")
    return raw


def _place_initrd(mem, size, kernel_end, addr_max, reserved):
    """Highest page-aligned low-RAM address for `size` bytes: above the kernel, below addr_max, not reserved."""
    low_end = ram_regions(mem.size)[0][1]
    top = min(addr_max + 1, low_end)
    bottom = max(kernel_end, layout.HIMEM_START)
    bottom = (bottom + PAGE - 1) & ~(PAGE - 1)
    while True:
        addr = (top - size) & ~(PAGE - 1)
        if addr < bottom or top < size:
            room = max(top - bottom, 0)
            raise KernelImageError(f"initrd of {_mib(size)} does not fit in guest RAM between the kernel end "
                                   f"0x{bottom:x} and 0x{top:x} ({_mib(room)} free); "
                                   f"give the guest more memory or use a smaller initrd")
        clash = [a for a, s, _ in reserved if a < addr + size and addr < a + s]
        if not clash:
            return addr
        top = min(clash)


def _elf_zero_page():
    """A zero page whose setup header is built from scratch for an ELF kernel, as Firecracker does."""
    bp = bytearray(BP_SIZE)
    struct.pack_into("<H", bp, HDR_BOOT_FLAG, BOOT_FLAG)
    struct.pack_into("<I", bp, HDR_HEADER, HDR_MAGIC)
    struct.pack_into("<H", bp, HDR_VERSION, ELF_PROTOCOL)
    struct.pack_into("<I", bp, HDR_KERNEL_ALIGNMENT, ELF_KERNEL_ALIGNMENT)
    return bp


def _bzimage_zero_page(bz):
    """A clean zero page with the image's own setup header copied in (boot.rst, "64-bit Boot Protocol").

    The fields the boot loader owns are cleared: we pass no setup_data list
    and boot a plain PC (hardware_subarch 0), whatever the file says.
    """
    bp = bytearray(BP_SIZE)
    bp[BP_HDR:BP_HDR + len(bz.header)] = bz.header
    bp[HDR_EXT_LOADER_VER] = bp[HDR_EXT_LOADER_TYPE] = 0
    struct.pack_into("<I", bp, HDR_HARDWARE_SUBARCH, 0)
    struct.pack_into("<Q", bp, HDR_HARDWARE_SUBARCH_DATA, 0)
    struct.pack_into("<Q", bp, HDR_SETUP_DATA, 0)
    return bp


def _fill_zero_page(bp, initrd, e820):
    """The loader's fields, common to ELF and bzImage kernels."""
    bp[HDR_TYPE_OF_LOADER] = LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, HEAP_END_PTR)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, layout.CMDLINE_ADDR & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, layout.CMDLINE_ADDR >> 32)
    addr, size = initrd or (0, 0)
    struct.pack_into("<I", bp, HDR_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, HDR_RAMDISK_SIZE, size & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32)
    struct.pack_into("<I", bp, BP_EXT_RAMDISK_SIZE, size >> 32)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (a, s, t) in enumerate(e820):
        E820_ENTRY.pack_into(bp, BP_E820_TABLE + i * E820_ENTRY.size, a, s, t)


# --- the loader -----------------------------------------------------------------

def load_linux(mem: GuestMemory, kernel: bytes, cmdline: str, initrd: bytes | None = None,
               extra_e820: list = ()) -> LinuxBoot:
    """Load `kernel` (ELF vmlinux or bzImage) with its command line, initrd and zero page into guest RAM.

    Everything is checked and planned first; guest RAM is written only once
    the whole load is known to succeed.  The caller sets up the CPU
    (cpu_state mode "linux") with RIP = entry and RSI = boot_params.
    `extra_e820` entries (addr, size, type) are added to the e820 map; the
    kernel and initrd keep clear of those that are not RAM (type != 1).
    """
    data = memoryview(kernel).cast("B")
    extra = _check_extra_e820(extra_e820)
    e820 = e820_map(mem.size, extra)
    reserved = [(a, s, t) for a, s, t in extra if t != E820_RAM]
    fmt = detect_kernel_format(data)

    elf = segments = None            # an ELF to copy segment by segment, or a bzImage entered as such
    if fmt == "elf":
        elf = data
        segments, entry = _parse_elf(elf, "vmlinux")
        bp = _elf_zero_page()
        cmdline_limit = layout.CMDLINE_MAX - 1
        addr_max = ELF_INITRD_ADDR_MAX
    else:
        bz = _parse_bzimage(data)
        comp = _compression(bz.payload)
        bp = _bzimage_zero_page(bz)
        cmdline_limit = min(layout.CMDLINE_MAX - 1, bz.cmdline_size)
        addr_max = bz.initrd_addr_max
        if comp in GUEST_DECOMPRESSES:
            if not bz.xloadflags & XLF_KERNEL_64:
                raise KernelImageError(f"bzImage has a {comp} payload, which the host cannot decompress, "
                                       f"and no 64-bit entry point (XLF_KERNEL_64 clear)")
            fmt = "bzimage"
            entry = BZIMAGE_LOAD_ADDR + BZIMAGE_ENTRY64_OFFSET
            kernel_end = _bzimage_kernel_end(bz)
            # The decompressor works in [load address, runtime start + init_size): all of it must be usable.
            _check_placement(mem, [("bzImage and its decompression area", BZIMAGE_LOAD_ADDR,
                                    kernel_end - BZIMAGE_LOAD_ADDR)], reserved)
            struct.pack_into("<I", bp, HDR_CODE32_START, BZIMAGE_LOAD_ADDR)
        else:
            elf = _decompress(bz.payload, comp)
            if elf[:4] != b"\x7fELF":
                raise KernelImageError(f"bzImage {comp} payload did not decompress to an ELF vmlinux")
            segments, entry = _parse_elf(elf, f"vmlinux in the bzImage's {comp} payload")
            fmt = f"bzimage-{comp}->elf"
    if segments is not None:
        what = "vmlinux" if fmt == "elf" else "decompressed vmlinux"
        _check_placement(mem, [(f"{what} segment {i}", s.paddr, s.memsz) for i, s in enumerate(segments)], reserved)
        kernel_end = max(s.paddr + s.memsz for s in segments)

    raw_cmdline = _encode_cmdline(cmdline, cmdline_limit)
    if fmt == "elf":
        # A "read" field (the kernel's limit, for the loader); no kernel reads it.
        # Firecracker fills in the command line's length, so do we.
        struct.pack_into("<I", bp, HDR_CMDLINE_SIZE, len(raw_cmdline))
    placed = None
    if initrd is not None:
        initrd = memoryview(initrd).cast("B")
        if len(initrd):
            placed = (_place_initrd(mem, len(initrd), kernel_end, addr_max, reserved), len(initrd))
    _fill_zero_page(bp, placed, e820)

    # --- nothing has been written to the guest before this point ---
    if segments is not None:
        _write_segments(mem, elf, segments)
    else:
        mem.write(BZIMAGE_LOAD_ADDR, bz.pm)
    if placed:
        mem.write(placed[0], initrd)
    mem.write(layout.CMDLINE_ADDR, raw_cmdline + b"\0")
    mem.write(layout.BOOT_PARAMS_ADDR, bytes(bp))
    return LinuxBoot(entry=entry, boot_params=layout.BOOT_PARAMS_ADDR, kernel_end=kernel_end,
                     initrd=placed, format=fmt)
