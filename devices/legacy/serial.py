"""16550A UART: the guest's serial console (COM1), polled or interrupt-driven.

Only the register file is modelled.  Transmission is instant: THR is always
empty (LSR.THRE|TEMT stay set) and each byte written goes straight to `out`.
Host input arrives through `feed` into an RX FIFO much deeper than the real
16 bytes, so pasted text is not lost while the guest is slow to drain it.
The interrupt line follows the highest-priority enabled source (what IIR
reports), gated by MCR.OUT2 as on a PC; `irq(level)` is called only when the
level changes, under the lock, so two vCPUs can never deliver levels out of
order.
"""
import threading
from collections import deque

from pyhv.proto.errors import StateError, state_bytes

# Register offsets; with LCR.DLAB set, offsets 0 and 1 are DLL and DLM.
THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_MSI, IIR_NONE, IIR_THRI, IIR_RDI, IIR_RLSI = 0x00, 0x01, 0x02, 0x04, 0x06
IIR_FIFO_ON = 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE_TEMT = 0x01, 0x02, 0x60
MSR_NORMAL = 0xB0                   # DCD | DSR | CTS: the other end is always ready

RX_FIFO_SIZE = 1024
_BYTE = tuple(bytes((i,)) for i in range(256))   # the read path allocates nothing


def _reply(value, size):
    """The register in the first byte; a wider access reads all-ones above it."""
    return _BYTE[value] if size == 1 else (_BYTE[value] + b"\xff" * size)[:size]


