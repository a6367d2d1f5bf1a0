"""A guest's description: GuestConfig with its typed DeviceSpecs, and the pure parsers and checks of its options.

What every process agrees a guest is: hvctl builds one from the command line,
the supervisor keeps it in guest.json, the worker builds the VM from it.
Checks here need nothing but the config itself; the files it names and the
device kinds' own options are checked by their owners (supervisor/config.py,
devices/virtio/kinds.py).
"""
import os
import re

from pyhv.proto.errors import UserError
from pyhv.proto.messages import Channel, Message, message

BOOT_MODES = ("linux", "raw16", "raw32", "raw64", "user64")
COMPAT_PROFILES = ("nested", "none")
DEFAULT_MEM_BYTES = 128 << 20
MIN_MEM, MAX_MEM = 1 << 20, 64 << 30
MAX_VCPUS = 64                  # KVM allows more; our hosts have 2 cores
MAX_TIMEOUT = 24 * 86400        # seconds; longer ones overflow the millisecond timers of poll() and ZeroMQ (2^31 ms)
MAX_CMDLINE = 2048              # bytes; x86 Linux's COMMAND_LINE_SIZE, and what fits the exec of a worker
MAX_CPU = 8191                  # the highest CPU number Linux supports (NR_CPUS <= 8192)
PAGE = 4096
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")
_SIZE_RE = re.compile(r"(\d+)([KMG]?)\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MMIO_HOLE_START = 0xC000_0000   # 3 GiB: RAM above it continues at 4 GiB (devices/guest_memory.py)
HIGH_RAM_START = 0x1_0000_0000


@message
class DeviceSpec(Message):
    """One device of a guest: its kind (a row of devices/virtio/kinds.py) and that kind's options, all strings."""
    kind: str
    options: dict[str, str] = dict


@message
class PluginRange(Message):
    """A range a device plugin serves: I/O ports or guest-physical addresses [base, base + length)."""
    base: int
    length: int


@message
class PluginSpec(Message):
    """A port/MMIO device plugin (`--device MODULE:CLASS[,KEY=VALUE...]`, docs/plugins.md) and what it declared.

    The ranges and line are what the plugin's class declared when the config was made (it is loaded once,
    in a process of its own, by supervisor/config.py): so a config's plugins are checked against the
    platform and each other without running user code, and the worker refuses a plugin that declares
    anything else when it starts.
    """
    module: str                      # a dotted module name, or the absolute path of a .py file
    cls: str
    options: dict[str, str] = dict   # CLASS(**options)
    path: str | None = None          # put first on the plugin's sys.path: the cwd `hvctl` ran in, for a module name
    pio: list[PluginRange] = list
    mmio: list[PluginRange] = list
    irq: int | None = None           # an IOAPIC line (GSI 0-23) the plugin pulses through an irqfd

    @property
    def what(self):
        return f"--device {self.module}:{self.cls}"

    def describe(self):
        """'MODULE:CLASS pio 0x300+32 irq 5', as `hvctl info` shows it."""
        return f"{self.module}:{self.cls} {declaration_text(self)}"


def declaration_text(d):
    """What a plugin declared (a PluginSpec or PluginHello): 'pio 0x300+32 mmio 0xd0000000+4096 irq 5'."""
    parts = [f"{space} " + ",".join(f"0x{r.base:x}+{r.length}" for r in getattr(d, space))
             for space in ("pio", "mmio") if getattr(d, space)]
    return " ".join(parts + ([f"irq {d.irq}"] if d.irq is not None else []))


MAX_PLUGINS = 16
MAX_PLUGIN_RANGES = 16               # per space, per plugin
MAX_PIO_END = 0x10000
MAX_MMIO_END = 1 << 52               # the widest guest-physical address x86-64 has
PLUGIN_IRQS = 24                     # IOAPIC pins
_DOTTED_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


GUEST = Channel("guest-config")     # a GuestConfig on its own: the worker's --config, guest.json


@GUEST
class GuestConfig(Message):
    """Everything needed to build one guest (the options of `hvctl run`/`create`)."""
    name: str
    kernel: str                      # absolute path, checked readable before use
    boot: str = "linux"              # one of BOOT_MODES
    load_addr: int | None = None     # None: 0x7C00 for raw16, 0x100000 otherwise
    initrd: str | None = None
    cmdline: str = ""
    mem_bytes: int = DEFAULT_MEM_BYTES
    vcpus: int = 1
    timeout: float | None = None     # seconds; past it the guest ends with 124
    pin: list[int] = list            # host CPUs; vCPU i runs on pin[i % len(pin)]; empty: unpinned
    compat: str = "nested"           # compatibility profile: "nested" (default) or "none"
    devices: list[DeviceSpec] = list  # virtio devices, in PCI slot order
    plugins: list[PluginSpec] = list  # device plugins, each in a process of its own (devices/plugin/)
    gdb: str | None = None           # "tcp:HOST:PORT": a GDB stub listens there; vCPUs wait for its client
    trace: str | None = None         # --trace: absolute path of the exit trace the worker writes (proto/trace.py)

    def devices_of(self, kind):
        return [d for d in self.devices if d.kind == kind]


def ram_ranges(size):
    """[(guest_phys_addr, length)] of guest RAM for a guest of `size` bytes (below the MMIO hole, then above 4 GiB)."""
    low = min(size, MMIO_HOLE_START)
    return [(0, low)] + ([(HIGH_RAM_START, size - low)] if size > low else [])


def parse_size(text, option="--mem"):
    """Bytes in "128M", "1G", "65536", "512k" (K/M/G are powers of 1024)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UserError(f"{option}: cannot parse size {text!r} (use a number with an optional K, M or G suffix, "
                        f"e.g. 128M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_int(text, option):
    """An integer in decimal or 0x hex, for --load-addr and --vcpus."""
    try:
        return int(text, 0)
    except ValueError:
        raise UserError(f"{option}: {text!r} is not an integer") from None


def parse_cpu_list(text):
    """'0,1' or '0-3' -> [0, 1] / [0, 1, 2, 3], for --pin."""
    cpus = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi or lo)
            if not 0 <= lo <= hi <= MAX_CPU:
                raise UserError(f"--pin: {part!r} is not a range of CPU numbers 0 .. {MAX_CPU}")
            cpus.extend(range(lo, hi + 1))
    except ValueError:
        raise UserError(f"--pin: {text!r} is not a CPU list like 0,1 or 0-3") from None
    if not cpus:
        raise UserError(f"--pin: {text!r} names no CPU")
    return cpus


def parse_gdb(text):
    """'tcp:127.0.0.1:1234' or 'tcp:[::1]:1234' -> (host, port), for --gdb."""
    kind, _, rest = text.partition(":") if isinstance(text, str) else ("", "", "")
    host, _, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if kind != "tcp" or not host or not port.isdigit() or not 1 <= int(port) <= 65535 \
            or any(c in host for c in "[]/ ") or len(host) > 253:
        raise UserError(f"--gdb: {text!r} is not tcp:HOST:PORT (e.g. tcp:127.0.0.1:1234, a port 1-65535)")
    return host, int(port)


def parse_mac(text):
    """'52:54:00:12:34:56' -> 6 bytes; UserError unless it is a unicast MAC address."""
    if not isinstance(text, str) or not MAC_RE.match(text):
        raise UserError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(p, 16) for p in text.split(":"))
    if mac[0] & 1:
        raise UserError(f"MAC address {text} is a multicast address (the first byte must be even)")
    return mac


def parse_plugin(text, cwd):
    """'MODULE:CLASS[,KEY=VALUE...]' (MODULE a dotted name or a .py path, relative to `cwd`) -> a PluginSpec."""
    head, _, rest = text.partition(",")
    module, colon, cls = head.rpartition(":")
    if not colon or not module or not _IDENT_RE.match(cls):
        raise UserError(f"--device: {text!r} is not MODULE:CLASS[,KEY=VALUE...] (e.g. mydev.py:Counter,base=0x300)")
    options = {}
    for item in rest.split(",") if rest else ():
        key, eq, value = item.partition("=")
        if not eq or not _IDENT_RE.match(key):
            raise UserError(f"--device: option {item!r} is not KEY=VALUE with KEY a Python name")
        if key in options:
            raise UserError(f"--device: option {key!r} given twice")
        options[key] = value
    if module.endswith(".py") or "/" in module:
        spec = PluginSpec(os.path.normpath(os.path.join(cwd, module)), cls, options)
    else:
        spec = PluginSpec(module, cls, options, path=cwd)
    check_plugin_source(spec.module, spec.cls, spec.options, spec.path)
    return spec


def format_mac(mac):
    return ":".join(f"{b:02x}" for b in mac)


def check(config):
    """Raise UserError unless `config`'s own values are usable (files and device options are checked elsewhere)."""
    c = config
    if not NAME_RE.match(c.name):
        raise UserError(f"bad guest name {c.name!r}: use 1-63 letters, digits, '_', '.', '-', "
                        f"starting with a letter or digit")
    if c.boot not in BOOT_MODES:
        raise UserError(f"--boot: {c.boot!r} is not one of {', '.join(BOOT_MODES)}")
    if not MIN_MEM <= c.mem_bytes <= MAX_MEM:
        raise UserError(f"--mem: {c.mem_bytes} bytes is out of range (1M .. 64G)")
    if c.mem_bytes % PAGE:
        raise UserError(f"--mem: {c.mem_bytes} bytes is not a multiple of 4K")
    if not 1 <= c.vcpus <= MAX_VCPUS:
        raise UserError(f"--vcpus: {c.vcpus} is out of range (1 .. {MAX_VCPUS})")
    if c.load_addr is not None and not any(gpa <= c.load_addr < gpa + size for gpa, size in ram_ranges(c.mem_bytes)):
        raise UserError(f"--load-addr: 0x{c.load_addr:x} is outside guest RAM ({c.mem_bytes >> 20} MiB)")
    if c.timeout is not None and not 0 < c.timeout <= MAX_TIMEOUT:
        raise UserError(f"--timeout: {c.timeout:g} is not a number of seconds > 0 and <= {MAX_TIMEOUT} (24 days)")
    if len(c.cmdline.encode()) > MAX_CMDLINE:
        raise UserError(f"--cmdline: {len(c.cmdline.encode())} bytes is longer than Linux reads ({MAX_CMDLINE})")
    if c.trace is not None and not c.trace.startswith("/"):
        raise UserError(f"--trace: {c.trace!r} is not an absolute path")
    if c.compat not in COMPAT_PROFILES:
        raise UserError(f"--compat: {c.compat!r} is not one of {', '.join(COMPAT_PROFILES)}")
    if len(c.plugins) > MAX_PLUGINS:
        raise UserError(f"--device: {len(c.plugins)} plugins is more than {MAX_PLUGINS}")
    for p in c.plugins:
        check_plugin_source(p.module, p.cls, p.options, p.path)
        check_plugin_ranges(p.what, p.pio, p.mmio, p.irq)
    if c.gdb is not None:
        parse_gdb(c.gdb)


def check_plugin_source(module, cls, options, path):
    """UserError unless a plugin's module, class, option names and search path have a usable shape."""
    if not (os.path.isabs(module) if module.endswith(".py") else _DOTTED_RE.match(module)):
        raise UserError(f"--device: {module!r} is neither a module name nor an absolute path to a .py file")
    if not _IDENT_RE.match(cls) or not all(_IDENT_RE.match(k) for k in options):
        raise UserError(f"--device {module}:{cls}: the class or one of its option names is not a Python name")
    if path is not None and not os.path.isabs(path):
        raise UserError(f"--device {module}:{cls}: plugin search path {path!r} is not absolute")


def check_plugin_ranges(what, pio, mmio, irq):
    """UserError unless a plugin's declared ranges and line are in bounds (overlaps are the platform's to check)."""
    if not pio and not mmio:
        raise UserError(f"{what}: declares no pio or mmio range, so the guest could never reach it")
    for space, ranges, end in (("pio", pio, MAX_PIO_END), ("mmio", mmio, MAX_MMIO_END)):
        if len(ranges) > MAX_PLUGIN_RANGES:
            raise UserError(f"{what}: more than {MAX_PLUGIN_RANGES} {space} ranges")
        for r in ranges:
            if not (0 <= r.base and 0 < r.length and r.base + r.length <= end):
                raise UserError(f"{what}: {space} range (0x{r.base:x}, {r.length}) is empty or beyond 0x{end:x}")
    if irq is not None and not 0 <= irq < PLUGIN_IRQS:
        raise UserError(f"{what}: irq {irq!r} is not a line 0-{PLUGIN_IRQS - 1}")
