"""The exit-trace file format (`--trace FILE`): its header, chunks and end record, read, checked and summarised.

docs/trace-format.md is the reference.  The worker's C run loop
(vcpu_worker/csrc/hv_kvm.c, hv_trace_*) writes the chunks;
vcpu_worker/trace.py writes the header and the end record through
`encode_header` / `encode_end`.  This module needs nothing but the standard
library (no cffi, no KVM), so `hvctl trace` reads a trace anywhere and
starts fast.

Reading never trusts the file: every chunk's magic, vCPU, size, sequence
number and CRC is checked, the end record's per-vCPU counts must match the
records found, and anything wrong is a TraceError (exit 2) whose one line
says where.  With `partial=True` a file without its end record (the guest
still running, or its writer killed) is read up to its last whole chunk.
"""
import json
import struct
import sys
import zlib
from array import array
from collections import Counter
from itertools import compress
from operator import and_, sub

from pyhv.proto.errors import UserError

MAGIC = b"PYHVTRC\0"
END_MAGIC = b"PYHVEND\0"
CHUNK_MAGIC = b"HVTC"                 # struct hv_trace_chunk's magic 0x43545648, little-endian
VERSION = 1
HEADER = struct.Struct("<8sHHII")     # magic, version, record bytes, meta length, meta CRC-32
CHUNK = struct.Struct("<4sHHIIQ")     # magic, vCPU, flags, records, records' CRC-32, sequence number
END = struct.Struct("<8sII")          # magic, JSON length, JSON CRC-32
RECORD = struct.Struct("<QQIIHHBBH")  # t_ns, addr, guest_ns, data, reason, vcpu, flags, size, count
RECORD_BYTES = RECORD.size            # 32: struct hv_trace_rec
FIELDS = ("t_ns", "addr", "guest_ns", "data", "reason", "vcpu", "flags", "size", "count")
FLAG_WRITE, FLAG_IN_C = 1, 2          # HV_TRACE_WRITE, HV_TRACE_IN_C
CHUNK_LAST = 1                        # HV_TRACE_CHUNK_LAST
GUEST_NS_SATURATED = 0xFFFFFFFF
MAX_META_BYTES = 1 << 20
MAX_CHUNK_RECORDS = 1 << 20
MAX_VCPUS = 0xFFFF
TOP = 10                              # ports/addresses in the human table


class TraceError(UserError):
    """A trace file that cannot be read: missing, truncated, corrupt or of another version (exit 2)."""


# --- writing (the header and the end record; the C loop writes the chunks) ----------------

def encode_header(meta):
    """The file's header for `meta` (a JSON-able dict with at least the keys `check_meta` wants)."""
    check_meta(meta)
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, RECORD_BYTES, len(blob), zlib.crc32(blob)) + blob


def encode_chunk(vcpu, seq, records, last=False):
    """One chunk as the C writer lays it out (`records`: bytes of whole records); for tests and tools."""
    return CHUNK.pack(CHUNK_MAGIC, vcpu, CHUNK_LAST if last else 0, len(records) // RECORD_BYTES,
                      zlib.crc32(records), seq) + records


def encode_end(end):
    blob = json.dumps(end, sort_keys=True, separators=(",", ":")).encode()
    return END.pack(END_MAGIC, len(blob), zlib.crc32(blob)) + blob


def check_meta(meta):
    """TraceError unless the header's metadata has what a reader needs, of the right types."""
    want = {"vcpus": int, "chunk_records": int, "start_ns": int, "start_unix_ns": int, "tsc_khz": int,
            "clock": str, "reasons": dict}
    for key, kind in want.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise TraceError(f"header field {key!r} is missing or not a {kind.__name__}")
    if not 1 <= meta["vcpus"] <= MAX_VCPUS or not 1 <= meta["chunk_records"] <= MAX_CHUNK_RECORDS:
        raise TraceError(f"header claims {meta['vcpus']} vCPUs and chunks of {meta['chunk_records']} records")
    if not all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in meta["reasons"].items()):
        raise TraceError("header field 'reasons' is not a map of exit codes to names")


# --- reading ---------------------------------------------------------------------------

