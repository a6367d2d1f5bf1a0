#!/usr/bin/env python3
"""Uncompressed newc cpio archives for Linux initramfs images (stdlib only).

On the project's machines guest kernel code runs through KVM's instruction
emulator, so the kernel must not decompress its initramfs: we write the
"newc" format (magic 070701, no checksums) that the kernel unpacks directly
(Documentation/driver-api/early-userspace/buffer-format.rst).

Every header field is under our control and defaults to reproducible values:
uid = gid = 0, mtime = 0, inode numbers counted from 1 in archive order.  Two
builds from the same inputs are byte-identical.

As a library:

    a = Archive()
    a.dir("/etc")                       # parents are created as needed
    a.file("/init", b"#!/bin/sh\\n...", mode=0o755)
    a.file_from_host("/bin/busybox", "/bin/busybox.static")
    a.symlink("/bin/sh", "busybox")
    a.node("/dev/console", "c", 5, 1)
    a.write("initramfs.cpio")           # or a.to_bytes()

As a script, a busybox-based initramfs:

    python3 guests/initramfs.py OUT --busybox PATH --init SCRIPT \\
        [--file HOSTPATH:GUESTPATH[:MODE]]... [--applet NAME]... \\
        [--modules LIB_MODULES_RELEASE_DIR --module NAME...]

With --modules, the named kernel modules and every module they depend on
(read from each .ko's own .modinfo, so no depmod is needed) go to
/lib/modules/RELEASE/..., and /etc/pyhv-modules lists them in load order
for guests/linux/init.sh to insmod.
"""
import argparse
import os
import stat
import struct
import sys

NEWC_MAGIC = b"070701"
HEADER_LEN = 110            # magic + 13 fields of 8 hex digits
TRAILER = "TRAILER!!!"
BLOCK = 512                 # archives are padded to a multiple of this, as cpio(1) does

# Applets given a /bin symlink by default: what guests/linux/init.sh uses,
# plus the everyday tools one wants on a console.
DEFAULT_APPLETS = (
    "sh", "ash", "cat", "cttyhack", "cut", "date", "devmem", "dmesg", "echo",
    "env", "false", "free", "grep", "head", "hostname", "init", "insmod", "ip", "ifconfig",
    "kill", "ln", "ls", "lsmod", "md5sum", "mkdir", "mknod", "mount", "mv", "nproc", "ping", "poweroff",
    "printf", "ps", "reboot", "rm", "sed", "seq", "setsid", "sleep", "sort",
    "stat", "sync", "tail", "test", "[", "time", "timeout", "touch", "tr",
    "true", "umount", "uname", "uptime", "wc", "xargs",
)


class SpecError(ValueError):
    """A bad archive spec (path, mode, duplicate entry); the message says what."""


