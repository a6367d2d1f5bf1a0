"""Serial8250 register model: Linux 8250 probe sequences and interrupt behaviour, no KVM."""
import threading

import pytest

from pyhv.devices.legacy.serial import RX_FIFO_SIZE, Serial8250

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
FCR = IIR
DLL, DLM = 0, 1
OUT2, LOOP = 0x08, 0x10


class Uart:
    """A Serial8250 with its IRQ line and output recorded."""

    def __init__(self):
        self.levels = []
        self.tx = bytearray()
        self.dev = Serial8250(irq=self.levels.append, out=self.tx.extend)

    def inb(self, off):
        return self.dev.read(off, 1)[0]

    def outb(self, off, value):
        self.dev.write(off, bytes((value,)))

    @property
    def line(self):
        return self.levels[-1] if self.levels else False


@pytest.fixture
def u():
    return Uart()


def linux_autoconfig(u):
    """The register traffic of Linux's autoconfig()/autoconfig_16550a(), returning the type it picks."""
    save_ier = u.inb(IER)                       # scratch test on IER
    u.outb(IER, 0)
    scratch2 = u.inb(IER) & 0x0F
    u.outb(IER, 0x0F)
    scratch3 = u.inb(IER) & 0x0F
    u.outb(IER, save_ier)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test)"
    save_mcr = u.inb(MCR)                       # loopback test (skipped with UPF_SKIP_TEST)
    u.outb(MCR, LOOP | 0x0A)
    status1 = u.inb(MSR) & 0xF0
    u.outb(MCR, save_mcr)
    if status1 != 0x90:
        return "none (loopback test)"
    u.outb(LCR, 0xBF)                           # EFR = 0 (same address as FCR)
    u.outb(FCR, 0)
    u.outb(LCR, 0)
    u.outb(FCR, 0x01)
    kind = {0: "8250/16450", 1: "unknown", 2: "16550", 3: "16550A"}[u.inb(IIR) >> 6]
    if kind != "16550A":
        return kind
    u.outb(LCR, 0x80)                           # EFR present with DLAB? (ST16C650V1)
    if u.inb(IIR) == 0:
        return "16650"
    u.outb(LCR, 0xBF)                           # EFR present with 0xBF? (ST16C650V2, TI16C752)
    if u.inb(IIR) == 0:
        return "16650V2"
    u.outb(LCR, 0)                              # National SuperIO: LOOP visible in EXCR1
    mcr = u.inb(MCR)
    u.outb(LCR, 0xE0)
    if not (u.inb(2) ^ mcr) & LOOP:
        u.outb(LCR, 0)
        u.outb(MCR, mcr ^ LOOP)
        u.outb(LCR, 0xE0)
        status2 = u.inb(2)
        u.outb(LCR, 0)
        u.outb(MCR, mcr)
        if (status2 ^ mcr) & LOOP:
            return "NS16550A"
    u.outb(LCR, 0)                              # TI16750: IIR bit 5 only with DLAB set
    u.outb(FCR, 0x21)
    s1 = u.inb(IIR) & 0xE0
    u.outb(FCR, 0x01)
    u.outb(LCR, 0x80)
    u.outb(FCR, 0x21)
    s2 = u.inb(IIR) & 0xE0
    u.outb(FCR, 0x01)
    u.outb(LCR, 0)
    if s1 == 0xC0 and s2 == 0xE0:
        return "16750"
    ier = u.inb(IER)                            # XScale: IER bit 6 (UUE) sticks
    u.outb(IER, ier & ~0x40)
    if not u.inb(IER) & 0x40:
        u.outb(IER, ier | 0x40)
        if u.inb(IER) & 0x40:
            return "XScale"
    u.outb(IER, ier)
    return "16550A"


# -- probing -------------------------------------------------------------------

def test_scratch_register_round_trips(u):
    for v in (0x55, 0xAA, 0x00, 0xFF):
        u.outb(SCR, v)
        assert u.inb(SCR) == v


def test_ier_keeps_only_its_four_bits(u):
    u.outb(IER, 0xFF)
    assert u.inb(IER) == 0x0F
    u.outb(IER, 0)
    assert u.inb(IER) == 0


def test_linux_autoconfig_detects_a_16550a(u):
    assert linux_autoconfig(u) == "16550A"
    assert u.levels == []                       # OUT2 was never set: no interrupt during the probe
    assert u.tx == b""


def test_loopback_wires_mcr_to_msr(u):
    u.outb(MCR, LOOP | 0x0A)                    # RTS | OUT2 -> CTS | DCD
    assert u.inb(MSR) & 0xF0 == 0x90
    u.outb(MCR, LOOP | 0x05)                    # DTR | OUT1 -> DSR | RI
    assert u.inb(MSR) & 0xF0 == 0x60
    u.outb(MCR, 0)
    assert u.inb(MSR) & 0xF0 == 0xB0            # normal mode: DCD | DSR | CTS


