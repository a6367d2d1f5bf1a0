"""proto: every message round-trips on its channel; decode rejects anything else with ProtocolError, and only that."""
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from pyhv.proto import codec, control as m, device_service as ds, errors, plugin as pw
from pyhv.proto.control import CONTROL
from pyhv.proto.errors import ProtocolError
from pyhv.proto.guest import GUEST, DeviceSpec, GuestConfig, PluginRange, PluginSpec
from pyhv.proto.messages import Error, Ok, to_plain

CONFIG = GuestConfig(name="g1", kernel="/k", boot="raw16", load_addr=0x7C00, initrd=None,
                     cmdline="console=ttyS0", mem_bytes=64 << 20, vcpus=2, timeout=1.5,
                     devices=[DeviceSpec("blk", {"path": "/d"}), DeviceSpec("rng")],
                     plugins=[PluginSpec("/p/dev.py", "Dev", {"base": "0x300"}, pio=[PluginRange(0x300, 8)], irq=5)])
INFO = m.GuestInfo(name="g1", state="stopped", vcpus=2, mem_bytes=64 << 20, exit_status=7,
                   reason="guest wrote 7", pids={"worker": 123}, config=CONFIG,
                   console_log="/r/console.log", console_sock="/r/console.sock")
SAMPLES = [
    INFO, m.Ping(), m.Create(CONFIG), m.Create(GuestConfig(name="plain", kernel="/k")),
    m.Start("g1"), m.Stop("g1"), m.Pause("g1"), m.Resume("g1"), m.CtrlAltDel("g1"), m.CtrlAltDelReply(True), m.Events(),
    m.SnapshotGuest("g1", "/tmp/s", stop=True), m.SnapshotReply("/tmp/s", 4096, 0.012),
    m.RestoreGuest("/tmp/s", "g2", True, ["switch:b"]), m.Migrate("g1", "/run/b"), m.Immigrate("/run/b/in/state"),
    m.Prepared("g1"), m.Commit("g1"), m.ReceiveGuest(CONFIG, paused=True), m.ReceiveReady("unix:/run/b/s.sock", "t"),
    m.MigrateOut("g1", "unix:/run/b/s.sock", "t"), m.MigrateReply("done", copy=True, to="/run/b", rounds=3,
                                                                  bytes=1 << 20, held_bytes=4096, downtime=0.02),
    m.Event("g1", "stopped", 143, "stopped by request", 1.5), m.Destroy("g1"), m.List(),
    m.Info("g1"), m.Wait("g1"), m.Wait("g1", 2.5), m.Stats("g1"), m.StopSupervisor(leave_guests=True),
    m.SupervisorStopping(42, ["g1"], True), m.DeviceStatus("g1"), Ok(), Error("no-such-guest", "no such guest: x"),
    m.Pong(42, "/run/pyhv"), m.GuestList([INFO, INFO]), m.GuestList([]),
    m.StatsReply({"vcpus": [{"index": 0, "exits": {"IO": 3}}], "x": None, "f": 1.5}),
]
SPAWN_SAMPLES = [ds.SpawnService("g1", "virtio-rng", 1, ds.ServiceFds.positions(1, 2)), ds.ServiceSpawned(1234),
                 pw.SpawnPlugin("g1", 0, pw.PluginFds.positions(2)), Error("bad-argument", "no")]


def envelope(type_, fields, v=codec.PROTOCOL_VERSION):
    return msgpack.packb({"v": v, "type": type_, "fields": fields})


def test_every_control_message_type_has_a_sample():
    assert {type(s) for s in SAMPLES} == set(CONTROL.types.values())
    assert {type(s) for s in SPAWN_SAMPLES} == set(ds.SPAWN.types.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: s.TYPE)
def test_roundtrip(msg):
    assert codec.decode(codec.encode(msg, CONTROL), CONTROL) == msg


@pytest.mark.parametrize("msg", SPAWN_SAMPLES, ids=lambda s: s.TYPE)
def test_spawn_roundtrip_and_channels_do_not_mix(msg):
    assert codec.decode(codec.encode(msg, ds.SPAWN), ds.SPAWN) == msg
    if not isinstance(msg, Error):
        with pytest.raises(ProtocolError, match="unknown message type"):
            codec.decode(codec.encode(msg, ds.SPAWN), CONTROL)
        with pytest.raises(TypeError):
            codec.encode(msg, CONTROL)


