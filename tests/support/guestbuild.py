"""Build tiny test guests from assembly or C at test time (as/ld/objcopy/gcc); binaries are never committed.

Shared by the tests (through conftest.py) and by bench/.  Outputs are cached
by content hash, so a source is assembled once per cache directory.
"""
import hashlib
import os
import pathlib
import subprocess
import tempfile

MODES = {
    # mode: (as flags, ld emulation, source prefix, default load address)
    "raw16": ("--32", "elf_i386", ".code16\n", 0x7C00),
    "raw32": ("--32", "elf_i386", ".code32\n", 0x100000),
    "raw64": ("--64", "elf_x86_64", ".code64\n", 0x100000),
    "user64": ("--64", "elf_x86_64", ".code64\n", 0x100000),
}

CACHE = pathlib.Path(os.environ.get("HV_GUEST_CACHE", pathlib.Path(tempfile.gettempdir()) / "pyhv-guests"))


class GuestBuildError(RuntimeError):
    pass


def _run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise GuestBuildError(f"{' '.join(cmd)}:\n{r.stderr}")


def _cached(kind, key_parts, build):
    digest = hashlib.sha256("\0".join(map(str, key_parts)).encode()).hexdigest()[:16]
    out = CACHE / f"{kind}-{digest}.bin"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            build(pathlib.Path(tmp), out)
    return out


def build_asm(source, mode="raw64", load_addr=None):
    """Assemble `source` for `mode` into a flat binary linked at `load_addr`; returns its path."""
    as_flag, emulation, prefix, default_addr = MODES[mode]
    addr = default_addr if load_addr is None else load_addr

    def build(tmp, out):
        (tmp / "g.S").write_text(prefix + source)
        _run(["gcc", "-c", "-x", "assembler-with-cpp", "-m32" if as_flag == "--32" else "-m64", "g.S", "-o", "g.o"], tmp)
        _run(["ld", "-m", emulation, "-Ttext", hex(addr), "-e", hex(addr), "-o", "g.elf", "g.o"], tmp)
        _run(["objcopy", "-O", "binary", "g.elf", "g.tmp"], tmp)
        os.replace(tmp / "g.tmp", out)

    return _cached(mode, (source, mode, addr), build)


C_START = r"""
.code64
.section .text.start
.globl _start
_start:
    /* rdi = vCPU index, rsi = vCPU count (raw boot state); each vCPU gets its own 16 KiB stack */
    lea stack_top(%rip), %rsp
    mov %rdi, %rax
    shl $14, %rax
    sub %rax, %rsp
    call guest_main
    /* guest_main returned: exit with its value through the debug page (works in ring 0 and ring 3) */
    mov $0xFEBFF000, %rbx
    movb %al, (%rbx)
1:  jmp 1b
.section .bss
.balign 4096
stack_bottom:
    .skip 16384 * 64
stack_top:
"""


GUEST_HEADERS = pathlib.Path(__file__).resolve().parent / "guests"


def build_c(source, mode="raw64", load_addr=0x100000, cflags=()):
    """Compile a freestanding C guest (`long guest_main(long index, long count, long tsc_khz)`) into a flat binary.

    The source may #include the headers in tests/support/guests (virtio_guest.h):
    they are copied beside it and are part of the cache key, so editing one
    rebuilds every guest that could use it.
    """
    headers = {h.name: h.read_text() for h in sorted(GUEST_HEADERS.glob("*.h"))}

    def build(tmp, out):
        (tmp / "start.S").write_text(C_START)
        (tmp / "g.c").write_text(source)
        for name, text in headers.items():
            (tmp / name).write_text(text)
        common = ["gcc", "-m64", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone", "-nostdlib",
                  "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables", *cflags]
        _run(common + ["-c", "start.S", "-o", "start.o"], tmp)
        _run(common + ["-O2", "-c", "g.c", "-o", "g.o"], tmp)
        _run(["ld", "-m", "elf_x86_64", "-static", "-Ttext", hex(load_addr), "-e", "_start",
              "-o", "g.elf", "start.o", "g.o"], tmp)
        _run(["objcopy", "-O", "binary", "--set-section-flags", ".bss=alloc,load,contents", "g.elf", "g.tmp"], tmp)
        os.replace(tmp / "g.tmp", out)

    return _cached(f"c-{mode}", (C_START, source, mode, load_addr, *cflags, *headers.items()), build)