def test_loopback_sends_thr_to_the_receiver(u):
    u.outb(MCR, LOOP)
    u.outb(THR, 0x41)
    assert u.tx == b""
    assert u.inb(LSR) & 0x01
    assert u.inb(THR) == 0x41
    assert not u.inb(LSR) & 0x01


def test_fifo_enable_shows_in_iir_bits_7_6(u):
    assert u.inb(IIR) == 0x01                   # no FIFO, no interrupt
    u.outb(FCR, 0x01 | 0x06)
    assert u.inb(IIR) == 0xC1
    u.outb(FCR, 0)
    assert u.inb(IIR) & 0xC0 == 0


def test_fcr_clear_rx_and_fifo_toggle_empty_the_receiver(u):
    u.outb(FCR, 0x01)
    u.dev.feed(b"abc")
    u.outb(FCR, 0x01)                           # no change, no clear bit: data kept
    assert u.inb(LSR) & 0x01
    u.outb(FCR, 0x03)
    assert not u.inb(LSR) & 0x01
    u.dev.feed(b"abc")
    u.outb(FCR, 0)                              # disabling the FIFOs empties them
    assert not u.inb(LSR) & 0x01


def test_divisor_latch(u):
    u.outb(IER, 0x05)
    u.outb(LCR, 0x83)
    u.outb(DLL, 0x01)
    u.outb(DLM, 0x02)
    assert (u.inb(DLL), u.inb(DLM)) == (0x01, 0x02)
    u.outb(LCR, 0x03)
    assert u.inb(IER) == 0x05                   # IER untouched by the DLM write
    assert u.tx == b""                          # the DLL write transmitted nothing
    u.outb(LCR, 0x83)
    assert (u.inb(DLL), u.inb(DLM)) == (0x01, 0x02)


def test_lsr_reports_transmitter_always_empty(u):
    assert u.inb(LSR) == 0x60
    u.outb(THR, ord("x"))
    assert u.inb(LSR) == 0x60
    assert u.tx == b"x"


# -- interrupts -----------------------------------------------------------------

def test_enabling_thri_raises_thre_and_reading_iir_clears_it(u):
    u.outb(FCR, 0x01)
    u.outb(MCR, OUT2)
    u.outb(IER, 0x02)
    assert u.levels == [True]
    assert u.inb(IIR) == 0xC2
    assert u.levels == [True, False]
    assert u.inb(IIR) == 0xC1


def test_thr_write_rearms_thre(u):
    u.outb(MCR, OUT2)
    u.outb(IER, 0x02)
    assert u.inb(IIR) == 0x02
    u.outb(THR, ord("a"))
    assert u.tx == b"a"
    assert u.levels == [True, False, True]
    assert u.inb(IIR) == 0x02
    u.outb(IER, 0)
    assert u.levels[-1] is False
    u.outb(THR, ord("b"))                       # polled output raises nothing
    assert u.levels == [True, False, True, False]
    assert u.tx == b"ab"


def test_linux_thre_retest_sees_thre_reasserted(u):
    """serial8250_do_startup: a UART that does not re-raise THRE gets UART_BUG_THRE."""
    u.outb(MCR, OUT2 | 0x03)
    u.outb(IER, 0x02)
    iir1 = u.inb(IIR)
    u.outb(IER, 0)
    u.outb(IER, 0x02)
    iir = u.inb(IIR)
    u.outb(IER, 0)
    assert not iir1 & 0x01 and not iir & 0x01
    assert u.line is False


def test_out2_gates_the_irq_line(u):
    u.outb(IER, 0x02)
    assert u.levels == []                       # pending, but OUT2 clear
    u.outb(MCR, OUT2)
    assert u.levels == [True]
    u.outb(MCR, 0)
    assert u.levels == [True, False]
    u.outb(MCR, OUT2 | LOOP)                    # loopback disconnects the OUT pins
    assert u.levels == [True, False]
    assert u.inb(IIR) == 0x02                   # the source itself is still pending


def test_rx_data_raises_and_draining_clears(u):
    u.outb(FCR, 0x01)
    u.outb(MCR, OUT2)
    u.outb(IER, 0x01)
    assert u.inb(IIR) == 0xC1
    u.dev.feed(b"hi")
    assert u.levels == [True]
    assert u.inb(IIR) == 0xC4
    assert u.inb(LSR) & 0x01
    assert u.inb(THR) == ord("h")
    assert u.levels == [True]                   # one byte left
    assert u.inb(THR) == ord("i")
    assert u.levels == [True, False]
    assert u.inb(IIR) == 0xC1
    assert not u.inb(LSR) & 0x01


