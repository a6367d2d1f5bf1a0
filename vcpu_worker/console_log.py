"""The guest's console log as the worker writes it: appended, timed line by line, capped, and never failing the guest.

A guest that floods its console must not fill the host's disk: past
`limit` bytes (HV_CONSOLE_LOG_MAX, default 64 MiB, counted over the log's
whole life) one marker line is written and later output only reaches
attached consoles; the bytes left out are counted.  A write the host
refuses (a full disk) is dropped the same way: the guest's output is
worth less than the guest.
"""
import os
import threading

from pyhv.proto.console_times import LineClock

DEFAULT_LIMIT = 64 << 20


def limit_from_env():
    try:
        return max(0, int(os.environ.get("HV_CONSOLE_LOG_MAX", DEFAULT_LIMIT)))
    except ValueError:
        return DEFAULT_LIMIT


class ConsoleLog:
    def __init__(self, fd, times_path, limit=None):
        self.fd = fd
        self.limit = limit_from_env() if limit is None else limit
        self._size = os.fstat(fd).st_size
        self._clock = LineClock(times_path, self._size)
        self._lock = threading.Lock()
        self.dropped = 0
        self._full = self._size >= self.limit

    def write(self, data):
        with self._lock:
            if not self._full and self._size + len(data) > self.limit:
                self._full = True
                marker = (f"\n[pyhv: the console log reached {self.limit} bytes; later output is not logged "
                          f"(hvctl console shows it)]\n").encode()
                self._append(marker)
            if self._full:
                self.dropped += len(data)
                return
            self._append(data)

    def _append(self, data):
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                self.dropped += len(view)
                return
            self._clock.wrote(bytes(view[:n]))
            self._size += n
            view = view[n:]

    def counters(self):
        return {"log_bytes": self._size, "log_dropped": self.dropped}
