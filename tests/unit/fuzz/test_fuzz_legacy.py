"""Fuzz: the legacy PC devices' registers (devices/legacy/: 8250 UART, i8042, CMOS RTC, debug page) and their saved state.

A vCPU reaches a device with any access KVM can produce: every offset of the
range the device is registered at (devices/legacy via
vcpu_worker/device_manager.py), 1, 2 or 4 bytes for a port and 1 to 8 for
MMIO, any value; the host side feeds input and presses keys meanwhile.  A
snapshot's device state comes from a file: restore() gets anything a
mutated snapshot could hold.  The property: register accesses never raise
and answer exactly the bytes asked for; the interrupt line only ever
changes level; the FIFOs stay bounded; restore() accepts a state or refuses
it with one of the errors DeviceManager.restore turns into a one-line
StateError, and a device it accepted still answers every access.
"""
import random

import pytest
from hypothesis import given, strategies as st

from fuzzing import budget
from pyhv.devices.legacy.debug_page import DEBUG_PAGE_SIZE, DebugPage
from pyhv.devices.legacy.i8042 import OUT_BUFFER, I8042
from pyhv.devices.legacy.rtc import CmosRtc
from pyhv.devices.legacy.serial import RX_FIFO_SIZE, Serial8250
from pyhv.proto.errors import StateError

pytestmark = pytest.mark.fuzz

# what vcpu_worker/device_manager.py's DeviceManager.restore turns into a StateError
RESTORE_ERRORS = (StateError, KeyError, TypeError, ValueError, AttributeError, OverflowError)


class Line:
    """An interrupt line that checks every call changes its level (devices call only on a change)."""

    def __init__(self, edge_pairs_ok=False):
        self.level, self.calls, self.edge_pairs_ok = False, 0, edge_pairs_ok

    def __call__(self, level):
        assert isinstance(level, bool)
        if not self.edge_pairs_ok:
            assert level != self.level, "the same level twice"
        self.level, self.calls = level, self.calls + 1


def uart(strict=True):
    """A UART whose line checks it only changes level (not after a restore: the saved level is not the line's)."""
    out = []
    return Serial8250(irq=Line(edge_pairs_ok=not strict), out=out.append), out


def keyboard():
    resets = []
    return I8042(reset=lambda: resets.append(1), irq=Line(edge_pairs_ok=True)), resets


def sweep(read, write, length, widths, rng):
    """Every offset of a `length`-byte range at every width: read, write a random value, read."""
    for offset in range(length):
        for size in widths:
            assert len(read(offset, size)) == size
            write(offset, rng.randbytes(size))
            assert len(read(offset, size)) == size


PORT_WIDTHS, MMIO_WIDTHS = (1, 2, 4), (1, 2, 3, 4, 5, 6, 7, 8)


def every_access_answers(dev, kind, rng):
    if kind == "serial":
        sweep(dev.read, dev.write, 8, PORT_WIDTHS, rng)
    elif kind == "i8042":
        for port in (dev.data_port(), dev.command_port()):
            sweep(port.read, port.write, 1, PORT_WIDTHS, rng)
    elif kind == "rtc":
        sweep(dev.read, dev.write, 2, PORT_WIDTHS, rng)
    else:
        sweep(dev.read, dev.write, 16, MMIO_WIDTHS, rng)


OPS = st.lists(st.tuples(st.sampled_from(["r", "w", "w", "feed", "key", "snap"]), st.integers(0, 7),
                         st.sampled_from(PORT_WIDTHS), st.binary(min_size=1, max_size=8)), max_size=200)


@budget(150)
@given(OPS)
def test_uart_registers(ops):
    u, out = uart()
    for op, offset, size, data in ops:
        if op == "r":
            assert len(u.read(offset, size)) == size
        elif op == "w":
            u.write(offset, data[:size])
        elif op == "feed":
            u.feed(data * 200)
        elif op == "snap":
            v, _ = uart()
            v.restore(u.snapshot())
            assert v.snapshot() == u.snapshot()
        assert len(u._rx) <= RX_FIFO_SIZE
    c = u.counters()
    assert c["tx_bytes"] == len(out) and all(len(b) == 1 for b in out)