def test_rx_data_outranks_thre(u):
    u.outb(MCR, OUT2)
    u.outb(IER, 0x03)
    u.dev.feed(b"x")
    assert u.inb(IIR) == 0x04                   # does not acknowledge the THRE behind it
    u.inb(THR)
    assert u.inb(IIR) == 0x02
    assert u.inb(IIR) == 0x01
    assert u.line is False


def test_feed_with_rx_interrupt_disabled_raises_nothing(u):
    u.outb(MCR, OUT2)
    u.dev.feed(b"x")
    assert u.levels == []
    u.outb(IER, 0x01)                           # enabling it later raises the pending data
    assert u.levels == [True]


def test_overrun_counts_and_sets_oe(u):
    u.outb(MCR, OUT2)
    u.outb(IER, 0x05)
    u.dev.feed(b"a" * (RX_FIFO_SIZE - 2))
    u.dev.feed(b"bcdef")
    c = u.dev.counters()
    assert c["rx_overruns"] == 3 and c["rx_bytes"] == RX_FIFO_SIZE
    assert u.inb(IIR) == 0x06                   # line status outranks data available
    assert u.inb(LSR) == 0x60 | 0x02 | 0x01
    assert u.inb(LSR) == 0x60 | 0x01            # OE clears on read
    assert u.inb(IIR) == 0x04
    data = bytes(u.inb(THR) for _ in range(RX_FIFO_SIZE))
    assert data == b"a" * (RX_FIFO_SIZE - 2) + b"bc"   # the FIFO kept the oldest bytes
    assert u.line is False


def test_loopback_modem_status_interrupt(u):
    u.outb(MCR, LOOP)
    u.inb(MSR)                                  # forget the deltas from entering loopback
    u.outb(IER, 0x08)
    assert u.inb(IIR) == 0x01
    u.outb(MCR, LOOP | 0x02)                    # RTS -> CTS changes
    assert u.inb(IIR) == 0x00
    assert u.inb(MSR) == 0x10 | 0x01            # CTS | DCTS
    assert u.inb(MSR) == 0x10
    assert u.inb(IIR) == 0x01


def test_linux_style_interrupt_driven_transmit(u):
    """The tty path: enable THRI, and each interrupt refill up to 16 bytes until done."""
    message = bytes(range(32, 127)) * 3
    pending = bytearray(message)
    u.outb(FCR, 0x01)
    u.outb(MCR, OUT2 | 0x03)
    u.outb(IER, 0x05)
    u.outb(IER, 0x07)                           # start_tx
    interrupts = 0
    while u.line:                               # the ISR loops until IIR says no interrupt
        interrupts += 1
        while not (iir := u.inb(IIR)) & 0x01:
            assert iir & 0x0F == 0x02
            for _ in range(16):
                if not pending:
                    break
                u.outb(THR, pending.pop(0))
            if not pending:
                u.outb(IER, 0x05)               # stop_tx
        assert interrupts < 50
    assert u.tx == message
    assert u.dev.counters()["tx_bytes"] == len(message)


# -- access widths and counters ---------------------------------------------------

def test_odd_accesses(u):
    u.outb(SCR, 0x12)
    assert u.dev.read(SCR, 2) == b"\x12\xff"
    assert u.dev.read(8, 1) == b"\xff"
    assert u.dev.read(-1, 2) == b"\xff\xff"
    u.dev.write(SCR, b"\x34\x56")
    assert u.inb(SCR) == 0x34
    u.dev.write(8, b"\x00")
    u.dev.write(SCR, b"")
    assert u.inb(SCR) == 0x34


def test_counters(u):
    u.outb(MCR, OUT2)
    u.outb(IER, 0x01)
    for ch in b"ok":
        u.outb(THR, ch)
    u.dev.feed(b"in")
    u.inb(THR), u.inb(THR)
    u.dev.feed(b"!")
    assert u.dev.counters() == {"tx_bytes": 2, "rx_bytes": 3, "rx_overruns": 0, "irqs_raised": 2}


def test_concurrent_writers_and_feeder_keep_count(u):
    u.outb(MCR, OUT2)
    u.outb(IER, 0x03)
    n = 2000

    def writer(ch):
        for _ in range(n):
            u.outb(THR, ch)

    threads = [threading.Thread(target=writer, args=(c,)) for c in b"abcd"]
    threads.append(threading.Thread(target=lambda: [u.dev.feed(b"z") for _ in range(n)]))
    for t in threads:
        t.start()
    got = bytearray()
    while any(t.is_alive() for t in threads) or u.inb(LSR) & 0x01:
        if u.inb(LSR) & 0x01:
            got.append(u.inb(THR))
    for t in threads:
        t.join()
    assert sorted(u.tx) == sorted(b"abcd" * n)
    assert set(got) <= {ord("z")}
    assert len(got) + u.dev.counters()["rx_overruns"] == n     # a slow reader loses bytes, but counts them
    assert all(a != b for a, b in zip(u.levels, u.levels[1:]))   # the callback only sees changes
