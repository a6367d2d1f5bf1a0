"""The register file GDB sees: the x86-64 target description (target.xml) and the 'g'/'p' byte layout.

One table (REGISTERS) gives each register's name, size and feature in
GDB's order; the XML, the packet layout and the register numbers all come
from it.  GDB's amd64 code looks for the features by name:
`org.gnu.gdb.i386.core` (general, segment selectors, x87) and
`org.gnu.gdb.i386.sse` are required, `org.gnu.gdb.i386.segments` carries
fs_base/gs_base; the system registers (cr0-cr8, efer, the kernel's swapgs
base) go in a feature of our own, which GDB shows as plain registers.
Values are ints (little-endian in the packets) except st0-st7 (10 bytes)
and xmm0-xmm15 (16), which are bytes.  Pure: the KVM side is in target.py.
"""
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
SYSTEM = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "k_gs_base")

CORE, SSE, SEGMENTS, SYS = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments", \
    "org.pyhv.x86.system"


class Register:
    __slots__ = ("name", "bits", "type", "feature", "group", "number", "offset")

    def __init__(self, name, bits, type_, feature, group=None):
        self.name, self.bits, self.type, self.feature, self.group = name, bits, type_, feature, group
        self.number = self.offset = None

    @property
    def size(self):
        return self.bits // 8

    def encode(self, value):
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).ljust(self.size, b"\0")[:self.size]
        return (value & ((1 << self.bits) - 1)).to_bytes(self.size, "little")

    def decode(self, data):
        if self.type in ("i387_ext", "vec128"):
            return bytes(data)
        return int.from_bytes(data, "little")


def _table():
    regs = [Register(n, 64, "int64", CORE, "general") for n in GPRS[:6]]
    regs += [Register("rbp", 64, "data_ptr", CORE, "general"), Register("rsp", 64, "data_ptr", CORE, "general")]
    regs += [Register(n, 64, "int64", CORE, "general") for n in GPRS[8:]]
    regs += [Register("rip", 64, "code_ptr", CORE, "general"), Register("eflags", 32, "i386_eflags", CORE, "general")]
    regs += [Register(n, 32, "int32", CORE, "general") for n in SELECTORS]
    regs += [Register(f"st{i}", 80, "i387_ext", CORE, "float") for i in range(8)]
    regs += [Register(n, 32, "int", CORE, "float") for n in X87_CONTROL]
    regs += [Register(f"xmm{i}", 128, "vec128", SSE, "vector") for i in range(16)]
    regs += [Register("mxcsr", 32, "i386_mxcsr", SSE, "vector")]
    regs += [Register(n, 64, "int64", SEGMENTS, "system") for n in ("fs_base", "gs_base")]
    regs += [Register(n, 64, "int64", SYS, "system") for n in SYSTEM]
    offset = 0
    for i, r in enumerate(regs):
        r.number, r.offset = i, offset
        offset += r.size
    return tuple(regs)


REGISTERS = _table()
BY_NAME = {r.name: r for r in REGISTERS}
G_SIZE = sum(r.size for r in REGISTERS)          # bytes in a 'g' reply
PC = BY_NAME["rip"].number

_EFLAGS = ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"),
           (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"), (20, "VIP"), (21, "ID"))
_MXCSR = ((0, "IE"), (1, "DE"), (2, "ZE"), (3, "OE"), (4, "UE"), (5, "PE"), (6, "DAZ"), (7, "IM"), (8, "DM"),
          (9, "ZM"), (10, "OM"), (11, "UM"), (12, "PM"), (15, "FZ"))


def _flags(name, size, bits):
    fields = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for b, n in bits)
    return f'<flags id="{name}" size="{size}">{fields}</flags>'


def target_xml():
    """The target description GDB reads with qXfer:features:read:target.xml."""
    types = {
        CORE: _flags("i386_eflags", 4, _EFLAGS),
        SSE: ('<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
              '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
              '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
              '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
              '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
              '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
              '<field name="uint128" type="uint128"/></union>' + _flags("i386_mxcsr", 4, _MXCSR)),
    }
    parts = ['<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">'
             '<architecture>i386:x86-64</architecture>']
    feature = None
    for r in REGISTERS:
        if r.feature != feature:
            if feature is not None:
                parts.append("</feature>")
            feature = r.feature
            parts.append(f'<feature name="{feature}">{types.get(feature, "")}')
        group = f' group="{r.group}"' if r.group else ""
        parts.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{r.number}"{group}/>')
    parts.append("</feature></target>")
    return "".join(parts).encode()


def encode_all(values):
    """The 'g' reply's bytes for a {name: value} of every register (one missing reads as zero)."""
    return b"".join(r.encode(values.get(r.name, 0)) for r in REGISTERS)


def decode_all(data):
    """{name: value} from a 'G' packet's bytes; ValueError unless it is exactly G_SIZE bytes."""
    if len(data) != G_SIZE:
        raise ValueError(f"register block of {len(data)} bytes, expected {G_SIZE}")
    return {r.name: r.decode(data[r.offset:r.offset + r.size]) for r in REGISTERS}


# -- x87 tag word: FXSAVE keeps one "valid" bit per register, GDB shows the full two-bit tags -----------------

def full_tag_word(abridged, fstat, st):
    """The 16-bit x87 tag word from FXSAVE's abridged one; `st` holds ST0-ST7's 10-byte values (stack order)."""
    top = (fstat >> 11) & 7
    tags = 0
    for phys in range(8):
        if not abridged & (1 << phys):
            tag = 3                                        # empty
        else:
            raw = int.from_bytes(st[(phys - top) & 7][:10], "little")
            exponent, mantissa = (raw >> 64) & 0x7FFF, raw & ((1 << 64) - 1)
            if exponent == 0x7FFF:
                tag = 2                                    # NaN, infinity
            elif exponent == 0:
                tag = 1 if mantissa == 0 else 2            # zero, or denormal
            else:
                tag = 0 if mantissa >> 63 else 2           # valid, or unnormal
        tags |= tag << (2 * phys)
    return tags


def abridged_tag_word(full):
    """FXSAVE's abridged tag byte from a full tag word: a register is in use unless its tag is 3 (empty)."""
    return sum(1 << phys for phys in range(8) if (full >> (2 * phys)) & 3 != 3)
