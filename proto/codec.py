"""Wire format: a message <-> msgpack bytes, validated field by field on decode.

Envelope: a msgpack map {"v": PROTOCOL_VERSION, "type": TYPE, "fields": {...}}.
Nested messages (GuestConfig inside Create) are plain field maps, typed by the
annotation; a field with a default may be left out (so a field can be added
without breaking older senders).  Every call names the Channel (the socket's set of messages).
decode() raises only ProtocolError, whatever the bytes: every peer's input is
untrusted.
"""
import functools
import types
import typing

import msgpack

from pyhv.proto.errors import ProtocolError
from pyhv.proto.messages import Message, to_plain

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20      # also the sockets' ZMQ_MAXMSGSIZE
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)


def encode(msg, channel):
    """msgpack bytes for the message instance `msg` (a top-level message of `channel`)."""
    if type(msg) not in channel:
        raise TypeError(f"not a {channel.name} message: {msg!r}")
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": msg.TYPE, "fields": to_plain(msg)})


def decode(data, channel, expect=None, max_bytes=MAX_MESSAGE_BYTES):
    """The message of `channel` in `data`; with `expect` (a class or tuple of classes) also check its type."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a message is bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:   # msgpack raises many unrelated types for garbage
        raise ProtocolError(f"not a msgpack message ({type(e).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != {"v", "type", "fields"}:
        raise ProtocolError("not a protocol envelope (expected keys v, type, fields)")
    if type(raw["v"]) is not int or raw["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {_short(raw['v'])} is not supported"
                            f" (this side speaks {PROTOCOL_VERSION})")
    cls = channel.get(raw["type"]) if isinstance(raw["type"], str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_short(raw['type'])}")
    msg = _build(cls, raw["fields"], cls.TYPE)
    if expect is not None and not isinstance(msg, expect):
        raise ProtocolError(f"unexpected message {cls.TYPE}")
    return msg


def from_plain(cls, fields):
    """A message of class `cls` from plain values (e.g. JSON read back from disk), validated like a decoded one."""
    return _build(cls, fields, cls.TYPE)


def _build(cls, fields, where):
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: fields must be a map, not {type(fields).__name__}")
    hints, names = _schema(cls)
    missing = [n for n in names if n not in fields and n not in cls.DEFAULTS]   # a field added later has a default
    extra = [k for k in fields if k not in names]
    if missing:
        raise ProtocolError(f"{where}: missing field {missing[0]}")
    if extra:
        raise ProtocolError(f"{where}: unknown field {_short(extra[0])}")
    return cls(**{n: _check(fields[n], hints[n], f"{where}.{n}") for n in names if n in fields})


@functools.cache
def _schema(cls):
    return typing.get_type_hints(cls), cls.FIELDS


def _check(value, tp, where):
    """`value` converted to annotation `tp`, or ProtocolError."""
    if isinstance(tp, types.UnionType):
        if value is None and type(None) in tp.__args__:
            return None
        (tp,) = [a for a in tp.__args__ if a is not type(None)]
        return _check(value, tp, where)
    if isinstance(tp, type) and issubclass(tp, Message):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong(where, "list", value)
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(where, "map", value)
        kt, vt = typing.get_args(tp)
        return {_check(k, kt, where): _check(v, vt, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict) or not _is_plain(value):
            raise _wrong(where, "map of plain values", value)
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise _wrong(where, "float", value)
        return float(value)
    if type(value) is not tp:    # exact: a bool is not an int here
        raise _wrong(where, tp.__name__, value)
    if tp is str and not _utf8(value):
        raise ProtocolError(f"{where}: text that is not UTF-8 (a lone surrogate)")
    return value


def _utf8(text):
    """Whether `text` can be sent as UTF-8: JSON (a guest.json, a snapshot's manifest) can carry lone surrogates
    ("\\ud800") that msgpack cannot, and str.encode() then fails wherever the text is used."""
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def _is_plain(value):
    """Only nil/bool/int/float/str/list/map with str keys, checked without recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                return False
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif type(v) not in _PLAIN_SCALARS:
            return False
    return True


def _wrong(where, expected, value):
    return ProtocolError(f"{where}: expected {expected}, got {type(value).__name__}")


def _short(value):
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."
