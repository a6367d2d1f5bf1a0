"""Legacy devices and PCI config space save and restore their state: a restored copy behaves as the original would."""
import msgpack
import pytest

from fakes import FakeRouter
from pyhv.devices.legacy.debug_page import DebugPage
from pyhv.devices.legacy.i8042 import I8042
from pyhv.devices.legacy.rtc import CmosRtc
from pyhv.devices.legacy.serial import IER, LCR, LSR, MCR, SCR, THR, Serial8250
from pyhv.devices.pci.config_space import PciFunction
from pyhv.devices.pci.root import PciRoot
from pyhv.proto import codec
from pyhv.proto.errors import StateError


def through_msgpack(state):
    """What a snapshot file would hold: plain values only."""
    return msgpack.unpackb(msgpack.packb(state), raw=False)


def test_serial_keeps_registers_unread_input_and_its_irq_level():
    levels, out = [], []
    a = Serial8250(irq=levels.append, out=out.append)
    a.write(LCR, b"\x03")
    a.write(MCR, b"\x0b")                         # OUT2: the line is driven
    a.write(IER, b"\x01")                         # receive interrupts
    a.write(SCR, b"\x5a")
    a.feed(b"typed")
    assert levels == [True]
    b_levels = []
    b = Serial8250(irq=b_levels.append, out=out.append)
    b.restore(through_msgpack(a.snapshot()))
    assert b_levels == []                         # the level is the interrupt controller's to restore
    assert b.snapshot() == a.snapshot()
    assert b.read(LSR, 1)[0] & 1 and b.read(SCR, 1) == b"\x5a"
    assert bytes(b.read(THR, 1)[0] for _ in range(5)) == b"typed"
    assert b_levels == [False]                    # drained: the line falls, as it would have on `a`
    with pytest.raises(StateError):
        b.restore({**a.snapshot(), "ier": "x"})


def test_i8042_keeps_pending_bytes_and_command_state():
    resets = []
    a = I8042(reset=lambda: resets.append(1))
    a.write_command(0x20)                         # read CTR: a reply waits in the output buffer
    a.write_command(0x60)                         # write CTR: waits for its data byte
    b = I8042(reset=lambda: resets.append(2))
    b.restore(through_msgpack(a.snapshot()))
    assert b.snapshot() == a.snapshot()
    b.write_data(0x45)                            # the pending command takes it
    b.write_command(0x20)
    assert b.read_data() == 0x45
    b.write_command(0xFE)
    assert resets == [2]


def test_rtc_keeps_its_index_and_cmos_ram():
    a = CmosRtc(clock=lambda: 0)
    a.write(0, b"\x20")
    a.write(1, b"\x99")                           # CMOS RAM byte 0x20
    a.write(0, b"\x21")
    b = CmosRtc(clock=lambda: 0)
    b.restore(through_msgpack(a.snapshot()))
    assert b.read(0, 1) == b"\x21"
    b.write(0, b"\x20")
    assert b.read(1, 1) == b"\x99"
    with pytest.raises(StateError):
        b.restore({"index": 0, "ram": b"short", "reads": 0})


def test_debug_page_counts_survive():
    a = DebugPage(exit_vm=lambda v: None, console_out=lambda d: None)
    a.write(1, b"x")
    b = DebugPage(exit_vm=lambda v: None, console_out=lambda d: None)
    b.restore(a.snapshot())
    assert b.counters() == {"writes": 1}


def test_pci_config_space_and_bar_decoding_come_back():
    def root_with_function():
        root = PciRoot(FakeRouter())
        fn = PciFunction(0x1234, 0x5678, 0xFF0000)
        fn.add_bar(0, 0x1000)
        root.add(fn, "f")
        return root, fn
    a_root, a = root_with_function()
    a_root.config_data_write(0x8000_0800 | 0x10, 0, 0xE100_0000, 4)     # the guest moves BAR 0
    a_root.config_data_write(0x8000_0800 | 0x3C, 0, 0x0B, 1)            # interrupt line scratch byte
    assert a.bar_addr[0] == 0xE100_0000
    b_root, b = root_with_function()
    b_root.restore(through_msgpack(a_root.snapshot()))
    assert bytes(b.config) == bytes(a.config) and b.bar_addr[0] == 0xE100_0000
    assert b_root.window.read(0x0100_0000, 4) == b"\xff" * 4                 # decoded: the function answers
    other = PciRoot(FakeRouter())
    other.add(PciFunction(0x1111, 0x2222, 0xFF0000), "f")
    with pytest.raises(StateError, match="does not belong"):
        other.restore(a_root.snapshot())
    with pytest.raises(StateError, match="this guest does not"):
        PciRoot(FakeRouter()).restore(a_root.snapshot())


