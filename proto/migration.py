"""The live-migration stream (`hvctl migrate --copy`): guest RAM, then the guest's state, from source to target.

docs/migration.md is the reference.  One byte stream (a unix socket here;
nothing on it needs fd passing, so a TCP connection can take its place)
from the source's worker, which owns KVM's dirty log, to a receiver the
target's supervisor starts.  The source opens it with a preamble (format
name and version "major.minor"; a receiver refuses another major), then
both sides send records:

    kind u8, 3 zero bytes, payload length u32, arg u64, crc32 u32, payload

The crc32 covers the 16 header bytes before it and the payload, so a record
that arrives damaged is refused, never used.  Kinds:
  MSG   a message of the STREAM channel (Hello, Round, Done, Prepared, Commit, Committed, Abort)
  PAGES arg = offset in the guest's RAM memfd, payload = whole pages of RAM there
  STATE the MachineState (proto/snapshot.py's), encoded as in a snapshot

The target's receiver (`Receiver`) trusts nothing: the Hello must carry the
token its supervisor handed out, every page range must lie inside RAM, the
state is decoded and checked, and Done's totals must match what arrived.
The commit is two-phase: the target answers Done with Prepared once the
guest exists there, held; the source answers Commit (after which it never
runs the guest again); the target runs it and answers Committed.  Either
side ends the migration before Commit with Abort (or by closing the
stream): the target then discards everything.
"""
import mmap
import os
import socket
import struct
import zlib

from pyhv.proto import codec
from pyhv.proto.errors import PeerFailed, ProtocolError
from pyhv.proto.guest import GuestConfig
from pyhv.proto.messages import Channel, Message
from pyhv.proto.snapshot import MAX_STATE_BYTES, SNAPSHOT, MachineState

MAGIC = b"pyhv-migration\0\0"
VERSION = (1, 0)                   # a receiver takes any minor version of its major
PREAMBLE = struct.Struct("<16sHH")
HEADER = struct.Struct("<BxxxIQ")  # kind, payload length, arg: what the crc32 covers with the payload
CRC = struct.Struct("<I")
RECORD_BYTES = HEADER.size + CRC.size
MSG, PAGES, STATE = 1, 2, 3
PAGE = 4096
MAX_PAGES_BYTES = 1 << 20          # per PAGES record
MAX_MSG_BYTES = 64 << 10
STREAM_TIMEOUT = 60.0              # seconds of silence after which a side gives up

STREAM = Channel("migration")      # what travels in MSG records
RECEIVER = Channel("receiver")     # a target supervisor and its receiver process (supervisor/receiver.py)


class MigrationError(PeerFailed):
    """The stream broke, timed out or carried something wrong; the migration is off."""


@STREAM
class Hello(Message):
    """Source -> target, first: which guest comes, and the token the target's supervisor handed out for it."""
    token: str
    name: str
    mem_bytes: int
    vcpus: int


@STREAM
class Round(Message):
    """Source -> target: the end of a pre-copy pass over RAM (`number` from 1) and the bytes it sent."""
    number: int
    bytes: int


@STREAM
class Done(Message):
    """Source -> target: everything is sent (pages, then the state); the totals to check."""
    rounds: int
    bytes: int
    records: int                   # PAGES records


@STREAM
class Prepared(Message):
    """Target -> source: the guest exists here, held; it runs only after Commit."""


@STREAM
class Commit(Message):
    """Source -> target: the source has let the guest go for good; run it."""


@STREAM
class Committed(Message):
    """Target -> source: the guest runs (or stays paused) under the target."""


@STREAM
class Abort(Message):
    """Either way, before Commit: the migration is off (the target discards what it got)."""
    reason: str


@RECEIVER
class Expect(Message):
    """Target supervisor -> its receiver process: the guest to take, the token to check, where its state goes."""
    token: str
    config: GuestConfig
    state_dir: str


@RECEIVER
class Received(Message):
    """Receiver -> its supervisor: RAM is in the memfd and the state in `state_dir`: prepare the guest."""
    rounds: int
    bytes: int


for _shared in (Prepared, Commit, Committed, Abort):
    RECEIVER(_shared)


