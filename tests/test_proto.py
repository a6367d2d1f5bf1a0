"""proto: every message round-trips; decode rejects anything else with ProtocolError, and only that."""
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from pyhv.proto import codec, messages as m
from pyhv.proto.messages import to_plain
from pyhv.proto.errors import ProtocolError

CONFIG = m.GuestConfig(name="g1", kernel="/k", boot="raw16", load_addr=0x7C00, initrd=None,
                       cmdline="console=ttyS0", mem_bytes=64 << 20, vcpus=2, disks=["/d"], timeout=1.5)
INFO = m.GuestInfo(name="g1", state="stopped", vcpus=2, mem_bytes=64 << 20, exit_status=7,
                   reason="guest wrote 7", pids={"worker": 123}, config=CONFIG,
                   console_log="/r/console.log", console_sock="/r/console.sock")
SAMPLES = [
    CONFIG, m.GuestConfig(name="plain", kernel="/k"), INFO, m.Ping(), m.Create(CONFIG),
    m.Start("g1"), m.Stop("g1"), m.Pause("g1"), m.Resume("g1"), m.Destroy("g1"), m.List(),
    m.Info("g1"), m.Wait("g1"), m.Stats("g1"), m.DeviceStatus("g1"), m.Ok(), m.Error("no-such-guest", "no such guest: x"),
    m.Pong(42, "/run/pyhv"), m.GuestList([INFO, INFO]), m.GuestList([]),
    m.StatsReply({"vcpus": [{"index": 0, "exits": {"IO": 3}}], "x": None, "f": 1.5}),
    m.SpawnService("g1", ["--device", "rng", "--mem-fd", "5"], [5]), m.ServiceSpawned(1234),
]


def envelope(type_, fields, v=codec.PROTOCOL_VERSION):
    return msgpack.packb({"v": v, "type": type_, "fields": fields})


def test_every_message_type_has_a_sample():
    assert {type(s) for s in SAMPLES} == set(m.MESSAGES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: s.TYPE)
def test_roundtrip(msg):
    assert codec.decode(codec.encode(msg)) == msg


def test_int_timeout_becomes_float():
    fields = to_plain(CONFIG) | {"timeout": 3}
    assert codec.decode(envelope("GuestConfig", fields)).timeout == 3.0


@pytest.mark.parametrize("data, words", [
    (b"", "not a msgpack"),
    (b"\xc1garbage", "not a msgpack"),
    (msgpack.packb([1, 2, 3]), "envelope"),
    (msgpack.packb({"v": 1, "type": "Ping"}), "envelope"),
    (envelope("Ping", {}, v=2), "version 2"),
    (envelope("Ping", {}, v=True), "version"),
    (envelope("Ping", {}, v="1"), "version"),
    (envelope("Nope", {}), "unknown message type"),
    (envelope(7, {}), "unknown message type"),
    (envelope("Start", {}), "missing field name"),
    (envelope("Start", {"name": "a", "x": 1}), "unknown field"),
    (envelope("Start", {"name": 5}), "Start.name: expected str"),
    (envelope("Start", {"name": b"a"}), "expected str"),
    (envelope("Start", []), "fields must be a map"),
    (envelope("Pong", {"pid": True, "runtime_dir": "/r"}), "Pong.pid: expected int"),
    (envelope("Pong", {"pid": 1.0, "runtime_dir": "/r"}), "expected int"),
    (envelope("Create", {"config": "x"}), "Create.config"),
    (envelope("Create", {"config": to_plain(CONFIG) | {"vcpus": "2"}}), "Create.config.vcpus"),
    (envelope("Create", {"config": to_plain(CONFIG) | {"disks": [1]}}), "disks[0]"),
    (envelope("Create", {"config": to_plain(CONFIG) | {"timeout": "x"}}), "timeout"),
    (envelope("GuestList", {"guests": [1]}), "GuestList.guests[0]"),
    (envelope("StatsReply", {"stats": {"a": msgpack.ExtType(1, b"x")}}), "plain values"),
    (envelope("StatsReply", {"stats": [1]}), "map"),
    (envelope("GuestInfo", to_plain(INFO) | {"pids": {"worker": "x"}}), "pids"),
    (b"\x91" * 5000, "not a msgpack"),                       # nested deeper than msgpack allows
    (b"\x00" * (codec.MAX_MESSAGE_BYTES + 1), "limit"),
])
def test_rejects(data, words):
    with pytest.raises(ProtocolError) as e:
        codec.decode(data)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_rejects_non_bytes():
    with pytest.raises(ProtocolError):
        codec.decode("a string")


def test_expect():
    assert codec.decode(codec.encode(m.Ok()), expect=m.Ok) == m.Ok()
    with pytest.raises(ProtocolError, match="unexpected message Ping"):
        codec.decode(codec.encode(m.Ping()), expect=m.GuestConfig)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        codec.encode({"type": "Ping"})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_bytes(data):
    try:
        codec.decode(data)
    except ProtocolError:
        pass


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(m.MESSAGES)) | st.text(max_size=8),
       st.dictionaries(st.sampled_from(["name", "config", "pid", "stats", "guests", "kind", "message",
                                         "runtime_dir", "kernel", "vcpus"]) | st.text(max_size=4),
                       PLAIN, max_size=6),
       st.sampled_from([codec.PROTOCOL_VERSION]) | PLAIN)
def test_fuzz_envelopes(type_, fields, version):
    """Structurally plausible messages with random field values: ProtocolError or a valid message."""
    try:
        msg = codec.decode(msgpack.packb({"v": version, "type": type_, "fields": fields}))
    except ProtocolError:
        return
    assert codec.decode(codec.encode(msg)) == msg
