"""Fuzz: the snapshot reader (proto/snapshot.py) and the device state it hands to the virtio transport and PCI bus.

A snapshot directory is a user's file: anyone can hand `hvctl restore` a
crafted one.  Its checksums catch corruption, not malice: here the manifest
is mutated as JSON (values replaced, keys dropped, nesting piled up, bytes
that are not JSON), the state file as msgpack with its checksum recomputed
so that decoding is reached, the memory file truncated or extended, its
extents rewritten; and the device state the transport and the PCI bus are
restored from (common config, MSI-X, ISR, config space) is a mutated real
one.  The property: the reader raises only SnapshotError, loads RAM only
inside the guest's memfd, and a transport it restored (or that refused
with one of the errors the device manager turns into a one-line StateError)
still answers every register and leaves the bus consistent.
"""
import functools
import hashlib
import json
import os
import random
import tempfile

import msgpack
import pytest
from hypothesis import example, given, strategies as st

from fuzzing import Bus, budget, random_op
from pyhv.devices.guest_memory import create_memfd, memfd_fits
from pyhv.devices.pci.config_space import PciFunction
from pyhv.proto import snapshot as S
from pyhv.proto.errors import StateError
from pyhv.proto.guest import GuestConfig

pytestmark = pytest.mark.fuzz

MiB = 1 << 20
CONFIG = GuestConfig(name="g", kernel="/k", boot="raw64", mem_bytes=2 * MiB, vcpus=1,
                     devices=[])
STATE = S.MachineState(vcpus=[{"regs": b"\1" * 144, "msrs": {"16": 5}}], vm={"clock": b"c" * 48},
                       devices={"serial": {"rx": b"abc", "lcr": 3}, "pci": {"functions": {}}})
RESTORE_ERRORS = (StateError, KeyError, TypeError, ValueError, AttributeError, OverflowError)

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                    | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=10)


@functools.cache
def original_files():
    """A real snapshot's files: {name: bytes} (written once, into a directory removed at once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s")
        fd = create_memfd(CONFIG.mem_bytes)
        for page, byte in {0: 1, 7: 2, 300: 3}.items():
            os.pwrite(fd, bytes([byte]) * 4096, page * 4096)
        w = S.Writer(path)
        w.state(STATE)
        w.memory(fd, CONFIG.mem_bytes)
        w.commit(CONFIG)
        os.close(fd)
        return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}


@pytest.fixture(scope="module")
def original():
    return original_files()


@st.composite
def directories(draw):
    """{file name: bytes} of a mutated snapshot; the 2 MiB memory file is (size, [(offset, byte)]) over the
    original's, so a failing example prints small."""
    original = original_files()
    files = {name: data for name, data in original.items() if name != "memory"}
    files["memory"] = (len(original["memory"]), [])
    manifest = json.loads(files["manifest.json"])
    state = msgpack.unpackb(files["state.msgpack"], raw=False)
    what = draw(st.sampled_from(["manifest", "manifest", "state", "memory", "extents", "raw"]))
    if what == "manifest":
        manifest = mutate_state(draw, manifest, json_only=True)
    elif what == "state":
        state = mutate_state(draw, state)
        files["state.msgpack"] = msgpack.packb(state)
        manifest["files"]["state.msgpack"] = {"size": len(files["state.msgpack"]),
                                              "sha256": hashlib.sha256(files["state.msgpack"]).hexdigest()}
    elif what == "memory":
        size = draw(st.sampled_from([0, 4096, CONFIG.mem_bytes - 1, CONFIG.mem_bytes + 4096]))
        files["memory"] = (size, draw(st.lists(st.tuples(st.integers(0, size), st.integers(0, 255)), max_size=3)))
        if draw(st.booleans()):
            manifest["files"]["memory"]["size"] = size
    elif what == "extents":
        manifest["files"]["memory"]["extents"] = draw(st.lists(st.lists(
            st.one_of(st.integers(-1, CONFIG.mem_bytes + 1), st.integers(-2 ** 64, 2 ** 64)), min_size=0,
            max_size=3), max_size=4))
    if what == "raw":
        name = draw(st.sampled_from(["manifest.json", "state.msgpack"]))
        data = bytearray(files[name])
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        files[name] = bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    else:
        files["manifest.json"] = json.dumps(manifest).encode()
    return files


def write_dir(path, files, original):
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    for name, data in files.items():
        if name == "memory":
            size, patches = data
            data = bytearray((original["memory"] + bytes(max(0, size - len(original["memory"]))))[:size])
            for offset, byte in patches:
                if offset < size:
                    data[offset] = byte
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


