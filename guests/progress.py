#!/usr/bin/env python3
"""Progress for fetch.sh's long steps: a download's percentage, the kernel build's share of units compiled.

On a terminal one line redraws itself in place; elsewhere (CI logs, pipes) a
line at each tenth, so a log shows the step moving without a line per block.
Standard library only: fetch.sh runs it before anything else is installed.

    python3 progress.py download PKG DIR      PKG's .deb into DIR; prints its path
    python3 progress.py build LOG EXPECTED    make's output on stdin, appended to LOG;
                                              prints the number of units built

A download takes apt's own URL, size and SHA256 (`apt-get download
--print-uris`), so the file is what apt would have fetched; if the mirror
cannot be reached directly (an apt-only proxy), apt-get downloads it instead,
without a percentage.
"""
import hashlib
import os
import re
import shlex
import subprocess
import sys
import urllib.request

# kbuild's quiet output names one unit per line: "  CC      kernel/fork.o", "  LD      vmlinux", ...
UNIT = re.compile(rb"^  [A-Z][A-Z0-9_-]* +\S")


class Progress:
    """One step's progress line on stderr."""

    def __init__(self, label, total, unit=None, stream=sys.stderr):
        self.label, self.total, self.unit, self.stream = label, max(total, 1), unit, stream
        self.tty = stream.isatty()
        self._shown = -1

    def update(self, done):
        pct = min(100, 100 * done // self.total)
        if self.tty:
            if pct != self._shown:
                self.stream.write(f"\r{self.label}: {pct:3d}%{self._amount(done)}")
                self.stream.flush()
        elif pct // 10 != self._shown // 10:
            self.stream.write(f"{self.label}: {pct}%{self._amount(done)}\n")
            self.stream.flush()
        else:
            return
        self._shown = pct

    def finish(self):
        self.update(self.total)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _amount(self, done):
        if self.unit == "MB":
            return f" ({done / 1e6:.1f} of {self.total / 1e6:.1f} MB)"
        return f" ({done} of ~{self.total} {self.unit})" if self.unit else ""


def apt_uri(pkg):
    """(url, file name, size, sha256 hex) of PKG's .deb as apt would fetch it."""
    r = subprocess.run(["apt-get", "download", "--print-uris", pkg], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        parts = shlex.split(line)
        if len(parts) == 4 and parts[3].startswith("SHA256:"):
            return parts[0], parts[1], int(parts[2]), parts[3][len("SHA256:"):]
    raise SystemExit(f"progress.py: apt-get knows no download for {pkg}: {r.stderr.strip() or r.stdout.strip()}")


def download(pkg, directory):
    url, name, size, sha256 = apt_uri(pkg)
    path = os.path.join(directory, name)
    part = path + ".part"
    bar = Progress(f"fetch.sh: downloading {name}", size, "MB")
    digest, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 16):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                bar.update(done)
    except OSError as e:
        print(f"\nprogress.py: {url}: {e}; asking apt-get instead", file=sys.stderr)
        if os.path.exists(part):
            os.unlink(part)
        subprocess.run(["apt-get", "download", "-qq", "-o", "APT::Sandbox::User=root", pkg], cwd=directory,
                       check=True, stdout=subprocess.DEVNULL)
        return path
    bar.finish()
    if done != size or digest.hexdigest() != sha256:
        os.unlink(part)
        raise SystemExit(f"progress.py: {url}: got {done} bytes with SHA256 {digest.hexdigest()}, "
                         f"apt expects {size} bytes with {sha256}")
    os.replace(part, path)
    return path


def build(log, expected):
    """Count kbuild's units on stdin against `expected` (the last build's count, or a guess)."""
    bar = Progress("fetch.sh: own kernel: building", expected, "units")
    units = 0
    with open(log, "ab") as out:
        for line in sys.stdin.buffer:
            out.write(line)
            if UNIT.match(line):
                units += 1
                bar.update(min(units, expected - 1))      # the last percent is the end of make
    bar.finish()
    return units


def main(argv):
    if len(argv) == 3 and argv[0] == "download":
        print(download(argv[1], argv[2]))
    elif len(argv) == 3 and argv[0] == "build":
        print(build(argv[1], int(argv[2])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