def test_a_config_travels_alone_on_its_channel_and_reads_back_from_plain_values():
    assert codec.decode(codec.encode(CONFIG, GUEST), GUEST) == CONFIG
    assert codec.from_plain(GuestConfig, to_plain(CONFIG)) == CONFIG
    with pytest.raises(ProtocolError, match="GuestConfig.devices\\[0\\].kind"):
        codec.from_plain(GuestConfig, to_plain(CONFIG) | {"devices": [{"kind": 1, "options": {}}]})


def test_int_timeout_becomes_float():
    fields = to_plain(CONFIG) | {"timeout": 3}
    assert codec.decode(envelope("GuestConfig", fields), GUEST).timeout == 3.0


def test_error_kinds_travel_and_come_back_as_the_same_classes():
    for cls in (errors.UserError, errors.NoSuchGuest, errors.BadState, errors.PeerFailed, errors.ProtocolError,
                errors.InternalError):
        e = Error.of(cls("why"))
        back = errors.from_wire(e.kind, e.message)
        assert type(back) is cls and str(back) == "why" and back.exit_status == cls.exit_status
    assert errors.UserError.exit_status == errors.EXIT_USAGE == 2
    assert errors.NoSuchGuest.exit_status == errors.EXIT_ERROR == 1
    assert errors.VmFailure.exit_status == errors.EXIT_VM_FAILED == 70
    assert type(errors.from_wire("martian", "x")) is errors.InternalError


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
    (envelope("Create", {"config": to_plain(CONFIG) | {"devices": [1]}}), "devices[0]"),
    (envelope("Create", {"config": to_plain(CONFIG) | {"devices": [{"kind": "blk", "options": {"path": 1}}]}}),
     "devices[0].options"),
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
        codec.decode(data, CONTROL)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_rejects_non_bytes():
    with pytest.raises(ProtocolError):
        codec.decode("a string", CONTROL)


def test_expect():
    assert codec.decode(codec.encode(Ok(), CONTROL), CONTROL, expect=Ok) == Ok()
    with pytest.raises(ProtocolError, match="unexpected message Ping"):
        codec.decode(codec.encode(m.Ping(), CONTROL), CONTROL, expect=m.Start)


def test_encode_refuses_non_messages():
    with pytest.raises(TypeError):
        codec.encode({"type": "Ping"}, CONTROL)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_bytes(data):
    try:
        codec.decode(data, CONTROL)
    except ProtocolError:
        pass


PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(CONTROL.types)) | st.text(max_size=8),
       st.dictionaries(st.sampled_from(["name", "config", "pid", "stats", "guests", "kind", "message",
                                         "runtime_dir", "kernel", "vcpus"]) | st.text(max_size=4),
                       PLAIN, max_size=6),
       st.sampled_from([codec.PROTOCOL_VERSION]) | PLAIN)
def test_fuzz_envelopes(type_, fields, version):
    """Structurally plausible messages with random field values: ProtocolError or a valid message."""
    try:
        msg = codec.decode(msgpack.packb({"v": version, "type": type_, "fields": fields}), CONTROL)
    except ProtocolError:
        return
    assert codec.decode(codec.encode(msg, CONTROL), CONTROL) == msg


def test_text_that_cannot_travel_as_utf8_is_a_protocol_error():
    """Found by tests/unit/fuzz/test_fuzz_proto.py: JSON (guest.json, a snapshot manifest) can hold a lone surrogate,
    from_plain took it, and the config check's cmdline.encode() raised UnicodeEncodeError: a restore of such a
    snapshot ended in a traceback instead of a one-line refusal."""
    from pyhv.proto import guest
    for text in ("\ud800", "a\udcffb"):
        with pytest.raises(ProtocolError, match="cmdline: text that is not UTF-8"):
            codec.from_plain(guest.GuestConfig, {"name": "g", "kernel": "/k", "cmdline": text})
        with pytest.raises(ProtocolError, match="not UTF-8"):
            codec.from_plain(guest.GuestConfig, {"name": "g", "kernel": "/k",
                                                 "devices": [{"kind": "blk", "options": {"path": text}}]})
