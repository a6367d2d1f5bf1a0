"""Device plugins with real guests: `--device MODULE:CLASS` serves ports or MMIO (or a virtio device) from a
process of its own; a plugin that raises, dies or hangs turns only its own reads into all-ones.

The plugins are examples/plugins/ and tests/support/testplugins.py; the guest is
tests/support/guests/plugin_guest.c, one scenario per build (see its header).
"""
import json
import os
import re
import shutil
import signal
import tempfile
import zlib

import pytest

from hv import GUESTS, REPO, hvctl, wait_for

EXAMPLES = REPO / "examples" / "plugins"
SUPPORT = GUESTS.parent
CRC32 = f"{EXAMPLES / 'crc32dev.py'}:Crc32"
TEXT = b"The quick brown fox jumps over the lazy dog"


@pytest.fixture
def scenario(build_c_guest):
    def build(n, *defines):
        return str(build_c_guest((GUESTS / "plugin_guest.c").read_text(),
                                 cflags=(f"-DSCENARIO={n}", *(f"-D{d}" for d in defines))))
    return build


def test_the_crc32_example_checksums_guest_ram(build_guest):
    demo = build_guest((EXAMPLES / "crc32_demo.S").read_text())
    r = hvctl("run", "--boot", "raw64", "--kernel", demo, "--device", CRC32, "--timeout", "30")
    crc = f"{zlib.crc32(TEXT):08x}"
    assert r.stdout.decode() == f"crc32 by the device: {crc}, by the guest: {crc}: the same\r\n"
    assert r.returncode == 0, r.stderr
    r = hvctl("run", "--boot", "raw64", "--kernel", demo, "--timeout", "30")      # no plugin: nobody answers
    assert r.returncode == 2 and r.stdout.startswith(b"no CRC-32 device")


def test_a_plugin_raises_its_interrupt_line_and_reads_guest_memory_through_the_checked_accessor(scenario):
    r = hvctl("run", "--boot", "raw64", "--kernel", scenario(2), "--device", f"{CRC32},irq=5", "--timeout", "30")
    assert r.returncode == 100, (r.stdout, r.stderr)
    assert f"crc=0x{zlib.crc32(TEXT):x}" in r.stdout.decode()


@pytest.mark.parametrize("where", ["pio", "mmio"])
def test_a_plugin_that_raises_reads_all_ones_from_then_on_and_info_names_it(sup, scenario, where):
    if where == "pio":
        guest, plugin = scenario(1), "testplugins:Scratch,fail_at=4"
    else:
        guest, plugin = scenario(1, "MMIO=0xD0000000UL"), "testplugins:Scratch,mmio=0xD0000000,fail_at=4"
    r = hvctl("create", "p", "--boot", "raw64", "--kernel", guest, "--device", plugin, "--timeout", "60", "--start",
              cwd=SUPPORT, env={"HV_RUNTIME_DIR": sup.dir})
    assert r.returncode == 0, r.stderr
    console = lambda: open(sup.info("p")["console_log"]).read()  # noqa: E731
    wait_for(lambda: "alive" in console(), timeout=20)
    assert console().startswith("before=0x11223344 failing=0xffffffff after=0xffffffff rewritten=0xffffffff alive")
    info = sup.info("p")
    assert info["state"] == "running"
    assert info["devices"]["plugin0"]["state"] == "failed"
    assert "Scratch.read(0x4, 4) raised RuntimeError: boom at 0x4" in info["devices"]["plugin0"]["reason"]
    assert "device:plugin0" not in info["pids"]                   # its process is gone
    dots = console().count(".")
    wait_for(lambda: console().count(".") > dots + 3, timeout=20)    # the guest runs on
    assert sup.hvctl("stop", "p").returncode == 0


def test_a_killed_or_hung_plugin_fails_alone(sup, scenario):
    r = hvctl("create", "k", "--boot", "raw64", "--kernel", scenario(1), "--device", "testplugins:Scratch,hang_at=4",
              "--timeout", "60", "--start", cwd=SUPPORT, env={"HV_RUNTIME_DIR": sup.dir})
    assert r.returncode == 0, r.stderr
    console = lambda: open(sup.info("k")["console_log"]).read()  # noqa: E731
    wait_for(lambda: "alive" in console(), timeout=30)             # the hung read gave up (5 s)
    assert "failing=0xffffffff" in console()
    assert "no answer within 5 s" in sup.info("k")["devices"]["plugin0"]["reason"]
    sup.hvctl("stop", "k", check=0)
    # kill -9 of the plugin's process between two guest accesses: the same, and `info` says how it ended
    r = hvctl("create", "d", "--boot", "raw64", "--kernel", scenario(5, "STEP_MS=200", "COUNT=1000"), "--device",
              "testplugins:Counter", "--timeout", "60", "--start", cwd=SUPPORT, env={"HV_RUNTIME_DIR": sup.dir})
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "n=0x3 " in open(sup.info("d")["console_log"]).read(), timeout=30)
    os.kill(sup.info("d")["pids"]["device:plugin0"], signal.SIGKILL)
    wait_for(lambda: "n=0xffffffff" in open(sup.info("d")["console_log"]).read(), timeout=30)
    info = sup.info("d")
    assert info["state"] == "running" and info["devices"]["plugin0"]["state"] == "failed"
    assert "plugin process pid" in info["devices"]["plugin0"]["reason"]   # not our child: ended, no status
    sup.hvctl("stop", "d", check=0)


