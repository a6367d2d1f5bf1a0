"""When each console line began: (byte offset in console.log, Unix time) records beside the log, for `logs --timestamps`.

The worker appends one 16-byte record ("<Qd") per line, taken when the
line's first byte is written; a reader pairs the log's lines with them by
offset.  Lines written before the record file existed, or by an older
worker, simply have no time.
"""
import bisect
import os
import struct
import threading
import time

RECORD = struct.Struct("<Qd")


class LineClock:
    """The writer: told of every chunk appended to the log, it records each line's start."""

    def __init__(self, path, offset):
        """`offset` is the log's size now: where the next chunk lands."""
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._offset = offset
        self._at_line_start = True
        self._lock = threading.Lock()      # console bytes come from any vCPU thread

    def wrote(self, data):
        if not data:
            return
        now = time.time()
        with self._lock:
            starts = [0] if self._at_line_start else []
            i = data.find(b"\n")
            while 0 <= i < len(data) - 1:
                starts.append(i + 1)
                i = data.find(b"\n", i + 1)
            records = b"".join(RECORD.pack(self._offset + s, now) for s in starts)
            self._offset += len(data)
            self._at_line_start = data.endswith(b"\n")
            try:
                os.write(self._fd, records)
            except OSError:
                pass                        # times are a convenience: never fail the console for them

    def close(self):
        os.close(self._fd)


def read(path):
    """[(offset, time)] sorted by offset; [] if there is no such file.  A torn last record is left out."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    usable = len(data) - len(data) % RECORD.size
    return sorted(RECORD.iter_unpack(data[:usable]))


def time_at(records, offset):
    """The time of the line starting at `offset`, or None (records from read())."""
    i = bisect.bisect_left(records, (offset, float("-inf")))
    return records[i][1] if i < len(records) and records[i][0] == offset else None
