"""The GDB stub's protocol (vcpu_worker/gdb/stub.py Session) against a fake target: replies, all-stop, refusals.

No /dev/kvm: the target is a dict of registers and a bytearray of memory,
the vCPUs' holds are a set.  What a real guest does is in tests/kvm/test_gdb.py.
"""
import xml.etree.ElementTree as ET

import pytest

from pyhv.vcpu_worker.gdb import packets
from pyhv.vcpu_worker.gdb.registers import BY_NAME, G_SIZE, REGISTERS, full_tag_word, abridged_tag_word, target_xml
from pyhv.vcpu_worker.gdb.stub import RUNNING, STOPPED, Session
from pyhv.vcpu_worker.gdb.target import SIGINT, DebugRefused, Stop

BASE = 0x1000


class FakeTarget:
    def __init__(self, count=2):
        self.count = count
        self.regs = [{r.name: (b"\0" * r.size if r.size > 8 else 0) for r in REGISTERS} for _ in range(count)]
        for i, r in enumerate(self.regs):
            r.update(rip=0x100000, rdi=i, eflags=2)
        self.memory = bytearray(range(256)) * 16          # guest-virtual BASE .. BASE + 4096
        self.held = set(range(count))
        self.breakpoints = set()
        self.stepping = set()
        self.ring3 = set()
        self.killed = self.removed_all = False

    def hold(self, indices):
        self.held = set(indices)
        return True

    def hold_all(self):
        return self.hold(range(self.count))

    def hold_nowait(self, indices):
        self.held = set(indices)

    def release_all(self):
        self.held = set()

    def ended(self):
        return None

    def describe(self, i):
        return f"vCPU {i}, ring 0"

    def registers(self, i):
        return dict(self.regs[i])

    def set_registers(self, i, changes):
        if any(n in ("cs", "ss", "ds", "es", "fs", "gs") for n in changes):
            raise DebugRefused("cannot set a selector")
        self.regs[i].update(changes)

    def read_memory(self, i, address, length):
        lo = max(address - BASE, 0)
        return bytes(self.memory[lo:address - BASE + length]) if address >= BASE else b""

    def write_memory(self, i, address, data):
        if address < BASE or address - BASE + len(data) > len(self.memory):
            raise DebugRefused("not mapped")
        self.memory[address - BASE:address - BASE + len(data)] = data

    def insert_breakpoint(self, i, ztype, address, length):
        if ztype == 2:
            raise DebugRefused("watchpoints do not fire on this host")
        self.breakpoints.add((ztype, address))

    def remove_breakpoint(self, ztype, address, length):
        self.breakpoints.discard((ztype, address))

    def remove_all(self):
        self.breakpoints.clear()
        self.removed_all = True

    def apply(self, step=()):
        self.stepping = set(step)

    def check_step(self, i):
        if i in self.ring3:
            raise DebugRefused(f"cannot single-step vCPU {i} in ring 3")

    def kill(self):
        self.killed = True


class Client:
    """A session and what it sent, decoded back into payloads."""

    def __init__(self, count=2):
        self.target = FakeTarget(count)
        self.wire = bytearray()
        self.posted = []
        self.notices = []
        self.session = Session(self.target, self.wire.extend, self.posted.append, self.notices.append)

    def send(self, payload, raw=False):
        """Send one packet; the payloads it answered with (acks dropped)."""
        self.wire.clear()
        self.session.feed(payload if raw else packets.frame(payload, rle=False))
        return self.replies()

    def replies(self):
        out, reader = [], packets.Reader(raw=True)
        for e in reader.feed(bytes(self.wire)):
            if e.kind == "packet":
                out.append(packets.reply_payload(e.data).decode("latin-1"))
        self.wire.clear()
        return out

    def ask(self, payload):
        replies = self.send(payload)
        assert len(replies) == 1, replies
        return replies[0]


@pytest.fixture
def c():
    return Client()