@budget(150)
@given(OPS)
def test_i8042_registers(ops):
    k, resets = keyboard()
    data_port, command_port = k.data_port(), k.command_port()
    for op, offset, size, data in ops:
        port = data_port if offset & 1 else command_port
        if op == "r":
            assert len(port.read(0, size)) == size
        elif op == "w":
            before = k.counters()["resets"]
            port.write(0, data[:size])
            assert len(resets) == k.counters()["resets"] and k.counters()["resets"] - before in (0, 1)
        elif op == "key":
            k.press_ctrl_alt_del()
        elif op == "snap":
            j, _ = keyboard()
            j.restore(k.snapshot())
            assert j.snapshot() == k.snapshot()
        assert len(k._out) <= OUT_BUFFER


@budget(100)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from(PORT_WIDTHS), st.binary(min_size=4, max_size=4),
                          st.booleans()), max_size=200))
def test_rtc_registers(ops):
    r = CmosRtc()
    for offset, size, data, write in ops:
        if write:
            r.write(offset, data[:size])
        else:
            value = r.read(offset, size)
            assert len(value) == size
    CmosRtc().restore(r.snapshot())


@budget(100)
@given(st.lists(st.tuples(st.integers(0, DEBUG_PAGE_SIZE - 1), st.sampled_from(MMIO_WIDTHS),
                          st.binary(min_size=8, max_size=8)), max_size=100))
def test_debug_page(ops):
    exits, out = [], []
    d = DebugPage(exit_vm=exits.append, console_out=out.append)
    for offset, size, data in ops:
        assert d.read(offset, size) == b"\xff" * size
        d.write(offset, data[:size])
    assert exits == [data[0] for offset, _, data in ops if offset == 0]
    assert out == [data[:1] for offset, _, data in ops if offset == 1]


# --- restore from whatever a snapshot file holds ------------------------------------------------

WEIRD_INTS = st.one_of(st.integers(-1, 300), st.sampled_from([-1, 256, 0x1FF, 2 ** 31, 2 ** 64, 2 ** 70]),
                       st.integers(-2 ** 70, 2 ** 70))
VALUES = st.one_of(WEIRD_INTS, WEIRD_INTS, WEIRD_INTS, st.none(), st.booleans(), st.floats(allow_nan=True),
                   st.text(max_size=4), st.binary(max_size=2000), st.lists(st.integers(-1, 300), max_size=4),
                   st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def make(kind):
    if kind == "serial":
        return uart(strict=False)[0]
    if kind == "i8042":
        return keyboard()[0]
    if kind == "rtc":
        return CmosRtc()
    return DebugPage(exit_vm=lambda status: None, console_out=lambda data: None)


@st.composite
def mutated_state(draw, kind):
    """A device's real snapshot with some values replaced, some keys dropped, some added."""
    dev = make(kind)
    every_access_answers(dev, kind, random.Random(draw(st.integers(0, 2 ** 16))))
    state = dev.snapshot()
    for key in draw(st.lists(st.sampled_from(sorted(state)), max_size=4)):
        action = draw(st.integers(0, 5))
        if action == 0:
            state.pop(key, None)
        else:
            state[key] = draw(VALUES)
    if draw(st.integers(0, 9)) == 0:
        state[draw(st.text(max_size=5))] = draw(VALUES)
    return state


FOUND = {   # what the fuzzer found (fixed in 7707c30, 3ef8d92): registers no device holds, sizes where bytes go
    "serial": [{"lcr": 256}, {"dll": 0x1FF}, {"rx": 2 ** 40}],
    "i8042": [{"last": -1}, {"status_cmd": 3}, {"out": 2 ** 70}],
    "rtc": [{"index": float("inf")}, {"ram": 128}],
    "debug_page": [{"writes": float("inf")}],
}


@pytest.mark.parametrize("kind", ["serial", "i8042", "rtc", "debug_page"])
def test_restore_takes_a_snapshot_or_refuses_it_and_then_every_access_answers(kind):
    found = [{**make(kind).snapshot(), **change} for change in FOUND[kind]]

    @budget(150)
    @given(state=st.one_of(st.sampled_from(found), mutated_state(kind)), seed=st.integers(0, 2 ** 16))
    def check(state, seed):
        dev = make(kind)
        try:
            dev.restore(state)
        except RESTORE_ERRORS:
            return
        every_access_answers(dev, kind, random.Random(seed))
        again = make(kind)
        again.restore(dev.snapshot())                 # what it saves, it takes back
    check()
