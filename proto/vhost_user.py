"""The vhost-user wire protocol, front-end side: message layout, constants, and replies checked field by field.

vhost-user (QEMU's docs/interop/vhost-user.rst) hands a virtio device's
queues to a back-end process over a unix stream socket: each message is a
12-byte header (request, flags, payload size; native byte order, which is
little-endian on x86) and a payload, with file descriptors (guest RAM, the
kick and call eventfds) in SCM_RIGHTS.  This module is pure: it builds the
requests pyhv sends and checks the replies it gets.  A back end is another
process, so every reply is untrusted input: a wrong request code, a missing
reply flag, a bad version, an unexpected size or an oversized payload is a
BackendBroke with one line saying which.
"""
import struct

from pyhv.proto.errors import PeerFailed

HEADER = struct.Struct("<III")          # request, flags, size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
MAX_PAYLOAD = 4096                      # larger than any reply we ask for (a config space is <= 256 bytes)
MAX_MEM_REGIONS = 8                     # what SET_MEM_TABLE carries (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_CONFIG = 256                        # VHOST_USER_MAX_CONFIG_SIZE

# front-end requests (the ones pyhv sends, and a few it names in errors)
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
NAMES = {GET_FEATURES: "GET_FEATURES", SET_FEATURES: "SET_FEATURES", SET_OWNER: "SET_OWNER",
         SET_MEM_TABLE: "SET_MEM_TABLE", SET_VRING_NUM: "SET_VRING_NUM", SET_VRING_ADDR: "SET_VRING_ADDR",
         SET_VRING_BASE: "SET_VRING_BASE", GET_VRING_BASE: "GET_VRING_BASE", SET_VRING_KICK: "SET_VRING_KICK",
         SET_VRING_CALL: "SET_VRING_CALL", GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES",
         SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES", GET_QUEUE_NUM: "GET_QUEUE_NUM",
         SET_VRING_ENABLE: "SET_VRING_ENABLE", GET_CONFIG: "GET_CONFIG", SET_CONFIG: "SET_CONFIG"}

# VHOST_USER_F_PROTOCOL_FEATURES: a virtio feature bit (30, unused by virtio 1.x) the back end offers
F_PROTOCOL_FEATURES = 1 << 30
# VHOST_F_LOG_ALL: dirty logging for migration (never offered to a guest, never set by pyhv)
F_LOG_ALL = 1 << 26

# protocol feature bits
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9
WANTED_PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK | PF_CONFIG

VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8                     # SET_VRING_CALL/KICK without an fd: nobody signals

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")           # index, num
_ADDR = struct.Struct("<IIQQQQ")        # index, flags, desc, used, avail, log (user addresses)
_MEM_HEAD = struct.Struct("<II")        # nregions, padding
_REGION = struct.Struct("<QQQQ")        # guest address, size, user address, mmap offset
_CONFIG_HEAD = struct.Struct("<III")    # offset, size, flags


class BackendBroke(PeerFailed):
    """The back end sent something the protocol does not allow (or refused a request); one line says what."""


def name(request):
    return NAMES.get(request, f"request {request}")


def message(request, payload=b"", need_reply=False):
    """The bytes of one front-end request."""
    return HEADER.pack(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), len(payload)) + payload


def u64(value):
    return _U64.pack(value)


def vring_state(index, num):
    return _STATE.pack(index, num)


def vring_addr(index, desc, used, avail, flags=0, log=0):
    return _ADDR.pack(index, flags, desc, used, avail, log)


def vring_fd(index, has_fd=True):
    """The u64 of SET_VRING_KICK/CALL: the ring index, and VRING_NOFD when no fd travels with it."""
    return _U64.pack(index | (0 if has_fd else VRING_NOFD))


def mem_table(regions):
    """SET_MEM_TABLE's payload for [(guest address, size, user address, mmap offset)], one fd per region."""
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise ValueError(f"{len(regions)} memory regions (1..{MAX_MEM_REGIONS})")
    return _MEM_HEAD.pack(len(regions), 0) + b"".join(_REGION.pack(*r) for r in regions)


