"""Fuzz: every proto/ message on every channel, the switch's frames, and the guest config checks behind them.

Every peer's input is untrusted: hvctl's requests to the supervisor, a
worker's to its device services and to the supervisor's spawn socket, a
service's spec, a guest.json or snapshot manifest's config, a snapshot's
state file.  For each channel, messages are generated from their own
schemas (the annotations codec.py checks), encoded, and then mutated: bytes
flipped, the stream cut, a field's value swapped for any other msgpack
value, fields dropped or added, the envelope bent.  The property:
codec.decode raises only ProtocolError; a message it accepts encodes and
decodes to itself and is of that channel; a GuestConfig it accepts is
refused by the config checks only with a one-line UserError; the switch's
decode raises only BadSwitchMessage.
"""
import types
import typing

import msgpack
import pytest
from hypothesis import given, strategies as st

from fuzzing import budget
from pyhv.devices.virtio import kinds
from pyhv.proto import codec, device_service as ds, guest, switch
from pyhv.proto.control import CONTROL
from pyhv.proto.errors import ProtocolError, UserError
from pyhv.proto.messages import Message
from pyhv.proto.snapshot import SNAPSHOT

pytestmark = pytest.mark.fuzz

CHANNELS = {c.name: c for c in (CONTROL, ds.SERVICE, ds.SPAWN, ds.SPEC, guest.GUEST, SNAPSHOT)}

TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["", "g", "blk", "rng", "net", "virtio-blk0", "/k", "raw64",
                                                        "linux", "nested", "switch:lab", "tap:tap0",
                                                        "52:54:00:12:34:56", "ro", "1", "path", "mac", "port"]))
INTS = st.one_of(st.integers(-1, 300), st.integers(-2 ** 63, 2 ** 64 - 1), st.sampled_from([0, 1, 4096, 1 << 20,
                                                                                              2 ** 32, 2 ** 64 - 1]))
PLAIN = st.recursive(st.none() | st.booleans() | INTS | st.floats() | TEXT | st.binary(max_size=16),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                     max_leaves=12)


def plain_for(tp, depth=0):
    """A strategy for plain values that fit annotation `tp` (what an honest peer sends)."""
    if isinstance(tp, types.UnionType):
        (inner,) = [a for a in tp.__args__ if a is not type(None)]
        return st.none() | plain_for(inner, depth)
    if isinstance(tp, type) and issubclass(tp, Message):
        return fields_for(tp, depth + 1)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(plain_for(item, depth), max_size=3 if depth < 3 else 0)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return st.dictionaries(plain_for(kt, depth), plain_for(vt, depth), max_size=3)
    return {dict: st.dictionaries(TEXT, PLAIN, max_size=3), str: TEXT, int: INTS, float: st.floats(),
            bool: st.booleans(), bytes: st.binary(max_size=64)}[tp]


def fields_for(cls, depth=0):
    hints = typing.get_type_hints(cls)
    return st.fixed_dictionaries({n: plain_for(hints[n], depth) for n in cls.FIELDS if n not in cls.DEFAULTS},
                                 optional={n: plain_for(hints[n], depth) for n in cls.FIELDS if n in cls.DEFAULTS})


@st.composite
def envelopes(draw):
    """(channel, the plain envelope of a well-formed message of it)."""
    channel = CHANNELS[draw(st.sampled_from(sorted(CHANNELS)))]
    cls = channel.types[draw(st.sampled_from(sorted(channel.types)))]
    return channel, {"v": codec.PROTOCOL_VERSION, "type": cls.TYPE, "fields": draw(fields_for(cls))}


def mutate_plain(draw, env):
    """The envelope with a field replaced by any value, dropped, or a field added; or the envelope itself bent."""
    choice = draw(st.integers(0, 5))
    fields = dict(env["fields"])
    if choice == 0 and fields:
        fields[draw(st.sampled_from(sorted(fields)))] = draw(PLAIN)
    elif choice == 1 and fields:
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif choice == 2:
        fields[draw(TEXT)] = draw(PLAIN)
    elif choice == 3:
        return {**env, draw(st.sampled_from(["v", "type", "fields"])): draw(PLAIN)}
    elif choice == 4:
        return draw(PLAIN)
    elif choice == 5 and fields:                    # one level down: a nested message's field
        key = draw(st.sampled_from(sorted(fields)))
        if isinstance(fields[key], dict) and fields[key]:
            inner = dict(fields[key])
            inner[draw(st.sampled_from(sorted(inner)))] = draw(PLAIN)
            fields[key] = inner
    return {**env, "fields": fields}


def mutate_bytes(draw, data):
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def check_decoded(channel, data):
    try:
        msg = codec.decode(data, channel)
    except ProtocolError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert type(msg) in channel
    data = codec.encode(msg, channel)                # compared as bytes: a float field may be NaN
    assert codec.encode(codec.decode(data, channel), channel) == data
    return msg


@budget(300)
@given(envelopes(), st.data())
def test_every_message_decodes_to_itself_or_is_a_protocol_error(env, data):
    channel, plain = env
    msg = check_decoded(channel, msgpack.packb(plain))
    assert msg is not None, f"a well-formed {plain['type']} was refused"
    packed = msgpack.packb(mutate_plain(data.draw, plain))
    check_decoded(channel, packed)
    check_decoded(channel, mutate_bytes(data.draw, packed))
    for other in CHANNELS.values():             # a message of one channel is no message of another
        got = check_decoded(other, packed)
        assert got is None or type(got) in other


@budget(200)
@given(fields_for(guest.GuestConfig), st.data())
def test_configs_from_the_wire_or_a_file_are_checked_in_one_line(fields, data):
    """What Create carries, guest.json holds and a snapshot manifest says: accepted by the codec, then refused by
    the config checks (proto/guest.py check, the device kinds' validate) only with a one-line UserError."""
    if data.draw(st.booleans()):
        fields = {**fields, data.draw(st.sampled_from(sorted(fields) or ["name"])): data.draw(PLAIN)}
    if data.draw(st.booleans()):                # a file may hold strings msgpack could not (JSON's \ud800)
        fields["cmdline"] = data.draw(st.sampled_from(["\ud800", "a\udcffb", "x" * 3000, "\0"]))
    try:
        config = codec.from_plain(guest.GuestConfig, fields)
    except ProtocolError:
        return
    try:
        guest.check(config)
        kinds.validate(config.devices)
    except UserError as e:
        assert str(e) and "\n" not in str(e)


@budget(200)
@given(st.lists(st.one_of(st.binary(max_size=20), st.sampled_from([switch.FRAME_TAG, switch.HELLO_TAG]),
                          st.binary(min_size=1500, max_size=1600)), max_size=3))
def test_switch_frames(parts):
    try:
        kind, payload = switch.decode(parts)
    except switch.BadSwitchMessage as e:
        assert str(e) and "\n" not in str(e)
        return
    assert kind in ("frame", "hello") and (kind == "hello" or switch.MIN_FRAME <= len(payload) <= switch.MAX_FRAME)

