"""Device plugins without a guest: option parsing, what a class may declare, the platform's free ranges, the
plugin process's answers, and loading each class once in a process of its own (supervisor/config.py)."""
import os
import textwrap

import msgpack
import pytest

from pyhv.devices.plugin import host, loader
from pyhv.devices.virtio import kinds
from pyhv.proto import plugin as wire
from pyhv.proto.errors import UserError
from pyhv.proto.guest import GuestConfig, PluginRange, PluginSpec, check, parse_plugin
from pyhv.supervisor.config import describe_plugins
from pyhv.vcpu_worker import platform

from hv import REPO

EXAMPLES = REPO / "examples" / "plugins"


def test_a_device_option_names_a_file_or_a_module_and_its_options():
    p = parse_plugin("dev.py:Crc32,base=0x310,irq=5", "/work")
    assert (p.module, p.cls, p.options, p.path) == ("/work/dev.py", "Crc32", {"base": "0x310", "irq": "5"}, None)
    p = parse_plugin("pkg.mod:Dev", "/work")
    assert (p.module, p.cls, p.options, p.path) == ("pkg.mod", "Dev", {}, "/work")
    for bad, why in (("dev.py", "not MODULE:CLASS"), ("dev.py:1x", "not MODULE:CLASS"), (":C", "not MODULE:CLASS"),
                     ("dev.py:C,base", "not KEY=VALUE"), ("dev.py:C,a=1,a=2", "given twice"),
                     ("dev.py:C,1a=2", "not KEY=VALUE"), ("no-dash:C", "neither a module name")):
        with pytest.raises(UserError, match=why):
            parse_plugin(bad, "/work")


def spec(pio=(), mmio=(), irq=None, module="/p/d.py", cls="D"):
    return PluginSpec(module, cls, pio=[PluginRange(*r) for r in pio], mmio=[PluginRange(*r) for r in mmio], irq=irq)


def config(*plugins, mem=128 << 20):
    return GuestConfig(name="g", kernel="/k", mem_bytes=mem, plugins=list(plugins))


def test_declared_ranges_must_be_in_bounds_and_reachable():
    check(config(spec(pio=[(0x300, 8)]), spec(mmio=[(0xD000_0000, 0x1000)], irq=5)))
    for bad, why in ((spec(), "declares no pio or mmio"), (spec(pio=[(0xFFFF, 2)]), "beyond 0x10000"),
                     (spec(pio=[(0x300, 0)]), "empty"), (spec(mmio=[(1 << 52, 1)]), "beyond"),
                     (spec(pio=[(0x300, 1)], irq=24), "irq 24"),
                     (spec(pio=[(0x300 + i, 1) for i in range(17)]), "more than 16"),
                     (spec(pio=[(0x300, 1)], module="rel/d.py"), "absolute path")):
        with pytest.raises(UserError, match=why):
            check(config(bad))


@pytest.mark.parametrize("plugin, owner", [
    (spec(pio=[(0x3F0, 0x10)]), "COM1"), (spec(pio=[(0x80, 1)]), "the POST port"),
    (spec(pio=[(0x501, 1)]), "the exit port"), (spec(pio=[(0xCF8, 4)]), "PCI configuration"),
    (spec(pio=[(0x40, 1)]), "the PIT"), (spec(pio=[(0x21, 1)]), "the PIC"),
    (spec(mmio=[(0x100000, 0x1000)]), "guest RAM"), (spec(mmio=[(0xE000_1000, 4)]), "the PCI MMIO window"),
    (spec(mmio=[(0xFEBFF000, 1)]), "the debug page"), (spec(mmio=[(0xFEC00000, 4)]), "the IOAPIC"),
    (spec(mmio=[(0xFEE00000, 4)]), "the LAPIC"), (spec(pio=[(0x300, 1)], irq=4), "COM1"),
])
def test_a_plugin_on_the_platform_is_refused_naming_the_owner(plugin, owner):
    with pytest.raises(UserError, match=owner):
        platform.check_plugins(config(plugin))


def test_plugins_may_not_overlap_each_other_but_may_sit_side_by_side():
    platform.check_plugins(config(spec(pio=[(0x300, 8)], irq=5), spec(pio=[(0x308, 8)], irq=6)))
    with pytest.raises(UserError, match="overlap D"):
        platform.check_plugins(config(spec(pio=[(0x300, 8)]), spec(pio=[(0x307, 2)])))
    with pytest.raises(UserError, match="irq 5 is taken by D"):
        platform.check_plugins(config(spec(pio=[(0x300, 8)], irq=5), spec(pio=[(0x308, 8)], irq=5)))
    # RAM above 4 GiB: MMIO there is guest RAM for a big guest, free for a small one
    platform.check_plugins(config(spec(mmio=[(1 << 32, 0x1000)])))
    with pytest.raises(UserError, match="guest RAM"):
        platform.check_plugins(config(spec(mmio=[(1 << 32, 0x1000)]), mem=4 << 30))


class Good:
    pio = [(0x300, 8)]
    mmio = [(0xD000_0000, 0x100)]
    irq = 5

    def read(self, offset, size):
        return bytes([offset]) * size

    def write(self, offset, data):
        self.last = (offset, bytes(data))