def test_states_are_plain_values():
    for device in (Serial8250(irq=lambda level: None, out=lambda b: None), I8042(reset=lambda: None), CmosRtc(),
                   DebugPage(exit_vm=lambda v: None, console_out=lambda d: None)):
        assert codec._is_plain(device.snapshot()), device


# --- saved state from a hostile snapshot (found by tests/unit/fuzz/test_fuzz_legacy.py) ---------------------

@pytest.mark.parametrize("field, value", [("lcr", 256), ("ier", 0x10), ("dll", 0x1FF), ("scr", 2 ** 64),
                                          ("mcr", 0x20), ("lsr_err", 0x01), ("tx_bytes", -1)])
def test_serial_refuses_registers_no_uart_holds(field, value):
    """An 8250 restored with LCR=256 read it back through a 256-entry table: IndexError in the vCPU, VM failed (70)
    on the guest's first register read instead of the restore refusing the snapshot."""
    a = Serial8250(irq=lambda level: None, out=lambda b: None)
    before = a.snapshot()
    with pytest.raises(StateError):
        a.restore({**before, field: value})
    assert a.snapshot() == before                   # nothing half-restored
    for offset in range(8):
        assert len(a.read(offset, 1)) == 1


@pytest.mark.parametrize("field, value", [("last", -1), ("ctr", 256), ("outport", 0x100), ("status_cmd", 3),
                                          ("pending", 0x42)])
def test_i8042_refuses_registers_no_controller_holds(field, value):
    """last=-1 made the next read of port 0x60 raise ValueError (bytes((-1,))): the VM failed instead of the
    restore refusing the snapshot."""
    a = I8042(reset=lambda: None)
    before = a.snapshot()
    with pytest.raises(StateError):
        a.restore({**before, field: value})
    assert a.snapshot() == before
    assert len(a.data_port().read(0, 1)) == 1 and len(a.command_port().read(0, 1)) == 1


def test_saved_byte_strings_must_be_bytes_not_a_size_to_allocate():
    """bytes(state["rx"]) of an int n allocates n zero bytes: a snapshot saying 2**40 made the restore a MemoryError
    (and 2**70 an OverflowError), neither of which the worker turned into a one-line refusal."""
    cases = ((Serial8250(irq=lambda level: None, out=lambda b: None), "rx"), (I8042(reset=lambda: None), "out"),
             (CmosRtc(), "ram"))
    for device, field in cases:
        for value in (2 ** 40, 2 ** 70, "text", [1, 2]):
            with pytest.raises(StateError, match="not bytes"):
                device.restore({**device.snapshot(), field: value})
    root = PciRoot(FakeRouter())
    with pytest.raises(StateError, match="not bytes"):
        root.restore({"address": 0, "functions": {"host-bridge": {"config": 2 ** 40}}})


def test_the_device_manager_refuses_any_malformed_value_with_one_state_error():
    """int(inf) in a device's restore is an OverflowError; the manager let it escape the worker as a traceback."""
    from pyhv.devices.guest_memory import GuestMemory, create_memfd
    from pyhv.proto.guest import GuestConfig
    from pyhv.vcpu_worker.bus import MmioBus, PioBus
    from pyhv.vcpu_worker.device_manager import DeviceManager
    fd = create_memfd(1 << 20)
    mem = GuestMemory(fd, 1 << 20)
    try:
        dm = DeviceManager(GuestConfig(name="g", kernel="/k", mem_bytes=1 << 20), mem, FakeRouter(), PioBus(),
                           MmioBus(), console_out=lambda b: None, on_reset=lambda: None, on_exit=lambda v: None)
        state = dm.snapshot()
        state["rtc"]["index"] = float("inf")
        with pytest.raises(StateError, match="malformed: OverflowError"):
            dm.restore(through_msgpack(state))
        dm.close()
    finally:
        mem.close()
        import os
        os.close(fd)