@pytest.fixture(scope="module")
def ram():
    fd = create_memfd(CONFIG.mem_bytes)
    yield fd
    os.close(fd)


def test_the_original_is_read_back(tmp_path, original, ram):
    write_dir(str(tmp_path / "s"), {**original, "memory": (len(original["memory"]), [])}, original)
    snap = S.Snapshot(str(tmp_path / "s"))
    assert snap.config == CONFIG and snap.state == STATE
    snap.load_memory(ram)
    assert os.pread(ram, 4096, 7 * 4096) == b"\2" * 4096


def test_mutated_snapshots_are_read_or_refused_with_one_line(tmp_path, original, ram):
    @budget(150)
    @given(directories())
    @example({"manifest.json": b"[" * 100_000, "state.msgpack": original["state.msgpack"],    # nesting past the
              "memory": (len(original["memory"]), [])})                                     # recursion limit
    def check(files):
        path = str(tmp_path / "s")
        write_dir(path, files, original)
        try:
            snap = S.Snapshot(path)
            snap.load_memory(ram)
        except S.SnapshotError as e:
            assert str(e) and "\n" not in str(e)
            return
        assert memfd_fits(ram, CONFIG.mem_bytes)                    # loading stayed inside the guest's RAM
    check()


# --- the virtio transport and the PCI bus, restored from what a snapshot says ----------------------------

def leaves(value, path=()):
    """Every (path, value) under a plain value: dict keys and list indices down to the scalars."""
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            yield from leaves(v, path + (k,))
    elif isinstance(value, list):
        yield path, value
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))
    else:
        yield path, value


def weird(draw, old, json_only=False):
    """A value a hostile snapshot might put where `old` was: mostly an integer out of its range."""
    if isinstance(old, int) and not isinstance(old, bool) and draw(st.integers(0, 3)):
        return draw(st.sampled_from([-1, 0x100, 0x10000, 2 ** 32, 2 ** 64 - 1, -2 ** 63, old ^ 0x80, old + 1]
                                    + ([2 ** 64, 2 ** 70] if json_only else [])))
    if json_only:
        return draw(JSON)
    return draw(st.one_of(st.integers(-1, 0x10000), st.integers(-2 ** 63, 2 ** 64 - 1), st.binary(max_size=300),
                          st.none(), st.booleans(), st.text(max_size=3), st.floats(),
                          st.lists(st.integers(-1, 70), max_size=4), st.just({})))


def mutate_state(draw, state, json_only=False):
    """`state` with one to three of its parts (any depth, chosen evenly) replaced or removed."""
    for _ in range(draw(st.integers(1, 3))):
        spots = [p for p, _ in leaves(state) if p]
        if not spots:
            break
        path = draw(st.sampled_from(spots))
        parent = state
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.integers(0, 7)) == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = weird(draw, parent[path[-1]], json_only)
    return state


def bus_state(bus):
    """What DeviceManager.snapshot() saves of the bus (the models' own state aside), through msgpack."""
    functions = {}
    for devfn, fn in bus.root.functions.items():
        pci = PciFunction.snapshot(fn)
        if fn in bus.fns:
            pci = {"pci": pci, "common": fn.common.snapshot(), "msix": fn.msix.snapshot(), "isr": fn.isr,
                   "config": bytes(fn._config), "device": None}
        functions[bus.root.names[devfn]] = pci
    return msgpack.unpackb(msgpack.packb({"address": bus.root.config_io.address, "functions": functions}),
                           raw=False)


@budget(200)
@given(seed=st.integers(0, 2 ** 32 - 1), steps=st.integers(0, 80), data=st.data())
def test_transport_restored_from_mutated_state_answers_every_register(seed, steps, data):
    """A bus driven for a while is saved, its state mutated and restored into a fresh bus (as DeviceManager does):
    refused with a restore error, or the restored bus answers every register (random_op) and stays consistent."""
    rng = random.Random(seed)
    a = Bus()
    try:
        for _ in range(steps):
            random_op(a, rng)
        state = bus_state(a)
    finally:
        a.close()
    state = mutate_state(data.draw, state)
    b = Bus()
    try:
        try:
            b.root.restore(state)
        except RESTORE_ERRORS:
            return                        # refused: the restore stops there and the VM is not built
        b.check()
        for _ in range(100):
            random_op(b, rng)
        b.check()
    finally:
        b.close()