class Trace:
    """A whole trace file, checked: `meta`, `end` (None if partial), and each vCPU's records as one bytes object."""

    def __init__(self, meta, records, end, partial=False, problem=None):
        self.meta = meta
        self.records = records            # [bytes] per vCPU, in time order (chunks in sequence)
        self.end = end
        self.partial = partial
        self.problem = problem            # why a partial read stopped where it did

    @property
    def vcpus(self):
        return self.meta["vcpus"]

    def reason_name(self, code):
        return self.meta["reasons"].get(str(code), f"reason {code}")

    def columns(self, vcpu, *names):
        """Arrays of the named fields of `vcpu`'s records (host byte order), one per name."""
        return [_column(self.records[vcpu], name) for name in names]

    def iter_records(self, vcpu=None):
        """Each record as a tuple in FIELDS order (slow: for tools and tests, not the summary)."""
        for v in range(self.vcpus) if vcpu is None else (vcpu,):
            yield from RECORD.iter_unpack(self.records[v])


_TYPECODES = {8: "Q", 4: "I", 2: "H", 1: "B"}
_OFFSETS = {"t_ns": (0, 8), "addr": (8, 8), "guest_ns": (16, 4), "data": (20, 4), "reason": (24, 2),
            "vcpu": (26, 2), "flags": (28, 1), "size": (29, 1), "count": (30, 2)}
for _code, _size in (("Q", 8), ("I", 4), ("H", 2)):
    if array(_code).itemsize != _size:                  # pragma: no cover (every CPython platform has these)
        raise ImportError(f"array type {_code} is not {_size} bytes here")


