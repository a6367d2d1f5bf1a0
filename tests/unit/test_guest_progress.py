"""guests/progress.py: the fetcher's progress lines (a log gets one per tenth) and the kernel build's unit count."""
import io
import subprocess
import sys

from pyhv.guests import progress


class Log(io.StringIO):
    def isatty(self):
        return False


def test_a_log_gets_a_line_per_tenth_and_the_end():
    out = Log()
    bar = progress.Progress("step", 1000, "MB", stream=out)
    for done in range(0, 1001, 7):
        bar.update(done)
    bar.finish()
    lines = out.getvalue().splitlines()
    assert [int(line.split(": ")[1].split("%")[0]) // 10 for line in lines] == list(range(11))
    assert lines[-1] == "step: 100% (0.0 of 0.0 MB)"


def test_build_counts_kbuild_units_and_keeps_the_whole_output(tmp_path):
    make = b"  CC      kernel/fork.o\nIn file included from x.c:\nwarning: y\n  LD      vmlinux\n  AR      lib/lib.a\n"
    log = tmp_path / "build.log"
    r = subprocess.run([sys.executable, progress.__file__, "build", str(log), "10"], input=make,
                       capture_output=True, check=True)
    assert r.stdout == b"3\n"
    assert log.read_bytes() == make
    assert b"100% (10 of ~10 units)" in r.stderr