def test_acks_then_replies_and_no_ack_mode(c):
    c.session.feed(packets.frame("?", rle=False))
    assert bytes(c.wire[:1]) == b"+"
    c.wire.clear()
    assert c.ask("QStartNoAckMode") == "OK"
    c.session.feed(packets.frame("?", rle=False))
    assert bytes(c.wire[:1]) == b"$"                       # no '+' any more


def test_a_bad_checksum_gets_a_nak_and_a_nak_gets_a_resend(c):
    c.session.feed(b"$?#00")
    assert bytes(c.wire) == b"-"
    c.ask("?")
    c.wire.clear()
    c.session.feed(b"-")
    assert c.replies() == ["T05thread:1;"]


def test_supported_and_the_target_description(c):
    features = c.ask("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386").split(";")
    assert "PacketSize=4000" in features and "qXfer:features:read+" in features
    xml, offset = b"", 0
    while True:
        reply = c.ask(f"qXfer:features:read:target.xml:{offset:x},200")
        xml += reply[1:].encode("latin-1")
        offset += len(reply) - 1
        if reply[0] == "l":
            break
        assert reply[0] == "m"
    assert xml == target_xml()
    root = ET.fromstring(xml.split(b"?>", 1)[1].split(b">", 1)[1])     # past the XML and DOCTYPE lines
    regs = root.findall(".//reg")
    assert [r.get("name") for r in regs] == [r.name for r in REGISTERS]
    assert [int(r.get("regnum")) for r in regs] == list(range(len(REGISTERS)))
    assert sum(int(r.get("bitsize")) for r in regs) // 8 == G_SIZE
    features = {f.get("name") for f in root.findall("feature")}
    assert {"org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"} <= features
    assert {r.get("name") for r in root.findall(".//feature[@name='org.gnu.gdb.i386.segments']/reg")} == \
        {"fs_base", "gs_base"}
    assert c.ask("qXfer:features:read:other.xml:0,100").startswith("E")
    assert c.ask("qXfer:features:read:target.xml:zz,100").startswith("E")


def test_threads_are_the_vcpus(c):
    assert c.ask("qfThreadInfo") == "m1,2"
    assert c.ask("qsThreadInfo") == "l"
    assert c.ask("qC") == "QC1"
    assert c.ask("T2") == "OK"
    assert c.ask("T3").startswith("E")
    assert bytes.fromhex(c.ask("qThreadExtraInfo,2")) == b"vCPU 1, ring 0"
    assert c.ask("Hg2") == "OK"
    assert c.session.g_thread == 1
    assert c.ask("Hg3").startswith("E")
    assert c.ask("Hx1").startswith("E")


def test_registers_read_and_write_per_thread(c):
    c.ask("Hg2")
    g = bytes.fromhex(c.ask("g"))
    assert len(g) == G_SIZE
    rdi = BY_NAME["rdi"]
    assert int.from_bytes(g[rdi.offset:rdi.offset + 8], "little") == 1
    assert c.ask(f"p{BY_NAME['rip'].number:x}") == (0x100000).to_bytes(8, "little").hex()
    assert c.ask(f"P{BY_NAME['rax'].number:x}={(0x1234).to_bytes(8, 'little').hex()}") == "OK"
    assert c.target.regs[1]["rax"] == 0x1234
    assert c.target.regs[0]["rax"] == 0
    # G writes back only what changed
    new = bytearray.fromhex(c.ask("g"))
    new[BY_NAME["rbx"].offset] = 0x77
    assert c.ask("G" + bytes(new).hex()) == "OK"
    assert c.target.regs[1]["rbx"] == 0x77 and c.target.regs[1]["rax"] == 0x1234
    assert c.ask("G" + bytes(new[:-1]).hex()).startswith("E")
    assert c.ask(f"P{BY_NAME['cs'].number:x}=10000000").startswith("E")         # refused, said why
    assert c.ask("P999=00").startswith("E") and c.ask("p999").startswith("E")
    assert c.ask(f"P{BY_NAME['rax'].number:x}=00").startswith("E")             # wrong size