@pytest.mark.parametrize("plugin, why", [
    ("testplugins:Scratch,base=0x3fc", "overlap the serial port COM1"),
    ("testplugins:Scratch,mmio=0x200000", "overlap guest RAM"),
    ("testplugins:Counter,base=0x80", "the POST port"),
    ("testplugins:Nope", "has no class Nope"),
    ("testplugins:Scratch,colour=red", "unexpected keyword argument 'colour'"),
])
def test_a_plugin_that_cannot_be_placed_is_refused_before_anything_runs(sup, scenario, plugin, why):
    for cmd in (["run"], ["create", "bad"]):
        r = hvctl(*cmd, "--boot", "raw64", "--kernel", scenario(5), "--device", plugin, "--timeout", "30",
                  cwd=SUPPORT, env={"HV_RUNTIME_DIR": sup.dir})
        assert r.returncode == 2 and r.stdout == b"", r
        assert why in r.stderr.decode() and len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    assert json.loads(sup.hvctl("list", "--json", check=0).stdout) == []


def test_two_plugins_on_one_range_are_refused(scenario):
    r = hvctl("run", "--boot", "raw64", "--kernel", scenario(5), "--device", "testplugins:Counter,base=0x310",
              "--device", "testplugins:Scratch,base=0x312", cwd=SUPPORT)
    assert r.returncode == 2 and b"ports 0x312+0x8 overlap Counter" in r.stderr


def test_every_vcpu_reaches_the_plugin_and_no_access_is_lost(scenario):
    r = hvctl("run", "--boot", "raw64", "--kernel", scenario(3, "WRITES=300"), "--vcpus", "4", "--device",
              "testplugins:Counter", "--timeout", "60", cwd=SUPPORT)
    assert r.returncode == 100, (r.stdout, r.stderr)


def test_other_vcpus_run_on_while_one_waits_for_the_plugin(scenario):
    r = hvctl("run", "--boot", "raw64", "--kernel", scenario(4), "--vcpus", "2", "--device",
              "testplugins:Scratch,slow_at=0,slow_ms=2000", "--timeout", "60", cwd=SUPPORT)
    assert r.returncode == 100, (r.stdout, r.stderr)


def test_a_snapshot_holds_the_plugins_state_or_is_refused(sup, scenario, tmp_path):
    guest = scenario(5, "STEP_MS=50", "COUNT=60")
    for name, plugin in (("keeps", "testplugins:Counter"), ("nostate", "testplugins:NoState")):
        r = hvctl("create", name, "--boot", "raw64", "--kernel", guest, "--device", plugin, "--timeout", "60",
                  "--start", cwd=SUPPORT, env={"HV_RUNTIME_DIR": sup.dir})
        assert r.returncode == 0, r.stderr
    wait_for(lambda: "n=0xa " in open(sup.info("nostate")["console_log"]).read(), timeout=30)
    r = sup.hvctl("snapshot", "nostate", tmp_path / "refused")
    assert r.returncode != 0 and "NoState has no snapshot() method" in r.stderr
    assert sup.info("nostate")["state"] == "running" and not (tmp_path / "refused").exists()
    wait_for(lambda: "n=0xa " in open(sup.info("keeps")["console_log"]).read(), timeout=30)
    sup.hvctl("snapshot", "keeps", tmp_path / "s", "--stop", check=0)
    before = open(sup.info("keeps")["console_log"]).read()
    sup.hvctl("restore", tmp_path / "s", "--name", "again", check=0)
    assert sup.hvctl("wait", "again", "--timeout", "60").returncode == 0
    counts = [int(n, 16) for n in re.findall(r"n=0x([0-9a-f]+)", before + open(sup.info("again")["console_log"]).read())]
    assert counts == list(range(1, 61))       # every count once, in order: the plugin's count came back with it


def test_a_virtio_plugin_serves_the_guest_through_its_own_virtio_pci_function(build_c_guest):
    import sys
    sys.path.insert(0, str(EXAMPLES))
    from seeded_rng import stream
    driver = str(build_c_guest((GUESTS / "virtio_rng_driver.c").read_text(), cflags=("-DPRINT_BYTES", "-fno-tree-vectorize")))
    plugin = f"{EXAMPLES / 'seeded_rng.py'}:SeededRng,seed=42"
    r = hvctl("run", "--boot", "raw64", "--kernel", driver, "--device", plugin, "--timeout", "60")
    assert r.returncode == 100, (r.stdout, r.stderr)       # the rng driver's every step, hostile ones included
    got = "".join(re.findall(r"bytes=([0-9a-f]{128})", r.stdout.decode()))
    assert got == stream(42, 3 * 64).hex()                 # exactly the seeded stream, in request order


def test_the_python_api_takes_plugins_too(build_guest):
    from pyhv import Client
    demo = str(build_guest((EXAMPLES / "crc32_demo.S").read_text()))
    d = tempfile.mkdtemp(prefix="hv-api-", dir="/tmp")      # short: unix socket paths are limited
    with Client.start_supervisor(d) as hv:
        g = hv.create("api", kernel=demo, boot="raw64", timeout=30, plugins=[f"{CRC32},base=0x300"], start=True)
        assert g.wait(timeout=30) == 0 and b"the same" in g.logs()
        assert g.info().config.plugins[0].pio[0].base == 0x300
    shutil.rmtree(d, ignore_errors=True)


def test_run_restore_takes_its_plugins_from_the_snapshot():
    r = hvctl("run", "--restore", "/nonexistent", "--device", CRC32)
    assert r.returncode == 2 and b"give no --device" in r.stderr
