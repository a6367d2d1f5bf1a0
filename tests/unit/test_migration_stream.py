"""The live-migration stream (proto/migration.py): pages, state and the dialogue, and everything a receiver refuses.

A source writes records into one end of a socket pair, a Receiver reads the
other into a fresh memfd, as a target's receiver process does.  A receiver
trusts nothing: damaged records, another major version, the wrong token,
pages outside RAM, totals that do not add up and a missing state all end
the migration with a MigrationError.
"""
import os
import socket
import struct
import threading
import zlib

import pytest

from pyhv.devices.guest_memory import create_memfd
from pyhv.proto import codec, migration as mig
from pyhv.proto.guest import GuestConfig
from pyhv.proto.snapshot import SNAPSHOT, MachineState

MiB = 1 << 20
CONFIG = GuestConfig(name="g", kernel="/k", mem_bytes=4 * MiB, vcpus=2)
STATE = MachineState(vcpus=[{"regs": b"r0"}, {"regs": b"r1"}], vm={"clock": b"c"}, devices={"serial": {}})
EXPECT = mig.Expect("t0ken", CONFIG, "/nowhere")


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield mig.Stream(a), mig.Stream(b)
    a.close()
    b.close()


@pytest.fixture
def ram():
    """The source's RAM: a few pages with data, the rest holes."""
    fd = create_memfd(CONFIG.mem_bytes)
    os.pwrite(fd, b"A" * 4096, 0)
    os.pwrite(fd, bytes(range(256)) * 32, 3 * 4096)        # two pages
    os.pwrite(fd, b"Z" * 4096, CONFIG.mem_bytes - 4096)
    yield fd
    os.close(fd)


def receive_in_thread(stream, expect=EXPECT):
    """Run a Receiver on `stream` into a new memfd; (thread, result dict: fd, state or error)."""
    out = {"fd": create_memfd(CONFIG.mem_bytes)}

    def run():
        r = mig.Receiver(stream, out["fd"], expect)
        try:
            r.hello()
            out["state"] = r.receive()
            out["rounds"] = r.rounds
        except mig.MigrationError as e:
            out["error"] = str(e)
    t = threading.Thread(target=run)
    t.start()
    return t, out


def send_all(src, ram_fd, ranges, state=STATE, token="t0ken"):
    src.send_preamble()
    src.send_msg(mig.Hello(token, "g", CONFIG.mem_bytes, 2))
    sent, records = src.send_ranges(ram_fd, ranges)
    src.send_msg(mig.Round(1, sent))
    src.send(mig.STATE, codec.encode(state, SNAPSHOT))
    src.send_msg(mig.Done(1, sent, records))


def test_pages_and_state_arrive_exactly(pair, ram):
    src, dst = pair
    t, out = receive_in_thread(dst)
    from pyhv.proto.snapshot import data_extents
    extents = data_extents(ram, CONFIG.mem_bytes)
    assert extents == [(0, 4096), (3 * 4096, 8192), (CONFIG.mem_bytes - 4096, 4096)]
    send_all(src, ram, extents)
    t.join(5)
    assert "error" not in out, out.get("error")
    assert out["state"] == STATE and out["rounds"] == 1
    assert os.pread(out["fd"], CONFIG.mem_bytes, 0) == os.pread(ram, CONFIG.mem_bytes, 0)
    os.close(out["fd"])


def test_a_range_over_a_megabyte_goes_in_several_records_and_a_later_round_overwrites(pair, ram):
    src, dst = pair
    t, out = receive_in_thread(dst)
    big = b"".join(bytes([i % 251]) * 4096 for i in range(400))          # 1.6 MiB: two records
    os.pwrite(ram, big, MiB)
    src.send_preamble()
    src.send_msg(mig.Hello("t0ken", "g", CONFIG.mem_bytes, 2))
    n1, r1 = src.send_ranges(ram, [(MiB, len(big))])
    os.pwrite(ram, b"second", MiB + 4096)                            # rewritten: the next round sends it again
    n2, r2 = src.send_ranges(ram, [(MiB + 4096, 4096)])
    src.send(mig.STATE, codec.encode(STATE, SNAPSHOT))
    src.send_msg(mig.Done(2, n1 + n2, r1 + r2))
    t.join(5)
    assert "error" not in out and (r1, r2) == (2, 1)
    assert os.pread(out["fd"], len(big), MiB) == os.pread(ram, len(big), MiB)
    os.close(out["fd"])


def refused(pair, write, expect=EXPECT):
    """What a receiver says of the bytes `write(src_stream)` puts on the stream."""
    src, dst = pair
    t, out = receive_in_thread(dst, expect)
    try:
        write(src)
    except mig.MigrationError:
        pass                                # the receiver may have gone already
    src.sock.shutdown(socket.SHUT_WR)
    t.join(5)
    assert not t.is_alive()
    os.close(out["fd"])
    return out.get("error", "")


def hello(src, token="t0ken"):
    src.send_preamble()
    src.send_msg(mig.Hello(token, "g", CONFIG.mem_bytes, 2))


def test_another_major_version_is_refused(pair):
    err = refused(pair, lambda s: s._sendall(mig.PREAMBLE.pack(mig.MAGIC, mig.VERSION[0] + 1, 0)))
    assert "version 2.0" in err


def test_a_newer_minor_version_is_taken(pair, ram):
    def write(s):
        s._sendall(mig.PREAMBLE.pack(mig.MAGIC, mig.VERSION[0], mig.VERSION[1] + 7))
        s.send_msg(mig.Hello("t0ken", "g", CONFIG.mem_bytes, 2))
        s.send(mig.STATE, codec.encode(STATE, SNAPSHOT))
        s.send_msg(mig.Done(0, 0, 0))
    assert refused(pair, write) == ""


def test_not_our_stream_is_refused(pair):
    assert "does not speak" in refused(pair, lambda s: s._sendall(b"GET / HTTP/1.1\r\n\r\n\0\0"))


def test_the_wrong_token_is_refused(pair):
    assert "token" in refused(pair, lambda s: hello(s, token="guess"))


def test_another_guest_is_refused(pair):
    def write(s):
        s.send_preamble()
        s.send_msg(mig.Hello("t0ken", "g", CONFIG.mem_bytes * 2, 2))
    assert "not the g" in refused(pair, write)


def test_a_damaged_record_is_refused(pair, ram):
    def write(s):
        hello(s)
        page = b"x" * 4096
        head = mig.HEADER.pack(mig.PAGES, len(page), 0)
        crc = zlib.crc32(page, zlib.crc32(head))
        s._sendall(head + mig.CRC.pack(crc) + b"y" + page[1:])     # one byte changed on the way
    assert "damaged" in refused(pair, write)


@pytest.mark.parametrize("offset, length", [(CONFIG.mem_bytes, 4096), (CONFIG.mem_bytes - 4096, 8192),
                                            (100, 4096), (0, 100), (0, 0)])
def test_pages_that_are_not_whole_pages_of_ram_are_refused(pair, offset, length):
    def write(s):
        hello(s)
        s.send(mig.PAGES, b"p" * length, offset)
    assert "not whole pages" in refused(pair, write)


def test_totals_that_do_not_add_up_are_refused(pair, ram):
    def write(s):
        hello(s)
        n, records = s.send_ranges(ram, [(0, 4096)])
        s.send(mig.STATE, codec.encode(STATE, SNAPSHOT))
        s.send_msg(mig.Done(1, n + 4096, records))
    assert "arrived" in refused(pair, write)


def test_done_without_a_state_is_refused(pair):
    def write(s):
        hello(s)
        s.send_msg(mig.Done(0, 0, 0))
    assert "without sending the guest's state" in refused(pair, write)


def test_a_state_of_the_wrong_shape_is_refused(pair):
    def write(s):
        hello(s)
        s.send(mig.STATE, codec.encode(MachineState(vcpus=[{}], vm={}, devices={}), SNAPSHOT))
    assert "1 vCPU states for 2" in refused(pair, write)


def test_a_stream_that_ends_midway_is_refused(pair, ram):
    def write(s):
        hello(s)
        s.send_ranges(ram, [(0, 4096)])
    assert "closed" in refused(pair, write)


def test_the_source_giving_up_is_heard(pair):
    def write(s):
        hello(s)
        s.send_msg(mig.Abort("vCPUs did not stop"))
    assert "gave up: vCPUs did not stop" in refused(pair, write)


def test_the_dialogue_after_done(pair):
    """Prepared -> Commit -> Committed; an Abort in place of an expected message raises with its reason."""
    src, dst = pair
    dst.send_msg(mig.Prepared())
    assert isinstance(src.recv_msg(mig.Prepared), mig.Prepared)
    src.send_msg(mig.Commit())
    assert isinstance(dst.recv_msg(mig.Commit), mig.Commit)
    dst.send_msg(mig.Abort("the guest could not start here"))
    with pytest.raises(mig.MigrationError, match="gave up: the guest could not start here"):
        src.recv_msg(mig.Committed)


def test_a_failed_send_finds_the_peers_reason(pair):
    src, dst = pair
    dst.send_msg(mig.Abort("disk full"))
    dst.sock.close()
    with pytest.raises(mig.MigrationError, match="broke"):
        for _ in range(1000):
            src.send(mig.PAGES, b"q" * 65536, 0)
    assert src.peer_reason() == "disk full"


def test_only_unix_addresses_are_served():
    with pytest.raises(mig.MigrationError, match="only unix"):
        mig.connect("tcp:host:1")
    with pytest.raises(mig.MigrationError, match="cannot connect"):
        mig.connect("unix:/nonexistent/stream.sock")


def test_the_record_header_is_as_documented():
    """docs/migration.md: kind u8, 3 zero bytes, length u32, arg u64, crc32 u32."""
    head = mig.HEADER.pack(mig.PAGES, 4096, 0x1000)
    assert head == struct.pack("<B3xIQ", 2, 4096, 0x1000) and mig.RECORD_BYTES == 20
    assert mig.PREAMBLE.pack(mig.MAGIC, 1, 0) == b"pyhv-migration\0\0\x01\x00\x00\x00"
