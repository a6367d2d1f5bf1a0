"""I8042 controller model: Linux's probe commands and the reset line, no KVM."""
import pytest

from pyhv.devices.legacy.i8042 import I8042

OBF, SYS, CMD, AUXDATA = 0x01, 0x04, 0x08, 0x20
CTR_KBDDIS, CTR_AUXDIS = 0x10, 0x20


class Kbc:
    def __init__(self):
        self.resets = 0
        self.dev = I8042(reset=self._reset)

    def _reset(self):
        self.resets += 1
        self.dev.read_status()                  # called outside the lock: re-entering must not deadlock

    def command(self, cmd, params=(), nreply=0):
        """Linux's __i8042_command: command, data bytes out, then poll for each reply byte."""
        self.dev.write_command(cmd)
        for p in params:
            self.dev.write_data(p)
        replies = []
        for _ in range(nreply):
            status = self.dev.read_status()
            if not status & OBF:
                raise TimeoutError(f"no reply to 0x{cmd:02x}")
            replies.append((self.dev.read_data(), bool(status & AUXDATA)))
        return replies

    def flush(self):
        """Linux's i8042_flush: -EIO if more than 16 bytes come out."""
        for _ in range(17):
            if not self.dev.read_status() & OBF:
                return True
            self.dev.read_data()
        return False


@pytest.fixture
def k():
    return Kbc()


def test_idle_status(k):
    status = k.dev.read_status()
    assert not status & OBF
    assert status & SYS
    assert status != 0xFF                       # not "no controller"


def test_self_test_and_interface_test(k):
    assert k.command(0xAA, nreply=1) == [(0x55, False)]
    assert not k.dev.read_status() & OBF
    assert k.command(0xAB, nreply=1) == [(0x00, False)]
    assert k.dev.read_status() & SYS


def test_command_byte_read_and_write(k):
    [(ctr, _)] = k.command(0x20, nreply=1)
    assert ctr & 0x40                           # translation on, as firmware leaves it
    k.command(0x60, [0x47])
    assert k.command(0x20, nreply=1) == [(0x47, False)]


def test_status_bit3_follows_the_last_port_written(k):
    k.dev.write_command(0x60)
    assert k.dev.read_status() & CMD
    k.dev.write_data(0x45)
    assert not k.dev.read_status() & CMD


def test_port_disable_enable_toggle_ctr_bits(k):
    k.command(0xA8)
    k.command(0xAE)
    assert k.command(0x20, nreply=1)[0][0] & (CTR_AUXDIS | CTR_KBDDIS) == 0
    k.command(0xA7)
    assert k.command(0x20, nreply=1)[0][0] & (CTR_AUXDIS | CTR_KBDDIS) == CTR_AUXDIS
    k.command(0xAD)
    assert k.command(0x20, nreply=1)[0][0] & (CTR_AUXDIS | CTR_KBDDIS) == CTR_AUXDIS | CTR_KBDDIS


def test_linux_check_aux_gives_up_at_once(k):
    """i8042_check_aux: the loop test fails, then the AUX test must not look like a working port."""
    assert k.flush()
    [(byte, aux)] = k.command(0xD3, [0x5A], nreply=1)
    assert not aux                              # Linux: "auxerr", the loop command failed
    [(param, _)] = k.command(0xA9, nreply=1)
    assert param not in (0x00, 0xFA, 0xFF)      # stale bytes did not answer for the controller
    assert k.flush()


def test_keyboard_replies(k):
    assert k.command(0xAE) == []
    k.dev.write_data(0xFF)
    assert [k.dev.read_data() for _ in range(2)] == [0xFA, 0xAA]
    k.dev.write_data(0xF2)
    assert [k.dev.read_data() for _ in range(3)] == [0xFA, 0xAB, 0x83]
    k.dev.write_data(0xF4)
    assert k.dev.read_status() & OBF
    assert k.dev.read_data() == 0xFA
    assert not k.dev.read_status() & OBF
    assert k.dev.read_data() == 0xFA            # a drained output register keeps its last byte


def test_unread_keyboard_bytes_stay_flushable(k):
    for _ in range(20):
        k.dev.write_data(0xF2)                  # no IRQ, so nobody reads the replies
    assert k.flush()


def test_write_kbd_output_buffer(k):
    k.command(0xD2, [0x1C])
    assert k.dev.read_data() == 0x1C


def test_pulse_reset(k):
    k.command(0xFF)                             # pulses nothing ("null command" from Linux's A20 code)
    assert k.resets == 0
    k.command(0xFE)
    assert k.resets == 1
    assert k.dev.counters() == {"commands": 2, "resets": 1, "keys": 0}


def test_output_port_write_resets_when_bit0_clear(k):
    k.command(0xD1, [0xDF])                     # A20 on, reset line high: Linux's enable_a20_kbc
    assert k.resets == 0
    assert k.command(0xD0, nreply=1) == [(0xDF, False)]
    k.command(0xD1, [0xDE])
    assert k.resets == 1
    assert k.dev.counters()["resets"] == 1


def test_port_adapters(k):
    data, cmd = k.dev.data_port(), k.dev.command_port()
    cmd.write(0, b"\xaa")
    assert cmd.read(0, 1)[0] & OBF
    assert data.read(0, 2) == b"\x55\xff"
    assert data.read(1, 1) == b"\xff"
    cmd.write(1, b"\xfe")                       # outside the 1-port region: ignored
    assert k.resets == 0
    cmd.write(0, b"\xfe\x00")
    assert k.resets == 1


class Irq:
    def __init__(self):
        self.levels = []

    def __call__(self, level):
        self.levels.append(level)

    def rising_edges(self):
        return sum(1 for a, b in zip([False] + self.levels, self.levels) if b and not a)


def test_keyboard_interrupt_gives_each_byte_its_own_edge():
    irq = Irq()
    dev = I8042(reset=lambda: None, irq=irq)
    dev.write_command(0x60)
    dev.write_data(0x47)                        # KBDINT on, keyboard enabled, translation on (Linux's value)
    dev.write_data(0xF2)                        # identify: ACK, AB, 83 come by interrupt
    got = []
    while dev.read_status() & OBF:
        got.append(dev.read_data())
    assert got == [0xFA, 0xAB, 0x83]
    assert irq.rising_edges() == 3 and irq.levels[-1] is False


def test_no_interrupt_while_the_command_byte_masks_it():
    irq = Irq()
    dev = I8042(reset=lambda: None, irq=irq)
    dev.write_command(0x60)
    dev.write_data(0x46)                        # KBDINT off
    dev.write_data(0xF2)
    assert irq.levels == [] and dev.read_status() & OBF


def test_ctrl_alt_del_reaches_a_listening_keyboard_only():
    irq = Irq()
    dev = I8042(reset=lambda: None, irq=irq)
    assert dev.press_ctrl_alt_del() is False    # firmware's command byte: no driver has set the controller up
    dev.write_command(0x60)
    dev.write_data(0x47 | CTR_KBDDIS)
    assert dev.press_ctrl_alt_del() is False    # keyboard disabled
    assert not dev.read_status() & OBF
    dev.write_command(0x60)
    dev.write_data(0x47)
    assert dev.press_ctrl_alt_del() is True
    keys = []
    while dev.read_status() & OBF:
        keys.append(dev.read_data())
    assert keys == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    assert irq.rising_edges() == 8
    assert dev.counters()["keys"] == 1