def test_what_an_instance_declares_is_checked():
    assert loader.declared(Good(), "x") == ([PluginRange(0x300, 8)], [PluginRange(0xD000_0000, 0x100)], 5)
    for attrs, why in (({"pio": 3}, "list of \\(base, length\\) pairs"), ({"pio": [(1, 2, 3)]}, "pairs"),
                       ({"irq": "5"}, "irq must be an int"), ({"read": None}, "no read\\(\\) method"),
                       ({"pio": [], "mmio": []}, "declares no pio or mmio")):
        bad = type("Bad", (Good,), attrs)()
        with pytest.raises(loader.PluginError, match=why):
            loader.declared(bad, "x")


def request(op, space=wire.PIO, index=0, size=0, offset=0, data=b""):
    return memoryview(wire.REQUEST.pack(op, space, index, size, offset) + data)


def test_the_plugin_process_answers_each_request_or_says_why_not():
    dev = Good()
    hello = wire.PluginHello("Good", pio=[PluginRange(0x300, 8)], mmio=[PluginRange(0xD000_0000, 0x100)])
    assert host.answer(dev, hello, request(wire.READ, size=2, offset=3)) == wire.OK + b"\x03\x03"
    assert host.answer(dev, hello, request(wire.WRITE, wire.MMIO, size=2, offset=0xFE, data=b"ab")) == wire.OK
    assert dev.last == (0xFE, b"ab")
    for r in (request(wire.READ, size=2, offset=7), request(wire.READ, index=1, size=1),
              request(wire.READ, size=9), request(9, size=1), memoryview(b"\x00")):
        assert host.answer(dev, hello, r)[:1] == wire.FAILED
    dev.read = lambda offset, size: b"x"
    assert host.answer(dev, hello, request(wire.READ, size=4)) == wire.FAILED + b"Good.read(0x0, 4) returned 1 bytes, not 4 bytes"
    dev.read = lambda offset, size: 1 / 0
    assert host.answer(dev, hello, request(wire.READ, size=4)) == \
        wire.FAILED + b"Good.read(0x0, 4) raised ZeroDivisionError: division by zero"


def test_state_calls_are_refused_without_the_methods_and_round_trip_with_them():
    dev = Good()
    hello = wire.PluginHello("Good", pio=[PluginRange(0x300, 8)])
    assert host.answer(dev, hello, request(wire.SNAPSHOT)) == wire.REFUSED + b"Good has no snapshot() method (docs/plugins.md)"
    dev.snapshot = lambda: {"n": 3}
    dev.restore = lambda state: setattr(dev, "n", state["n"])
    reply = host.answer(dev, hello, request(wire.SNAPSHOT))
    assert reply[:1] == wire.OK and msgpack.unpackb(reply[1:]) == {"n": 3}
    assert host.answer(dev, hello, request(wire.RESTORE, data=msgpack.packb({"n": 9}))) == wire.OK and dev.n == 9
    dev.snapshot = lambda: object()
    assert host.answer(dev, hello, request(wire.SNAPSHOT))[:1] == wire.REFUSED


def test_the_examples_load_and_say_what_they_are():
    crc = loader.describe(PluginSpec(str(EXAMPLES / "crc32dev.py"), "Crc32", {"base": "0x380", "irq": "6"}))
    assert crc == {"port": {"pio": [[0x380, 0x20]], "mmio": [], "irq": 6}, "path": None}
    rng = loader.describe(PluginSpec(str(EXAMPLES / "seeded_rng.py"), "SeededRng", {"seed": "1"}))
    assert rng == {"virtio": {"queues": 1}, "path": None}
    assert "has no class Nope" in loader.describe(PluginSpec(str(EXAMPLES / "crc32dev.py"), "Nope"))["error"]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "dev.py").write_text(textwrap.dedent("""
        from pyhv.devices.virtio.rng import VirtioRng
        class Port:
            def __init__(self, base="0x300"):
                self.pio = [(int(base, 0), 4)]
            def read(self, offset, size):
                return bytes(size)
            def write(self, offset, data):
                pass
        class Rng(VirtioRng):
            pass
        class Broken:
            def __init__(self):
                raise ValueError("no such hardware")
        """))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_each_plugin_is_loaded_once_in_a_process_of_its_own(plugin_dir):
    ports, virtio = describe_plugins([parse_plugin("mypkg.dev:Port,base=0x320", os.getcwd()),
                                      parse_plugin("mypkg/dev.py:Rng", os.getcwd())])
    assert ports == [PluginSpec("mypkg.dev", "Port", {"base": "0x320"}, path=str(plugin_dir),
                                pio=[PluginRange(0x320, 4)])]
    assert virtio == [kinds.Plugin.spec(PluginSpec(str(plugin_dir / "mypkg" / "dev.py"), "Rng"), 1)]
    assert kinds.Plugin.plugin(virtio[0].options) == PluginSpec(str(plugin_dir / "mypkg" / "dev.py"), "Rng")
    with pytest.raises(UserError, match=r"Broken\(\) raised ValueError: no such hardware"):
        describe_plugins([parse_plugin("mypkg.dev:Broken", os.getcwd())])
    with pytest.raises(UserError, match="cannot import nosuch"):
        describe_plugins([parse_plugin("nosuch:X", os.getcwd())])
