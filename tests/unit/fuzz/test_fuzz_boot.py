"""Fuzz: the boot loaders (vcpu_worker/boot/) on truncated and malicious kernels and initrds.

A kernel file is the user's, and a crafted one may come from anywhere:
ELF vmlinux images built field by field here (program headers whose
offsets, sizes and addresses are anything, entry points anywhere, headers
that overlap or run off the file), bzImages around them with every setup
header field drawn (protocol version, header length, setup sectors,
payload offset and length, command-line limit, initrd ceiling, alignment,
preferred address, init size) and payloads uncompressed, gzip, xz, lzma,
bzip2 or garbage, then truncated or flipped; initrds of every size; raw
images at every load address.  The property: the loader raises only
KernelImageError / UserError with one line; nothing reaches guest RAM
unless the whole load succeeds (canary RAM, checked byte for byte); a load
that succeeds writes only its kernel segments, zero page, command line and
initrd, enters inside a segment and puts the initrd inside RAM below the
kernel's ceiling.  The host LZ4 decoder is fuzzed in a child process by
tests/unit/test_linux_loader.py (a crash there must not take pytest down).
"""
import bz2
import gzip
import lzma
import struct

import pytest
from hypothesis import event, given, strategies as st

from fuzzing import CanaryMemory, budget
from linux_images import make_bzimage, size_trailer
from pyhv.proto.errors import UserError
from pyhv.vcpu_worker.boot import layout
from pyhv.vcpu_worker.boot.linux import BP_SIZE, KernelImageError, load_linux

pytestmark = pytest.mark.fuzz

MiB = 1 << 20
RAM = 8 * MiB
PHYS = 0x200000                  # where the ELF images put their first segment (the loader needs >= 1 MiB)
ELF_HDR = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")

ADDR = st.one_of(st.integers(0, RAM + 0x1000), st.sampled_from([0, PHYS, PHYS + 0x1000, RAM - 0x1000, RAM,
                                                                  0xC000_0000, 0xFFFF_FFFF, 2 ** 32, 2 ** 63,
                                                                  2 ** 64 - 0x1000]),
                 st.integers(0, 2 ** 64 - 1))
SIZE = st.one_of(st.integers(0, 0x4000), st.sampled_from([0, 1, 0x1000, RAM, 2 ** 32, 2 ** 63, 2 ** 64 - 1]),
                 st.integers(0, 2 ** 64 - 1))


@st.composite
def elf_images(draw, sane=False):
    """A 64-bit ELF executable: sane segments at PHYS, then (unless `sane`) any field possibly replaced."""
    nseg = draw(st.integers(1 if sane else 0, 4))
    segs = []
    for i in range(nseg):
        filesz = draw(st.integers(0x20 if sane else 0, 0x3000))
        segs.append({"type": 1 if sane else draw(st.sampled_from([1, 1, 1, 0, 4])), "paddr": PHYS + 0x4000 * i,
                     "vaddr": 0xFFFFFFFF81000000 + 0x4000 * i, "filesz": filesz,
                     "memsz": filesz + draw(st.integers(0, 0x2000)), "data": bytes([0x90 + i]) * filesz})
    entry = draw(st.sampled_from([PHYS + 0x10, 0xFFFFFFFF81000010])) if segs else PHYS
    phoff, phentsize = 64, PHDR.size
    offset = phoff + phentsize * nseg
    for s in segs:
        s["offset"] = offset
        offset += len(s["data"])
    for _ in range(0 if sane else draw(st.integers(0, 3))):       # the hostile part
        if segs and draw(st.booleans()):
            s = draw(st.sampled_from(segs))
            s[draw(st.sampled_from(["paddr", "vaddr", "filesz", "memsz", "offset"]))] = draw(
                st.one_of(ADDR, SIZE))
        else:
            field = draw(st.sampled_from(["entry", "phoff", "phentsize", "phnum"]))
            value = draw(st.one_of(ADDR, st.integers(0, 0xFFFF)))
            if field == "entry":
                entry = value
            elif field == "phoff":
                phoff = value
            elif field == "phentsize":
                phentsize = value & 0xFFFF
            else:
                nseg = value & 0xFFFF
    ident = (b"\x7fELF", 2, 1) if sane else draw(st.sampled_from([(b"\x7fELF", 2, 1), (b"\x7fELF", 2, 1),
                                                                   (b"\x7fELF", 1, 1), (b"\x7fELF", 2, 2)]))
    machine, etype = (62, 2) if sane else draw(st.sampled_from([(62, 2), (62, 2), (62, 2), (3, 2), (62, 3)]))
    head = ELF_HDR.pack(ident[0], ident[1], ident[2], 1, 0, 0, etype, machine, 1, entry & (2 ** 64 - 1),
                        phoff & (2 ** 64 - 1), 0, 0, 64, phentsize, nseg, 64, 0, 0)
    phdrs = b"".join(PHDR.pack(s["type"], 7, s["offset"] & (2 ** 64 - 1), s["vaddr"] & (2 ** 64 - 1),
                               s["paddr"] & (2 ** 64 - 1), s["filesz"] & (2 ** 64 - 1), s["memsz"] & (2 ** 64 - 1),
                               0x1000) for s in segs)
    return head + phdrs + b"".join(s["data"] for s in segs)


def compress(comp, elf):
    if comp == "gzip":
        return gzip.compress(elf, mtime=0)
    if comp == "xz":
        return lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size_trailer(elf)
    if comp == "lzma":
        return lzma.compress(elf, format=lzma.FORMAT_ALONE) + size_trailer(elf)
    if comp == "bzip2":
        return bz2.compress(elf) + size_trailer(elf)
    return elf


