"""vcpu_worker/vcpu.py's handle_exit, one dispatch over exit reasons, fed made-up exits (no /dev/kvm)."""
import pytest

from pyhv.proto.errors import EXIT_OK, EXIT_VM_FAILED
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.bus import MmioBus, PioBus
from pyhv.vcpu_worker.vcpu import ExitContext, Outcome, handle_exit


class Device:
    def __init__(self, reply=b"\x12\x34\x56\x78"):
        self.reply, self.writes, self.reads = reply, [], []

    def read(self, offset, size):
        self.reads.append((offset, size))
        return self.reply[:size]

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


class Vcpu:
    """What the failure paths ask of a vCPU: its index, and registers that cannot be read here."""
    index = 3

    def get_regs(self):
        raise OSError("no vCPU in this test")

    get_sregs = get_regs

    def kick_clear(self):
        self.cleared = True


@pytest.fixture
def dev():
    return Device()


@pytest.fixture
def ctx(dev):
    pio, mmio = PioBus(), MmioBus()
    pio.register(0x3F8, 8, dev, "uart")
    mmio.register(0xFEB00000, 0x1000, dev, "page")
    return ExitContext(Vcpu(), pio.lookup, mmio.lookup, mem=None)


def exit_record(reason, **fields):
    e = ffi.new("struct hv_exit *")
    e.reason = reason
    buf = ffi.new("char[]", 64)
    e.io_data = e.mmio_data = buf
    for k, v in fields.items():
        setattr(e, k, v)
    return e, buf


def test_port_write_and_read_reach_the_device_at_its_offset(ctx, dev):
    e, buf = exit_record(lib.KVM_EXIT_IO, io_dir=lib.KVM_EXIT_IO_OUT, io_size=1, io_port=0x3FB, io_count=1)
    buf[0] = b"\x83"
    assert handle_exit(e.reason, e, ctx) is None
    assert dev.writes == [(3, b"\x83")]
    e, buf = exit_record(lib.KVM_EXIT_IO, io_dir=lib.KVM_EXIT_IO_IN, io_size=2, io_port=0x3F9, io_count=1)
    assert handle_exit(e.reason, e, ctx) is None
    assert dev.reads == [(1, 2)] and ffi.unpack(buf, 2) == b"\x12\x34"


def test_string_io_is_one_device_access_per_element(ctx, dev):
    e, buf = exit_record(lib.KVM_EXIT_IO, io_dir=lib.KVM_EXIT_IO_OUT, io_size=1, io_port=0x3F8, io_count=3)
    ffi.memmove(buf, b"abc", 3)
    handle_exit(e.reason, e, ctx)
    assert dev.writes == [(0, b"a"), (0, b"b"), (0, b"c")]


def test_short_device_replies_are_padded_with_ones(ctx, dev):
    dev.reply = b"\x01"
    e, buf = exit_record(lib.KVM_EXIT_MMIO, mmio_addr=0xFEB00010, mmio_len=4, mmio_write=0)
    handle_exit(e.reason, e, ctx)
    assert dev.reads == [(0x10, 4)] and ffi.unpack(buf, 4) == b"\x01\xff\xff\xff"


def test_unclaimed_mmio_reads_all_ones_and_is_counted(ctx, dev):
    e, buf = exit_record(lib.KVM_EXIT_MMIO, mmio_addr=0x1234, mmio_len=8, mmio_write=0)
    assert handle_exit(e.reason, e, ctx) is None
    assert ffi.unpack(buf, 8) == b"\xff" * 8 and ctx.mmio_unclaimed == 1
    e, _ = exit_record(lib.KVM_EXIT_MMIO, mmio_addr=0x1234, mmio_len=4, mmio_write=1)
    handle_exit(e.reason, e, ctx)
    assert ctx.mmio_unclaimed == 2 and dev.writes == []


@pytest.mark.parametrize("reason, fields, status, words", [
    (lib.HV_EXIT_GUEST_EXIT, {"exit_value": 42}, 42, "wrote 42 to the exit port"),
    (lib.KVM_EXIT_SHUTDOWN, {}, EXIT_OK, "triple fault"),
    (lib.KVM_EXIT_SYSTEM_EVENT, {"suberror": lib.KVM_SYSTEM_EVENT_RESET}, EXIT_OK, "guest reset"),
    (lib.KVM_EXIT_FAIL_ENTRY, {}, EXIT_VM_FAILED, "VM entry failed"),
    (lib.KVM_EXIT_INTERNAL_ERROR, {"suberror": 2, "ndata": 1}, EXIT_VM_FAILED, "internal error, suberror 2"),
    (lib.HV_EXIT_ERRNO, {"err": 14}, EXIT_VM_FAILED, "KVM_RUN failed: Bad address"),
    (lib.KVM_EXIT_HYPERCALL, {}, EXIT_VM_FAILED, "unhandled exit HYPERCALL"),
    (999, {}, EXIT_VM_FAILED, "unhandled exit 999"),
])
def test_exits_that_end_the_vm_say_how(ctx, reason, fields, status, words):
    e, _ = exit_record(reason, **fields)
    outcome = handle_exit(reason, e, ctx)
    assert isinstance(outcome, Outcome) and outcome.status == status and words in outcome.reason
    if status == EXIT_VM_FAILED and reason != lib.HV_EXIT_ERRNO:
        assert outcome.reason.startswith("vCPU 3: ") and "registers unavailable" in outcome.reason


def test_halts_and_interrupts_keep_running_and_a_kick_asks_the_machine(ctx, dev):
    for reason in (lib.KVM_EXIT_HLT, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
        e, _ = exit_record(reason)
        assert handle_exit(reason, e, ctx) is None
    asked = []
    ctx.on_kick = lambda c: asked.append(c) or Outcome(143, "stopped by request")
    e, _ = exit_record(lib.KVM_EXIT_INTR)
    assert handle_exit(lib.KVM_EXIT_INTR, e, ctx) == Outcome(143, "stopped by request")
    assert asked == [ctx] and ctx.vcpu.cleared
