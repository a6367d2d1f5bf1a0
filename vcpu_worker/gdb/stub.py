"""The GDB remote stub: a TCP listener, one client at a time, all-stop sessions over the guest's vCPUs.

`--gdb tcp:HOST:PORT` (interface.md, "Debugging and tracing"): the Machine
makes a GdbStub before its vCPUs start; they are held before their first
instruction until a client attaches.  Everything runs on one EventLoop
thread ("gdb"): accepting, reading packets, answering them and reporting
stops.  vCPU threads only record a stop (Session.vcpu_stopped, under a
lock) and post the report to that loop.

All-stop: when one vCPU stops (breakpoint, watchpoint, step, Ctrl-C) every
vCPU is held, and the stop reply names the thread (vCPU i is thread i+1).
`vCont` resumes per thread (s, c; C and S take no signal into the guest),
threads it does not name stay stopped.  `D` (or a client that goes away)
removes every breakpoint, turns stepping off and lets the guest run on; a
later client stops it again.  `k` ends the guest as `hvctl stop` would
(status 143, "killed from GDB").  What the machine cannot do is refused
with an `E.text` reply and the same line on the VMM's stderr; on a resume,
an `O` packet puts it on GDB's console first.
"""
import os
import socket
import threading

from pyhv.devices.loop import EventLoop
from pyhv.proto.errors import HvError, UserError
from pyhv.proto.guest import parse_gdb
from pyhv.vcpu_worker.gdb import packets
from pyhv.vcpu_worker.gdb.registers import BY_NAME, REGISTERS, decode_all, encode_all, target_xml
from pyhv.vcpu_worker.gdb.target import SIGINT, DebugRefused, MachineTarget, Stop

PACKET_SIZE = 0x4000
MAX_MEMORY = (PACKET_SIZE - 16) // 2      # bytes in one 'm' reply
SEND_TIMEOUT = 10.0                       # a client that stops reading is dropped
RUNNING, STOPPED, DETACHED = "running", "stopped", "detached"


def _parse_address_length(text):
    """'addr,length' (hex) -> (addr, length)."""
    addr, sep, length = text.partition(",")
    if not sep:
        raise ValueError("expected ADDR,LENGTH")
    return packets.parse_hex(addr), packets.parse_hex(length, 1 << 32)


