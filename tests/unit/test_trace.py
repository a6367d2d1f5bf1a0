"""Exit traces without KVM: the C recorder's layout and rings (driven by hv_trace_fill), the reader, the summary, hvctl trace.

The C side is the real one (vcpu_worker/_kvm): records go through the same
producer, drainer and file writer as a guest's exits, from one Python
thread per fake vCPU (cffi releases the GIL, so they run concurrently).
"""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import zlib

import pytest

from hv import HVCTL
from pyhv.proto import trace as fmt
from pyhv.proto.errors import UserError
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.trace import Tracer, reason_names

IO, MMIO, HLT = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_HLT


class FakeVcpu:
    """What a Tracer needs of a vCPU: its index and its struct hv_vcpu."""

    def __init__(self, index):
        self.index = index
        self.state = ffi.new("struct hv_vcpu *")


def fill(vcpu, n, reason=IO, addr=0x80, flags=lib.HV_TRACE_WRITE | lib.HV_TRACE_IN_C, t0=1000):
    rec = ffi.new("struct hv_trace_rec *", {"t_ns": t0, "addr": addr, "guest_ns": 10, "reason": reason,
                                             "flags": flags, "size": 1, "count": 1})
    lib.hv_trace_fill(vcpu.state.trace, rec, n)


def tracer(path, nvcpus, **kw):
    vcpus = [FakeVcpu(i) for i in range(nvcpus)]
    return Tracer(str(path), vcpus, {"guest": "unit", "tsc_khz": 0}, log=kw.pop("log", lambda line: None), **kw), vcpus


# --- the C structs are the documented format ---------------------------------------------

def test_c_record_and_chunk_layouts_are_the_file_format():
    assert ffi.sizeof("struct hv_trace_rec") == fmt.RECORD_BYTES == 32
    offsets = {name: ffi.offsetof("struct hv_trace_rec", name) for name in fmt.FIELDS}
    assert offsets == {name: off for name, (off, _) in fmt._OFFSETS.items()}
    assert [ffi.sizeof(ffi.typeof("struct hv_trace_rec").fields[i][1].type) for i in range(len(fmt.FIELDS))] == \
        [size for _, size in fmt._OFFSETS.values()]
    assert ffi.sizeof("struct hv_trace_chunk") == fmt.CHUNK.size
    assert [ffi.offsetof("struct hv_trace_chunk", f) for f in ("magic", "vcpu", "flags", "nrec", "crc", "seq")] == \
        [0, 4, 6, 8, 12, 16]
    assert lib.HV_TRACE_CHUNK_MAGIC.to_bytes(4, "little") == fmt.CHUNK_MAGIC
    assert (lib.HV_TRACE_WRITE, lib.HV_TRACE_IN_C, lib.HV_TRACE_CHUNK_LAST) == \
        (fmt.FLAG_WRITE, fmt.FLAG_IN_C, fmt.CHUNK_LAST)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 1000, 4096 * 32 + 5])
def test_c_crc32_is_zlibs(n):
    data = os.urandom(n)
    assert lib.hv_crc32(0, data, n) == zlib.crc32(data)


def test_every_exit_reason_has_a_name():
    names = reason_names()
    assert names[IO] == "IO" and names[MMIO] == "MMIO" and names[lib.KVM_EXIT_INTR] == "INTR"
    assert names[lib.HV_EXIT_ERRNO] == "KVM_RUN_ERROR"


# --- the rings, the drainer and the file: nothing lost -------------------------------------

def _check_complete(path, counts, t0=1000):
    trace = fmt.read(path)
    for v, n in enumerate(counts):
        recs = list(trace.iter_records(v))
        assert len(recs) == n
        assert [r[0] for r in recs] == list(range(t0, t0 + n))       # every record, in order, once
        assert all(r[5] == v for r in recs)
    s = fmt.summary(trace)
    assert s["total"] == sum(counts) and s["lost"] == 0
    assert s["by_vcpu"] == {str(v): n for v, n in enumerate(counts)}
    return trace, s