def test_memory_read_write_and_binary_write(c):
    assert bytes.fromhex(c.ask(f"m{BASE + 0x10:x},4")) == bytes((0x10, 0x11, 0x12, 0x13))
    assert c.ask("m0,4") == "E14"
    assert c.ask(f"M{BASE:x},2:abcd") == "OK"
    assert c.target.memory[:2] == b"\xab\xcd"
    data = b"#$}*\x03\x00"
    frame = b"$" + packets.escape(f"X{BASE:x},{len(data):x}:".encode() + data)
    frame += b"#%02x" % packets.checksum(frame[1:])
    assert c.send(bytes(frame), raw=True) == ["OK"]
    assert c.target.memory[:len(data)] == data
    assert c.ask(f"X{BASE:x},0:") == "OK"                                      # GDB's probe for X
    assert c.ask(f"M{BASE:x},3:abcd").startswith("E")                          # length mismatch
    assert c.ask("M0,1:00").startswith("E")                                    # not mapped: nothing written
    assert len(bytes.fromhex(c.ask(f"m{BASE:x},ffffffff"))) < 0x4000           # clamped to the packet size


def test_breakpoints_and_refusals(c):
    assert c.ask("Z0,100100,1") == "OK"
    assert c.ask("Z1,100200,1") == "OK"
    assert c.target.breakpoints == {(0, 0x100100), (1, 0x100200)}
    assert c.ask("z0,100100,1") == "OK"
    assert c.target.breakpoints == {(1, 0x100200)}
    assert c.ask("Z3,1000,4") == ""                # read watchpoints: unsupported
    reply = c.ask("Z2,1000,4")
    assert reply.startswith("E..") and "watchpoints" in reply      # GDB prints Z errors after a second '.'
    assert c.notices and "watchpoints" in c.notices[-1]
    assert c.ask("Z0,zz,1").startswith("E") and c.ask("Z9,0,1").startswith("E") and c.ask("Z0").startswith("E")


def test_vcont_steps_one_thread_and_holds_the_rest(c):
    assert c.ask("vCont?") == "vCont;c;C;s;S"
    assert c.send("vCont;s:2") == []                  # no reply until it stops
    assert c.session.state == RUNNING
    assert c.target.stepping == {1} and c.target.held == {0}
    assert c.session.vcpu_stopped(Stop(1)) is True
    assert c.posted == [c.session.report]
    c.posted.pop()()                                  # the loop reports
    assert c.replies() == ["T05thread:2;"]
    assert c.session.state == STOPPED and c.target.held == {0, 1}
    assert c.session.g_thread == 1


def test_vcont_leftmost_action_wins_and_signals_are_dropped(c):
    assert c.send("vCont;s:1;C0f") == []
    assert c.target.stepping == {0} and c.target.held == set()
    c.session.vcpu_stopped(Stop(0))
    c.posted.pop()()
    assert c.replies() == ["T05thread:1;"]
    assert c.ask("vCont;x").startswith("E") and c.ask("vCont;s:9").startswith("E") and c.ask("vCont").startswith("E")
    assert c.session.state == STOPPED


def test_first_stop_wins_and_breakpoint_reasons_follow_the_client(c):
    c.ask("qSupported:swbreak+;hwbreak+")
    c.send("c")
    assert c.target.held == set()
    assert c.session.vcpu_stopped(Stop(1, reason="swbreak")) is True
    assert c.session.vcpu_stopped(Stop(0, reason="hwbreak")) is True        # parks too, but is not reported
    c.posted.pop(0)()
    assert c.posted == []
    assert c.replies() == ["T05thread:2;swbreak:;"]
    assert c.session.vcpu_stopped(Stop(0)) is False                        # stopped already: a stale event


