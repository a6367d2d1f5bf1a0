"""vcpu_worker/guest_debug.py: the one owner of each vCPU's KVM_SET_GUEST_DEBUG state, DR slots and exits.

No /dev/kvm needed."""
import pytest

from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.guest_debug import DR6_BS, NOT_MINE, GuestDebug


class Vcpu:
    index, fd = 0, -1


class Owner:
    def __init__(self, name):
        self.name, self.events, self.sw = name, [], []

    def on_debug(self, ctx, event):
        self.events.append(event)
        return None

    def on_software_breakpoint(self, ctx, rip):
        self.sw.append(rip)
        return "stopped" if rip == 0x1000 else NOT_MINE

    def __repr__(self):
        return self.name


def debug_exit(exception, pc, dr6):
    e = ffi.new("struct hv_exit *")
    e.reason, e.suberror = lib.KVM_EXIT_DEBUG, exception
    e.data[0], e.data[1] = pc, dr6
    return e


def test_nothing_asked_is_guest_debugging_off():
    assert GuestDebug(Vcpu()).control() == (0, (0,) * 8)


def test_a_reserved_slot_leaves_the_other_three_to_the_debugger():
    d, syscall, gdb = GuestDebug(Vcpu()), Owner("syscall"), Owner("gdb")
    d.reserve(0, syscall)
    assert d.free_slots(gdb) == [1, 2, 3]
    assert [d.set_slot(gdb, 0x1000 + i) for i in range(4)] == [1, 2, 3, None]
    assert d.set_slot(syscall, 0xffffffff81000000) == 0
    with pytest.raises(ValueError):
        d.reserve(1, syscall)                       # gdb's now
    d.clear(gdb)
    assert d.free_slots(gdb) == [1, 2, 3] and d.slots[0].owner is syscall


def test_the_control_word_and_dr7_combine_every_owner():
    d, a, b = GuestDebug(Vcpu(), block_irq=True), Owner("a"), Owner("b")
    d.set_slot(a, 0x100200)                          # execute, slot 0
    d.set_slot(b, 0x2000, "w", 4)                    # write watchpoint, 4 bytes, slot 1
    d.set_slot(b, 0x3000, "rw", 8)                   # access, 8 bytes, slot 2
    d.set_step(a, True)
    d.set_software_breakpoints(b, True)
    control, regs = d.control()
    assert control == (lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP | lib.KVM_GUESTDBG_SINGLESTEP
                       | lib.KVM_GUESTDBG_BLOCKIRQ | lib.KVM_GUESTDBG_USE_SW_BP)
    assert regs[:3] == (0x100200, 0x2000, 0x3000)
    dr7 = regs[7]
    assert dr7 & 0b111111 == 0b101010                # G0, G1, G2
    assert (dr7 >> 16) & 0xF == 0b0000               # slot 0: execute, 1 byte
    assert (dr7 >> 20) & 0xF == 0b1101               # slot 1: write (01), 4 bytes (11)
    assert (dr7 >> 24) & 0xF == 0b1011               # slot 2: read/write (11), 8 bytes (10)
    assert dr7 & (1 << 10)
    d.set_step(a, False)
    assert not d.control()[0] & lib.KVM_GUESTDBG_SINGLESTEP


def test_a_watchpoint_must_be_aligned_and_sized():
    d, o = GuestDebug(Vcpu()), Owner("o")
    for address, length in ((0x1001, 4), (0x1000, 3), (0x1004, 8)):
        with pytest.raises(ValueError):
            d.set_slot(o, address, "w", length)
    assert d.control() == (0, (0,) * 8)


def test_a_debug_exit_goes_to_the_owner_whose_slot_or_step_fired():
    d, a, b = GuestDebug(Vcpu()), Owner("a"), Owner("b")
    d.set_slot(a, 0x100)
    d.set_slot(b, 0x200)
    d.set_step(b, True)
    assert d.on_exit(debug_exit(1, 0x200, 0xFFFF0FF0 | 0b10), ctx=None) is None
    assert a.events == [] and [(e.pc, [i for i, _ in e.slots], e.step) for e in b.events] == [(0x200, [1], False)]
    d.on_exit(debug_exit(1, 0x204, 0xFFFF0FF0 | DR6_BS), ctx=None)
    assert b.events[-1].step and not b.events[-1].slots and a.events == []
    d.set_step(b, False)
    d.on_exit(debug_exit(1, 0x208, 0xFFFF0FF0 | DR6_BS), ctx=None)    # a step nobody wants any more
    assert d.unclaimed == 1 and len(b.events) == 2


def test_software_breakpoints_are_the_owners_or_the_guests():
    d, o = GuestDebug(Vcpu()), Owner("o")
    assert d.software_breakpoint(None, 0x1000) is NOT_MINE         # nobody planted any
    d.set_software_breakpoints(o, True)
    assert d.software_breakpoint(None, 0x1000) == "stopped"
    assert d.software_breakpoint(None, 0x2000) is NOT_MINE         # the guest's own int3


def test_the_guest_s_own_debug_exits_go_to_an_attached_debugger_else_to_the_guest():
    d, hook, gdb = GuestDebug(Vcpu()), Owner("hook"), Owner("gdb")
    delivered = []
    d.deliver_to_guest = delivered.append
    d.reserve(0, hook)
    d.set_slot(hook, 0x100)
    gdb.attached = lambda: gdb.on
    gdb.on = False
    d.set_debugger(gdb)
    assert d.on_exit(debug_exit(1, 0x300, 0xFFFF0FF0 | 0b1000), ctx=None) is None     # B3: the guest's own DR3
    assert delivered == [0xFFFF0FF8] and gdb.events == []
    gdb.on = True                                                                      # a GDB client connected
    d.on_exit(debug_exit(1, 0x304, 0xFFFF0FF0 | DR6_BS), ctx=None)                      # the guest's own TF
    assert len(delivered) == 1 and [(e.pc, e.step, e.slots) for e in gdb.events] == [(0x304, True, [])]
    d.on_exit(debug_exit(1, 0x100, 0xFFFF0FF1), ctx=None)                               # the hook's DR0
    assert len(hook.events) == 1 and len(gdb.events) == 1 and len(delivered) == 1
