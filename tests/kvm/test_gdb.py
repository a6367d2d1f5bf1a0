"""The GDB stub (`--gdb tcp:HOST:PORT`) driven by Debian's gdb in batch mode against SMP raw guests.

The guests (support/guests/gdb_smp.S, gdb_user.S) are built from source at
test time; their labels sit at fixed offsets, so gdb needs no symbol file.
Each test compares the guest's console output and exit status with a run
without gdb where the session should leave the guest as it was.
"""
import json
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
from hv import GUESTS, HVCTL, needs_kvm

from pyhv.vcpu_worker.gdb import packets

pytestmark = needs_kvm

SMP = (GUESTS / "gdb_smp.S").read_text()
USER = (GUESTS / "gdb_user.S").read_text()
BASE = 0x100000
HOLD_LOOP, GUEST_INT3, PRINT_LOOP, EMIT, VCPU1_WORK = (BASE + o for o in (0x40, 0xA0, 0x100, 0x108, 0x200))
MESSAGE, EXIT_CODE, HOLD, COUNTER = (BASE + o for o in (0x400, 0x480, 0x488, 0x498))
SMP_OUTPUT, SMP_STATUS = b"!pyhv-gdb-marker\n", 7
USER_OUTPUT, USER_STATUS = b"pyhv-user-marker\n", 9


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GdbGuest:
    """`hvctl run --gdb` of a guest in the background, waiting for its client."""

    def __init__(self, image, boot="raw64", vcpus=2, timeout=60):
        assert shutil.which("gdb"), "gdb is not installed (setup.sh installs Debian's gdb)"
        self.port = free_port()
        self.proc = subprocess.Popen(HVCTL + ["run", "--kernel", str(image), "--boot", boot, "--vcpus", str(vcpus),
                                              "--timeout", str(timeout), "--gdb", f"tcp:127.0.0.1:{self.port}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.notice = self.proc.stderr.readline().decode()
        assert "waits for GDB" in self.notice, self.notice + self.proc.stderr.read().decode()

    def gdb(self, script, timeout=60, background=False):
        """Run `script` in gdb -batch after `target remote`: the CompletedProcess (text), or the Popen if background."""
        prologue = f"set pagination off\nset confirm off\nset width 0\ntarget remote 127.0.0.1:{self.port}\n"
        cmd = ["gdb", "-batch", "-nx"]
        path = f"/tmp/pyhv-gdb-{self.port}.gdb"
        with open(path, "w") as f:
            f.write(prologue + script)
        if background:
            return subprocess.Popen(cmd + ["-x", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return subprocess.run(cmd + ["-x", path], capture_output=True, text=True, timeout=timeout)

    def finish(self, timeout=60):
        """(console output, stderr, exit status) once the guest has ended."""
        out, err = self.proc.communicate(timeout=timeout)
        return out, self.notice + err.decode(), self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def smp(build_guest):
    return build_guest(SMP, "raw64")


@pytest.fixture
def guests():
    made = []
    yield lambda *a, **k: made.append(GdbGuest(*a, **k)) or made[-1]
    for g in made:
        g.kill()


def test_the_test_guests_without_gdb(smp, build_guest, run_guest):
    r = run_guest(smp, "--boot", "raw64", "--vcpus", 2, "--timeout", 60, timeout=90)
    assert (r.stdout, r.returncode) == (SMP_OUTPUT, SMP_STATUS)
    r = run_guest(build_guest(USER, "user64"), "--boot", "user64", "--vcpus", 2, "--timeout", 60, timeout=90)
    assert (r.stdout, r.returncode) == (USER_OUTPUT, USER_STATUS)


def test_threads_registers_memory_breakpoints_step_and_detach(smp, guests):
    g = guests(smp)
    r = g.gdb(f"""
info threads
x/s {MESSAGE:#x}
p/x $rip
p $rdi
thread 2
p $rdi
hbreak *{VCPU1_WORK:#x}
continue
p/x $pc
delete
break *{PRINT_LOOP:#x}
continue
p/x $pc
x/1xb {PRINT_LOOP:#x}
stepi
p/x $pc
delete
detach
""")
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert re.search(r"\* 1 +Thread 1 \(vCPU 0, ring 0\) 0x0+100000", out), out
    assert re.search(r"  2 +Thread 2 \(vCPU 1, ring 0\) 0x0+100000", out), out
    assert '"pyhv-gdb-marker\\n"' in out
    assert "$1 = 0x100000" in out and "$2 = 0" in out and "$3 = 1" in out        # RDI = vCPU index
    assert f"Thread 2 hit Breakpoint 1, {VCPU1_WORK:#018x}" in out                  # the hardware breakpoint
    assert f"$4 = {VCPU1_WORK:#x}" in out
    assert f"Thread 1 hit Breakpoint 2, {PRINT_LOOP:#018x}" in out                  # the software breakpoint
    assert f"$5 = {PRINT_LOOP:#x}" in out
    assert f"{PRINT_LOOP:#x}:\t0x8a" in out                    # GDB reads the original byte, not the int3
    assert f"$6 = {PRINT_LOOP + 2:#x}" in out                  # stepi: movb (%rsi),%al is 2 bytes
    assert "detached" in out
    output, err, status = g.finish()
    # The guest's own int3 (before print_loop) still went to its #BP handler while GDB's breakpoint was in.
    assert (output, status) == (SMP_OUTPUT, SMP_STATUS), err


def test_memory_and_register_writes_reach_the_guest_and_stepi_runs_an_out(smp, guests):
    g = guests(smp)
    r = g.gdb(f"""
set {{char}}{EXIT_CODE:#x} = 42
break *{EMIT:#x}
continue
p/c $rax
set $rax = 0x50
delete
stepi
stepi
p/x $pc
continue
""")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "$1 = 112 'p'" in r.stdout
    assert f"$2 = {EMIT + 5:#x}" in r.stdout                   # mov $0x3f8,%dx (4 bytes), out %al,%dx (1)
    assert "exited with code 052" in r.stdout                  # GDB hears the guest's exit status (W packet)
    output, err, status = g.finish()
    assert (output, status) == (b"!Pyhv-gdb-marker\n", 42), err


def test_ctrl_c_stops_a_running_guest(smp, guests):
    g = guests(smp)
    gdb = g.gdb(f"""
set {{char}}{HOLD:#x} = 1
echo RUNNING\\n
continue
info threads
p/x $pc
set {{char}}{HOLD:#x} = 0
continue
""", background=True)
    try:
        assert gdb.stdout.readline() and "RUNNING" in "".join(iter_until(gdb.stdout, "RUNNING"))
        time.sleep(1.0)                               # the guest spins on `hold`
        gdb.send_signal(signal.SIGINT)                # what Ctrl-C at gdb's prompt does: it sends 0x03
        out, _ = gdb.communicate(timeout=60)
    finally:
        if gdb.poll() is None:
            gdb.kill()
    assert "received signal SIGINT" in out, out
    pc = int(re.search(r"\$1 = (0x[0-9a-f]+)", out).group(1), 16)
    assert HOLD_LOOP <= pc < HOLD_LOOP + 0x10, out                       # caught spinning in hold_loop
    assert re.search(r"  2 +Thread 2 \(vCPU 1, ring 0\)", out)
    assert "exited with code 07" in out
    output, err, status = g.finish()
    assert (output, status) == (SMP_OUTPUT, SMP_STATUS), err


def iter_until(stream, marker):
    for line in stream:
        yield line
        if marker in line:
            return


def test_kill_ends_the_guest_as_stop_does(smp, guests):
    g = guests(smp)
    r = g.gdb("kill\n")
    assert r.returncode == 0, r.stdout + r.stderr
    output, err, status = g.finish()
    assert status == 143 and output == b"", err


def test_watchpoints_are_refused_here_and_software_watchpoints_step_instead(smp, guests):
    g = guests(smp)
    r = g.gdb(f"""
python
try:
    gdb.execute("watch *(long*){COUNTER:#x}")
    gdb.execute("continue")
except gdb.error as e:
    print("REFUSED:", e)
end
delete
thread 2
set can-use-hw-watchpoints 0
watch *(long*){COUNTER:#x}
continue
info threads
delete
detach
""")
    out = r.stdout + r.stderr
    assert "REFUSED:" in out and "Could not insert hardware watchpoint" in out, out
    assert re.search(r"Thread 2 hit Watchpoint \d+: \*\(long\*\)" + hex(COUNTER), out), out
    assert "Old value = 0\nNew value = 1" in out
    output, err, status = g.finish()
    assert (output, status) == (SMP_OUTPUT, SMP_STATUS), err
    assert "watchpoints do not fire on this host" in err


def test_ring3_breakpoints_and_stepping_are_refused_not_hung(build_guest, guests):
    g = guests(build_guest(USER, "user64"), boot="user64")
    r = g.gdb(f"""
info threads
x/s {MESSAGE:#x}
python
for cmd in ("break *{BASE + 0x100:#x}", "continue", "delete", "hbreak *{BASE + 0x100:#x}", "continue", "delete",
            "stepi"):
    try:
        gdb.execute(cmd)
    except gdb.error as e:
        print("REFUSED:", cmd, "->", e)
end
p/x $pc
detach
""")
    out = r.stdout + r.stderr
    assert re.search(r"Thread 1 \(vCPU 0, ring 3\)", out), out
    assert '"pyhv-user-marker\\n"' in out                             # memory reads work in ring 3
    assert "Cannot insert breakpoint 1" in out
    assert "REFUSED: continue" in out and "ring 3" in out             # the hardware breakpoint's reason, in gdb
    assert "cannot single-step vCPU 0 in ring 3" in out               # the O packet and the E reply
    assert "$1 = 0x100000" in out                                     # nothing ran
    output, err, status = g.finish()
    assert (output, status) == (USER_OUTPUT, USER_STATUS), err
    assert "a breakpoint at 0x100100 refused: vCPU 0 runs in ring 3" in err


TO_USER = r"""
    lea stack_top(%rip), %rsp
    push $0x2b                       /* SS: user data */
    lea user_stack(%rip), %rax
    push %rax
    push $0x2                        /* RFLAGS */
    push $0x33                       /* CS: 64-bit user code */
    lea user(%rip), %rax
    push %rax
before:
    nop
to_user:
    iretq
user:
    mov $0xFEBFF000, %rbx
    movb $5, (%rbx)
1:  jmp 1b
.balign 16
    .fill 256, 1, 0
stack_top:
    .fill 256, 1, 0
user_stack:
"""


def test_a_step_into_ring3_is_refused_and_continue_gets_there(build_guest, guests):
    # Stepping iretq to ring 3 would set TF in natively run ring-3 code: the guest would get the #DB.
    g = guests(build_guest(TO_USER, "raw64"), vcpus=1)
    r = g.gdb(f"""
python
import re
text = gdb.execute("x/12i $pc", to_string=True)
before = int(re.search(r"(0x[0-9a-f]+):\\s+nop", text).group(1), 16)
gdb.execute(f"break *{{before:#x}}")
gdb.execute("continue")
gdb.execute("delete")
gdb.execute("stepi")
print("AT", gdb.execute("x/i $pc", to_string=True))
gdb.execute("stepi")                 # refused: GDB warns with the reason and stays put
end
p/x $pc
continue
""")
    out = r.stdout + r.stderr
    assert "iretq" in out.split("AT", 1)[1].splitlines()[0], out
    assert "cannot single-step vCPU 0 over iretq into ring 3" in out, out
    assert "exited with code 05" in out, out
    assert g.finish()[2] == 5


class RawClient:
    """A GDB remote-protocol client of our own, for what gdb would never send."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = packets.Reader(raw=True)
        self.events = []

    def send(self, data):
        self.sock.sendall(data)

    def packet(self, payload):
        self.send(packets.frame(payload, rle=False))
        return self.reply()

    def reply(self):
        while True:
            for i, e in enumerate(self.events):
                if e.kind == "packet":
                    del self.events[:i + 1]
                    return packets.reply_payload(e.data)
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.events += self.reader.feed(data)


def test_malformed_packets_leave_the_stub_and_guest_working(smp, guests):
    g = guests(smp)
    c = RawClient(g.port)
    # at once, before the vCPU threads may even have parked: the stub waits for them
    assert bytes.fromhex(c.packet(b"m100400,10").decode()) == b"pyhv-gdb-marker\n"
    second = socket.create_connection(("127.0.0.1", g.port), timeout=20)
    assert second.recv(16) == b""                               # one client at a time: the second is closed
    second.close()
    c.send(b"$g#00")                                           # bad checksum
    c.send(b"garbage\x00\xff")                                 # noise between packets
    c.send(b"$" + b"m" * 100000 + b"#00")                      # far too long
    c.send(b"$X100400,4:}#" + b"%02x" % packets.checksum(b"X100400,4:}"))   # a packet that ends inside an escape
    for payload in (b"m100400", b"mffffffffffffffff,10", b"Z0,zz,1", b"G00", b"P1=", b"Hg99", b"vCont;q",
                    b"qXfer:features:read:target.xml:0", b"M100400,2:zz"):
        reply = c.packet(payload)
        assert reply.startswith(b"E") or reply == b"", (payload, reply)
    assert c.packet(b"?") == b"T05thread:1;"
    reply = c.packet(b"m100400,10")
    assert bytes.fromhex(reply.decode()) == b"pyhv-gdb-marker\n", reply
    assert c.packet(f"M{HOLD:x},1:01".encode()) == b"OK"      # the guest will spin until we let it go
    c.send(packets.frame(b"vCont;c", rle=False))
    time.sleep(0.3)
    c.send(b"\x03")                                            # interrupt
    assert c.reply().startswith(b"T02thread:")
    assert c.packet(f"M{HOLD:x},1:00".encode()) == b"OK"
    assert c.packet(b"D") == b"OK"
    output, err, status = g.finish()
    assert (output, status) == (SMP_OUTPUT, SMP_STATUS), err


def test_bad_gdb_endpoints_are_refused(smp, run_guest):
    r = run_guest(smp, "--boot", "raw64", "--gdb", "127.0.0.1:1234", timeout=30)
    assert r.returncode == 2 and b"--gdb" in r.stderr and b"Traceback" not in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_guest(smp, "--boot", "raw64", "--gdb", f"tcp:127.0.0.1:{port}", timeout=30)
    assert r.returncode == 2 and b"cannot listen" in r.stderr and b"Traceback" not in r.stderr, r.stderr


def test_a_supervised_guest_waits_for_gdb_and_info_shows_where(sup, smp):
    port = free_port()
    sup.hvctl("create", "dbg", "--kernel", smp, "--boot", "raw64", "--vcpus", "2", "--timeout", "60",
              "--gdb", f"tcp:127.0.0.1:{port}", "--start", check=0)
    assert sup.info("dbg")["config"]["gdb"] == f"tcp:127.0.0.1:{port}"
    assert re.search(rf"gdb: +tcp:127.0.0.1:{port}", sup.hvctl("info", "dbg", check=0).stdout)
    time.sleep(0.5)
    assert sup.info("dbg")["state"] == "running" and sup.hvctl("logs", "dbg", check=0).stdout == ""   # waiting
    stats = json.loads(sup.hvctl("stats", "dbg", "--json", check=0).stdout)
    assert stats["gdb"] == {"endpoint": f"tcp:127.0.0.1:{port}", "client": None, "state": "waiting"}
    assert all(v["position"]["rip"] == hex(BASE) for v in stats["vcpus"])       # before the first instruction
    r = subprocess.run(["gdb", "-batch", "-nx", "-ex", "set confirm off", "-ex", f"target remote 127.0.0.1:{port}",
                        "-ex", "info threads", "-ex", "detach"], capture_output=True, text=True, timeout=60)
    assert "Thread 2 (vCPU 1, ring 0)" in r.stdout, r.stdout + r.stderr
    assert sup.hvctl("wait", "dbg", "--timeout", "60").returncode == SMP_STATUS
    assert sup.hvctl("logs", "dbg", check=0).stdout == SMP_OUTPUT.decode()