def test_64_vcpus_filling_concurrently_lose_nothing(tmp_path):
    path = tmp_path / "t.trace"
    t, vcpus = tracer(path, 64, chunk_records=256, ring_chunks=2)
    t.start()
    counts = [5000 + 37 * i for i in range(64)]
    threads = [threading.Thread(target=fill, args=(v, n)) for v, n in zip(vcpus, counts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    end = t.close({v.index for v in vcpus})
    assert all(v.state.trace == ffi.NULL for v in vcpus)
    assert [r["records"] for r in end["vcpus"]] == counts
    assert all(r["written"] == r["records"] and r["dropped"] == 0 and r["finished"] for r in end["vcpus"])
    trace, s = _check_complete(path, counts)
    assert s["by_port"] == {"0x80": sum(counts)} and s["in_c"] == sum(counts)


def test_a_vcpu_whose_drainer_never_runs_writes_its_own_chunks(tmp_path):
    path = tmp_path / "t.trace"
    t, (v,) = tracer(path, 1, chunk_records=100, ring_chunks=3)      # no start(): no drainer
    fill(v, 100 * 10 + 42)
    counters = t.counters()[0]
    assert counters["records"] == 1042 and counters["self_drains"] > 0
    assert counters["written"] + counters["pending"] == 1042
    t.close({0})
    _, s = _check_complete(path, [1042])
    assert s["self_drains"] > 0


def test_records_of_a_vcpu_that_never_stopped_are_counted_not_silently_lost(tmp_path):
    path = tmp_path / "t.trace"
    t, (a, b) = tracer(path, 2, chunk_records=100, ring_chunks=4)
    t.start()
    fill(a, 250)
    fill(b, 250)
    end = t.close({0})                                                  # vCPU 1's thread "is still running"
    assert b.state.trace != ffi.NULL                                    # its ring stays allocated
    fill(b, 1000)                                                       # ... and may go on: nothing reaches the file
    assert end["vcpus"][1]["pending"] == 50 and not end["vcpus"][1]["finished"]
    trace = fmt.read(path)
    s = fmt.summary(trace)
    assert s["by_vcpu"] == {"0": 250, "1": 200} and s["unflushed"] == 50 and s["lost"] == 50


def test_a_failing_write_counts_its_records_as_dropped(tmp_path):
    path = tmp_path / "t.trace"
    lines = []
    t, (v,) = tracer(path, 1, chunk_records=100, ring_chunks=2, log=lines.append)
    header = os.path.getsize(path)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (header + 2 * (fmt.CHUNK.size + 100 * 32), old_limit[1]))
    try:
        t.start()
        fill(v, 1000)
        end = t.close({0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    counts = end["vcpus"][0]
    assert counts["records"] == 1000 and counts["written"] == 200 and counts["dropped"] == 800
    assert end["write_error"] == os.strerror(errno.EFBIG)
    assert any("failed" in line for line in lines) and any("800" in line for line in lines)
    with pytest.raises(fmt.TraceError, match="no end record"):      # the end record did not fit either
        fmt.read(path)
    assert fmt.summary(fmt.read(path, partial=True))["total"] == 200


def test_two_guests_cannot_write_one_trace_file(tmp_path):
    path = tmp_path / "t.trace"
    t, (v,) = tracer(path, 1)
    fill(v, 10)
    with pytest.raises(UserError, match="being written by another guest"):
        tracer(path, 1)
    t.close({0})
    assert fmt.summary(fmt.read(path))["total"] == 10          # the refused one changed nothing
    t2, _ = tracer(path, 1)                                     # free again once the first closed it
    t2.close({0})
    assert fmt.summary(fmt.read(path))["total"] == 0
    a, (va,) = tracer(os.devnull, 1)                            # a device is not locked (nor truncated)
    b, _ = tracer(os.devnull, 1)
    fill(va, 5000)
    assert a.close({0})["vcpus"][0]["written"] == 5000 and b.close({0})["vcpus"][0]["written"] == 0


# --- the reader: every kind of damage is one line -------------------------------------------

META = {"vcpus": 2, "chunk_records": 4, "start_ns": 1_000_000, "start_unix_ns": 1_700_000_000_000_000_000,
        "tsc_khz": 2_000_000, "clock": "CLOCK_MONOTONIC", "guest": "crafted",
        "reasons": {str(IO): "IO", str(MMIO): "MMIO", str(HLT): "HLT"}}


def rec(t, reason, addr=0, guest_ns=100, flags=0, vcpu=0, size=1, data=0):
    return fmt.RECORD.pack(t, addr, guest_ns, data, reason, vcpu, flags, size, 1)


def crafted(chunks=None, end=None, meta=META):
    """A small, valid trace: vCPU 0 does 5 exits, vCPU 1 does 1; each exit's timing is known."""
    W, C = fmt.FLAG_WRITE, fmt.FLAG_IN_C
    # The VMM's time after each exit is the next exit's time minus its guest_ns minus this one's:
    v0 = [rec(1_000_100, IO, 0x80, flags=W | C),            # 100 ns
          rec(1_000_300, IO, 0x80, flags=W | C),            # 600 ns
          rec(1_001_000, IO, 0x3F8, flags=W),               # 2000 ns
          rec(1_003_100, MMIO, 0xFEBFF001, flags=W),        # 900 ns
          rec(1_004_100, MMIO, 0xD0000000, size=4)]         # the last: none
    v1 = [rec(1_002_000, HLT, vcpu=1)]
    if chunks is None:
        chunks = [fmt.encode_chunk(0, 0, b"".join(v0[:4])), fmt.encode_chunk(1, 0, b"".join(v1), last=True),
                  fmt.encode_chunk(0, 1, b"".join(v0[4:]), last=True)]
    if end is None:
        end = {"vcpus": [{"records": 5, "written": 5, "dropped": 0, "finished": True},
                         {"records": 1, "written": 1, "dropped": 0, "finished": True}]}
    return fmt.encode_header(meta) + b"".join(chunks) + fmt.encode_end(end)


def test_the_summary_of_a_crafted_trace_is_exact():
    s = fmt.summary(fmt.parse(crafted()))
    assert s["total"] == 6
    assert s["by_reason"] == {"IO": 3, "MMIO": 2, "HLT": 1}
    assert s["by_vcpu"] == {"0": 5, "1": 1}
    assert s["by_port"] == {"0x80": 2, "0x3f8": 1}
    assert s["by_address"] == {"0xfebff001": 1, "0xd0000000": 1}
    assert s["in_c"] == 2 and s["lost"] == 0 and not s["partial"]
    assert s["reasons"]["IO"]["vmm_ns_mean"] == (100 + 600 + 2000) / 3
    assert s["reasons"]["MMIO"]["vmm_ns_mean"] == 900 and s["reasons"]["MMIO"]["vmm_ns_max"] == 900
    assert s["reasons"]["HLT"]["vmm_ns_mean"] is None                  # a vCPU's last exit has no "after"
    ports = {p["port"]: p for p in s["ports"]}
    assert ports["0x80"] == {"port": "0x80", "exits": 2, "writes": 2, "in_c": 2, "vmm_ns_mean": 350}
    assert ports["0x3f8"]["vmm_ns_mean"] == 2000 and ports["0x3f8"]["in_c"] == 0
    addrs = {a["address"]: a for a in s["addresses"]}
    assert addrs["0xd0000000"]["writes"] == 0 and addrs["0xfebff001"]["writes"] == 1
    assert addrs["0xfebff001"]["vmm_ns_mean"] == 900 and addrs["0xd0000000"]["vmm_ns_mean"] is None
    assert s["duration_s"] == pytest.approx((1_004_100 - (1_000_100 - 100)) / 1e9)
    assert s["per_vcpu"]["0"]["guest_ns"] == 500
    json.dumps(s)


def test_the_timeline_adds_up_to_every_exit():
    trace = fmt.parse(crafted())
    width, by_reason, by_vcpu = fmt.timeline(trace, bins=7)
    assert sum(x * width for series in by_reason.values() for x in series) == pytest.approx(6)
    assert {v: sum(series) * width for v, series in by_vcpu.items()} == pytest.approx({0: 5, 1: 1})
    _, by_reason, _ = fmt.timeline(trace, bins=7, top=1)
    assert set(by_reason) == {"IO", "other"}


@pytest.mark.parametrize("cut", [0, 5, 19, 40, 200, -100, -3])
def test_a_truncated_trace_is_refused_in_one_line(cut):
    data = crafted()
    cut = cut if cut >= 0 else len(data) + cut
    with pytest.raises(fmt.TraceError, match="truncated|bad magic") as e:
        fmt.parse(data[:cut])
    assert "\n" not in str(e.value)


def test_a_partial_read_takes_the_whole_chunks_before_the_cut():
    data = crafted()
    head = len(fmt.encode_header(META))
    first_chunk = fmt.CHUNK.size + 4 * 32
    trace = fmt.parse(data[:head + first_chunk + 10], partial=True)
    assert trace.partial and fmt.summary(trace)["total"] == 4 and fmt.summary(trace)["lost"] is None


@pytest.mark.parametrize("where, why", [(30, "header checksum"), (-60, "end record checksum"),
                                        ("record", "checksum mismatch in the chunk of vCPU 0"),
                                        ("magic", "bad magic"), ("version", "format version 9")])
def test_a_corrupt_trace_is_refused_saying_where(where, why):
    data = bytearray(crafted())
    head = len(fmt.encode_header(META))
    if where == "record":
        data[head + fmt.CHUNK.size + 40] ^= 1
    elif where == "magic":
        data[0] ^= 0xFF
    elif where == "version":
        data[8] = 9
    else:
        data[where] ^= 0x20
    with pytest.raises(fmt.TraceError, match=why):
        fmt.parse(bytes(data))


def test_inconsistent_chunks_and_end_records_are_refused():
    good = crafted()
    with pytest.raises(fmt.TraceError, match="stray bytes"):
        fmt.parse(good + b"x")
    c = [fmt.encode_chunk(0, 0, rec(1_000_100, IO, 0x80) * 4), fmt.encode_chunk(0, 0, rec(1_000_200, IO) * 1)]
    with pytest.raises(fmt.TraceError, match="out of sequence"):
        fmt.parse(crafted(chunks=c))
    c = [fmt.encode_chunk(0, 1, rec(1_000_100, IO, 0x80))]          # chunk 0 missing, nothing dropped
    end = {"vcpus": [{"records": 1, "written": 1, "dropped": 0}, {"records": 0, "written": 0, "dropped": 0}]}
    with pytest.raises(fmt.TraceError, match="missing"):
        fmt.parse(crafted(chunks=c, end=end))
    end["vcpus"][0] = {"records": 5, "written": 1, "dropped": 4}      # ... unless the writer says it dropped it
    s = fmt.summary(fmt.parse(crafted(chunks=c, end=end)))
    assert s["total"] == 1 and s["dropped"] == 4 and s["lost"] == 4
    end["vcpus"][0] = {"records": 2, "written": 2, "dropped": 0}
    with pytest.raises(fmt.TraceError, match="says 2 records were written, the file holds 1"):
        fmt.parse(crafted(chunks=c, end=end))
    with pytest.raises(fmt.TraceError, match="claims vCPU 7"):
        fmt.parse(crafted(chunks=[fmt.encode_chunk(7, 0, rec(1, IO))]))
    with pytest.raises(fmt.TraceError, match="'vcpus' is missing"):
        fmt.encode_header({k: v for k, v in META.items() if k != "vcpus"})


# --- hvctl trace ------------------------------------------------------------------------------

def hvctl(*args, env=None):
    return subprocess.run(HVCTL + [str(a) for a in args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_hvctl_trace_json_has_the_contracts_keys(tmp_path):
    path = tmp_path / "t.trace"
    path.write_bytes(crafted())
    r = hvctl("trace", path, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["total"] == 6 and s["by_reason"]["IO"] == 3 and s["by_vcpu"] == {"0": 5, "1": 1}
    assert s["by_port"] == {"0x80": 2, "0x3f8": 1}
    r = hvctl("trace", path)
    assert r.returncode == 0 and "6 exits" in r.stdout and "0x3f8" in r.stdout and "none lost" in r.stdout
    r = hvctl("trace", path, "--top", "1")
    assert "0x80" in r.stdout and "0x3f8" not in r.stdout and "1 more ports" in r.stdout
    r = hvctl("trace", path, "--top", "-1")
    assert r.returncode == 2 and "--top" in r.stderr


@pytest.mark.parametrize("content", [b"", b"PYHV", b"something else entirely", None])
def test_hvctl_trace_of_a_bad_file_is_one_line_and_exit_2(tmp_path, content):
    path = tmp_path / "t.trace"
    if content is not None:
        path.write_bytes(content if content else crafted()[:-7])
    r = hvctl("trace", path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr and str(path) in r.stderr


def test_hvctl_trace_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    path, png = tmp_path / "t.trace", tmp_path / "t.png"
    path.write_bytes(crafted())
    hide = tmp_path / "hide"
    (hide / "matplotlib").mkdir(parents=True)
    (hide / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    r = hvctl("trace", path, "--plot", png, env={"PYTHONPATH": str(hide)})
    assert r.returncode != 0 and r.stdout == "" and not png.exists()
    assert len(r.stderr.strip().splitlines()) == 1 and "pip install 'pyhv[plot]'" in r.stderr


def test_hvctl_trace_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path, png = tmp_path / "t.trace", tmp_path / "t.png"
    path.write_bytes(crafted())
    r = hvctl("trace", path, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