def check_version(preamble):
    """The (major, minor) of a stream's preamble; MigrationError unless it is ours with our major version."""
    magic, major, minor = PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise MigrationError("the peer does not speak the pyhv migration stream")
    if major != VERSION[0]:
        raise MigrationError(f"migration stream version {major}.{minor}; this pyhv takes {VERSION[0]}.x")
    return major, minor


def connect(address, timeout=STREAM_TIMEOUT):
    """A Stream to `address`: "unix:PATH" (the only kind a target hands out today)."""
    kind, _, where = address.partition(":")
    if kind != "unix" or not where:
        raise MigrationError(f"cannot reach migration address {address!r} (only unix:PATH is served)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(where)
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot connect to the target's receiver at {where}: {e.strerror or e}") from None
    return Stream(sock)


class Stream:
    """One end of a migration stream: records out and in, each checked; any failure is a MigrationError."""

    def __init__(self, sock):
        self.sock = sock
        self.send_failed = False        # then peer_reason() may find why
        self._buf = bytearray(MAX_PAGES_BYTES)

    def close(self):
        self.sock.close()

    def settimeout(self, seconds):
        self.sock.settimeout(seconds)

    # -- out -------------------------------------------------------------------------------------------------------
    def _sendall(self, data):
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise MigrationError(f"the peer took nothing for {self.sock.gettimeout():g} s") from None
        except OSError as e:
            self.send_failed = True
            raise MigrationError(f"the stream broke ({e.strerror or e})") from None

    def send_preamble(self):
        self._sendall(PREAMBLE.pack(MAGIC, *VERSION))

    def send(self, kind, payload=b"", arg=0):
        head = HEADER.pack(kind, len(payload), arg)
        self._sendall(head + CRC.pack(zlib.crc32(payload, zlib.crc32(head))))
        if payload:
            self._sendall(payload)

    def send_msg(self, msg):
        self.send(MSG, codec.encode(msg, STREAM))

    def send_ranges(self, fd, ranges):
        """PAGES records of `ranges` [(offset, length)] of fd `fd` (page-aligned); (bytes, records) sent.

        Each record's pages are copied out first, so its checksum is of what is sent even while a vCPU
        writes the page (that write is in the dirty log: the page goes again)."""
        total = records = 0
        buf = memoryview(self._buf)
        for offset, length in ranges:
            for pos in range(offset, offset + length, MAX_PAGES_BYTES):
                n = min(MAX_PAGES_BYTES, offset + length - pos)
                if os.preadv(fd, [buf[:n]], pos) != n:
                    raise MigrationError(f"short read of guest RAM at offset {pos}")
                self.send(PAGES, buf[:n], pos)
                total += n
                records += 1
        return total, records

    # -- in --------------------------------------------------------------------------------------------------------
    def _recv_into(self, view):
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise MigrationError(f"nothing arrived for {self.sock.gettimeout():g} s") from None
            except OSError as e:
                raise MigrationError(f"the stream broke ({e.strerror or e})") from None
            if n == 0:
                raise MigrationError("the peer closed the stream")
            got += n

    def recv_exact(self, n):
        data = bytearray(n)
        self._recv_into(memoryview(data))
        return bytes(data)

    def recv_header(self):
        """(kind, payload length, arg, crc) of the next record."""
        raw = self.recv_exact(RECORD_BYTES)
        kind, length, arg = HEADER.unpack_from(raw)
        return kind, length, arg, (raw[:HEADER.size], CRC.unpack_from(raw, HEADER.size)[0])

    def recv_payload_into(self, view, check):
        """The payload into `view` (its whole length), checked against the header's crc32."""
        self._recv_into(view)
        head, crc = check
        if zlib.crc32(view, zlib.crc32(head)) != crc:
            raise MigrationError("a record arrived damaged (checksum mismatch)")

    def recv_payload(self, length, check, limit):
        if length > limit:
            raise MigrationError(f"a record of {length} bytes is over the {limit}-byte limit")
        data = bytearray(length)
        self.recv_payload_into(memoryview(data), check)
        return bytes(data)

    def recv_msg(self, expect=None):
        """The next record, which must be a message (of type `expect`, if given; an Abort raises)."""
        kind, length, arg, check = self.recv_header()
        if kind != MSG:
            raise MigrationError(f"expected a message, got a record of kind {kind}")
        msg = _decode(self.recv_payload(length, check, MAX_MSG_BYTES))
        if isinstance(msg, Abort) and expect is not Abort:
            raise MigrationError(f"the peer gave up: {msg.reason}")
        if expect is not None and not isinstance(msg, expect):
            raise MigrationError(f"expected {expect.TYPE}, got {msg.TYPE}")
        return msg

    def peer_reason(self):
        """After a failed send: the Abort the peer may have left on the stream before closing, as text, or ""."""
        try:
            self.sock.settimeout(0.5)
            msg = self.recv_msg(Abort)
            return msg.reason if isinstance(msg, Abort) else ""
        except (MigrationError, OSError):
            return ""


class Receiver:
    """The target's side of one stream: pages into the guest's RAM memfd, then the state, all checked."""

    def __init__(self, stream, mem_fd, expect):
        self.stream = stream
        self.expect = expect
        self.mem_fd = mem_fd
        self.rounds = self.bytes = self.records = 0

    def hello(self):
        """The preamble and Hello: the guest and token this receiver was told to expect, or MigrationError."""
        check_version(self.stream.recv_exact(PREAMBLE.size))
        hello = self.stream.recv_msg(Hello)
        if hello.token != self.expect.token:
            raise MigrationError("the source did not present this migration's token")
        c = self.expect.config
        if (hello.name, hello.mem_bytes, hello.vcpus) != (c.name, c.mem_bytes, c.vcpus):
            raise MigrationError(f"the stream is for guest {hello.name} ({hello.mem_bytes} bytes, {hello.vcpus} "
                                 f"vCPUs), not the {c.name} this receiver was set up for")
        return hello

    def receive(self):
        """Every record up to Done; the guest's MachineState (decoded and checked)."""
        size = self.expect.config.mem_bytes
        state = None
        with mmap.mmap(self.mem_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as ram:
            view = memoryview(ram)
            try:
                while True:
                    kind, length, arg, check = self.stream.recv_header()
                    if kind == PAGES:
                        if state is not None:
                            raise MigrationError("pages after the state")
                        if arg % PAGE or length % PAGE or not 0 < length <= MAX_PAGES_BYTES or arg + length > size:
                            raise MigrationError(f"pages at 0x{arg:x}+0x{length:x} are not whole pages of the "
                                                 f"guest's {size >> 20} MiB")
                        with view[arg:arg + length] as part:
                            self.stream.recv_payload_into(part, check)
                        self.bytes += length
                        self.records += 1
                    elif kind == STATE:
                        if state is not None:
                            raise MigrationError("a second state")
                        state = self._state(self.stream.recv_payload(length, check, MAX_STATE_BYTES))
                    elif kind == MSG:
                        msg = _decode(self.stream.recv_payload(length, check, MAX_MSG_BYTES))
                        if isinstance(msg, Round):
                            self.rounds = msg.number
                        elif isinstance(msg, Done):
                            self._done(msg, state)
                            return state
                        elif isinstance(msg, Abort):
                            raise MigrationError(f"the source gave up: {msg.reason}")
                        else:
                            raise MigrationError(f"unexpected {msg.TYPE} while receiving")
                    else:
                        raise MigrationError(f"unknown record kind {kind}")
            finally:
                view.release()

    def _state(self, data):
        try:
            state = codec.decode(data, SNAPSHOT, expect=MachineState, max_bytes=MAX_STATE_BYTES)
        except ProtocolError as e:
            raise MigrationError(f"the guest's state is malformed: {e}") from None
        if len(state.vcpus) != self.expect.config.vcpus:
            raise MigrationError(f"{len(state.vcpus)} vCPU states for {self.expect.config.vcpus} vCPUs")
        return state

    def _done(self, done, state):
        if state is None:
            raise MigrationError("the source finished without sending the guest's state")
        if (done.bytes, done.records) != (self.bytes, self.records):
            raise MigrationError(f"the source sent {done.bytes} bytes in {done.records} records, "
                                 f"{self.bytes} in {self.records} arrived")
        self.rounds = done.rounds


def _decode(data):
    try:
        return codec.decode(data, STREAM)
    except ProtocolError as e:
        raise MigrationError(f"bad message on the stream: {e}") from None
