"""The snapshot directory format: its manifest, the guest's state file and its sparse RAM image, written and checked.

docs/snapshot-format.md is the reference.  A snapshot is a directory:

* `manifest.json`: format name and version ("major.minor"), the guest's
  config, and for each other file its size and SHA-256; for the RAM image
  also the extents that hold data (everything else is zero).
* `state.msgpack`: a MachineState (vCPUs, in-kernel irqchip/PIT/clock, every
  device), encoded like any message (proto/codec.py), validated on decode.
* `memory`: the guest RAM memfd's bytes at their memfd offsets, as a sparse
  file: only the extents the guest ever touched hold data, so an idle 1 GiB
  guest costs a few MiB of disk.
* `disk-NAME`: a writable disk's image as it was (sparse), when it has one.

Reading never trusts the directory: every file is checked against the
manifest (size and checksum) before anything is created from it, and a
different major version is refused.  Writing goes to a temporary sibling
that is renamed onto DIR at the end, so a failed snapshot leaves nothing.
"""
import hashlib
import json
import mmap
import os
import shutil

from pyhv.proto import codec
from pyhv.proto.errors import HostError, StateError, UserError
from pyhv.proto.guest import GuestConfig
from pyhv.proto.messages import Channel, Message, to_plain

FORMAT = "pyhv-snapshot"
VERSION = (1, 0)                  # a reader takes any minor version of its major
MANIFEST, STATE, MEMORY = "manifest.json", "state.msgpack", "memory"
MAX_MANIFEST_BYTES = 4 << 20
MAX_STATE_BYTES = 64 << 20
CHUNK = 8 << 20                   # bytes per read/write (and per hash update)

SNAPSHOT = Channel("snapshot")


@SNAPSHOT
class MachineState(Message):
    """Everything of a guest but its RAM: per vCPU KVM's state blobs, the VM's, every device's (plain values)."""
    vcpus: list[dict]                 # Vcpu.save_state() of each, in index order
    vm: dict                          # Vm.save_state()
    devices: dict                     # DeviceManager.snapshot()


class SnapshotError(UserError):
    """A snapshot directory that cannot be used (missing, incomplete, corrupt, another version): exit 2."""


def disk_file(device):
    return f"disk-{device}"


# --- extents of data in a file (a memfd or an image) ------------------------------------------

def data_extents(fd, size):
    """[(offset, length)] of the parts of `fd` that hold data (SEEK_DATA/SEEK_HOLE; holes read as zero)."""
    extents, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:                 # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            extents.append((start, end - start))
        pos = end
    return extents


def _copy_extents(src, dst, extents, size, digest):
    """The extents of fd `src` to the same offsets of fd `dst` (made `size` bytes long), hashed in order."""
    os.ftruncate(dst, size)
    for offset, length in extents:
        for pos in range(offset, offset + length, CHUNK):
            want = min(CHUNK, offset + length - pos)
            data = os.pread(src, want, pos)
            if len(data) != want:
                raise OSError(5, f"short read at offset {pos}")
            digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.pwrite(dst, view, pos + len(data) - len(view)):]
    os.fsync(dst)


# --- writing ---------------------------------------------------------------------------------------

