"""hvctl user errors: one line on stderr, the documented exit status, never a traceback."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HVCTL = [sys.executable, os.path.join(REPO, "bin", "hvctl")]
HOST_GIB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30


def hvctl(*args, runtime_dir, timeout=30):
    env = {**os.environ, "HV_RUNTIME_DIR": runtime_dir}
    return subprocess.run(HVCTL + list(map(str, args)), capture_output=True, text=True, env=env,
                          timeout=timeout, cwd="/")


def one_line_error(r, status, words):
    assert r.returncode == status, r
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert words in lines[0]


@pytest.fixture
def rundir():
    d = tempfile.mkdtemp(prefix="hv-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def supervisor(rundir):
    p = subprocess.Popen(HVCTL + ["supervisor", "--runtime-dir", rundir], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock, deadline = os.path.join(rundir, "control.sock"), time.monotonic() + 15
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            break
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, "supervisor did not start"
            time.sleep(0.05)
    yield rundir
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "k.bin"
    k.write_bytes(b"\xf4")
    return k


@pytest.mark.parametrize("cmd", ["run", "create g"])
def test_missing_kernel(cmd, rundir):
    one_line_error(hvctl(*cmd.split(), "--kernel", "/no/such/kernel", runtime_dir=rundir), 2,
                   "no such kernel file: /no/such/kernel")


@pytest.mark.parametrize("options, words", [
    (["--mem", "12x"], "--mem"),
    (["--mem", "0"], "--mem"),
    (["--mem", "65G"], "--mem"),
    (["--mem", "1000000"], "--mem"),            # not a multiple of 4K (and below 1M)
    (["--mem", "1026K"], "multiple of 4K"),
    (["--vcpus", "0"], "--vcpus"),
    (["--vcpus", "65"], "--vcpus"),
    (["--vcpus", "two"], "--vcpus"),
    (["--boot", "raw8"], "--boot"),
    (["--load-addr", "zz"], "--load-addr"),
    (["--timeout", "soon"], "--timeout"),
    (["--timeout", "-1"], "--timeout"),
    (["--timeout", "inf"], "--timeout"),
    (["--timeout", "1e10"], "24 days"),
    (["--timeout", "nan"], "--timeout"),
    (["--pin", "0-20000000"], "--pin"),
    (["--mem", f"{HOST_GIB + 1}G"], "more than this host has" if HOST_GIB < 64 else "out of range"),
    (["--cmdline", "a" * 100_000], "--cmdline: 100000 bytes"),
    (["--stats-json", "/no/such/dir/s.json"], "--stats-json: cannot write"),
    (["--net", "switch:a,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02"], "mac= 2 times"),
    (["--initrd", "/no/initrd"], "no such initrd file"),
    (["--disk", "/x"], "--disk: /x: no such file"),
    (["--disk", "/tmp"], "--disk: /tmp: no such file"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_run_options(options, words, kernel, rundir):
    one_line_error(hvctl("run", "--kernel", kernel, *options, runtime_dir=rundir), 2, words)


def test_kernel_is_a_directory(rundir):
    one_line_error(hvctl("run", "--kernel", "/tmp", runtime_dir=rundir), 2, "no such kernel file")


@pytest.mark.parametrize("args", [[], ["bogus"], ["start"], ["wait", "g", "--timeout", "x"]])
def test_bad_usage(args, rundir):
    one_line_error(hvctl(*args, runtime_dir=rundir), 2, "")


@pytest.mark.parametrize("args", [["list"], ["info", "g"], ["start", "g"], ["wait", "g"], ["logs", "g"],
                                  ["snapshot", "g", "/tmp/x"], ["restore", "/tmp/x"]])
def test_no_supervisor(args, rundir):
    r = hvctl(*args, runtime_dir=rundir, timeout=10)
    one_line_error(r, 1, "no supervisor is running")
    assert "hvctl supervisor --detach" in r.stderr


def test_stale_control_socket_means_no_supervisor(rundir):
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(rundir, "control.sock"))
    s.close()                        # the file stays, nobody listens
    one_line_error(hvctl("list", runtime_dir=rundir, timeout=10), 1, "no supervisor is running")


@pytest.mark.parametrize("cmd", ["start", "stop", "pause", "resume", "destroy", "info", "wait", "logs",
                                 "console", "stats"])
def test_unknown_guest(cmd, supervisor):
    one_line_error(hvctl(cmd, "nosuch", runtime_dir=supervisor), 1, "no such guest: nosuch")


def test_create_errors_via_supervisor(supervisor, kernel):
    assert hvctl("create", "g", "--kernel", kernel, runtime_dir=supervisor).returncode == 0
    one_line_error(hvctl("create", "g", "--kernel", kernel, runtime_dir=supervisor), 1, "already exists")
    one_line_error(hvctl("create", "bad/name", "--kernel", kernel, runtime_dir=supervisor), 2, "bad guest name")
    one_line_error(hvctl("pause", "g", runtime_dir=supervisor), 1, "is created")
    one_line_error(hvctl("wait", "g", runtime_dir=supervisor), 1, "has not been started")
    one_line_error(hvctl("stats", "g", runtime_dir=supervisor), 1, "not running")
    one_line_error(hvctl("console", "g", runtime_dir=supervisor), 1, "no console")
    kernel.unlink()
    one_line_error(hvctl("start", "g", runtime_dir=supervisor), 2, "no such kernel file")


def test_second_supervisor_refused(supervisor):
    for args in (["supervisor"], ["supervisor", "--detach"]):
        one_line_error(hvctl(*args, runtime_dir=supervisor), 1, "already running")


def test_runtime_dir_option_before_or_after_command(supervisor):
    for args in (["--runtime-dir", supervisor, "list"], ["list", "--runtime-dir", supervisor]):
        assert hvctl(*args, runtime_dir="/nonexistent").returncode == 0


def test_an_image_larger_than_guest_ram_is_refused_before_it_is_read(tmp_path, rundir):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)                     # sparse: 1 GiB that would be read whole before
    one_line_error(hvctl("run", "--kernel", big, "--boot", "raw64", "--mem", "16M", runtime_dir=rundir), 2,
                   "do not fit in --mem 16 MiB")


def test_a_run_with_device_services_leaves_nothing_in_the_temp_dir(tmp_path, rundir):
    """Every device-service run once left a /tmp/pyhv-* dir behind (issue 14, defect 10): it goes with the run."""
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")                            # raw16: jmp .
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run(HVCTL + ["run", "--kernel", str(spin), "--boot", "raw16", "--disk", str(disk), "--rng",
                                "--timeout", "2"], capture_output=True, timeout=60,
                       env={**os.environ, "HV_RUNTIME_DIR": rundir, "TMPDIR": str(tmp)})
    assert r.returncode == 124, r
    assert os.listdir(tmp) == []


def test_a_killed_runs_private_dir_is_removed_by_the_next_run(tmp_path, rundir):
    import glob
    import signal
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")                            # raw16: jmp .
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    pattern = os.path.join(tempfile.gettempdir(), "pyhv-run-*")
    before = set(glob.glob(pattern))
    env = {**os.environ, "HV_RUNTIME_DIR": rundir}
    p = subprocess.Popen(HVCTL + ["run", "--kernel", str(spin), "--boot", "raw16", "--disk", str(disk),
                                  "--timeout", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while not set(glob.glob(pattern)) - before:
        assert time.monotonic() < deadline and p.poll() is None, "hvctl run made no private dir"
        time.sleep(0.05)
    (left,) = set(glob.glob(pattern)) - before
    time.sleep(1)                                            # its device service is up
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = hvctl("run", "--kernel", spin, "--boot", "raw16", "--disk", disk, "--timeout", "1", runtime_dir=rundir)
    assert r.returncode == 124
    assert not os.path.exists(left)