def _norm(path):
    """Archive name for a guest path: no leading '/', no '.', '..' or empty components."""
    if not isinstance(path, str) or not path:
        raise SpecError(f"bad guest path {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise SpecError(f"bad guest path {path!r}: need an absolute path without '..' below /")
    if any("\0" in p for p in parts):
        raise SpecError(f"bad guest path {path!r}: contains a NUL byte")
    return "/".join(parts)


def _pad4(n):
    return (4 - n % 4) % 4


class Archive:
    """An ordered set of cpio entries; parents always precede their children."""

    def __init__(self):
        self._entries = []      # (name, mode, uid, gid, mtime, rdevmajor, rdevminor, data)
        self._kinds = {}        # name -> S_IFMT of the entry

    # --- adding entries ------------------------------------------------------
    def _add(self, path, fmt, perm, data=b"", uid=0, gid=0, mtime=0, rdev=(0, 0)):
        name = _norm(path)
        if perm & ~0o7777:
            raise SpecError(f"{path}: mode 0o{perm:o} has bits outside 0o7777")
        if name in self._kinds:
            if fmt == stat.S_IFDIR and self._kinds[name] == stat.S_IFDIR:
                return name     # the same directory twice is harmless
            raise SpecError(f"{path}: already in the archive")
        parent = name.rpartition("/")[0]
        if parent:
            if self._kinds.get(parent, stat.S_IFDIR) != stat.S_IFDIR:
                raise SpecError(f"{path}: parent {parent!r} is not a directory")
            if parent not in self._kinds:
                self.dir(parent)
        for what, v in (("uid", uid), ("gid", gid), ("mtime", mtime), ("major", rdev[0]), ("minor", rdev[1])):
            if not 0 <= v <= 0xFFFFFFFF:
                raise SpecError(f"{path}: {what} {v} does not fit in 32 bits")
        if len(data) > 0xFFFFFFFF:
            raise SpecError(f"{path}: {len(data)} bytes is too large for newc (4 GiB - 1 at most)")
        self._kinds[name] = fmt
        self._entries.append((name, fmt | perm, uid, gid, mtime, rdev[0], rdev[1], bytes(data)))
        return name

    def dir(self, path, mode=0o755, uid=0, gid=0):
        return self._add(path, stat.S_IFDIR, mode, uid=uid, gid=gid)

    def file(self, path, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        return self._add(path, stat.S_IFREG, mode, data, uid=uid, gid=gid)

    def file_from_host(self, path, hostpath, mode=None, uid=0, gid=0):
        """A regular file with a host file's contents; mode defaults to the host file's permission bits."""
        st = os.stat(hostpath)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{hostpath}: not a regular file")
        with open(hostpath, "rb") as f:
            data = f.read()
        return self.file(path, data, stat.S_IMODE(st.st_mode) if mode is None else mode, uid=uid, gid=gid)

    def symlink(self, path, target, uid=0, gid=0):
        if not target or "\0" in target:
            raise SpecError(f"{path}: bad symlink target {target!r}")
        return self._add(path, stat.S_IFLNK, 0o777, target.encode(), uid=uid, gid=gid)

    def node(self, path, kind, major, minor, mode=0o600, uid=0, gid=0):
        """A device node: kind 'c' (character) or 'b' (block)."""
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if fmt is None:
            raise SpecError(f"{path}: device kind must be 'c' or 'b', not {kind!r}")
        return self._add(path, fmt, mode, uid=uid, gid=gid, rdev=(major, minor))

    def fifo(self, path, mode=0o644, uid=0, gid=0):
        return self._add(path, stat.S_IFIFO, mode, uid=uid, gid=gid)

    def names(self):
        return [e[0] for e in self._entries]

    # --- output ------------------------------------------------------------------
    @staticmethod
    def _header(ino, mode, uid, gid, nlink, mtime, filesize, rdevmajor, rdevminor, namesize):
        # c_magic, then c_ino c_mode c_uid c_gid c_nlink c_mtime c_filesize c_devmajor
        # c_devminor c_rdevmajor c_rdevminor c_namesize c_check as 8 hex digits each.
        fields = (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdevmajor, rdevminor, namesize, 0)
        return NEWC_MAGIC + "".join(f"{v:08X}" for v in fields).encode("ascii")

    @classmethod
    def _record(cls, ino, name, mode, uid, gid, nlink, mtime, rdevmajor, rdevminor, data):
        bname = name.encode() + b"\0"
        head = cls._header(ino, mode, uid, gid, nlink, mtime, len(data), rdevmajor, rdevminor, len(bname))
        out = head + bname + b"\0" * _pad4(HEADER_LEN + len(bname))
        return out + data + b"\0" * _pad4(len(data))

    def to_bytes(self):
        # A directory's link count is 2 + its subdirectories, as on a real file system.
        subdirs = {}
        for name, mode, *_ in self._entries:
            if stat.S_ISDIR(mode) and "/" in name:
                parent = name.rpartition("/")[0]
                subdirs[parent] = subdirs.get(parent, 0) + 1
        chunks = []
        for ino, (name, mode, uid, gid, mtime, rmaj, rmin, data) in enumerate(self._entries, start=1):
            nlink = 2 + subdirs.get(name, 0) if stat.S_ISDIR(mode) else 1
            chunks.append(self._record(ino, name, mode, uid, gid, nlink, mtime, rmaj, rmin, data))
        chunks.append(self._record(0, TRAILER, 0, 0, 0, 1, 0, 0, 0, b""))
        out = b"".join(chunks)
        return out + b"\0" * ((BLOCK - len(out) % BLOCK) % BLOCK)

    def write(self, out_path):
        """Write the archive atomically (temporary file, then rename)."""
        data = self.to_bytes()
        tmp = f"{out_path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out_path)
        return len(data)


# --- the busybox initramfs ---------------------------------------------------------

BASE_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root", "mnt")


def busybox_initramfs(busybox, init, files=(), applets=DEFAULT_APPLETS):
    """An Archive with /bin/busybox, /bin/<applet> symlinks, /init and extra files.

    busybox: host path of a statically linked busybox.
    init: host path of the init script, or its contents as bytes.
    files: (hostpath, guestpath, mode or None) triples.
    """
    a = Archive()
    for d in BASE_DIRS:
        a.dir(d, mode=0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for init's stdin/stdout/stderr before /init
    # runs, i.e. before devtmpfs can be mounted: it must be in the archive.
    a.node("dev/console", "c", 5, 1, mode=0o600)
    a.node("dev/null", "c", 1, 3, mode=0o666)
    a.node("dev/kmsg", "c", 1, 11, mode=0o644)     # printk from user space, before devtmpfs too
    a.file_from_host("bin/busybox", busybox, mode=0o755)
    for name in applets:
        if name == "busybox":
            continue
        if "/" in name or not name:
            raise SpecError(f"bad applet name {name!r}")
        a.symlink(f"bin/{name}", "busybox")
    if isinstance(init, (bytes, bytearray)):
        a.file("init", bytes(init), mode=0o755)
    else:
        a.file_from_host("init", init, mode=0o755)
    for hostpath, guestpath, mode in files:
        a.file_from_host(guestpath, hostpath, mode=mode)
    return a


# --- kernel modules ------------------------------------------------------------------

MODULES_LIST = "etc/pyhv-modules"       # init.sh loads these, one path a line, in order


def modinfo(path):
    """{key: [values]} from a kernel module's .modinfo section (an ELF64 little-endian .ko)."""
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise SpecError(f"{path}: not a 64-bit little-endian ELF kernel module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i):
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[stroff + name:elf.index(b"\0", stroff + name)] == b".modinfo":
            info = {}
            for item in elf[offset:offset + size].split(b"\0"):
                key, eq, value = item.decode(errors="replace").partition("=")
                if eq:
                    info.setdefault(key, []).append(value)
            return info
    raise SpecError(f"{path}: no .modinfo section")


def module_closure(tree, names):
    """[path relative to `tree`] of modules `names` and all they depend on, each after its dependencies.

    tree: a kernel package's lib/modules/RELEASE directory.
    """
    index, depends = {}, {}
    for root, _, files in os.walk(tree):
        for leaf in files:
            if leaf.endswith(".ko"):
                path = os.path.join(root, leaf)
                info = modinfo(path)
                name = info.get("name", [leaf[:-3].replace("-", "_")])[0]
                index[name] = os.path.relpath(path, tree)
                depends[name] = [d for d in ",".join(info.get("depends", [])).split(",") if d]
    order, seen = [], set()

    def visit(name, chain):
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in index:
            raise SpecError(f"module {name} (needed by {' <- '.join(chain) or 'the command line'}) is not in {tree}")
        if name in chain:
            raise SpecError(f"modules depend on each other in a circle: {' -> '.join(chain + [name])}")
        for dep in depends[name]:
            visit(dep, chain + [name])
        seen.add(name)
        order.append(index[name])

    for name in names:
        visit(name, [])
    return order


def add_modules(archive, tree, names):
    """Put modules `names` with their dependencies from `tree` (lib/modules/RELEASE) into `archive`, and their
    load order into /etc/pyhv-modules; returns the guest paths in that order."""
    release = os.path.basename(os.path.normpath(tree))
    paths = []
    for rel in module_closure(tree, names):
        guest = f"lib/modules/{release}/{rel}"
        archive.file_from_host(guest, os.path.join(tree, rel), mode=0o644)
        paths.append("/" + guest)
    archive.file(MODULES_LIST, "".join(p + "\n" for p in paths))
    return paths


def parse_file_spec(spec):
    """'HOSTPATH:GUESTPATH[:MODE]' -> (hostpath, guestpath, mode or None); MODE is octal."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise SpecError(f"--file {spec!r}: expected HOSTPATH:GUESTPATH[:MODE]")
    mode = None
    if len(parts) == 3:
        if not parts[2] or parts[2].strip("01234567"):
            raise SpecError(f"--file {spec!r}: MODE {parts[2]!r} is not an octal number")
        mode = int(parts[2], 8)
        if mode > 0o7777:
            raise SpecError(f"--file {spec!r}: MODE {parts[2]!r} is out of range")
    return parts[0], parts[1], mode


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="initramfs.py",
        description="Write an uncompressed newc cpio initramfs: busybox, its applet links, /init and extra files.")
    p.add_argument("out", metavar="OUT", help="archive to write")
    p.add_argument("--busybox", required=True, metavar="PATH", help="a statically linked busybox binary")
    p.add_argument("--init", required=True, metavar="SCRIPT", help="becomes /init (mode 0755)")
    p.add_argument("--file", action="append", default=[], metavar="HOSTPATH:GUESTPATH[:MODE]",
                   help="add a file (MODE in octal; default: the host file's permissions); repeatable")
    p.add_argument("--applet", action="append", default=None, metavar="NAME",
                   help="link /bin/NAME to busybox (repeatable; replaces the default list)")
    p.add_argument("--modules", metavar="DIR", help="a kernel's lib/modules/RELEASE directory, for --module")
    p.add_argument("--module", action="append", default=[], metavar="NAME",
                   help="add this module and its dependencies from --modules, loaded by init (repeatable)")
    args = p.parse_args(argv)
    if bool(args.modules) != bool(args.module):
        p.error("--modules and --module go together")
    try:
        files = [parse_file_spec(s) for s in args.file]
        applets = DEFAULT_APPLETS if args.applet is None else tuple(["sh"] + args.applet)
        archive = busybox_initramfs(args.busybox, args.init, files, tuple(dict.fromkeys(applets)))
        if args.modules:
            add_modules(archive, args.modules, args.module)
        size = archive.write(args.out)
    except (SpecError, OSError) as e:
        print(f"initramfs.py: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(archive.names())} entries, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
