"""The SYSCALL hook's pure parts (no /dev/kvm): decoding the #PF entry and gate, DR7, the C page walk, debug-exit dispatch."""
import json

import pytest

from pyhv.vcpu_worker import guest_debug, syscall_hook
from pyhv.vcpu_worker._kvm import ffi, lib
from pyhv.vcpu_worker.syscall_hook import RFLAGS_AC, RFLAGS_DF, RFLAGS_IF, parse_gate, skip_rule
from pyhv.vcpu_worker.vcpu import ExitContext, handle_exit


@pytest.mark.parametrize("insn, rule", [
    (b"\xf3\x0f\x1e\xfa\xfc", (4, 0, 0)),               # endbr64
    (b"\x0f\x1f\x00\xfc", (3, 0, 0)),                   # nopl (%rax): ASM_CLAC as Linux patches it here
    (b"\x0f\x1f\x44\x00\x00", (5, 0, 0)),               # nopl 0(%rax,%rax,1)
    (b"\x66\x0f\x1f\x84\x00\x00\x00\x00\x00", (9, 0, 0)),
    (b"\x0f\x1f\x80\x00\x00\x00\x00", (7, 0, 0)),       # nopl disp32(%rax)
    (b"\x0f\x01\xca\xfc", (3, RFLAGS_AC, 0)),           # clac
    (b"\x0f\x01\xcb", (3, 0, RFLAGS_AC)),               # stac
    (b"\xfc\xe8", (1, RFLAGS_DF, 0)),                   # cld
    (b"\xfa", (1, RFLAGS_IF, 0)),                       # cli
    (b"\x90", (1, 0, 0)),
    (b"\x66\x90", (2, 0, 0)),
])
def test_entries_the_c_loop_resumes_past(insn, rule):
    assert skip_rule(insn) == rule


@pytest.mark.parametrize("insn", [b"\x50", b"\xe8\x00\x00\x00\x00", b"\x0f\x1f\x08", b"\x0f\x01", b"", b"\xf3\x0f"])
def test_anything_else_is_single_stepped(insn):
    assert skip_rule(insn) is None                      # push, call, a 0f 1f that is not /0, truncated bytes


def gate(handler, type_attr=0x8E, selector=0x10):
    low = (handler & 0xFFFF) | selector << 16 | type_attr << 40 | (handler >> 16 & 0xFFFF) << 48
    return low.to_bytes(8, "little") + (handler >> 32).to_bytes(8, "little")


def test_gates():
    assert parse_gate(gate(0xFFFFFFFF81A00AE0)) == (True, 0xFFFFFFFF81A00AE0)
    assert parse_gate(gate(0xFFFFFFFF81A00AE0, 0x8F)) == (True, 0xFFFFFFFF81A00AE0)   # trap gate
    assert parse_gate(gate(0x1000, 0x0E)) == (False, None)                            # not present
    assert parse_gate(gate(0x1000, 0x8C)) == (False, None)                            # call gate
    assert parse_gate(gate(0x0000800000000000)) == (False, None)                      # not canonical
    assert parse_gate(b"\0" * 15) == (False, None)


def test_the_c_walk_follows_4_level_tables_and_large_pages():
    mem = ffi.new("uint8_t[]", 0x10000)
    ram = ffi.new("struct hv_guest_ram *")
    ram.n, ram.gpa[0], ram.size[0], ram.host[0] = 1, 0x100000, 0x10000, mem

    def put(gpa, value):
        ffi.cast("uint64_t *", mem + (gpa - 0x100000))[0] = value

    va = 0xFFFFFE0000001FF8                             # the CPU entry area's kind of address
    pml4, pdpt, pd, pt = 0x100000, 0x101000, 0x102000, 0x103000
    put(pml4 + ((va >> 39) & 511) * 8, pdpt | 1)
    put(pdpt + ((va >> 30) & 511) * 8, pd | 1)
    put(pd + ((va >> 21) & 511) * 8, pt | 1)
    put(pt + ((va >> 12) & 511) * 8, 0x7654000 | 1)
    out = ffi.new("uint64_t *")
    assert lib.hv_guest_walk(ram, pml4 | 0x18, 0, va, out) == 0 and out[0] == 0x7654FF8    # CR3 flag bits ignored
    put(pd + ((va >> 21) & 511) * 8, 0x40000000 | 0x81)                                     # a 2 MiB page
    assert lib.hv_guest_walk(ram, pml4, 0, va, out) == 0 and out[0] == 0x40000000 + (va & 0x1FFFFF)
    put(pd + ((va >> 21) & 511) * 8, 0x40000000)                                            # not present
    assert lib.hv_guest_walk(ram, pml4, 0, va, out) == -1
    put(pml4 + ((va >> 39) & 511) * 8, 0x7FFF000 | 1)                                       # a table outside RAM
    assert lib.hv_guest_walk(ram, pml4, 0, va, out) == -1


