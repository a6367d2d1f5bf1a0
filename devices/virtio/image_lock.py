"""Disk images locked like QEMU's: an OFD lock on the whole file, exclusive for a writer, shared for readers.

Two guests writing one raw image corrupt it (each caches what it thinks is
on disk), so a writable image is used by one guest at a time and a
read-only one by any number of guests, none of them writing.  The lock is
an open-file-description lock (fcntl F_OFD_SETLK): it belongs to the open
file, not to a process, so every process holding a dup of that fd shares
it and it is released only when the last one closes it.

Whoever starts a guest's device services opens its images here, before the
guest runs, and keeps the fds for as long as the guest runs: the supervisor
for supervised guests (supervisor/services.py), `hvctl run`'s launcher
otherwise (vcpu_worker/launchers.py).  Each service incarnation inherits the
same fd (ServiceFds.image) and never opens the file itself, so a service
restarted after a crash cannot lock itself out, and a guest that outlives a
killed supervisor keeps its lock in its services.  A migration hands the
fd over with the guest's RAM.  Locks are advisory: they keep pyhv guests
(and QEMU, which takes byte-range OFD locks on the same files) from sharing
an image by mistake, not a root process that ignores them.
"""
import fcntl
import os
import struct

from pyhv.proto.errors import UserError

_FLOCK = struct.Struct("hhqqi4x")        # struct flock: l_type, l_whence, l_start, l_len (0: to EOF), l_pid (0)


class ImageInUse(UserError):
    """Another guest holds the image: writing it, or reading it while this one wants to write."""


def _flock(kind):
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)


def lock(fd, path, read_only):
    """Take the whole-file OFD lock on `fd` (shared if `read_only`); ImageInUse if another open file holds one."""
    kind = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind))
        return
    except (BlockingIOError, PermissionError):
        pass
    try:
        holder = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(kind)))[0]
    except OSError:
        holder = fcntl.F_WRLCK
    if holder == fcntl.F_RDLCK:         # only readers hold it, and we want to write
        raise ImageInUse(f"--disk: {path} is in use read-only by another guest; stop that guest, or add ,ro to "
                         f"share it read-only")
    raise ImageInUse(f"--disk: {path} is in use by another guest that may write to it; stop that guest first")


def open_image(path, read_only):
    """An fd of the image at `path` (read-write unless `read_only`), locked; ImageInUse or UserError."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"--disk: cannot open {path}: {e.strerror}") from None
    try:
        lock(fd, path, read_only)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_image(fd, path, read_only):
    """Whether `fd` is the file at `path`, open for writing unless `read_only` (an fd handed over by a peer)."""
    try:
        st, want = os.fstat(fd), os.stat(path)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino) and (read_only or mode == os.O_RDWR)
