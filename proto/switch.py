"""The virtual switch's wire format: what a NIC port and a switch (devices/net/switch.py) exchange over ZeroMQ.

The switch is a ROUTER, each port a DEALER.  A message is two frames:
[TAG, payload].  TAG is b"pyhv-sw" + version byte + kind byte:
  kind b"F": payload is one Ethernet frame (14 .. MAX_FRAME bytes);
  kind b"H": hello, payload empty: "this port exists" (sent on connect and
             every HELLO_INTERVAL, so the switch floods broadcasts to ports
             that have not sent a frame yet, and relearns them after a restart).
Frames are data, not control, so they are not msgpack messages; the tag
versions them and `decode` validates every message, whatever the bytes.
"""

from pyhv.proto.errors import ProtocolError

VERSION = 1
_PREFIX = b"pyhv-sw" + bytes([VERSION])
FRAME_TAG = _PREFIX + b"F"
HELLO_TAG = _PREFIX + b"H"
MIN_FRAME, MAX_FRAME = 14, 1514
HELLO_INTERVAL = 1.0            # seconds between a port's hellos
PORT_TIMEOUT = 5.0              # a port not heard from for this long is forgotten


class BadSwitchMessage(ProtocolError):
    """Not a switch message of this version (dropped and counted by the receiver)."""


def frame(payload):
    return [FRAME_TAG, payload]


def hello():
    return [HELLO_TAG, b""]


def decode(parts):
    """(kind, payload) with kind "frame" or "hello"; BadSwitchMessage otherwise."""
    if len(parts) != 2:
        raise BadSwitchMessage(f"{len(parts)} parts, expected 2")
    tag, payload = parts
    if tag == FRAME_TAG:
        if not MIN_FRAME <= len(payload) <= MAX_FRAME:
            raise BadSwitchMessage(f"frame of {len(payload)} bytes (allowed {MIN_FRAME}..{MAX_FRAME})")
        return "frame", payload
    if tag == HELLO_TAG:
        return "hello", b""
    raise BadSwitchMessage(f"unknown tag {bytes(tag[:16])!r}")
