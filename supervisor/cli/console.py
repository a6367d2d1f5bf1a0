"""The guest's console: `logs` (what it printed, optionally following) and `console` (attached, raw tty, Ctrl-] detaches)."""
import os
import re
import sys
import time

from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_OK, BadState, NoSuchGuest, PeerFailed, UserError
from pyhv.supervisor.cli.client import NoSupervisor, iso_time, request, runtime_dir

DETACH_KEY = b"\x1d"            # Ctrl-]
# What a guest asked its terminal (ESC[6n cursor position, ESC[c / ESC[>c attributes, ESC[5n status): replayed
# from the log onto the user's terminal, the answer would land in the user's shell as typed input.
TERMINAL_QUERY = re.compile(rb"\x1b\[[0-9;?>]*[nc]")
LIVE = ("running", "paused")


def cmd_logs(args):
    """The console log: asked of the supervisor where it is; read from the runtime dir when it is not running
    (or the guest was destroyed and its log kept)."""
    if args.tail is not None and args.tail < 0:
        raise UserError(f"--tail: {args.tail} is not a number of lines >= 0")
    try:
        g = request(args, m.Info(args.name))
        path, live = g.console_log, g.state in LIVE
    except (NoSupervisor, NoSuchGuest) as e:
        rd = runtime_dir(args)
        path = next((p for p in (rd.guest(args.name).console_log,
                                 os.path.join(rd.kept_logs(args.name), "console.log")) if os.path.exists(p)), None)
        if path is None:
            raise
        g, live = None, isinstance(e, NoSupervisor) and _runs_unsupervised(rd, args.name)
    out = sys.stdout.buffer
    f = open(path, "rb") if os.path.exists(path) else None
    if f is not None and args.tail is not None:
        _seek_to_last_lines(f, args.tail)
    to_tty = os.isatty(out.fileno())
    stamp = _Stamper(os.path.join(os.path.dirname(path), "console.times")) if args.timestamps else None
    last_check = time.monotonic()
    while True:
        if f is None and os.path.exists(path):
            f = open(path, "rb")
        offset = f.tell() if f else 0
        data = f.read() if f else b""
        if data:
            data = stamp(data, offset) if stamp else data
            out.write(TERMINAL_QUERY.sub(b"", data) if to_tty else data)
            out.flush()
        if not args.follow or not live:
            break
        if not data:
            time.sleep(0.1)
        if time.monotonic() - last_check > 0.3:
            live = _still_live(args)                                # read once more after it stopped
            last_check = time.monotonic()
    return EXIT_OK


def _still_live(args):
    """Is the guest followed by `logs --follow` still running?  Asked of the supervisor, or, between two
    supervisors (one killed, or being upgraded: the guest runs on), of the guest's record and its worker."""
    try:
        return request(args, m.Info(args.name)).state in LIVE
    except NoSupervisor:
        return _runs_unsupervised(runtime_dir(args), args.name)


def _runs_unsupervised(rd, name):
    """Does guest NAME of runtime dir `rd` run while no supervisor does: its record says so, and the worker it
    names (by identity, not just pid: supervisor/procs.py) is alive?"""
    import json
    from pyhv.supervisor.procs import Adopted, is_worker
    try:
        with open(rd.guest(name).record) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    worker = (Adopted.find(record.get("worker"), lambda pid: is_worker(pid, name))
              if record.get("state") in LIVE else None)
    if worker is None:
        return False
    worker.close()
    return True


class _Stamper:
    """Prefixes each line of the log with the time its first byte was written (proto/console_times.py)."""

    def __init__(self, times_path):
        self.times_path = times_path
        self.records = []
        self.at_line_start = True

    def __call__(self, data, offset):
        from pyhv.proto import console_times
        self.records = console_times.read(self.times_path)
        out = bytearray()
        for line in data.splitlines(keepends=True):
            if self.at_line_start:
                t = console_times.time_at(self.records, offset)
                out += (iso_time(t) if t is not None else "-" * 23).encode() + b" "
            out += line
            offset += len(line)
            self.at_line_start = line.endswith(b"\n")
        return bytes(out)


def _seek_to_last_lines(f, n, block=1 << 16):
    """Position `f` at the start of its last `n` lines (a final unterminated line counts as one)."""
    end = f.seek(0, os.SEEK_END)
    if n == 0:
        return
    pos, found = end, 0
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step)
        if pos + step == end and chunk.endswith(b"\n"):
            chunk = chunk[:-1]                 # the final newline ends the last line, it does not start one
        for i in range(len(chunk) - 1, -1, -1):
            if chunk[i] == 0x0A:
                found += 1
                if found == n:
                    f.seek(pos + i + 1)
                    return
    f.seek(0)


def attach(sock, label):
    """Copy the terminal to `sock` and back until EOF or Ctrl-]; raw mode while stdin is a tty."""
    import select
    from pyhv.devices.console_host import BUSY
    sock.settimeout(0.2)
    try:
        first = sock.recv(4096)
    except TimeoutError:
        first = b""
    sock.settimeout(None)
    if first.startswith(BUSY):
        raise BadState(f"the console of {label} is attached elsewhere (one client at a time)")
    fd_in = sys.stdin.fileno()
    tty = os.isatty(fd_in)
    if tty:
        import termios
        import tty as ttymod
        saved = termios.tcgetattr(fd_in)
        ttymod.setraw(fd_in)
        print(f"[attached to {label}; Ctrl-] detaches]\r", file=sys.stderr)
    try:
        if first:
            os.write(1, first)
        while True:
            ready, _, _ = select.select([sock, fd_in], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(1, data)
            if fd_in in ready:
                data = os.read(fd_in, 4096)
                if not data or DETACH_KEY in data:
                    if data:
                        sock.sendall(data.split(DETACH_KEY)[0])
                    break
                sock.sendall(data)
    except OSError:
        pass
    finally:
        if tty:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
            print(f"\n[detached from {label}]", file=sys.stderr)


def cmd_console(args):
    import socket
    g = request(args, m.Info(args.name))
    if g.state not in LIVE:
        raise BadState(f"guest {g.name} is {g.state}: no console to attach to")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(g.console_sock)
    except OSError as e:
        s.close()
        raise PeerFailed(f"cannot attach to the console of {g.name}: {e.strerror}") from None
    try:
        attach(s, g.name)
    finally:
        s.close()
    return EXIT_OK


def add_commands(add):
    logs = add("logs", cmd_logs, "the guest's console output so far", "name")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the guest stops")
    logs.add_argument("--tail", "-n", type=int, metavar="N", help="start with the last N lines")
    logs.add_argument("--timestamps", "-t", action="store_true", help="prefix each line with when it was "
                      "written (local time, ms)")
    add("console", cmd_console, "attach the console interactively (Ctrl-] detaches)", "name")