class Session:
    """One client's conversation: packets in, replies out through `send(bytes)`; `post(fn)` runs fn on the loop.

    Needs a target with MachineTarget's methods; the unit tests give it a fake one.
    """

    def __init__(self, target, send, post, notify=None):
        self.target = target
        self.send_raw = send
        self.post = post
        self.notify = notify or (lambda line: None)
        self.reader = packets.Reader()
        self.acks = True
        self.last_sent = None
        self.client_features = set()
        self.state = STOPPED
        self.lock = threading.Lock()
        self.stop = Stop(0)           # the halt to report; on attach every vCPU is stopped, as if vCPU 0 had
        self.pending = None           # while running: the first Stop a vCPU reported
        self.running = ()             # vCPU indices the last resume let go
        self.g_thread = self.c_thread = 0    # vCPU index for registers/memory and for c/s
        self.closed = False
        self.commands = {"?": self.why, "g": self.read_registers, "G": self.write_registers,
                         "p": self.read_register, "P": self.write_register, "m": self.read_memory,
                         "M": self.write_memory, "X": self.write_binary, "c": self.cont, "C": self.cont_signal,
                         "s": self.step, "S": self.step_signal, "H": self.set_thread, "T": self.thread_alive,
                         "Z": self.insert, "z": self.remove, "D": self.detach, "k": self.kill,
                         "q": self.query, "Q": self.set_query, "v": self.v_packet}

    # -- transport ---------------------------------------------------------------------------------------
    def send(self, payload):
        data = packets.frame(payload)
        self.last_sent = data
        self.send_raw(data)

    def feed(self, data):
        """Bytes from the client."""
        for event in self.reader.feed(data):
            if self.closed:
                return
            if event.kind == "packet":
                if self.acks:
                    self.send_raw(b"+")
                self.handle(event.data)
            elif event.kind == "bad":
                if self.acks:
                    self.send_raw(b"-")
            elif event.kind == "nak" and self.last_sent is not None and self.acks:
                self.send_raw(self.last_sent)
            elif event.kind == "interrupt":
                self.interrupt()

    def handle(self, packet):
        """One packet's payload -> its reply (none for a resume: the stop reply comes later)."""
        if not packet:
            return self.send(b"")
        handler = self.commands.get(chr(packet[0]))
        try:
            reply = handler(packet[1:].decode("latin-1") if packet[0] != 0x58 else packet[1:]) \
                if handler else ""
        except DebugRefused as e:
            self.notify(str(e))
            # GDB prints a Z packet's error text from after the second '.' (remote.c), other packets' after the first
            reply = ("E.." if packet[:1] in b"Zz" else "E.") + str(e)
        except (ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
            reply = "E." + f"malformed packet: {e}"[:200]
        except OSError as e:               # an ioctl on a vCPU failed
            reply = "E." + f"KVM: {e}"[:200]
        except Exception as e:             # a bug here must not end the session, let alone the worker
            self.notify(f"internal error on packet {packet[:40]!r}: {type(e).__name__}: {e}")
            reply = "E.internal error in the stub (see the VMM's log)"
        if reply is not None:
            self.send(reply)

    # -- stops ---------------------------------------------------------------------------------------------
    def stop_reply(self, stop):
        reason = ""
        if stop.reason in ("swbreak", "hwbreak") and stop.reason + "+" in self.client_features:
            reason = f"{stop.reason}:;"
        elif stop.reason in ("watch", "rwatch", "awatch"):
            reason = f"{stop.reason}:{stop.address:x};"
        return f"T{stop.signal:02x}thread:{stop.index + 1:x};{reason}"

    def vcpu_stopped(self, stop):
        """From a vCPU thread: it stopped for the debugger.  True if it should park (the session reports it)."""
        with self.lock:
            if self.state != RUNNING or self.closed:
                return False
            first = self.pending is None
            if first:
                self.pending = stop
        if first:
            self.target.hold_nowait(range(self.target.count))
            self.post(self.report)
        return True

    def interrupt(self):
        """Ctrl-C (0x03) from the client: stop every vCPU and report SIGINT on the first one that was running."""
        with self.lock:
            if self.state != RUNNING:
                return
            if self.pending is None:
                self.pending = Stop(self.running[0] if self.running else self.g_thread, SIGINT)
        self.report()

    def report(self):
        """On the loop: every vCPU held, the pending stop reported."""
        if self.state != RUNNING:
            return
        self.target.hold_all()
        with self.lock:
            stop, self.pending, self.state = self.pending, None, STOPPED
        if stop is None:
            return
        self.stop = stop
        self.g_thread = self.c_thread = stop.index
        self.send(self.stop_reply(stop))

    def vm_ended(self, status):
        """The guest ended: a client waiting for a stop hears that the process exited."""
        if self.state == RUNNING:
            self.send(f"W{status & 0xFF:02x}")
        self.state = DETACHED

    # -- resuming ---------------------------------------------------------------------------------------
    def resume(self, actions):
        """Let the vCPUs in `actions` ({index: "c" or "s"}) run; the others stay held.  None: no reply yet."""
        if not actions:
            return "E.no such thread"
        steps = [i for i, a in actions.items() if a == "s"]
        try:
            for i in steps:
                self.target.check_step(i)
        except DebugRefused as e:
            self.notify(str(e))
            self.send("O" + f"pyhv: {e}\n".encode().hex())
            return "E." + str(e)
        self.target.apply(step=set(steps))
        with self.lock:
            self.state, self.pending, self.running = RUNNING, None, tuple(sorted(actions))
        self.target.hold_nowait(set(range(self.target.count)) - set(actions))
        return None

    def _resume_at(self, address, step):
        """c/s [addr]: the c-thread steps, or every vCPU continues; from `address` if given."""
        self._stopped_only()
        index = self.c_thread
        if address:
            self.target.set_registers(index, {"rip": packets.parse_hex(address)})
        if step:
            return self.resume({index: "s"})
        return self.resume({i: "c" for i in range(self.target.count)})

    def cont(self, args):
        return self._resume_at(args, step=False)

    def step(self, args):
        return self._resume_at(args, step=True)

    def cont_signal(self, args):
        """C sig[;addr]: as c; a signal means nothing to a vCPU, so it is checked and dropped."""
        sig, _, address = args.partition(";")
        packets.parse_hex(sig, 256)
        return self._resume_at(address, step=False)

    def step_signal(self, args):
        sig, _, address = args.partition(";")
        packets.parse_hex(sig, 256)
        return self._resume_at(address, step=True)

    def v_cont(self, args):
        if args == "?":
            return "vCont;c;C;s;S"
        self._stopped_only()
        if not args.startswith(";"):
            raise ValueError("vCont needs actions")
        actions = {}
        for part in args[1:].split(";"):
            action, _, thread = part.partition(":")
            kind = action[:1]
            if kind not in "cCsS" or not kind or (kind in "cs" and len(action) != 1):
                return "E.only the c, C, s and S actions are supported (all-stop)"
            if kind in "CS":
                packets.parse_hex(action[1:], 256)        # a signal: validated, not delivered
            indices = self._threads(thread) if thread else range(self.target.count)
            for i in indices:
                actions.setdefault(i, kind.lower())       # the leftmost action for a thread wins
        return self.resume(actions)

    def _threads(self, text):
        tid = packets.parse_thread(text)
        if tid == -1:
            return range(self.target.count)
        if not 1 <= tid <= self.target.count:
            raise ValueError(f"no thread {tid}")
        return (tid - 1,)

    # -- state packets ------------------------------------------------------------------------------------
    def why(self, args):
        return self.stop_reply(self.stop)

    def _stopped_only(self):
        if self.state != STOPPED:
            raise DebugRefused("the guest is running (all-stop): interrupt it first")

    def read_registers(self, args):
        self._stopped_only()
        return encode_all(self.target.registers(self.g_thread)).hex()

    def write_registers(self, args):
        self._stopped_only()
        new = decode_all(packets.hex_bytes(args))
        old = self.target.registers(self.g_thread)
        changes = {n: v for n, v in new.items() if BY_NAME[n].encode(v) != BY_NAME[n].encode(old.get(n, 0))}
        if changes:
            self.target.set_registers(self.g_thread, changes)
        return "OK"

    def read_register(self, args):
        self._stopped_only()
        number = packets.parse_hex(args)
        if number >= len(REGISTERS):
            return "E.no such register"
        reg = REGISTERS[number]
        return reg.encode(self.target.registers(self.g_thread)[reg.name]).hex()

    def write_register(self, args):
        self._stopped_only()
        number, sep, value = args.partition("=")
        if not sep:
            raise ValueError("expected N=VALUE")
        number = packets.parse_hex(number)
        if number >= len(REGISTERS):
            return "E.no such register"
        reg = REGISTERS[number]
        data = packets.hex_bytes(value)
        if len(data) != reg.size:
            raise ValueError(f"{reg.name} takes {reg.size} bytes")
        self.target.set_registers(self.g_thread, {reg.name: reg.decode(data)})
        return "OK"

    def read_memory(self, args):
        self._stopped_only()
        addr, length = _parse_address_length(args)
        data = self.target.read_memory(self.g_thread, addr, min(length, MAX_MEMORY))
        if not data and length:
            return "E14"                         # EFAULT: nothing readable there
        return data.hex()

    def write_memory(self, args):
        self._stopped_only()
        where, sep, text = args.partition(":")
        if not sep:
            raise ValueError("expected ADDR,LENGTH:DATA")
        addr, length = _parse_address_length(where)
        data = packets.hex_bytes(text)
        if len(data) != length:
            raise ValueError(f"{len(data)} bytes of data for a length of {length}")
        if data:
            self.target.write_memory(self.g_thread, addr, data)
        return "OK"

    def write_binary(self, args):
        self._stopped_only()
        where, sep, data = args.partition(b":")
        if not sep:
            raise ValueError("expected ADDR,LENGTH:DATA")
        addr, length = _parse_address_length(where.decode("latin-1"))
        if len(data) != length:
            raise ValueError(f"{len(data)} bytes of data for a length of {length}")
        if data:
            self.target.write_memory(self.g_thread, addr, bytes(data))
        return "OK"

    def set_thread(self, args):
        op, text = args[:1], args[1:]
        if op not in ("g", "c"):
            raise ValueError(f"H{op}")
        tid = packets.parse_thread(text)
        if tid > self.target.count:
            return "E.no such thread"
        index = self.stop.index if tid in (0, -1) else tid - 1
        if op == "g":
            self.g_thread = index
        else:
            self.c_thread = index
        return "OK"

    def thread_alive(self, args):
        tid = packets.parse_thread(args)
        return "OK" if 1 <= tid <= self.target.count else "E.no such thread"

    def _breakpoint_args(self, args):
        ztype, addr, kind = args.split(";", 1)[0].split(",")
        return packets.parse_hex(ztype, 5), packets.parse_hex(addr), packets.parse_hex(kind, 1 << 16)

    def insert(self, args):
        self._stopped_only()
        ztype, addr, kind = self._breakpoint_args(args)
        if ztype == 3:
            return ""                            # read watchpoints: x86 cannot, GDB is told it is unsupported
        self.target.insert_breakpoint(self.g_thread, ztype, addr, kind)
        return "OK"

    def remove(self, args):
        self._stopped_only()
        ztype, addr, kind = self._breakpoint_args(args)
        if ztype == 3:
            return ""
        self.target.remove_breakpoint(ztype, addr, kind)
        return "OK"

    def detach(self, args):
        """Breakpoints out, stepping off, every vCPU released; the client goes."""
        self.leave()
        self.send("OK")
        self.closed = True
        return None

    def leave(self):
        """What detaching and a vanished client both do."""
        if self.state == DETACHED:
            return
        if self.state == RUNNING:
            self.target.hold_all()
        with self.lock:
            self.state = DETACHED
        if self.target.ended() is None:
            self.target.remove_all()
            self.target.release_all()
            self.notify("GDB has gone: breakpoints removed, the guest runs on")

    def kill(self, args):
        self.target.kill()
        self.state = DETACHED
        self.closed = True
        return None

    # -- queries ------------------------------------------------------------------------------------------
    def query(self, args):
        name, _, rest = args.partition(":")
        if name == "Supported":
            self.client_features = {f for f in rest.split(";") if f.endswith("+")}
            return (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+")
        if name == "Attached":
            return "1"                   # an existing guest: quitting GDB detaches rather than kills
        if name == "C":
            return f"QC{self.stop.index + 1:x}"
        if name == "fThreadInfo":
            return "m" + ",".join(f"{i + 1:x}" for i in range(self.target.count))
        if name == "sThreadInfo":
            return "l"
        if name.startswith("ThreadExtraInfo,"):
            index = self._threads(name.split(",", 1)[1])[0]
            return self.target.describe(index).encode().hex()
        if name == "Xfer":
            return self._xfer(rest)
        if name == "Symbol":
            return "OK"
        return ""

    def _xfer(self, rest):
        obj, op, annex, span = (rest.split(":") + ["", "", "", ""])[:4]
        if obj != "features" or op != "read":
            return ""
        if annex != "target.xml":
            return "E00"
        offset, length = _parse_address_length(span)
        data = target_xml()
        chunk = data[offset:offset + min(length, PACKET_SIZE // 2)]
        return ("l" if offset + len(chunk) >= len(data) else "m").encode() + chunk

    def set_query(self, args):
        if args == "StartNoAckMode":
            self.send("OK")
            self.acks = False
            self.reader.check = False
            return None
        if args.startswith("NonStop:"):
            return "OK" if args == "NonStop:0" else "E.non-stop mode is not supported (all-stop only)"
        return ""

    def v_packet(self, args):
        if args.startswith("Cont"):
            return self.v_cont(args[4:])
        if args.startswith("Kill"):
            self.target.kill()
            self.state = DETACHED
            self.send("OK")
            self.closed = True
            return None
        return ""


class GdbStub:
    """The listener and the loop thread; one Session per connected client."""

    def __init__(self, machine, endpoint, notify=None):
        self.endpoint = endpoint
        host, port = parse_gdb(endpoint)
        self.target = MachineTarget(machine)
        self.notify = notify or _stderr_notice
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            self.listener = socket.socket(family, kind, proto)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(address)
            self.listener.listen(1)
        except OSError as e:
            raise UserError(f"--gdb: cannot listen on {endpoint}: {e.strerror or e}") from None
        self.listener.setblocking(False)
        self.loop = EventLoop("gdb")
        self.client = None
        self.peer = None
        self.session = None
        self._thread = None

    def start(self):
        """Hold every vCPU before its first instruction, and listen."""
        self.target.machine.debug_hold(range(self.target.count))
        self.loop.add(self.listener, self._accept)
        self._thread = self.loop.start()
        threading.Thread(target=self._watch_end, name="gdb-end", daemon=True).start()
        self.notify(f"the guest waits for GDB on {self.endpoint} (gdb: target remote {self._address()})")

    def _address(self):
        host, port = self.listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def status(self):
        return {"endpoint": self.endpoint, "client": self.peer,
                "state": self.session.state if self.session else "waiting"}

    def close(self):
        """The VM has ended: a client still waiting hears the exit status (W), then the loop and sockets go."""
        outcome = self.target.ended()

        def last():
            if outcome is not None:
                self._ended(outcome.status)
            self.loop.stop()
        if self._thread is not None and self._thread.is_alive():
            self.loop.call_soon(last)
            self._thread.join(2.0)
        else:
            self.loop.stop()
        for s in (self.client, self.listener):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    # -- on the loop --------------------------------------------------------------------------------------
    def _accept(self):
        try:
            conn, peer = self.listener.accept()
        except OSError:
            return
        if self.client is not None or self.target.ended() is not None:
            conn.close()                         # one client at a time
            return
        conn.settimeout(SEND_TIMEOUT)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = conn
        self.peer = f"{peer[0]}:{peer[1]}"
        if not self.target.hold_all():          # the first client may come before the vCPU threads have parked
            self.notify("a vCPU did not stop for the new GDB client")
        self.session = Session(self.target, self._send, self.loop.call_soon, self.notify)
        self.target.on_stop = self.session.vcpu_stopped
        self.loop.add(conn, self._readable)
        self.notify(f"GDB client {self.peer} attached; every vCPU is stopped")

    def _send(self, data):
        try:
            self.client.sendall(data)
        except (OSError, AttributeError):
            self.loop.call_soon(self._drop)

    def _readable(self):
        try:
            data = self.client.recv(65536)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        if not data:
            return self._drop()
        try:
            self.session.feed(data)
        except HvError as e:                     # a refusal that escaped the packet handlers: the client goes
            self.notify(f"GDB session ended: {e}")
            self.session.closed = True
        if self.session.closed:
            self._drop()

    def _drop(self):
        """The client went (or detached, or was dropped): the guest runs on without it."""
        if self.client is None:
            return
        session, conn = self.session, self.client
        self.target.on_stop = None
        session.leave()
        self.loop.remove(conn)
        try:
            conn.close()
        except OSError:
            pass
        self.client = self.peer = None

    def _watch_end(self):
        outcome = None
        while outcome is None and not self.loop.stopped:
            outcome = self.target.machine.wait(1.0)
        if outcome is not None:
            self.loop.call_soon(lambda: self._ended(outcome.status))

    def _ended(self, status):
        if self.session is not None and self.client is not None:
            self.session.vm_ended(status)
            self.session.closed = True
            self._drop()


def _stderr_notice(line):
    """A line for the user: hvctl run's stderr (its terminal may be raw), a supervised worker's log."""
    end = "\r\n" if os.isatty(2) else "\n"
    try:
        os.write(2, f"hvctl: gdb: {line}{end}".encode())
    except OSError:
        pass
