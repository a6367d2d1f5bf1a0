"""A Linux guest's serial console driven by a test through `hvctl console`, and waiting for its shell."""
import os
import pathlib
import select
import subprocess
import time

from hv import HVCTL


class Console:
    """`hvctl console NAME` driven by a test: send a line, wait for a marker only the command's output holds."""

    def __init__(self, sup, name):
        self.p = subprocess.Popen(HVCTL + ["console", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env={**os.environ, "HV_RUNTIME_DIR": sup.dir})
        self.seen = bytearray()

    def run(self, line, marker, timeout=120):
        """Type `line`; the output up to `marker` (which must not occur in `line` itself)."""
        start = len(self.seen)
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()
        end = time.monotonic() + timeout
        while marker.encode() not in self.seen[start:]:
            assert time.monotonic() < end, f"no {marker!r} after {line!r}; got {bytes(self.seen[-800:])!r}"
            ready, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if ready:
                self.seen += os.read(self.p.stdout.fileno(), 65536)
        return self.seen[start:].decode(errors="replace")

    def close(self):
        self.p.kill()
        self.p.wait()


def wait_for_shell(sup, name, timeout=600):
    deadline = time.monotonic() + timeout
    log = pathlib.Path(sup.info(name)["console_log"])
    while b"starting a shell" not in log.read_bytes():
        assert time.monotonic() < deadline and sup.info(name)["state"] == "running", log.read_bytes()[-2000:]
        time.sleep(1)