class FakeHook:
    """The SYSCALL hook as GuestDebug sees it: an owner with DR0 reserved."""

    def __init__(self):
        self.seen = []

    def on_debug(self, ctx, event):
        self.seen.append((event.pc, [i for i, _ in event.slots], event.step))
        return None


class Vcpu:
    index, fd = 0, -1


def debug_exit(dr6, pc=0x1000):
    e = ffi.new("struct hv_exit *")
    e.reason, e.suberror = lib.KVM_EXIT_DEBUG, 1
    e.data[0], e.data[1] = pc, dr6
    return e


def hooked_debug(delivered):
    debug, hook = guest_debug.GuestDebug(Vcpu()), FakeHook()
    debug.reserve(syscall_hook.HOOK_SLOT, hook)
    assert debug.set_slot(hook, 0xFFFFFFFF81A00AE0) == syscall_hook.HOOK_SLOT
    debug.deliver_to_guest = delivered.append
    return debug, hook


def test_a_debug_exit_nobody_asked_for_is_the_guest_s_own():
    delivered = []
    debug, hook = hooked_debug(delivered)
    ctx = ExitContext(vcpu=Vcpu(), pio_lookup=None, mmio_lookup=None, mem=None, debug=debug, hook=None)
    assert handle_exit(lib.KVM_EXIT_DEBUG, debug_exit(0xFFFF4FF0), ctx) is None      # BS: its own TF
    assert handle_exit(lib.KVM_EXIT_DEBUG, debug_exit(0xFFFF0FF8), ctx) is None      # B3: its own DR3
    assert delivered == [0xFFFF4FF0, 0xFFFF0FF8] and hook.seen == []


def test_the_hook_s_own_debug_exit_goes_to_the_hook():
    delivered = []
    debug, hook = hooked_debug(delivered)
    ctx = ExitContext(vcpu=Vcpu(), pio_lookup=None, mmio_lookup=None, mem=None, debug=debug, hook=None)
    assert handle_exit(lib.KVM_EXIT_DEBUG, debug_exit(0xFFFF0FF1, 0xFFFFFFFF81A00AE0), ctx) is None
    assert hook.seen == [(0xFFFFFFFF81A00AE0, [0], False)] and delivered == []
    debug.clear_slot(hook, 0)
    debug.set_step(hook, True)                            # an entry C cannot skip: one step with DR0 off
    handle_exit(lib.KVM_EXIT_DEBUG, debug_exit(0xFFFF4FF0, 0xFFFFFFFF81A00AE3), ctx)
    assert hook.seen[-1] == (0xFFFFFFFF81A00AE3, [], True) and delivered == []


def test_host_facts_are_read_only_for_this_boot_and_kvm(tmp_path, monkeypatch):
    path = tmp_path / "facts.json"
    monkeypatch.setattr(syscall_hook.runtime, "host_facts_file", lambda: str(path))
    assert syscall_hook.read_host_facts() is None
    assert "probed when a guest starts" in syscall_hook.describe_host()
    facts = {"key": syscall_hook._host_key(), "syscall_leaves_ring3": False, "breakpoint_fires": True,
             "detail": "probed"}
    path.write_text(json.dumps(facts))
    assert syscall_hook.needed(syscall_hook.read_host_facts())
    assert syscall_hook.describe_host().startswith("on: ")
    path.write_text(json.dumps({**facts, "key": "another boot"}))
    assert syscall_hook.read_host_facts() is None
    path.write_text(json.dumps({**facts, "syscall_leaves_ring3": True}))
    assert not syscall_hook.needed(syscall_hook.read_host_facts())
    assert syscall_hook.describe_host() == "off: SYSCALL works on this host"
