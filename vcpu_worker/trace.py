"""Exit tracing (`--trace FILE`): the C run loop records every VM exit, a drainer thread writes them to the file.

Why it is built this way:

* **Recorded in C, in hv_vcpu_run.**  Most exits of a busy guest never reach
  Python (port 0x80, unclaimed ports and the exit port are answered by the C
  loop), so only the loop sees every one.  Right after KVM_RUN returns, one
  test of `hv_vcpu.trace` decides: NULL (tracing off) costs a load and a
  predictable branch, nothing else; otherwise `hv_trace_exit` fills a
  32-byte record (time, vCPU, reason, port/address, size, direction, the
  bytes written, the time spent in the guest, whether C answered it).
* **Per-vCPU rings of chunks, one producer each.**  A vCPU only ever writes
  its own ring (no lock, no atomic read-modify-write on the exit path); a
  full chunk is published with a release store and the drainer is woken
  through an eventfd, one write per `CHUNK_RECORDS` exits.
* **A drainer thread, not the vCPU, writes the file.**  Page-cache writes can
  stall for milliseconds under writeback pressure; a vCPU that stalls skews
  exactly what an experiment measures.  The drainer (`trace-drain`, a Python
  thread blocked in C with the GIL released) writes whole chunks with one
  writev each, checksummed, under a file lock shared by nobody else.
* **Nothing is overwritten, nothing is dropped silently.**  If a vCPU fills
  its whole ring before the drainer catches up (the 2-core hosts deschedule
  it), the vCPU writes its pending chunks itself: the guest is slowed, the
  trace stays complete, and the end record counts these self-drains and
  their time so the user knows the trace perturbed the run.  A chunk whose
  write fails (a full disk) is the one way to lose records: counted per
  vCPU as dropped, the errno kept, a line in the log, and `hvctl trace`
  reports it.  A vCPU thread that never left KVM_RUN at the end keeps its
  unwritten records, counted as unflushed.
* **The file is self-describing.**  The header (written here, before any
  chunk) holds the vCPU count, the clock, the start times, the TSC frequency
  and the exit-reason names; the end record (written here after every vCPU's
  last chunk) holds the per-vCPU counts a reader checks against.  Format:
  docs/trace-format.md, reader: proto/trace.py.

Memory: RING_CHUNKS x CHUNK_RECORDS x 32 bytes per vCPU (512 KiB), touched
only as the vCPU exits; 64 vCPUs reserve 32 MiB.
"""
import fcntl
import os
import socket
import stat
import sys
import threading
import time

import pyhv
from pyhv.proto import trace as fmt
from pyhv.proto.errors import HostError, UserError
from pyhv.vcpu_worker._kvm import ffi, lib

CHUNK_RECORDS = 4096            # 128 KiB per chunk: one drainer wake-up per 4096 exits
RING_CHUNKS = 4
DRAIN_TIMEOUT_MS = 500          # the drainer also wakes this often (to notice close())
COUNTERS = ("records", "written", "dropped", "self_drains", "self_drain_ns", "pending")