def config(offset, size, data=b"", flags=0):
    """GET_CONFIG's request (data: zeros of `size`) or SET_CONFIG's payload."""
    return _CONFIG_HEAD.pack(offset, size, flags) + (data or bytes(size))


# -- replies: every field checked -----------------------------------------------------------

def parse_header(data):
    """(request, flags, size) of a reply header; BackendBroke unless it is a well-formed reply."""
    if len(data) != HEADER.size:
        raise BackendBroke(f"a reply header of {len(data)} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise BackendBroke(f"reply to {name(request)} has protocol version {flags & VERSION_MASK} (not {VERSION})")
    if not flags & FLAG_REPLY:
        raise BackendBroke(f"{name(request)} without the reply flag (a back end sends only replies here)")
    if size > MAX_PAYLOAD:
        raise BackendBroke(f"reply to {name(request)} announces {size} bytes (at most {MAX_PAYLOAD})")
    return request, flags, size


def check_reply(request, got_request, payload, sizes):
    """BackendBroke unless the reply is to `request` and its payload has one of `sizes` bytes."""
    if got_request != request:
        raise BackendBroke(f"answered {name(got_request)} to {name(request)}")
    if len(payload) not in sizes:
        raise BackendBroke(f"reply to {name(request)} has {len(payload)} bytes "
                           f"(expected {' or '.join(map(str, sizes))})")


def parse_u64(request, got_request, payload):
    check_reply(request, got_request, payload, (_U64.size,))
    return _U64.unpack(payload)[0]


def parse_ack(request, got_request, payload):
    """A REPLY_ACK: BackendBroke unless it says success (0)."""
    status = parse_u64(request, got_request, payload)
    if status != 0:
        raise BackendBroke(f"refused {name(request)} (status {status})")


def parse_vring_state(request, got_request, payload, index):
    """GET_VRING_BASE's answer for ring `index`: its next available index (0..0xFFFF)."""
    check_reply(request, got_request, payload, (_STATE.size,))
    got_index, num = _STATE.unpack(payload)
    if got_index != index:
        raise BackendBroke(f"reply to {name(request)} for ring {index} names ring {got_index}")
    if num > 0xFFFF:
        raise BackendBroke(f"ring {index}'s base {num} is not a 16-bit ring index")
    return num


def parse_config(got_request, payload, offset, size):
    """GET_CONFIG's answer: exactly `size` bytes of config space from `offset` (an empty payload is a refusal)."""
    check_reply(GET_CONFIG, got_request, payload, (_CONFIG_HEAD.size + size, 0, _CONFIG_HEAD.size))
    if len(payload) <= _CONFIG_HEAD.size:
        raise BackendBroke("refused GET_CONFIG (an empty config space)")
    got_offset, got_size, _ = _CONFIG_HEAD.unpack_from(payload)
    if (got_offset, got_size) != (offset, size):
        raise BackendBroke(f"GET_CONFIG of {size} bytes at {offset} answered with {got_size} at {got_offset}")
    return payload[_CONFIG_HEAD.size:]


# -- what a back end would parse: for the tests' back end -------------------------------------

def unpack_header(data):
    return HEADER.unpack(data)


def unpack_u64(payload):
    return _U64.unpack(payload)[0]


def unpack_vring_state(payload):
    return _STATE.unpack(payload)


def unpack_vring_addr(payload):
    """(index, flags, desc, used, avail, log)."""
    return _ADDR.unpack(payload)


def unpack_mem_table(payload):
    """[(guest address, size, user address, mmap offset)]."""
    n, _ = _MEM_HEAD.unpack_from(payload)
    return [_REGION.unpack_from(payload, _MEM_HEAD.size + i * _REGION.size) for i in range(n)]


def unpack_config(payload):
    """(offset, size, flags, data)."""
    offset, size, flags = _CONFIG_HEAD.unpack_from(payload)
    return offset, size, flags, payload[_CONFIG_HEAD.size:]


def reply(request, payload=b""):
    """A back end's reply (for the tests' back end)."""
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload
