"""The GDB stub's packet layer (vcpu_worker/gdb/packets.py): framing, checksums, escapes, run-length, acks.

No /dev/kvm needed."""
import pytest
from hypothesis import given, strategies as st

from pyhv.vcpu_worker.gdb import packets
from pyhv.vcpu_worker.gdb.packets import Event, Reader


def test_a_packet_is_framed_with_its_checksum():
    assert packets.frame(b"OK", rle=False) == b"$OK#9a"
    assert packets.frame("", rle=False) == b"$#00"
    assert packets.checksum(b"qSupported") == sum(b"qSupported") % 256


def test_special_bytes_are_escaped_and_restored():
    raw = b"a#b$c}d*e"
    escaped = packets.escape(raw)
    assert escaped == b"a}\x03b}\x04c}]d}\x0ae"
    assert packets.unescape(escaped) == raw
    with pytest.raises(ValueError):
        packets.unescape(b"abc}")


def test_runs_are_encoded_and_the_forbidden_counts_avoided():
    assert packets.rle_encode(b"0" * 4) == b"0* "           # 3 more: 3 + 29 = ' '
    assert packets.rle_encode(b"000") == b"000"             # too short to pay
    for n in range(1, 300):
        encoded = packets.rle_encode(b"x" * n)
        counts, i = set(), 0
        while i < len(encoded):                 # character, then optionally '*' and a count byte
            if encoded[i + 1:i + 2] == b"*":
                counts.add(encoded[i + 2])
                i += 3
            else:
                i += 1
        assert not counts & set(b"#$+-"), n             # 6, 7, 14, 16 repeats are never a count byte
        assert packets.rle_decode(encoded) == b"x" * n


def test_a_run_never_starts_on_an_escaped_byte():
    # '}' then the escaped byte: repeating it would repeat the raw byte, not the escaped one
    data = packets.escape(b"#" * 10)
    assert packets.rle_decode(packets.rle_encode(data)) == data
    assert packets.unescape(packets.rle_decode(packets.rle_encode(data))) == b"#" * 10


@given(st.binary(max_size=600))
def test_frame_round_trips_through_escape_and_rle(data):
    wire = packets.frame(data)
    assert wire[:1] == b"$" and wire[-3:-2] == b"#"
    body = wire[1:-3]
    assert int(wire[-2:], 16) == packets.checksum(body)
    assert packets.unescape(packets.rle_decode(body)) == data
    reader = Reader(raw=True)
    assert [packets.reply_payload(e.data) for e in reader.feed(wire)] == [data]


@given(st.binary(max_size=300), st.integers(1, 7))
def test_the_reader_reassembles_packets_split_anywhere(data, pieces):
    wire = b"+" + packets.frame(data, rle=False) + b"\x03" + packets.frame(b"g", rle=False)
    reader = Reader()
    events = []
    step = max(1, len(wire) // pieces)
    for i in range(0, len(wire), step):
        events += reader.feed(wire[i:i + step])
    assert events == [Event("ack"), Event("packet", data), Event("interrupt"), Event("packet", b"g")]


def test_a_bad_checksum_is_reported_not_raised():
    reader = Reader()
    assert reader.feed(b"$g#00") == [Event("bad", b"checksum mismatch")]
    assert reader.feed(b"$g#zz") == [Event("bad", b"checksum is not hex")]
    assert reader.feed(b"$g#67") == [Event("packet", b"g")]       # and the next one is fine
    reader.check = False                                          # no-ack mode: checksums are not checked
    assert reader.feed(b"$g#00") == [Event("packet", b"g")]


def test_an_overlong_packet_is_dropped_without_growing():
    reader = Reader(max_packet=16)
    body = b"m" * 100000
    assert reader.feed(b"$" + body + b"#" + b"%02x" % packets.checksum(body)) == [Event("bad", b"packet too long")]
    assert len(reader._buf) == 0
    assert reader.feed(packets.frame(b"?", rle=False)) == [Event("packet", b"?")]


def test_a_packet_cut_short_by_a_new_one_is_reported_and_the_new_one_read():
    reader = Reader()
    assert reader.feed(b"$abc$g#67") == [Event("bad", b"packet interrupted by '$'"), Event("packet", b"g")]


def test_noise_between_packets_and_a_dangling_escape():
    reader = Reader()
    assert reader.feed(b"hello\r\n") == []
    body = b"X0,1:}"
    assert reader.feed(b"$" + body + b"#" + b"%02x" % packets.checksum(body)) == \
        [Event("bad", b"packet ends inside an escape")]


@pytest.mark.parametrize("text,value", [("0", 0), ("ff", 255), ("FFFFFFFFFFFFFFFF", 2**64 - 1)])
def test_hex_numbers(text, value):
    assert packets.parse_hex(text) == value


@pytest.mark.parametrize("text", ["", "-1", "0x10", "1 2", "g", "1" * 17, "+5"])
def test_bad_hex_numbers_are_value_errors(text):
    with pytest.raises(ValueError):
        packets.parse_hex(text)


def test_thread_ids_and_hex_bytes():
    assert packets.parse_thread("-1") == -1
    assert packets.parse_thread("0") == 0
    assert packets.parse_thread("2") == 2
    with pytest.raises(ValueError):
        packets.parse_thread("p1.2")
    assert packets.hex_bytes("00ff") == b"\x00\xff"
    for bad in ("0", "zz"):
        with pytest.raises(ValueError):
            packets.hex_bytes(bad)
