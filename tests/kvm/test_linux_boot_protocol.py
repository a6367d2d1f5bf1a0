"""The 64-bit Linux boot protocol end to end: a probe "kernel" booted by `hvctl run --boot linux` reads our zero page."""
import pathlib
import subprocess

import pytest
from hv import GUESTS

from linux_images import make_bzimage, need, payload_for

PROBE = GUESTS / "linux_probe.S"


@pytest.fixture(scope="module")
def probe_elf(tmp_path_factory):
    need("as", "ld")
    d = tmp_path_factory.mktemp("probe")
    subprocess.run(["as", "--64", "-o", d / "p.o", PROBE], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "--build-id=none", "-N", "--no-warn-rwx-segments",
                    "-z", "noexecstack", "-Ttext=0x1000000", "-e", "_start", "-o", d / "p.elf", d / "p.o"], check=True)
    return d / "p.elf"


def test_elf_vmlinux_gets_cmdline_and_e820(run_guest, probe_elf):
    r = run_guest(probe_elf, "--boot", "linux", "--compat", "none", "--cmdline", "console=ttyS0 pyhv=yes",
                  "--timeout", "20", timeout=30)
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "cmdline=console=ttyS0 pyhv=yes"
    assert lines[1].startswith("e820=") and int(lines[1][5:]) >= 3
    assert r.returncode == 42


def test_nested_profile_adds_its_kernel_arguments_but_keeps_the_users(run_guest, probe_elf):
    from pyhv.vcpu_worker.compat import NESTED_KERNEL_ARGS
    r = run_guest(probe_elf, "--cmdline", "console=ttyS0 tsc=unstable", "--timeout", "20", timeout=30)
    words = r.stdout.decode().splitlines()[0][len("cmdline="):].split()
    assert words[:2] == ["console=ttyS0", "tsc=unstable"]          # the user's value wins
    assert "tsc=reliable" not in words
    assert words[2:-1] == [a for a in NESTED_KERNEL_ARGS if not a.startswith("tsc=")]
    assert words[-1].startswith("tsc_early_khz=") and int(words[-1].split("=")[1]) > 100_000   # KVM's TSC kHz


def test_lz4_bzimage_is_decompressed_on_the_host_and_booted(run_guest, probe_elf, tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(make_bzimage(payload_for("lz4", probe_elf.read_bytes())))
    r = run_guest(bz, "--cmdline", "from=bzImage", "--compat", "none", "--timeout", "20", timeout=30)
    assert r.stdout.decode().splitlines()[0] == "cmdline=from=bzImage"   # --boot linux is the default
    assert r.returncode == 42


def test_linux_boot_with_an_initrd_and_two_vcpus(run_guest, probe_elf, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"07070100" * 1000)
    r = run_guest(probe_elf, "--initrd", initrd, "--vcpus", 2, "--cmdline", "x", "--compat", "none",
                  "--timeout", "20", timeout=30)
    assert r.stdout.decode().splitlines()[0] == "cmdline=x"
    assert r.returncode == 42


def test_garbage_kernel_file_is_a_one_line_error_with_status_2(run_guest, tmp_path):
    bad = tmp_path / "vmlinuz"
    bad.write_bytes(b"\x7fELF" + b"\xff" * 100)
    r = run_guest(bad, "--timeout", "20", timeout=30)
    assert r.returncode == 2
    assert len(r.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in r.stderr