@st.composite
def bzimages(draw, sane=False):
    elf = draw(elf_images(sane))
    comp = draw(st.sampled_from(["none", "gzip", "xz", "lzma", "bzip2"] + ([] if sane else ["garbage", "zstd"])))
    if comp == "garbage":
        payload = draw(st.binary(min_size=4, max_size=64))
    elif comp == "zstd":                       # a payload only the guest can unpack: its own entry point is used
        payload = b"\x28\xb5\x2f\xfd" + draw(st.binary(max_size=64))
    else:
        payload = compress(comp, elf)
    fields = {} if sane else draw(st.fixed_dictionaries({}, optional={
        "version": st.sampled_from([0x0200, 0x020B, 0x020C, 0x020F, 0xFFFF]),
        "setup_sects": st.integers(0, 255), "cmdline_size": st.sampled_from([0, 1, 255, 2047, 0xFFFFFFFF]),
        "initrd_addr_max": st.sampled_from([0, 0xFFFFF, PHYS, 4 * MiB, 0x37FFFFFF, 0xFFFFFFFF]),
        "xloadflags": st.integers(0, 0xFFFF), "init_size": st.sampled_from([0, 0x1000, 0x200000, 0x2000000, 0xFFFFFFFF]),
        "payload_offset": st.sampled_from([0, 4, 0x400, 0x10000]), "hdr_len": st.integers(0, 255),
        "loadflags": st.integers(0, 255), "relocatable": st.integers(0, 1),
        "kernel_alignment": st.sampled_from([0, 3, 0x1000, 0x200000, 0x80000000])}))
    image = bytearray(make_bzimage(payload, **fields))
    if not sane and draw(st.booleans()):       # payload_length and pref_address may lie too
        struct.pack_into("<I", image, 0x24C, draw(st.integers(0, 2 ** 32 - 1)))
        struct.pack_into("<Q", image, 0x258, draw(ADDR))
    return bytes(image)


@st.composite
def kernels(draw):
    """A third are well-formed (so the success path is fuzzed too: initrds, command lines), the rest hostile."""
    sane = draw(st.integers(0, 2)) == 0
    data = bytearray(draw(st.one_of(elf_images(sane), bzimages(sane))))
    if sane:
        return bytes(data)
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def ram():
    m = CanaryMemory(RAM)
    yield m
    m.close()


INITRDS = st.one_of(st.none(), st.sampled_from([0, 1, 4096, 1 * MiB, 5 * MiB, 7 * MiB]))


@budget(150)
@given(kernel=kernels(), initrd=INITRDS, cmdline=st.sampled_from(["", "console=ttyS0", "x" * 300, "a\0b"]))
def test_linux_loader_writes_all_of_a_good_kernel_or_nothing(ram, kernel, initrd, cmdline):
    ram.reset()
    initrd_bytes = None if initrd is None else b"\xab" * initrd
    try:
        boot = load_linux(ram, kernel, cmdline, initrd_bytes)
    except KernelImageError as e:
        assert str(e) and "\n" not in str(e)
        assert not ram.changed(), "a refused kernel left bytes in guest RAM"
        event("refused")
        return
    event(f"loaded: {boot.format}")
    allowed = [(layout.BOOT_PARAMS_ADDR, BP_SIZE), (layout.CMDLINE_ADDR, layout.CMDLINE_MAX)]
    if boot.format == "bzimage":                # entered through its own decompressor
        allowed.append((0x100000, boot.kernel_end - 0x100000))
    else:
        allowed.append((0x100000, boot.kernel_end - 0x100000))     # every segment lies in [1 MiB, kernel_end)
        assert 0x100000 <= boot.entry < boot.kernel_end
    assert boot.kernel_end <= RAM
    if boot.initrd:
        addr, size = boot.initrd
        assert size == initrd and addr >= boot.kernel_end and addr + size <= RAM and addr % 4096 == 0
        allowed.append(boot.initrd)
    ram.assert_written_only_within(allowed)


class Config:
    """What boot.load reads of a GuestConfig."""

    def __init__(self, kernel, boot, load_addr, mem_bytes):
        self.kernel, self.boot, self.load_addr, self.mem_bytes = kernel, boot, load_addr, mem_bytes
        self.initrd, self.cmdline, self.vcpus = None, "", 1


@budget(100)
@given(boot=st.sampled_from(["raw16", "raw32", "raw64", "user64"]),
       load_addr=st.one_of(st.none(), st.integers(0, RAM + 0x1000), st.sampled_from([0, 0x500, 0x7C00, 0xFFFF,
                                                                                     0x10000, RAM - 1, 2 ** 64 - 1])),
       size=st.one_of(st.integers(0, 0x2000), st.sampled_from([0x10000, 0x100000, RAM - 0x100000, RAM, RAM + 1])))
def test_raw_images_load_where_they_fit_or_not_at_all(ram, tmp_path_factory, boot, load_addr, size):
    from pyhv.vcpu_worker import compat
    from pyhv.vcpu_worker.boot import load
    path = tmp_path_factory.getbasetemp() / "raw.bin"
    with open(path, "wb") as f:
        f.write(b"\xcc" * size)
    ram.reset()
    try:
        entry = load(Config(str(path), boot, load_addr, RAM), ram, compat.profile("none"), 1000)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        assert not ram.changed()
        return
    at = entry.rip
    assert ram.read(at, size) == b"\xcc" * size if size else True
    tables = (layout.GDT_ADDR, layout.PD_ADDR + 4 * 4096 - layout.GDT_ADDR)
    ram.assert_written_only_within([(at, size), tables])
