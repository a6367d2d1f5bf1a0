"""The guest's console: `logs` (what it printed, optionally following) and `console` (attached, raw tty, Ctrl-] detaches)."""
import os
import sys
import time

from pyhv.proto import control as m
from pyhv.proto.errors import EXIT_OK, BadState, PeerFailed
from pyhv.supervisor.cli.client import request

DETACH_KEY = b"\x1d"            # Ctrl-]
LIVE = ("running", "paused")


def cmd_logs(args):
    g = request(args, m.Info(args.name))
    out = sys.stdout.buffer
    try:
        f = open(g.console_log, "rb")
    except FileNotFoundError:
        if not args.follow or g.state not in LIVE:
            return EXIT_OK
        f = None
    last_check = time.monotonic()
    while True:
        if f is None and os.path.exists(g.console_log):
            f = open(g.console_log, "rb")
        data = f.read() if f else b""
        if data:
            out.write(data)
            out.flush()
        if not args.follow or g.state not in LIVE:
            break
        if not data:
            time.sleep(0.1)
        if time.monotonic() - last_check > 0.3:
            g = request(args, m.Info(args.name))   # read once more after it stopped
            last_check = time.monotonic()
    return EXIT_OK


def attach(sock, label):
    """Copy the terminal to `sock` and back until EOF or Ctrl-]; raw mode while stdin is a tty."""
    import select
    fd_in = sys.stdin.fileno()
    tty = os.isatty(fd_in)
    if tty:
        import termios
        import tty as ttymod
        saved = termios.tcgetattr(fd_in)
        ttymod.setraw(fd_in)
        print(f"[attached to {label}; Ctrl-] detaches]\r", file=sys.stderr)
    try:
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
    add("logs", cmd_logs, "the guest's console output so far", "name").add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the guest stops")
    add("console", cmd_console, "attach the console interactively (Ctrl-] detaches)", "name")
