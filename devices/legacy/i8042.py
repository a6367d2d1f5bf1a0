"""i8042 PS/2 controller with an AT keyboard: Linux probes it, the guest resets the machine, the host presses keys.

The guest reboots by pulsing the CPU reset line through the controller
(command 0xFE, or 0xD1 with output-port bit 0 clear); that calls `reset()`,
outside the lock.  Bytes for the guest sit in a small output buffer (status
bit 0); while the command byte enables the keyboard interrupt, IRQ 1 is high
whenever one is waiting, and drops and rises again between bytes (the ISA
line is edge-triggered, so each byte is an edge).  `press_ctrl_alt_del()` is
how `hvctl shutdown` asks a guest to power off: Linux's VT keyboard handler
takes Ctrl-Alt-Del to its init (Firecracker's SendCtrlAltDel does the same).
Keys are scancode set 1, what the controller delivers with translation on.

There is no AUX (mouse) port.  0xD3 (AUX loopback) is an unknown command, so
Linux's loop test fails, and the AUX interface test then answers 0x01 ("clock
line stuck"): i8042_check_aux gives up at once.  Linux accepts 0x00 and 0xFF
there as a working port and then waits 250 ms for an IRQ 12 that never comes.
"""
import threading
from collections import deque

from pyhv.proto.errors import StateError, state_bytes

STATUS_OBF, STATUS_SYS, STATUS_CMD, STATUS_UNLOCKED = 0x01, 0x04, 0x08, 0x10
CTR_KBDINT, CTR_KBDDIS, CTR_AUXDIS = 0x01, 0x10, 0x20
CTR_DEFAULT = 0x65                  # XLATE | AUXDIS | SYS | KBDINT, as firmware leaves it
OUTPORT_RESET, OUTPORT_DEFAULT = 0x01, 0x03   # bit 0 is the CPU reset line, active low; bit 1 A20
AUX_TEST_NO_AUX = 0x01
OUT_BUFFER = 16                     # Linux's i8042_flush gives up after 16 bytes

CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_AUX_DISABLE, CMD_AUX_ENABLE, CMD_AUX_TEST = 0xA7, 0xA8, 0xA9
CMD_SELF_TEST, CMD_KBD_TEST, CMD_KBD_DISABLE, CMD_KBD_ENABLE = 0xAA, 0xAB, 0xAD, 0xAE
CMD_READ_OUTPORT, CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OUT = 0xD0, 0xD1, 0xD2
CMD_PULSE = 0xF0                    # 0xF0..0xFF pulse the output-port bits clear in the low nibble

_REPLIES = {CMD_AUX_TEST: AUX_TEST_NO_AUX, CMD_SELF_TEST: 0x55, CMD_KBD_TEST: 0x00}
_CTR_BITS = {CMD_AUX_DISABLE: (CTR_AUXDIS, True), CMD_AUX_ENABLE: (CTR_AUXDIS, False),
             CMD_KBD_DISABLE: (CTR_KBDDIS, True), CMD_KBD_ENABLE: (CTR_KBDDIS, False)}
_KBD_REPLIES = {0xFF: (0xFA, 0xAA), 0xF2: (0xFA, 0xAB, 0x83), 0xEE: (0xEE,)}   # reset, identify, echo
_ACK = (0xFA,)
_PENDING = (CMD_WRITE_CTR, CMD_WRITE_OUTPORT, CMD_WRITE_KBD_OUT)   # commands that wait for a data byte
# Ctrl, Alt, Delete (an E0 key) pressed, then released in reverse order: scancode set 1
CTRL_ALT_DEL = (0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D)


class _Port:
    """One controller port in the bus's `read(offset, size)` / `write(offset, data)` shape."""

    __slots__ = ("_read", "_write")

    def __init__(self, read, write):
        self._read, self._write = read, write

    def read(self, offset, size):
        value = self._read() if offset == 0 else 0xFF
        return bytes((value,)) + b"\xff" * (size - 1) if size > 0 else b""

    def write(self, offset, data):
        if offset == 0 and data:
            self._write(data[0])


