"""The GDB stub's round trips: single steps and register/memory reads per second, as a client sees them over TCP.

A 2-vCPU raw64 guest (tests/support/guests/gdb_smp.S) under `hvctl run
--gdb`; a client of our own (the stub's packet module) holds vCPU 0 in the
guest's `hold` loop, then times `vCont;s:1` (one emulated ring-0
instruction, one KVM_EXIT_DEBUG, one stop reply), `g` and a 256-byte `m`.
No C reference: what a debugger waits for, not what a guest costs.
"""
import pathlib
import socket
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench import common
from pyhv.vcpu_worker.gdb import packets

SOURCE = (common.REPO / "tests" / "support" / "guests" / "gdb_smp.S").read_text()
HOLD, MESSAGE = 0x100488, 0x100400
STEPS, READS, REPS = 500, 500, 3


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = packets.Reader(raw=True)
        self.pending = []

    def ask(self, payload):
        self.sock.sendall(packets.frame(payload, rle=False))
        while True:
            for i, e in enumerate(self.pending):
                if e.kind == "packet":
                    del self.pending[:i + 1]
                    return packets.reply_payload(e.data)
            data = self.sock.recv(65536)
            if not data:
                sys.exit("bench: the stub closed the connection")
            self.pending += self.reader.feed(data)


def rate(n, fn):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def run(args):
    image = common.guestbuild.build_asm(SOURCE, "raw64")
    steps, regs, mems = [], [], []
    for _ in range(args.reps or REPS):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.Popen(common.hvctl_cmd(args) + ["run", "--boot", "raw64", "--vcpus", "2", "--kernel",
                                                       str(image), "--timeout", "300", "--gdb", f"tcp:127.0.0.1:{port}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=common.CHILD_ENV)
        if b"waits for GDB" not in p.stderr.readline():
            sys.exit("bench: hvctl run --gdb did not start")
        c = Client(port)
        assert c.ask(b"QStartNoAckMode") == b"OK"
        c.reader.check = False
        reply = c.ask(f"M{HOLD:x},1:01".encode())                   # vCPU 0 will spin in hold_loop
        assert reply == b"OK", reply
        steps.append(rate(STEPS, lambda: c.ask(b"vCont;s:1").startswith(b"T05") or sys.exit("bench: bad step")))
        regs.append(rate(READS, lambda: c.ask(b"g")))
        mems.append(rate(READS, lambda: c.ask(f"m{MESSAGE:x},100".encode())))
        c.ask(f"M{HOLD:x},1:00".encode())
        assert c.ask(b"D") == b"OK"
        out, _ = p.communicate(timeout=300)
        assert out == b"!pyhv-gdb-marker\n" and p.returncode == 7, (out, p.returncode)
    return [common.row("gdb_step", f"stepi of a ring-0 vCPU ({STEPS} per run)", steps, "steps/s"),
            common.row("gdb_step", "register reads (g, 608 bytes)", regs, "reads/s"),
            common.row("gdb_step", "memory reads (m, 256 bytes through the page tables)", mems, "reads/s")]


if __name__ == "__main__":
    common.main(run, __doc__.split("\n")[0])