class Serial8250:
    """A 16550A at 8 consecutive ports; `read`/`write` take an offset 0..7."""

    def __init__(self, irq, out, rx_fifo_size=RX_FIFO_SIZE):
        self._irq = irq
        self._out = out
        self._rx_size = rx_fifo_size
        self._lock = threading.Lock()       # all register state
        self._tx_lock = threading.Lock()    # held across out(): bytes leave in THR-write order
        self._rx = deque()
        self._ier = self._fcr = self._lcr = self._mcr = self._scr = 0
        self._dll, self._dlm = 12, 0        # 9600 baud, as a BIOS leaves it
        self._lsr_err = 0                   # OE, until the guest reads LSR
        self._msr_delta = 0                 # DCTS/DDSR/TERI/DDCD, until the guest reads MSR
        self._thre_pending = False
        self._level = False
        self._tx_bytes = self._rx_bytes = self._rx_overruns = self._irqs_raised = 0

    # -- bus interface ------------------------------------------------------

    def read(self, offset, size):
        if not 0 <= offset < 8:
            return b"\xff" * size
        with self._lock:
            value = self._read(offset)
        return _reply(value, size)

    def write(self, offset, data):
        if not data or not 0 <= offset < 8:
            return
        with self._tx_lock:
            with self._lock:
                sent = self._write(offset, data[0])
            if sent is not None:
                self._out(_BYTE[sent])

    # -- host side ----------------------------------------------------------

    def feed(self, data):
        """Host input: queue `data` for the guest; bytes past a full FIFO are overruns."""
        if data:
            with self._lock:
                self._receive(data)
                self._update_irq()

    def counters(self):
        with self._lock:
            return {"tx_bytes": self._tx_bytes, "rx_bytes": self._rx_bytes,
                    "rx_overruns": self._rx_overruns, "irqs_raised": self._irqs_raised}

    # -- state ----------------------------------------------------------------
    _STATE = ("_ier", "_fcr", "_lcr", "_mcr", "_scr", "_dll", "_dlm", "_lsr_err", "_msr_delta", "_thre_pending",
              "_level", "_tx_bytes", "_rx_bytes", "_rx_overruns", "_irqs_raised")
    _REGISTERS = {"_ier": 0x0F, "_fcr": 0xFF, "_lcr": 0xFF, "_mcr": 0x1F, "_scr": 0xFF, "_dll": 0xFF, "_dlm": 0xFF,
                  "_lsr_err": LSR_OE, "_msr_delta": 0x0F}          # the bits each register can hold

    def snapshot(self):
        """The register file, unread input and interrupt level, as plain values."""
        with self._lock:
            state = {name[1:]: getattr(self, name) for name in self._STATE}
            state["rx"] = bytes(self._rx)
        return state

    def restore(self, state):
        """Take `snapshot()`'s values (StateError for one no UART can hold); the IRQ line's level is the interrupt
        controller's to restore."""
        values = {}
        for name in self._STATE:
            value = state[name[1:]]
            if type(value) not in (int, bool) or value < 0:
                raise StateError(f"serial state {name[1:]}={value!r} is not a non-negative integer")
            if value & ~self._REGISTERS.get(name, -1):
                raise StateError(f"serial register {name[1:]}={value!r} holds bits it cannot")
            values[name] = value
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)
            self._rx = deque(state_bytes(state["rx"], "serial input")[-self._rx_size:])

    def refresh_irq(self):
        """Drive the IRQ line to the registers' level: after a restore the new irqchip has no line of ours high."""
        with self._lock:
            self._level = False
            self._update_irq()

    # -- registers (lock held) ------------------------------------------------

    def _read(self, offset):
        if offset == THR:
            if self._lcr & LCR_DLAB:
                return self._dll
            value = self._rx.popleft() if self._rx else 0
            self._update_irq()
            return value
        if offset == IER:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if offset == IIR:
            iid = self._pending()
            if iid == IIR_THRI:             # reading IIR acknowledges THRE, as real parts do
                self._thre_pending = False
                self._update_irq()
            return iid | (IIR_FIFO_ON if self._fcr & FCR_ENABLE else 0)
        if offset == LSR:
            value = LSR_THRE_TEMT | self._lsr_err | (LSR_DR if self._rx else 0)
            if self._lsr_err:
                self._lsr_err = 0
                self._update_irq()
            return value
        if offset == MSR:
            value = self._msr_lines() | self._msr_delta
            if self._msr_delta:
                self._msr_delta = 0
                self._update_irq()
            return value
        if offset == LCR:
            return self._lcr
        return self._mcr if offset == MCR else self._scr

    def _write(self, offset, value):
        """Apply one register write; returns the byte to hand to `out`, if any."""
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._dll = value
                return None
            return self._transmit(value)
        if offset == IER:
            if dlab:
                self._dlm = value
                return None
            old, self._ier = self._ier, value & 0x0F
            if self._ier & ~old & IER_THRI:
                self._thre_pending = True   # THR is empty: enabling ETBEI interrupts at once (Linux's THRE test)
            elif not self._ier & IER_THRI:
                self._thre_pending = False
        elif offset == IIR:                 # FCR; toggling FIFO enable also empties the FIFOs
            if (value ^ self._fcr) & FCR_ENABLE or value & (FCR_ENABLE | FCR_CLEAR_RX) == FCR_ENABLE | FCR_CLEAR_RX:
                self._rx.clear()
            self._fcr = value
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            old = self._msr_lines()
            self._mcr = value & 0x1F
            new = self._msr_lines()
            self._msr_delta |= ((old ^ new) >> 4 & 0x0B) | ((old & ~new) >> 4 & 0x04)  # TERI: RI fell
        elif offset == SCR:
            self._scr = value
        self._update_irq()                  # LSR/MSR writes (factory test) are ignored
        return None

    def _transmit(self, value):
        self._thre_pending = bool(self._ier & IER_THRI)   # written and gone: THR is empty again
        if self._mcr & MCR_LOOP:
            self._receive(_BYTE[value])
            self._update_irq()
            return None
        self._tx_bytes += 1
        self._update_irq()
        return value

    def _receive(self, data):
        room = self._rx_size - len(self._rx)
        if len(data) > room:
            self._rx_overruns += len(data) - room
            self._lsr_err |= LSR_OE
            data = data[:room]
        self._rx.extend(data)
        self._rx_bytes += len(data)

    def _msr_lines(self):
        """CTS/DSR/RI/DCD: fixed in normal mode; in loopback RTS, DTR, OUT1, OUT2 drive them."""
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_NORMAL
        return (mcr & MCR_RTS) << 3 | (mcr & MCR_DTR) << 5 | (mcr & (MCR_OUT1 | MCR_OUT2)) << 4

    def _pending(self):
        """IIR's interrupt id: the highest-priority source that IER enables."""
        ier = self._ier
        if ier & IER_RLSI and self._lsr_err:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            return IIR_RDI
        if ier & IER_THRI and self._thre_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self):
        # On a PC, OUT2 enables the IRQ driver; in loopback the OUT pins are
        # disconnected, so the line stays low while Linux probes.
        level = self._mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2 and self._pending() != IIR_NONE
        if level != self._level:
            self._level = level
            if level:
                self._irqs_raised += 1
            self._irq(level)