def test_interrupt_stops_everything_with_sigint(c):
    c.session.feed(b"\x03")                     # ignored while stopped
    assert c.replies() == []
    c.send("vCont;c")
    c.session.feed(b"\x03")
    assert c.replies() == [f"T{SIGINT:02x}thread:1;"]
    assert c.target.held == {0, 1}


def test_single_step_in_ring_3_is_refused_with_a_console_line(c):
    c.target.ring3.add(0)
    replies = c.send("vCont;s:1;c")
    assert replies[0].startswith("O")
    assert b"ring 3" in bytes.fromhex(replies[0][1:])
    assert replies[1].startswith("E.") and "ring 3" in replies[1]
    assert c.session.state == STOPPED and c.target.held == {0, 1}


def test_everything_but_resume_is_refused_while_running(c):
    c.send("c")
    for packet in ("g", "m1000,4", "Z0,1000,1", "c", "vCont;c"):
        assert c.ask(packet).startswith("E"), packet


def test_detach_removes_breakpoints_and_releases(c):
    c.ask("Z0,100100,1")
    assert c.ask("D") == "OK"
    assert c.target.removed_all and c.target.breakpoints == set() and c.target.held == set()
    assert c.session.closed


def test_kill_ends_the_guest(c):
    assert c.send("k") == []
    assert c.target.killed and c.session.closed
    c2 = Client()
    assert c2.ask("vKill;1") == "OK" and c2.target.killed


def test_unknown_and_malformed_packets_never_raise(c):
    for packet in ("", "qUnknown", "vUnknown", "!", "R00", "b", "Hg", "H", "T", "pzz", "m", "m1", "M1000",
                   "X1000", "\xff\xfe", "qThreadExtraInfo,", "qThreadExtraInfo,99", "QNonStop:1", "Z", "z1",
                   "C", "Czz", "S05;zz", "vCont;c:zz", "qXfer:features:read:target.xml:0"):
        replies = c.send(packet)
        assert len(replies) == 1, packet
        assert replies[0] == "" or replies[0].startswith("E"), (packet, replies)
    assert c.ask("QNonStop:0") == "OK"
    assert c.ask("?") == "T05thread:1;"


def test_the_vm_ending_while_running_is_an_exit_status(c):
    c.send("c")
    c.session.vm_ended(7)
    assert c.replies() == ["W07"]


def test_x87_tag_words():
    one = (0x3FFF << 64 | 1 << 63).to_bytes(10, "little")
    zero = bytes(10)
    st = [one, zero] + [zero] * 6
    top = 6                                    # ST0 is physical register 6, ST1 physical 7
    full = full_tag_word(0b11000000, top << 11, st)
    assert [(full >> 2 * p) & 3 for p in range(8)] == [3, 3, 3, 3, 3, 3, 0, 1]
    assert abridged_tag_word(full) == 0b11000000
    assert abridged_tag_word(0xFFFF) == 0


@pytest.mark.parametrize("text,expected", [("tcp:127.0.0.1:1234", ("127.0.0.1", 1234)),
                                           ("tcp:localhost:65535", ("localhost", 65535)),
                                           ("tcp:[::1]:1", ("::1", 1))])
def test_gdb_endpoints(text, expected):
    from pyhv.proto.guest import parse_gdb
    assert parse_gdb(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1:1234", "udp:127.0.0.1:1234", "tcp:127.0.0.1", "tcp::1234",
                                  "tcp:127.0.0.1:0", "tcp:127.0.0.1:65536", "tcp:127.0.0.1:-1", "tcp:a b:1",
                                  "tcp:127.0.0.1:12x", "unix:/tmp/sock"])
def test_bad_gdb_endpoints_are_user_errors(text):
    from pyhv.proto.errors import UserError
    from pyhv.proto.guest import parse_gdb
    with pytest.raises(UserError, match="--gdb"):
        parse_gdb(text)