def reason_names():
    """{code: name} of everything the C loop can record: KVM's exit reasons and its own run error."""
    names = {getattr(lib, n): n[len("KVM_EXIT_"):] for n in dir(lib)
             if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
    names[lib.HV_EXIT_ERRNO] = "KVM_RUN_ERROR"
    return names


class Tracer:
    """The trace of one Machine: the file, the C tracer, the drainer.  start(), then close() once the vCPUs stopped."""

    def __init__(self, path, vcpus, meta, chunk_records=CHUNK_RECORDS, ring_chunks=RING_CHUNKS, log=None):
        """`vcpus`: the Vcpu handles (their hv_vcpu structs get the rings); `meta`: header fields beyond the clock's."""
        self.path = path
        self.vcpus = list(vcpus)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.closed = False
        self.end = None
        self._stop = threading.Event()
        self._thread = None
        self._reported_error = False
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"--trace: cannot create {path}: {e.strerror}") from None
        regular = stat.S_ISREG(os.fstat(self.fd).st_mode)     # not /dev/null, a FIFO
        try:
            if regular:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)    # truncated only once it is ours
        except OSError:
            os.close(self.fd)
            raise UserError(f"--trace: {path} is being written by another guest (give each guest its own file)") \
                from None
        try:
            if regular:
                os.ftruncate(self.fd, 0)
            self.meta = {**meta, "vcpus": len(self.vcpus), "chunk_records": chunk_records, "clock": "CLOCK_MONOTONIC",
                         "start_ns": time.monotonic_ns(), "start_unix_ns": time.time_ns(),
                         "reasons": {str(k): v for k, v in sorted(reason_names().items())},
                         "pyhv": pyhv.__version__, "host": socket.gethostname(), "pid": os.getpid()}
            _write_all(self.fd, fmt.encode_header(self.meta))
            self._c = lib.hv_trace_new(self.fd, len(self.vcpus), chunk_records, ring_chunks)
            if self._c == ffi.NULL:
                raise HostError(f"--trace: cannot allocate the trace buffers for {len(self.vcpus)} vCPUs")
        except OSError as e:
            os.close(self.fd)
            raise HostError(f"--trace: cannot write {path}: {e.strerror}") from None
        except BaseException:
            os.close(self.fd)
            raise
        for v in self.vcpus:
            v.state.trace = lib.hv_trace_ring(self._c, v.index)

    def start(self):
        self._thread = threading.Thread(target=self._drain, name="trace-drain", daemon=True)
        self._thread.start()

    def _drain(self):
        while not self._stop.is_set():
            lib.hv_trace_drain(self._c, DRAIN_TIMEOUT_MS)
            self._check_error()

    def _check_error(self):
        err = lib.hv_trace_error(self._c)
        if err and not self._reported_error:
            self._reported_error = True
            self.log(f"trace: writing {self.path} failed: {os.strerror(err)}; the records that could not be "
                     f"written are counted as dropped")

    def drain(self):
        """Write every full chunk now, in this thread (the drainer's work); the records written."""
        return lib.hv_trace_drain(self._c, 0)

    def counters(self):
        """Per vCPU: records made, written, dropped, self-drains (and their ns), pending in the ring."""
        if self._c is None:
            return [{k: r[k] for k in COUNTERS} for r in self.end["vcpus"]]
        out = ffi.new(f"uint64_t[{lib.HV_TRACE_NCOUNTERS}]")
        rows = []
        for v in self.vcpus:
            lib.hv_trace_counters(self._c, v.index, out)
            rows.append(dict(zip(COUNTERS, out)))
        return rows

    def status(self):
        """For `hvctl stats`: the file and the totals."""
        rows = self.counters()
        return {"file": self.path, **{k: sum(r[k] for r in rows) for k in COUNTERS}}

    def close(self, stopped, outcome=None):
        """Write each stopped vCPU's rest, the end record, and close the file; `stopped`: indexes of vCPUs whose
        threads have ended (only those rings are safe to finish).  Returns the end record."""
        if self.closed:
            return None
        self.closed = True
        self._stop.set()
        lib.hv_trace_wake(self._c)
        if self._thread is not None:
            self._thread.join()
        lib.hv_trace_drain(self._c, 0)
        finished = set()
        for v in self.vcpus:
            if v.index in stopped:
                lib.hv_trace_finish_ring(self._c, v.index)
                v.state.trace = ffi.NULL
                finished.add(v.index)
        lib.hv_trace_seal(self._c)       # a vCPU thread that is still alive writes nothing after the end record
        self._check_error()
        err = lib.hv_trace_error(self._c)
        rows = self.counters()
        for v, row in zip(self.vcpus, rows):
            row["finished"] = v.index in finished
        self.end = end = {"vcpus": rows, "end_ns": time.monotonic_ns(), "end_unix_ns": time.time_ns(),
               "write_error": os.strerror(err) if err else None,
               "outcome": None if outcome is None else {"status": outcome.status, "reason": outcome.reason}}
        try:
            _write_all(self.fd, fmt.encode_end(end))
        except OSError as e:
            self.log(f"trace: cannot finish {self.path}: {e.strerror}; the file has no end record")
        os.close(self.fd)
        lost = sum(r["dropped"] + r["pending"] for r in rows)
        if lost:
            self.log(f"trace: {lost} exit record(s) of {sum(r['records'] for r in rows)} could not be written to "
                     f"{self.path} (see `hvctl trace`)")
        if len(finished) == len(self.vcpus):
            lib.hv_trace_free(self._c)    # else a vCPU thread may still hold its ring: leave it allocated
            self._c = None
        return end


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