def check_target(path):
    """UserError unless `path` may become a snapshot: absent or an empty directory, in a directory that exists."""
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)):
        raise UserError(f"snapshot directory {path} exists and is not empty (give a new or empty one)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"cannot create snapshot {path}: no such directory {parent}")


class Writer:
    """Builds a snapshot in DIR.partial-PID, then `commit()` renames it onto DIR; `abort()` removes it.

    `durable=False` (a migration's hand-over state, read at once by the target and worthless after a crash)
    skips the fsyncs: they cost milliseconds of the guest's downtime."""

    def __init__(self, path, durable=True):
        check_target(path)
        self.durable = durable
        self.path = os.path.abspath(path)
        self.tmp = f"{self.path}.partial-{os.getpid()}"
        self.files = {}
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
            os.mkdir(self.tmp, 0o700)     # guest RAM: as private as the guest
        except OSError as e:
            raise HostError(f"cannot create snapshot {path}: {e.strerror}") from None

    def _host(self, e, what):
        return HostError(f"cannot write snapshot {self.path}: {what}: {e.strerror or e}")

    def memory(self, mem_fd, size):
        """Guest RAM from its memfd: only the extents that hold data, hashed as they are written."""
        digest = hashlib.sha256()
        extents = data_extents(mem_fd, size)
        try:
            fd = os.open(os.path.join(self.tmp, MEMORY), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy_extents(mem_fd, fd, extents, size, digest)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._host(e, "guest RAM") from None
        self.files[MEMORY] = {"size": size, "sha256": digest.hexdigest(), "extents": [list(e) for e in extents]}

    def disk(self, device, image):
        """A writable disk's image as it is now (its data extents; holes stay holes)."""
        name = disk_file(device)
        try:
            src = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(src).st_size
                extents = data_extents(src, size)
                fd = os.open(os.path.join(self.tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    digest = hashlib.sha256()
                    _copy_extents(src, fd, extents, size, digest)
                finally:
                    os.close(fd)
            finally:
                os.close(src)
        except OSError as e:
            raise self._host(e, f"disk {device}") from None
        self.files[name] = {"size": size, "sha256": digest.hexdigest(), "extents": [list(e) for e in extents]}

    def state(self, state):
        data = codec.encode(state, SNAPSHOT)
        self._write(STATE, data)
        self.files[STATE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def _write(self, name, data):
        try:
            with os.fdopen(os.open(os.path.join(self.tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                   0o600), "wb") as f:
                f.write(data)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
        except OSError as e:
            raise self._host(e, name) from None

    def commit(self, config, handover=False):
        """Write the manifest (last: a snapshot without one is incomplete) and put the directory in place.

        `handover`: a migration's state, whose RAM is the memfd handed over with it (no memory file)."""
        manifest = {"format": FORMAT, "version": f"{VERSION[0]}.{VERSION[1]}", "config": to_plain(config),
                    "files": self.files, **({"handover": True} if handover else {})}
        self._write(MANIFEST, json.dumps(manifest, indent=1).encode())
        try:
            if os.path.isdir(self.path):
                os.rmdir(self.path)           # empty (checked); rename cannot replace a directory otherwise
            os.rename(self.tmp, self.path)
        except OSError as e:
            raise self._host(e, "rename into place") from None

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------------

class Snapshot:
    """A snapshot directory, checked: its manifest, config and state now; its RAM as `load_memory` reads it."""

    def __init__(self, path, handover=False, state=True):
        """With `handover`, also a migration's state (RAM not in the directory: `self.handover` says which).
        Without `state`, its state is checked later, by read_state()."""
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise SnapshotError(f"no snapshot at {path} (not a directory)")
        raw = self._read(MANIFEST, MAX_MANIFEST_BYTES)
        try:
            manifest = json.loads(raw)
        except (ValueError, RecursionError):            # RecursionError: nesting past the interpreter's limit
            raise SnapshotError(f"snapshot {path}: {MANIFEST} is not JSON (corrupt)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SnapshotError(f"snapshot {path}: {MANIFEST} is not a {FORMAT} manifest")
        self.version = _version(manifest.get("version"), path)
        try:
            self.config = codec.from_plain(GuestConfig, manifest.get("config"))
        except Exception as e:
            raise SnapshotError(f"snapshot {path}: bad guest config in {MANIFEST}: {e}") from None
        self.files = _files(manifest.get("files"), path)
        self.handover = manifest.get("handover") is True
        if self.handover and not handover:
            raise SnapshotError(f"{path} is a migration's hand-over state, not a snapshot (it holds no RAM)")
        for name in (STATE,) if self.handover else (STATE, MEMORY):
            if name not in self.files:
                raise SnapshotError(f"snapshot {path} is incomplete: the manifest lists no {name}")
        memory = self.files.get(MEMORY)
        if memory is not None and (memory["size"] != self.config.mem_bytes or "extents" not in memory):
            raise SnapshotError(f"snapshot {path}: {MEMORY} is {memory['size']} bytes, the guest has "
                                f"{self.config.mem_bytes}")
        for name, entry in self.files.items():
            full = os.path.join(self.path, name)
            try:
                size = os.stat(full).st_size
            except OSError:
                raise SnapshotError(f"snapshot {path} is incomplete: {name} is missing") from None
            if size != entry["size"]:
                raise SnapshotError(f"snapshot {path}: {name} is {size} bytes, the manifest says {entry['size']} "
                                    f"(truncated?)")
        self.state = None
        if state:
            self.read_state()

    def read_state(self):
        """self.state: the MachineState, checked against its checksum and the guest's vCPU count."""
        path = self.path
        data = self._read(STATE, MAX_STATE_BYTES)
        if hashlib.sha256(data).hexdigest() != self.files[STATE]["sha256"]:
            raise SnapshotError(f"snapshot {path}: {STATE} does not match its checksum (corrupt)")
        try:
            self.state = codec.decode(data, SNAPSHOT, expect=MachineState, max_bytes=MAX_STATE_BYTES)
        except Exception as e:
            raise SnapshotError(f"snapshot {path}: {STATE}: {e}") from None
        if len(self.state.vcpus) != self.config.vcpus:
            raise SnapshotError(f"snapshot {path}: {len(self.state.vcpus)} vCPU states for {self.config.vcpus} vCPUs")

    def _read(self, name, limit):
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {self.path} is incomplete: no {name}") from None
        except OSError as e:
            raise SnapshotError(f"cannot read snapshot {self.path}: {name}: {e.strerror}") from None
        if len(data) > limit:
            raise SnapshotError(f"snapshot {self.path}: {name} is over {limit} bytes")
        return data

    def load_memory(self, mem_fd):
        """The RAM image into the guest's memfd (its data extents only), checked against its checksum on the way."""
        entry = self.files[MEMORY]
        digest = hashlib.sha256()
        try:
            src = os.open(os.path.join(self.path, MEMORY), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotError(f"cannot read snapshot {self.path}: {MEMORY}: {e.strerror}") from None
        try:
            with mmap.mmap(mem_fd, entry["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as ram:
                view = memoryview(ram)
                try:
                    for offset, length in entry["extents"]:
                        for pos in range(offset, offset + length, CHUNK):
                            with view[pos:min(pos + CHUNK, offset + length)] as part:
                                if os.preadv(src, [part], pos) != len(part):
                                    raise SnapshotError(f"snapshot {self.path}: {MEMORY} is truncated")
                                digest.update(part)
                finally:
                    view.release()
        finally:
            os.close(src)
        if digest.hexdigest() != entry["sha256"]:
            raise SnapshotError(f"snapshot {self.path}: {MEMORY} does not match its checksum (corrupt)")

    def disks(self):
        """{device name: (file name, manifest entry)} of the disk images the snapshot holds."""
        return {name[len("disk-"):]: (name, e) for name, e in self.files.items() if name.startswith("disk-")}

    def copy_disk(self, device, target):
        """A private copy of the snapshot's image of disk `device` at `target` (sparse, checked on the way)."""
        name, entry = self.disks()[device]
        digest = hashlib.sha256()
        try:
            src = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    _copy_extents(src, fd, [tuple(e) for e in entry["extents"]], entry["size"], digest)
                finally:
                    os.close(fd)
            finally:
                os.close(src)
        except OSError as e:
            raise HostError(f"cannot copy disk {device} of snapshot {self.path} to {target}: {e.strerror or e}") \
                from None
        if digest.hexdigest() != entry["sha256"]:
            os.unlink(target)
            raise SnapshotError(f"snapshot {self.path}: {name} does not match its checksum (corrupt)")


def _version(text, path):
    try:
        major, minor = (int(p) for p in str(text).split("."))
    except ValueError:
        raise SnapshotError(f"snapshot {path}: bad format version {text!r}") from None
    if major != VERSION[0]:
        raise SnapshotError(f"snapshot {path} has format version {major}.{minor}; this pyhv reads "
                            f"{VERSION[0]}.x only")
    return major, minor


def _files(files, path):
    if not isinstance(files, dict):
        raise SnapshotError(f"snapshot {path}: the manifest lists no files")
    out = {}
    for name, e in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or name == MANIFEST:
            raise SnapshotError(f"snapshot {path}: bad file name {name!r} in the manifest")
        if not (isinstance(e, dict) and type(e.get("size")) is int and e["size"] >= 0
                and isinstance(e.get("sha256"), str)):
            raise SnapshotError(f"snapshot {path}: bad manifest entry for {name}")
        if "extents" in e:
            ext = e["extents"]
            if not isinstance(ext, list) or not all(
                    isinstance(x, list) and len(x) == 2 and all(type(v) is int for v in x) for x in ext):
                raise SnapshotError(f"snapshot {path}: bad extents for {name}")
            end = 0
            for offset, length in ext:
                if offset < end or length <= 0 or offset + length > e["size"]:
                    raise SnapshotError(f"snapshot {path}: extents of {name} overlap or leave the file")
                end = offset + length
        out[name] = e
    return out
