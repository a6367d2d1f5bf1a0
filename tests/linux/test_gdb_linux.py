"""GDB on our Linux kernel (slow): symbols from its vmlinux, a hardware breakpoint, a system call caught, detach.

The kernel is mapped at its virtual addresses only once it runs: a software
breakpoint in kernel text can be planted after `start_kernel` (hbreak, which
needs no mapping), not before.  uname(1) makes the newuname system call,
which stops in __x64_sys_newuname on the vCPU that ran it; after detach the
guest finishes as without GDB.
"""
import os
import pathlib
import re
import shutil
import socket
import subprocess

import pytest

from hv import HVCTL

pytestmark = pytest.mark.slow

ARTEFACTS = pathlib.Path(os.environ.get("HV_ARTEFACTS", "/var/cache/pyhv"))


def test_gdb_stops_our_kernel_in_a_system_call_and_detaches():
    assert shutil.which("gdb"), "gdb is not installed (setup.sh installs Debian's gdb)"
    artefacts = {"own": ARTEFACTS / "own" / "vmlinux", "initrd": ARTEFACTS / "initramfs.cpio"}
    assert all(p.exists() for p in artefacts.values()), "run setup.sh (hvctl guests fetch) first"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guest = subprocess.Popen(HVCTL + ["run", "--kernel", str(artefacts["own"]), "--initrd", str(artefacts["initrd"]),
                                      "--cmdline", "console=ttyS0 pyhv.run=uname", "--vcpus", "2", "--timeout", "900",
                                      "--gdb", f"tcp:127.0.0.1:{port}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"waits for GDB" in guest.stderr.readline()
        r = subprocess.run(["gdb", "-batch", "-nx", str(artefacts["own"]), "-ex", "set pagination off",
                            "-ex", f"target remote 127.0.0.1:{port}", "-ex", "hbreak start_kernel", "-ex", "continue",
                            "-ex", "delete", "-ex", "break __x64_sys_newuname", "-ex", "continue", "-ex", "bt 4",
                            "-ex", "info threads", "-ex", "stepi", "-ex", "delete", "-ex", "detach"],
                           capture_output=True, text=True, timeout=900)
        out = r.stdout + r.stderr
        assert "Thread 1 hit Breakpoint 1" in out and "in start_kernel ()" in out, out
        assert re.search(r"Thread \d hit Breakpoint 2, 0x[0-9a-f]+ in __x64_sys_newuname \(\)", out), out
        assert "in do_syscall_64 ()" in out                    # the backtrace, from the kernel's own symbols
        at = [int(a, 16) for a in re.findall(r"(0x[0-9a-f]+) in __x64_sys_newuname \(\)", out)]
        assert len(set(at)) >= 2 and at[-1] > at[0], out       # stepi moved on inside the function
        output, _ = guest.communicate(timeout=900)
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    assert b"pyhv-init: exit status 0" in output and b"\nLinux\r\n" in output.replace(b"\r\r", b"\r"), output[-2000:]
    assert guest.returncode == 0