def _column(data, name):
    offset, size = _OFFSETS[name]
    whole = array(_TYPECODES[size])
    whole.frombytes(data)
    if size > 1 and sys.byteorder != "little":
        whole.byteswap()
    per = RECORD_BYTES // size
    return whole[offset // size::per]


def read(path, partial=False):
    """The Trace in file `path`; TraceError (one line, exit 2) if it is not a complete, intact trace."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    try:
        return parse(data, partial)
    except TraceError as e:
        raise TraceError(f"trace {path}: {e}") from None


def parse(data, partial=False):
    mv = memoryview(data)
    if data[:8] != MAGIC:
        raise TraceError("truncated in its header" if MAGIC.startswith(bytes(data[:8])) else
                         "not a pyhv trace file (bad magic)")
    if len(data) < HEADER.size:
        raise TraceError("truncated in its header")
    magic, version, record_bytes, meta_len, meta_crc = HEADER.unpack_from(data)
    if version != VERSION:
        raise TraceError(f"format version {version}; this pyhv reads version {VERSION}")
    if record_bytes != RECORD_BYTES:
        raise TraceError(f"records of {record_bytes} bytes; version {VERSION} has {RECORD_BYTES}")
    if meta_len > MAX_META_BYTES:
        raise TraceError(f"header of {meta_len} bytes is implausible (corrupt)")
    pos = HEADER.size + meta_len
    if len(data) < pos:
        raise TraceError("truncated in its header")
    blob = bytes(mv[HEADER.size:pos])
    if zlib.crc32(blob) != meta_crc:
        raise TraceError("header checksum mismatch (corrupt)")
    try:
        meta = json.loads(blob)
    except ValueError:
        raise TraceError("header is not valid JSON (corrupt)") from None
    if not isinstance(meta, dict):
        raise TraceError("header is not a JSON object (corrupt)")
    check_meta(meta)
    nv, cap = meta["vcpus"], meta["chunk_records"]
    parts = [[] for _ in range(nv)]
    next_seq = [0] * nv
    last = [False] * nv
    gaps = [0] * nv                       # chunks missing in sequence (the writer counts them as dropped)
    end = None
    problem = None
    while pos < len(data):
        if bytes(mv[pos:pos + 4]) == END_MAGIC[:4]:
            end, problem = _read_end(data, pos)
            break
        if len(data) - pos < CHUNK.size:
            problem = f"truncated at byte {pos} (in a chunk header)"
            break
        magic, vcpu, flags, nrec, crc, seq = CHUNK.unpack_from(data, pos)
        if magic != CHUNK_MAGIC:
            raise TraceError(f"no chunk at byte {pos} (bad magic: corrupt)")
        if vcpu >= nv or nrec > cap:
            raise TraceError(f"chunk at byte {pos} claims vCPU {vcpu} and {nrec} records (header: {nv} vCPUs, "
                             f"chunks of {cap}): corrupt")
        start, stop = pos + CHUNK.size, pos + CHUNK.size + nrec * RECORD_BYTES
        if stop > len(data):
            problem = f"truncated at byte {len(data)} (in a chunk of vCPU {vcpu} that starts at byte {pos})"
            break
        records = mv[start:stop]
        if zlib.crc32(records) != crc:
            raise TraceError(f"checksum mismatch in the chunk of vCPU {vcpu} at byte {pos} (corrupt)")
        if last[vcpu] or seq < next_seq[vcpu]:
            raise TraceError(f"chunk {seq} of vCPU {vcpu} at byte {pos} is out of sequence (corrupt)")
        gaps[vcpu] += seq - next_seq[vcpu]
        next_seq[vcpu] = seq + 1
        last[vcpu] = bool(flags & CHUNK_LAST)
        parts[vcpu].append(records)
        pos = stop
    records = [b"".join(p) for p in parts]
    if end is None:
        if not partial:
            raise TraceError((problem or "truncated: no end record") + "; the run that wrote it did not finish "
                             "(still running, or killed); --partial reads the whole chunks it has")
        return Trace(meta, records, None, partial=True, problem=problem or "no end record yet")
    _check_end(end, records, gaps, last)
    return Trace(meta, records, end)


def _read_end(data, pos):
    """(the end record, None), or (None, why) if the file ends inside it; TraceError if it is corrupt."""
    if len(data) - pos < END.size:
        return None, f"truncated at byte {len(data)} (in the end record)"
    magic, length, crc = END.unpack_from(data, pos)
    if magic != END_MAGIC:
        raise TraceError(f"no chunk or end record at byte {pos} (bad magic: corrupt)")
    blob = data[pos + END.size:pos + END.size + length]
    if len(blob) < length:
        return None, f"truncated at byte {len(data)} (in the end record)"
    if pos + END.size + length != len(data):
        raise TraceError(f"{len(data) - pos - END.size - length} stray bytes after the end record (corrupt)")
    if zlib.crc32(blob) != crc:
        raise TraceError("end record checksum mismatch (corrupt)")
    try:
        end = json.loads(blob)
    except ValueError:
        raise TraceError("end record is not valid JSON (corrupt)") from None
    if not isinstance(end, dict) or not isinstance(end.get("vcpus"), list):
        raise TraceError("end record has no per-vCPU counts (corrupt)")
    return end, None


def _check_end(end, records, gaps, last):
    if len(end["vcpus"]) != len(records):
        raise TraceError(f"end record counts {len(end['vcpus'])} vCPUs, the header {len(records)} (corrupt)")
    for i, (counts, data) in enumerate(zip(end["vcpus"], records)):
        if not isinstance(counts, dict) or not all(isinstance(counts.get(k), int)
                                                   for k in ("records", "written", "dropped")):
            raise TraceError(f"end record's counts of vCPU {i} are malformed (corrupt)")
        found = len(data) // RECORD_BYTES
        if counts["written"] != found:
            raise TraceError(f"vCPU {i}: the end record says {counts['written']} records were written, the file "
                             f"holds {found} (corrupt)")
        if gaps[i] and not counts["dropped"]:
            raise TraceError(f"vCPU {i}: {gaps[i]} chunk(s) missing (corrupt)")
        if counts.get("finished") and not last[i]:
            raise TraceError(f"vCPU {i}: its last chunk is missing (corrupt)")


# --- summarising -----------------------------------------------------------------------

def summary(trace):
    """The figures `hvctl trace` prints: a JSON-able dict (the keys interface.md promises, and more).

    Column-wise over arrays, with the per-record work in C (set, count, compress, map): ~0.3 us a record.
    """
    meta, nv = trace.meta, trace.vcpus
    IO, MMIO = _code(meta, "IO"), _code(meta, "MMIO")
    by_reason, in_c_by_reason, vmm_by_reason = Counter(), Counter(), {}
    ports, addresses = {}, {}           # port/address -> [exits, writes, in C, VMM ns samples, VMM ns sum]
    per_vcpu = {}
    first = last = None
    for v in range(nv):
        n = len(trace.records[v]) // RECORD_BYTES
        if not n:
            per_vcpu[str(v)] = {"exits": 0, "by_reason": {}, "guest_ns": 0}
            continue
        t, addr, g, reason, flags = trace.columns(v, "t_ns", "addr", "guest_ns", "reason", "flags")
        counts = _counts(reason)
        by_reason.update(counts)
        in_c = list(map(bool, map((FLAG_IN_C).__and__, flags)))
        writes = list(map(bool, map((FLAG_WRITE).__and__, flags)))
        in_c_by_reason.update(_counts(list(compress(reason, in_c))))
        # Time outside the guest after exit i: from its return to the next KVM_RUN's entry (t - guest_ns);
        # none after a vCPU's last exit, nor where the next KVM_RUN's time in the guest saturated.
        vmm = list(map(sub, map(sub, t[1:], g[1:]), t[:-1])) + [0]
        valid = list(map(GUEST_NS_SATURATED.__ne__, g[1:])) + [False]
        for r, (c, total, peak) in _group(reason, vmm, valid).items():
            acc = vmm_by_reason.setdefault(r, [0, 0, None])
            acc[0] += c
            acc[1] += total
            acc[2] = peak if acc[2] is None or (peak is not None and peak > acc[2]) else acc[2]
        for code, table in ((IO, ports), (MMIO, addresses)):
            if code is None or code not in counts:
                continue
            mask = list(map(code.__eq__, reason))
            keys = list(compress(addr, mask))
            for key, c in _counts(keys).items():
                table.setdefault(key, [0, 0, 0, 0, 0])[0] += c
            for column, values in ((1, compress(writes, mask)), (2, compress(in_c, mask))):
                for key, c in _counts(list(compress(keys, values))).items():
                    table[key][column] += c
            for key, (c, total, _) in _group(keys, list(compress(vmm, mask)), list(compress(valid, mask))).items():
                table[key][3] += c
                table[key][4] += total
        guest_ns = sum(g) - g.count(GUEST_NS_SATURATED) * GUEST_NS_SATURATED
        span = t[-1] - t[0]
        per_vcpu[str(v)] = {"exits": n, "by_reason": _named(trace, Counter(counts)), "guest_ns": guest_ns,
                            "first_ns": t[0] - meta["start_ns"], "last_ns": t[-1] - meta["start_ns"],
                            "in_guest": guest_ns / (span + g[0]) if span + g[0] > 0 else None}
        first = t[0] - g[0] if first is None else min(first, t[0] - g[0])
        last = t[-1] if last is None else max(last, t[-1])
    total = sum(by_reason.values())
    duration = (last - first) / 1e9 if total else 0.0

    def ranked(table):
        return sorted(table.items(), key=lambda kv: (-kv[1][0], kv[0]))

    def mean(c, total):
        return total / c if c else None

    out = {
        "file_version": VERSION,
        "guest": meta.get("guest"),
        "vcpus": nv,
        "partial": trace.partial,
        "total": total,
        "by_reason": _named(trace, by_reason),
        "by_vcpu": {k: v["exits"] for k, v in per_vcpu.items()},
        "by_port": {f"0x{a:x}": row[0] for a, row in ranked(ports)},
        "by_address": {f"0x{a:x}": row[0] for a, row in ranked(addresses)},
        "in_c": sum(in_c_by_reason.values()),
        "start_unix_ns": meta["start_unix_ns"] + (first - meta["start_ns"] if total else 0),
        "duration_s": duration,
        "exits_per_s": total / duration if duration > 0 else None,
        "reasons": {
            trace.reason_name(r): {"exits": c, "in_c": in_c_by_reason[r],
                                   "vmm_ns_mean": mean(*vmm_by_reason.get(r, (0, 0, None))[:2]),
                                   "vmm_ns_max": vmm_by_reason.get(r, (0, 0, None))[2]}
            for r, c in by_reason.most_common()},
        "ports": [{"port": f"0x{a:x}", "exits": c, "writes": w, "in_c": ic, "vmm_ns_mean": mean(vn, vs)}
                  for a, (c, w, ic, vn, vs) in ranked(ports)],
        "addresses": [{"address": f"0x{a:x}", "exits": c, "writes": w, "in_c": ic, "vmm_ns_mean": mean(vn, vs)}
                      for a, (c, w, ic, vn, vs) in ranked(addresses)],
        "per_vcpu": per_vcpu,
    }
    out.update(_losses(trace))
    return out


FEW = 64                                # distinct keys up to which _counts/_group make one C pass per key


def _counts(keys):
    """{key: occurrences} of a list or array."""
    distinct = set(keys)
    if len(distinct) > FEW:
        return Counter(keys)
    return {k: keys.count(k) for k in distinct}


def _group(keys, values, valid):
    """{key: (count, sum, max)} of the `values` whose `valid` is true, by the parallel `keys`."""
    distinct = set(keys)
    out = {}
    if len(distinct) <= FEW:
        for k in distinct:
            sel = list(compress(values, map(and_, map(k.__eq__, keys), valid)))
            out[k] = (len(sel), sum(sel), max(sel)) if sel else (0, 0, None)
        return out
    acc = {}
    for k, d, ok in zip(keys, values, valid):
        if ok:
            a = acc.setdefault(k, [0, 0, d])
            a[0] += 1
            a[1] += d
            if d > a[2]:
                a[2] = d
    return {k: tuple(a) for k, a in acc.items()}


def _losses(trace):
    """What the writer could not put in the file, from the end record: never silent."""
    if trace.end is None:
        return {"lost": None, "dropped": None, "unflushed": None, "self_drains": None, "write_error": None,
                "problem": trace.problem}
    vs = trace.end["vcpus"]
    dropped = sum(v["dropped"] for v in vs)
    unflushed = sum(max(0, v["records"] - v["written"] - v["dropped"]) for v in vs)
    return {"lost": dropped + unflushed, "dropped": dropped, "unflushed": unflushed,
            "self_drains": sum(v.get("self_drains", 0) for v in vs),
            "self_drain_ns": sum(v.get("self_drain_ns", 0) for v in vs),
            "write_error": trace.end.get("write_error"), "outcome": trace.end.get("outcome")}


def timeline(trace, bins=200, top=6):
    """Exits per second over time: (bin width s, {reason name: [rate per bin]}, {vCPU: [rate per bin]}).

    The `top` commonest reasons get a series each, the rest are summed as "other".
    """
    starts = [trace.columns(v, "t_ns")[0] for v in range(trace.vcpus)]
    present = [t for t in starts if len(t)]
    if not present:
        return 1.0, {}, {}
    t0, t1 = min(t[0] for t in present), max(t[-1] for t in present)
    width = max(1, (t1 - t0) // bins + 1)             # ns per bin: (t1 - t0) // width < bins
    totals = Counter()
    for v in range(trace.vcpus):
        totals.update(trace.columns(v, "reason")[0])
    keep = {r for r, _ in totals.most_common(top)}
    by_reason, by_vcpu = {}, {}
    for v, t in enumerate(starts):
        if not len(t):
            continue
        (reason,) = trace.columns(v, "reason")
        idx = [(x - t0) // width for x in t]
        per = Counter(idx)
        by_vcpu[v] = [per.get(i, 0) * 1e9 / width for i in range(bins)]
        for (r, i), c in Counter(zip(reason, idx)).items():
            series = by_reason.setdefault(trace.reason_name(r) if r in keep else "other", [0.0] * bins)
            series[i] += c * 1e9 / width
    return width / 1e9, by_reason, by_vcpu


def vmm_times(trace, limit=200_000):
    """{reason name: [ns outside the guest after each exit]} (at most `limit` values in all, evenly sampled)."""
    out = {}
    total = sum(len(r) for r in trace.records) // RECORD_BYTES
    step = max(1, total // limit)
    for v in range(trace.vcpus):
        t, g, reason = trace.columns(v, "t_ns", "guest_ns", "reason")
        vmm = map(sub, map(sub, t[1:], g[1:]), t[:-1])
        for i, (r, d, gg) in enumerate(zip(reason, vmm, g[1:])):
            if i % step == 0 and gg != GUEST_NS_SATURATED:
                out.setdefault(trace.reason_name(r), []).append(d)
    return out


def _code(meta, name):
    for k, v in meta["reasons"].items():
        if v == name:
            return int(k)
    return None


def _named(trace, counts):
    return {trace.reason_name(r): c for r, c in counts.most_common()}
