"""Guest configuration from user options: size parsing, GuestConfig building, validation.

Used by `hvctl run`/`create` (before anything is spawned) and again by the
supervisor on Create, since a request may come from anywhere.  Every failure
is a ConfigError with one line that names the option and the fix.  No
msgpack/zmq import here: `hvctl run` must start fast.
"""
import os
import re

from pyhv.devices.guest_memory import ram_regions
from pyhv.proto.messages import BOOT_MODES, COMPAT_PROFILES, DEFAULT_MEM_BYTES, GuestConfig

MIN_MEM, MAX_MEM = 1 << 20, 64 << 30
MAX_VCPUS = 64                  # KVM allows more; our hosts have 2 cores
PAGE = 4096
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_SIZE_RE = re.compile(r"(\d+)([KMG]?)\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def default_runtime_dir():
    """$HV_RUNTIME_DIR, else $XDG_RUNTIME_DIR/pyhv, else /tmp/pyhv-UID."""
    if os.environ.get("HV_RUNTIME_DIR"):
        return os.environ["HV_RUNTIME_DIR"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "pyhv")
    return f"/tmp/pyhv-{os.getuid()}"


class ConfigError(ValueError):
    """A guest option is unusable; the message is the one line hvctl prints (exit 2)."""


def parse_size(text):
    """Bytes in "128M", "1G", "65536", "512k" (K/M/G are powers of 1024)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ConfigError(f"--mem: cannot parse size {text!r} (use a number with an optional K, M or G suffix, e.g. 128M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_int(text, option):
    """An integer in decimal or 0x hex, for --load-addr and --vcpus."""
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not an integer") from None


def build_config(name, kernel, boot="linux", load_addr=None, initrd=None, cmdline=None,
                 mem=None, vcpus=None, disks=(), timeout=None, pin=None, compat=None, rng=False,
                 vconsole=False, nets=()):
    """A validated GuestConfig from option strings as argparse gives them (None = default)."""
    try:
        t = None if timeout is None else float(timeout)
    except ValueError:
        raise ConfigError(f"--timeout: {timeout!r} is not a number of seconds") from None
    config = GuestConfig(
        name=name,
        kernel=os.path.abspath(kernel),
        boot=boot,
        load_addr=None if load_addr is None else parse_int(load_addr, "--load-addr"),
        initrd=None if initrd is None else os.path.abspath(initrd),
        cmdline="" if cmdline is None else cmdline,
        mem_bytes=DEFAULT_MEM_BYTES if mem is None else parse_size(mem),
        vcpus=1 if vcpus is None else parse_int(vcpus, "--vcpus"),
        timeout=t,
        pin=[] if pin is None else parse_cpu_list(pin),
        compat="nested" if compat is None else compat,
        rng=bool(rng),
        vconsole=bool(vconsole),
        disks=[_disk_spec(d) for d in disks],
        nets=[_net_spec(n) for n in nets],
    )
    validate(config)
    return config


def parse_cpu_list(text):
    """'0,1' or '0-3' -> [0, 1] / [0, 1, 2, 3], for --pin."""
    cpus = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--pin: {text!r} is not a CPU list like 0,1 or 0-3") from None
    if not cpus:
        raise ConfigError(f"--pin: {text!r} names no CPU")
    return cpus


def validate(config):
    """Raise ConfigError unless `config` can be handed to a worker (files included)."""
    c = config
    if not NAME_RE.match(c.name):
        raise ConfigError(f"bad guest name {c.name!r}: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit")
    if c.boot not in BOOT_MODES:
        raise ConfigError(f"--boot: {c.boot!r} is not one of {', '.join(BOOT_MODES)}")
    if not MIN_MEM <= c.mem_bytes <= MAX_MEM:
        raise ConfigError(f"--mem: {c.mem_bytes} bytes is out of range (1M .. 64G)")
    if c.mem_bytes % PAGE:
        raise ConfigError(f"--mem: {c.mem_bytes} bytes is not a multiple of 4K")
    if not 1 <= c.vcpus <= MAX_VCPUS:
        raise ConfigError(f"--vcpus: {c.vcpus} is out of range (1 .. {MAX_VCPUS})")
    if c.load_addr is not None and not any(gpa <= c.load_addr < gpa + size
                                           for gpa, size, _ in ram_regions(c.mem_bytes)):
        raise ConfigError(f"--load-addr: 0x{c.load_addr:x} is outside guest RAM ({c.mem_bytes >> 20} MiB)")
    if c.timeout is not None and not c.timeout > 0:
        raise ConfigError(f"--timeout: {c.timeout:g} is not a positive number of seconds")
    for d in c.disks:
        _check_disk(d)
    if len(c.disks) > MAX_DISKS:
        raise ConfigError(f"--disk: at most {MAX_DISKS} disks")
    for n in c.nets:
        parse_net(n)
    if len(c.nets) > MAX_NETS:
        raise ConfigError(f"--net: at most {MAX_NETS} NICs")
    if c.compat not in COMPAT_PROFILES:
        raise ConfigError(f"--compat: {c.compat!r} is not one of {', '.join(COMPAT_PROFILES)}")
    host_cpus = os.sched_getaffinity(0)
    for cpu in c.pin:
        if cpu not in host_cpus:
            raise ConfigError(f"--pin: host CPU {cpu} is not available here (have {sorted(host_cpus)})")
    _check_file(c.kernel, "kernel")
    if c.initrd is not None:
        _check_file(c.initrd, "initrd")


MAX_DISKS = 8
MAX_NETS = 4
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")        # Linux IFNAMSIZ - 1
SWITCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")


def _net_spec(text):
    """A --net value with its MAC made explicit: a random locally administered one if none was given,
    so a created guest keeps its address across restarts."""
    if not isinstance(text, str) or ",mac=" in text:
        return text
    mac = bytes([0x52, 0x54, 0x00]) + os.urandom(3)
    return text + ",mac=" + ":".join(f"{b:02x}" for b in mac)


def parse_net(spec):
    """'tap:IFNAME,mac=MAC' / 'switch:NAME,mac=MAC' -> (kind, name, mac); ConfigError with the fix."""
    if not isinstance(spec, str):
        raise ConfigError(f"--net: {spec!r} is not a string")
    head, _, opts = spec.partition(",")
    kind, _, name = head.partition(":")
    mac = None
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key != "mac" or not MAC_RE.match(value):
            raise ConfigError(f"--net: bad option {opt!r} in {spec!r} (the only option is mac=52:54:00:12:34:56)")
        if int(value[:2], 16) & 1:
            raise ConfigError(f"--net: {value} is a multicast MAC address (the first byte must be even)")
        mac = value.lower()
    if kind == "tap" and IFNAME_RE.match(name):
        return kind, name, mac
    if kind == "switch" and SWITCH_RE.match(name):
        return kind, name, mac
    raise ConfigError(f"--net: {spec!r}: use tap:IFNAME (a host TAP interface, at most 15 characters) or "
                      f"switch:NAME (a virtual switch shared by this supervisor's guests)[,mac=MAC]")


def _disk_spec(text):
    """'PATH' or 'PATH,ro' with PATH made absolute (what GuestConfig.disks holds)."""
    path, sep, opt = text.rpartition(",")
    if sep and opt == "ro":
        return os.path.abspath(path) + ",ro"
    return os.path.abspath(text)


def _check_disk(spec):
    """A --disk the worker can open: an existing regular file of at least one sector."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError("--disk: empty path")
    path, sep, opt = spec.rpartition(",")
    ro = bool(sep) and opt == "ro"
    if not ro:
        path = spec
    if not os.path.isabs(path):
        raise ConfigError(f"--disk: {path!r} is not an absolute path")
    if not os.path.isfile(path):
        raise ConfigError(f"--disk: {path}: no such file (a raw disk image is needed, e.g. truncate -s 64M disk.img)")
    if not os.access(path, os.R_OK if ro else os.R_OK | os.W_OK):
        raise ConfigError(f"--disk: {path}: not {'readable' if ro else 'readable and writable'}"
                          f"{'' if ro else ' (add ,ro for a read-only disk)'}")
    if os.path.getsize(path) < 512:
        raise ConfigError(f"--disk: {path}: smaller than one 512-byte sector")


def _check_file(path, what):
    if not os.path.isfile(path):
        raise ConfigError(f"no such {what} file: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} file is not readable: {path}")
