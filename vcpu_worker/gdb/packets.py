"""The GDB remote serial protocol's framing: packets, checksums, escapes, run-length encoding, acks, Ctrl-C.

Pure byte handling, no sockets, so every rule is unit-tested without /dev/kvm.
A packet is `$data#cc`: `cc` the two-hex-digit sum of `data`'s bytes modulo
256; in `data` the bytes `#`, `$`, `}` and `*` travel as `}` followed by the
byte XOR 0x20, and a stub may shorten a run of one character to the
character, `*` and a count byte (count + 29).  Outside a packet, `+` and `-`
acknowledge (good checksum / please resend) and a bare 0x03 is an interrupt.
The client is another user's program: anything malformed becomes an event
the session answers (a `-`, or nothing), never an exception, and no packet
may grow without bound.
"""

ESCAPE = 0x7D          # '}'
ESCAPED = frozenset(b"#$}*")
INTERRUPT = 0x03
MAX_PACKET = 0x4000 * 2 + 64   # a packet's bytes between '$' and '#' as sent, escapes included (PacketSize 0x4000)
RLE_MIN = 4                    # runs shorter than this are cheaper written out
RLE_MAX = 97                   # count byte 29 + n must stay <= 126


def checksum(data):
    return sum(data) & 0xFF


def escape(data):
    """`data` with the protocol's four special bytes escaped (for binary payloads)."""
    if not any(b in ESCAPED for b in data):
        return bytes(data)
    out = bytearray()
    for b in data:
        if b in ESCAPED:
            out += bytes((ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data):
    """Undo `escape`; a trailing lone '}' is an error (ValueError)."""
    if ESCAPE not in data:
        return bytes(data)
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == ESCAPE:
            try:
                out.append(next(it) ^ 0x20)
            except StopIteration:
                raise ValueError("packet ends inside an escape") from None
        else:
            out.append(b)
    return bytes(out)


def rle_encode(data):
    """Run-length encode `data` (already escaped) as a stub may: `c*n`, where n+29 is never '#', '$', '+' or '-'."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        j = i + 1
        while j < n and data[j] == b and j - i <= RLE_MAX:
            j += 1
        run = j - i
        if b in ESCAPED or data[i - 1:i] == b"}" or run < RLE_MIN:
            out.append(b)          # never repeat an escape's second byte or a special byte
            i += 1
            continue
        repeat = run - 1
        while chr(repeat + 29) in "#$+-":
            repeat -= 1        # 6 and 7 ('#', '$') and 14, 16 ('+', '-') are not allowed as counts
        out += bytes((b, 0x2A, repeat + 29))
        i += repeat + 1
    return bytes(out)


def rle_decode(data):
    """Expand `x*n` runs (a client's side of `rle_encode`; tests and tools use it)."""
    if 0x2A not in data:
        return bytes(data)
    out = bytearray()
    i = 0
    while i < len(data):
        b = data[i]
        if b == 0x2A:
            if not out or i + 1 >= len(data):
                raise ValueError("run-length marker without a character or count")
            count = data[i + 1] - 29
            if count < 0:
                raise ValueError("negative run length")
            out += bytes((out[-1],)) * count
            i += 2
            continue
        out.append(b)
        i += 1
    return bytes(out)


def reply_payload(body):
    """A stub's reply as a client reads it: runs expanded, then escapes undone (GDB's order)."""
    return unescape(rle_decode(body))


def frame(payload, rle=True):
    """The bytes on the wire for a reply `payload` (bytes or str): escaped, optionally run-length encoded."""
    if isinstance(payload, str):
        payload = payload.encode("latin-1")
    body = escape(payload)
    if rle:
        body = rle_encode(body)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


class Event:
    """What the reader found: kind is "packet" (data: the unescaped payload), "bad" (a packet whose checksum or
    escaping was wrong, or that was too long: answer '-'), "ack", "nak" or "interrupt"."""
    __slots__ = ("kind", "data")

    def __init__(self, kind, data=b""):
        self.kind = kind
        self.data = data

    def __repr__(self):
        return f"Event({self.kind!r}, {self.data!r})"

    def __eq__(self, other):
        return isinstance(other, Event) and (self.kind, self.data) == (other.kind, other.data)


class Reader:
    """Splits a byte stream from the client into Events; `feed(bytes)` returns those completed so far.

    With `check` False (after QStartNoAckMode) the checksum is not verified,
    as the protocol allows; escapes still are.  With `raw` a packet's data is
    its body as sent (a client reading a stub's replies expands runs first,
    then undoes escapes: `reply_payload`).
    """

    def __init__(self, max_packet=MAX_PACKET, raw=False):
        self.max_packet = max_packet
        self.raw = raw
        self.check = True
        self._buf = bytearray()
        self._in_packet = False
        self._overflow = False
        self._sum = None            # the two checksum characters, once '#' has been seen

    def feed(self, data):
        events = []
        for b in data:
            if not self._in_packet:
                if b == 0x24:                   # '$'
                    self._in_packet, self._overflow, self._sum = True, False, None
                    self._buf.clear()
                elif b == 0x2B:
                    events.append(Event("ack"))
                elif b == 0x2D:
                    events.append(Event("nak"))
                elif b == INTERRUPT:
                    events.append(Event("interrupt"))
                continue                        # anything else between packets is line noise
            if self._sum is not None:
                self._sum.append(b)
                if len(self._sum) == 2:
                    events.append(self._finish())
                continue
            if b == 0x23:                       # '#'
                self._sum = bytearray()
            elif b == 0x24:                     # '$' inside a packet: the last one was cut short; start again
                events.append(Event("bad", b"packet interrupted by '$'"))
                self._buf.clear()
                self._overflow = False
            elif len(self._buf) < self.max_packet:
                self._buf.append(b)
            else:
                self._overflow = True           # keep reading to the '#', keep nothing
        return events

    def _finish(self):
        self._in_packet = False
        body, digits = bytes(self._buf), bytes(self._sum)
        self._buf.clear()
        self._sum = None
        if self._overflow:
            return Event("bad", b"packet too long")
        if self.check:
            try:
                want = int(digits, 16)
            except ValueError:
                return Event("bad", b"checksum is not hex")
            if want != checksum(body):
                return Event("bad", b"checksum mismatch")
        if self.raw:
            return Event("packet", body)
        try:
            return Event("packet", unescape(body))
        except ValueError as e:
            return Event("bad", str(e).encode())


# -- payload helpers ---------------------------------------------------------------------------------------

def hex_bytes(text):
    """Bytes from an even-length hex string (bytes or str); ValueError otherwise."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("latin-1")
    if len(text) % 2:
        raise ValueError("odd number of hex digits")
    return bytes.fromhex(text)


def parse_hex(text, limit=1 << 64):
    """A non-negative hex number (bytes or str) below `limit`; ValueError otherwise (no sign, no 0x, no spaces)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("latin-1")
    if not text or len(text) > 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"not a hex number: {text[:20]!r}")
    value = int(text, 16)
    if value >= limit:
        raise ValueError(f"0x{value:x} is out of range")
    return value


def parse_thread(text):
    """A thread-id: -1 (all), 0 (any) or a positive id; ValueError otherwise (multiprocess 'p' ids are not used)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("latin-1")
    if text == "-1":
        return -1
    return parse_hex(text, 1 << 31)