class I8042:
    """Data port 0x60 and status/command port 0x64 of an AT keyboard controller."""

    def __init__(self, reset, irq=None):
        """`reset()` ends the VM; `irq(level)` drives IRQ 1."""
        self._reset = reset
        self._irq = irq
        self._level = False
        self._driver = False            # a driver wrote the command byte: someone may read keys
        self._lock = threading.Lock()
        self._out = deque()             # bytes waiting for the guest at port 0x60
        self._last = 0                  # what the output register holds once drained
        self._ctr = CTR_DEFAULT
        self._outport = OUTPORT_DEFAULT
        self._pending = None            # a command waiting for its data byte
        self._status_cmd = 0            # status bit 3: the last write went to port 0x64
        self._commands = self._resets = self._keys = 0
        self._data_port = _Port(self.read_data, self.write_data)
        self._command_port = _Port(self.read_status, self.write_command)

    def data_port(self):
        return self._data_port

    def command_port(self):
        return self._command_port

    def counters(self):
        with self._lock:
            return {"commands": self._commands, "resets": self._resets, "keys": self._keys}

    def press_ctrl_alt_del(self):
        """Queue Ctrl-Alt-Del for the guest; False if no keyboard driver listens (none has written the command
        byte, as in a raw guest, or it masks the interrupt or disabled the keyboard): then nothing is queued."""
        with self._lock:
            listening = self._driver and self._ctr & CTR_KBDINT and not self._ctr & CTR_KBDDIS
            if listening:
                self._keys += 1
                self._queue(CTRL_ALT_DEL)
            edges = self._edges()
        self._drive(edges)
        return bool(listening)

    def snapshot(self):
        with self._lock:
            return {"out": bytes(self._out), "last": self._last, "ctr": self._ctr, "outport": self._outport,
                    "pending": self._pending, "status_cmd": self._status_cmd, "commands": self._commands,
                    "resets": self._resets, "keys": self._keys, "level": self._level,
                    "driver": self._driver}

    def restore(self, state):
        """Take `snapshot()`'s values; StateError for a register value no controller can hold."""
        byte = {name: int(state[name]) for name in ("last", "ctr", "outport", "status_cmd")}
        pending = None if state["pending"] is None else int(state["pending"])
        if any(not 0 <= v <= 0xFF for v in byte.values()) or pending not in (None, *_PENDING):
            raise StateError(f"i8042 state with impossible registers: {byte}, pending {pending!r}")
        if byte["status_cmd"] not in (0, STATUS_CMD):
            raise StateError(f"i8042 status bit 3 saved as {byte['status_cmd']!r}")
        with self._lock:
            self._out = deque(state_bytes(state["out"], "i8042 output buffer")[:OUT_BUFFER])
            self._last, self._ctr, self._outport = byte["last"], byte["ctr"], byte["outport"]
            self._pending = pending
            self._status_cmd = byte["status_cmd"]
            self._commands, self._resets = int(state["commands"]), int(state["resets"])
            self._keys, self._level = int(state.get("keys", 0)), bool(state.get("level", False))
            self._driver = bool(state.get("driver", False))

    # -- port 0x60 ----------------------------------------------------------

    def read_data(self):
        with self._lock:
            popped = bool(self._out)
            if popped:
                self._last = self._out.popleft()
            value = self._last
            edges = self._edges(new_byte=popped)
        self._drive(edges)
        return value

    def write_data(self, b):
        reset = False
        with self._lock:
            self._status_cmd = 0
            cmd, self._pending = self._pending, None
            if cmd == CMD_WRITE_CTR:
                self._ctr = b
                self._driver = True
            elif cmd == CMD_WRITE_KBD_OUT:
                self._queue((b,))
            elif cmd == CMD_WRITE_OUTPORT:
                self._outport = b
                reset = not b & OUTPORT_RESET
                self._resets += reset
            else:                           # no command pending: the byte is for the keyboard
                self._queue(_KBD_REPLIES.get(b, _ACK))
            edges = self._edges()
        self._drive(edges)
        if reset:
            self._reset()

    # -- port 0x64 ----------------------------------------------------------

    def read_status(self):
        with self._lock:
            return (STATUS_OBF if self._out else 0) | STATUS_SYS | STATUS_UNLOCKED | self._status_cmd

    def write_command(self, b):
        with self._lock:
            self._commands += 1
            self._status_cmd = STATUS_CMD
            self._pending = None
            reset = False
            if b in _PENDING:
                self._pending = b
            elif b == CMD_READ_CTR:
                self._reply(self._ctr)
            elif b == CMD_READ_OUTPORT:
                self._reply(self._outport)
            elif b in _REPLIES:
                self._reply(_REPLIES[b])
            elif b in _CTR_BITS:
                bit, on = _CTR_BITS[b]
                self._ctr = self._ctr | bit if on else self._ctr & ~bit
            elif b & 0xF0 == CMD_PULSE:
                reset = not b & OUTPORT_RESET
                self._resets += reset
            edges = self._edges()
        self._drive(edges)
        if reset:
            self._reset()

    # -- IRQ 1 ------------------------------------------------------------------

    def _edges(self, new_byte=False):
        """The levels to drive IRQ 1 through (lock held): high while a byte waits and the interrupt is on;
        after the guest took a byte with another behind it, low and high again for a fresh edge."""
        want = bool(self._out) and bool(self._ctr & CTR_KBDINT)
        if self._irq is None:
            return ()
        edges = (False, True) if want and self._level and new_byte else ((want,) if want != self._level else ())
        self._level = want
        return edges

    def _drive(self, edges):
        for level in edges:
            self._irq(level)

    # -- output buffer (lock held) --------------------------------------------

    def _reply(self, value):
        """A controller reply replaces anything queued: with no IRQ, stale keyboard
        bytes would otherwise be read back as the answer to the next command."""
        self._out.clear()
        self._out.append(value)

    def _queue(self, values):
        for v in values:
            if len(self._out) < OUT_BUFFER:
                self._out.append(v)
