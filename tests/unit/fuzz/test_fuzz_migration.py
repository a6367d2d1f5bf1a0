"""Fuzz: a migration's receiver (proto/migration.py Receiver) reading a stream it cannot trust.

Whoever reaches the receiver's socket (or corrupts the stream on its way)
chooses every byte.  The stream is built record by record with valid
checksums, so the receiver's own checks are reached, then bent: records
dropped, repeated or swapped, a page range moved or resized (any offset,
any length), messages with other values (token, guest, totals, round
numbers), the state's msgpack mutated, records of unknown kinds, another
preamble; sometimes raw bytes are flipped or the stream is cut as well.
The property: the receiver either takes the stream (and then hands back a
MachineState of the guest's vCPU count) or refuses it with one
MigrationError of one line, nothing else; and it writes only inside the
guest's RAM: the memfd keeps its size and the dirty map after RAM stays
untouched.
"""
import os
import socket
import threading
import zlib

import msgpack
import pytest
from hypothesis import given, strategies as st

from fuzzing import budget
from pyhv.devices.guest_memory import create_memfd, dirty_map_span, memfd_fits
from pyhv.proto import codec, migration as mig
from pyhv.proto.guest import GuestConfig
from pyhv.proto.snapshot import SNAPSHOT, MachineState

pytestmark = pytest.mark.fuzz

MiB = 1 << 20
CONFIG = GuestConfig(name="g", kernel="/k", boot="raw64", mem_bytes=1 * MiB, vcpus=2)
EXPECT = mig.Expect("t0ken", CONFIG, "/nowhere")
STATE = MachineState(vcpus=[{"regs": b"\1" * 16}, {"regs": b"\2" * 16}], vm={"clock": b"c"}, devices={})
U64 = st.one_of(st.integers(0, 2 * MiB), st.sampled_from([0, 4096, MiB - 4096, MiB, 2 ** 32, 2 ** 63, 2 ** 64 - 1]),
                st.integers(0, 2 ** 64 - 1))           # what a record's arg can hold
INTS = st.one_of(st.just(-1), U64)


def record(kind, payload=b"", arg=0):
    head = mig.HEADER.pack(kind, len(payload), arg)
    return head + mig.CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


def message(msg):
    return (mig.MSG, codec.encode(msg, mig.STREAM), 0)


def honest():
    """The records of an honest stream: Hello, two page ranges, a round, the state, Done."""
    return [message(mig.Hello("t0ken", "g", CONFIG.mem_bytes, 2)),
            (mig.PAGES, b"A" * 4096, 0), (mig.PAGES, b"B" * 8192, 64 * 4096),
            message(mig.Round(1, 12288)),
            (mig.STATE, codec.encode(STATE, SNAPSHOT), 0),
            message(mig.Done(1, 12288, 2))]


def mutate_plain(draw, value):
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value, key=repr)))
        return {**value, key: mutate_plain(draw, value[key])}
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate_plain(draw, value[i])] + value[i + 1:]
    return draw(st.one_of(st.none(), st.booleans(), INTS, st.text(max_size=8), st.binary(max_size=24),
                          st.lists(st.integers(0, 3), max_size=3), st.just({})))


@st.composite
def streams(draw):
    records = honest()
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["drop", "repeat", "swap", "pages", "message", "state", "unknown"]))
        i = draw(st.integers(0, len(records) - 1))
        kind, payload, arg = records[i]
        if what == "drop" and len(records) > 1:
            del records[i]
        elif what == "repeat":
            records.insert(i, records[i])
        elif what == "swap":
            j = draw(st.integers(0, len(records) - 1))
            records[i], records[j] = records[j], records[i]
        elif what == "pages":
            length = draw(st.sampled_from([0, 1, 4095, 4096, 8192, mig.MAX_PAGES_BYTES, mig.MAX_PAGES_BYTES + 4096]))
            records.insert(i, (mig.PAGES, b"P" * length, draw(U64)))
        elif what == "message" and kind == mig.MSG and payload in {p for k, p, _ in honest() if k == mig.MSG}:
            envelope = msgpack.unpackb(payload, raw=False)
            envelope["fields"] = mutate_plain(draw, envelope["fields"])
            records[i] = (kind, msgpack.packb(envelope), arg)
        elif what == "state":
            envelope = msgpack.unpackb(codec.encode(STATE, SNAPSHOT), raw=False)
            records[i] = (mig.STATE, msgpack.packb(mutate_plain(draw, envelope)), 0)
        elif what == "unknown":
            records.insert(i, (draw(st.integers(0, 255)), draw(st.binary(max_size=32)), draw(U64)))
    preamble = draw(st.sampled_from([mig.PREAMBLE.pack(mig.MAGIC, *mig.VERSION)] * 4 + [
        mig.PREAMBLE.pack(mig.MAGIC, mig.VERSION[0] + 1, 0), mig.PREAMBLE.pack(b"x" * 16, 1, 0), b""]))
    data = bytearray(preamble + b"".join(record(k, p, a) for k, p, a in records))
    if draw(st.integers(0, 4)) == 0 and data:                  # and damaged on the way
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def receive(data, mem_fd):
    """A Receiver's verdict on the bytes `data`: ("taken", state) or ("refused", message)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(10)

    def feed():
        try:
            theirs.sendall(data)
            theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass                                    # the receiver gave up and closed: fine
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        r = mig.Receiver(mig.Stream(ours), mem_fd, EXPECT)
        r.hello()
        return "taken", r.receive()
    except mig.MigrationError as e:
        return "refused", str(e)
    finally:
        ours.close()
        t.join(10)
        theirs.close()


@pytest.fixture(scope="module")
def ram():
    fd = create_memfd(CONFIG.mem_bytes)
    yield fd
    os.close(fd)


def test_the_honest_stream_is_taken(ram):
    verdict, state = receive(b"".join([mig.PREAMBLE.pack(mig.MAGIC, *mig.VERSION)] +
                                      [record(k, p, a) for k, p, a in honest()]), ram)
    assert (verdict, state) == ("taken", STATE)
    assert os.pread(ram, 4096, 0) == b"A" * 4096 and os.pread(ram, 8192, 64 * 4096) == b"B" * 8192


def test_any_stream_is_taken_or_refused_in_one_line_and_only_ram_is_written(ram):
    trailer, length = dirty_map_span(CONFIG.mem_bytes)

    @budget(200)
    @given(streams())
    def check(data):
        verdict, what = receive(data, ram)
        if verdict == "refused":
            assert what and "\n" not in what
        else:
            assert isinstance(what, MachineState) and len(what.vcpus) == CONFIG.vcpus
        assert memfd_fits(ram, CONFIG.mem_bytes)
        assert os.pread(ram, length, trailer) == bytes(length)          # the dirty map: no byte written
    check()
