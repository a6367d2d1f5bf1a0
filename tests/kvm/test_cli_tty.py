"""hvctl on a terminal: `run` hands the guest a raw tty (no local echo, Ctrl-C to the guest) and Ctrl-] stops it;
`console` attaches one client at a time."""
import contextlib
import os
import pty
import select
import subprocess
import time

from hv import HVCTL

# raw16: prints ">", echoes every COM1 byte as "<byte>", exits 7 on "q"
ECHO = r"""
    mov $0x3f8, %dx
    mov $'>', %al
    out %al, %dx
1:  mov $0x3fd, %dx
    in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    mov %al, %bl
    mov $'<', %al
    out %al, %dx
    mov %bl, %al
    out %al, %dx
    cmp $'q', %bl
    jne 1b
    mov $0x501, %dx
    mov $7, %al
    out %al, %dx
2:  jmp 2b
"""


def read_until(fd, marker, timeout=20):
    got, deadline = b"", time.monotonic() + timeout
    while marker not in got and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                got += os.read(fd, 4096)
            except OSError:
                break
    return got


@contextlib.contextmanager
def hvctl_on_a_pty(*args, env=None):
    """hvctl ARGS with a pty for its terminal: (the process, the pty's master fd), killed and closed after."""
    master, slave = pty.openpty()
    p = subprocess.Popen(HVCTL + list(args), stdin=slave, stdout=slave, stderr=slave, env=env,
                         start_new_session=True)
    os.close(slave)
    try:
        yield p, master
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)


def test_run_on_a_terminal_is_raw_and_ctrl_bracket_stops_the_guest(build_guest):
    image = build_guest(ECHO, "raw16")
    with hvctl_on_a_pty("run", "--boot", "raw16", "--kernel", str(image), "--timeout", "30") as (p, fd):
        assert b"Ctrl-] stops the guest" in read_until(fd, b">")
        os.write(fd, b"a\x03")                     # Ctrl-C is a byte for the guest, not a signal for hvctl
        got = read_until(fd, b"<\x03")
        assert b"<a" in got and b"<\x03" in got
        assert b"aa" not in got                    # no local echo: only the guest's
        os.write(fd, b"\x1d")
        assert b"stopped from the console" in read_until(fd, b"Ctrl-])")
        assert p.wait(10) == 143


def test_run_without_a_terminal_passes_every_byte(build_guest):
    r = subprocess.run(HVCTL + ["run", "--boot", "raw16", "--kernel", str(build_guest(ECHO, "raw16")),
                                "--timeout", "30"], input=b"x\x1dq", capture_output=True, timeout=60)
    assert r.returncode == 7 and r.stdout == b"><x<\x1d<q"


def test_one_console_at_a_time(sup, build_guest):
    image = build_guest(ECHO, "raw16")
    sup.hvctl("create", "c", "--kernel", image, "--boot", "raw16", "--timeout", "60", "--start", check=0)
    env = {**os.environ, "HV_RUNTIME_DIR": sup.dir}
    with hvctl_on_a_pty("console", "c", env=env) as (first, master):
        read_until(master, b"attached to c")
        second = subprocess.run(HVCTL + ["console", "c"], stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, env=env, timeout=20)
        assert second.returncode == 1 and "attached elsewhere" in second.stderr
        assert len(second.stderr.splitlines()) == 1
        os.write(master, b"z")
        assert b"<z" in read_until(master, b"<z")
        os.write(master, b"\x1d")
        assert first.wait(10) == 0
    assert sup.info("c")["state"] == "running"


IDLE = "1: hlt\njmp 1b\n"      # raw16, interrupts off: asleep in KVM_RUN for good


def test_top_on_a_terminal_quits_on_q_and_an_idle_guest_uses_no_guest_cpu(sup, build_guest):
    sup.hvctl("create", "sleeper", "--kernel", build_guest(IDLE, "raw16"), "--boot", "raw16", "--timeout", "60",
              "--start", check=0)
    env = {**os.environ, "HV_RUNTIME_DIR": sup.dir}
    with hvctl_on_a_pty("top", "--interval", "0.5", env=env) as (p, master):
        screen = read_until(master, b"sleeper", timeout=20)
        screen += read_until(master, b"sleeper", timeout=20)      # the second refresh has rates
        assert b"q quits" in screen
        os.write(master, b"q")
        assert p.wait(10) == 0
    last = screen.decode(errors="replace").split("\x1b[2J")[-1].splitlines()
    header = last[1]
    row = next(line for line in last if line.startswith("sleeper"))
    guest, cpu = (int(row[header.index(col):].split()[0]) for col in ("GUEST%", "CPU%"))
    assert guest <= cpu          # time asleep in KVM_RUN is not guest CPU (it read 100 beside a CPU% of 2)
