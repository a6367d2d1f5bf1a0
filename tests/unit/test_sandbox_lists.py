"""proto/sandbox.py in child processes (no KVM): each role's filter kills on a call outside its list, logs it in
log mode, stays out of the way when off; no_new_privs, dropped capabilities and Landlock take effect; the lists
keep the stacking rule (a parent's list holds its children's)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pyhv.proto import sandbox

ROLES = sandbox.ROLES


def run_as(role, body, mode="enforce", writable=(), env=None):
    """Run `body` (Python) in a child that first applies `role` (sys.argv[1:]: the dirs it may write); the
    CompletedProcess."""
    code = "import os, sys\nfrom pyhv.proto import sandbox\n" + \
        f"st = sandbox.apply({role!r}, writable=sys.argv[1:])\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *map(str, writable)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, sandbox.ENV: mode, **(env or {})})


def test_each_parents_list_holds_its_childrens_and_no_list_holds_a_denied_call():
    for parent, children in sandbox.SPAWNS.items():
        for child in children:
            assert sandbox.allowed(child) <= sandbox.allowed(parent), (parent, child)
            assert sandbox.ioctl_types(child) <= sandbox.ioctl_types(parent), (parent, child)
    for role in ROLES:
        assert not sandbox.allowed(role) & sandbox.DENIED
    assert "execve" not in sandbox.allowed("worker") | sandbox.allowed("service") | sandbox.allowed("switch")
    assert "fork" not in sandbox.allowed("service") and "openat" in sandbox.allowed("service")
    unknown = {n for r in ROLES for n in sandbox.allowed(r) if sandbox.syscall_number(n) is None}
    assert unknown <= {"time", "epoll_wait", "epoll_create", "select", "pipe", "eventfd", "access", "stat", "lstat",
                       "open", "readlink", "mkdir", "rmdir", "unlink", "rename", "link", "symlink", "chmod",
                       "fork", "vfork", "poll", "dup2", "futex_waitv", "epoll_pwait2"}, unknown   # not on x86-64


@pytest.mark.parametrize("role", ROLES)
def test_every_role_shows_no_new_privs_and_a_filter_and_a_denied_call_kills_it_with_sigsys(role):
    r = run_as(role, """
        s = sandbox.proc_status(os.getpid())
        print(s["NoNewPrivs"], s["Seccomp"], st["role"], st["mode"], flush=True)
        import ctypes
        ctypes.CDLL(None).syscall(sandbox.syscall_number("ptrace"), 0, 0, 0, 0)
        print("survived", flush=True)
    """)
    assert r.stdout.split("\n")[0] == f"1 2 {role} enforce", r.stderr
    assert r.returncode == -signal.SIGSYS and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "plugin"])
def test_a_call_outside_the_list_is_logged_and_allowed_in_log_mode(role):
    r = run_as(role, """
        import ctypes
        print(ctypes.CDLL(None).syscall(sandbox.syscall_number("ptrace"), 0, 0, 0, 0) != -2, flush=True)
        print("survived", st["mode"])
    """, mode="log")
    assert r.returncode == 0 and "survived log" in r.stdout, r.stderr


def test_off_keeps_no_new_privs_and_loads_no_filter():
    r = run_as("worker", """
        s = sandbox.proc_status(os.getpid())
        print(s["NoNewPrivs"], s["Seccomp"], st["seccomp"])
    """, mode="off")
    assert r.stdout.split() == ["1", "0", "False"], r.stderr


def test_a_bad_mode_is_one_line():
    r = run_as("worker", "", mode="on")
    assert r.returncode != 0 and "HV_SECCOMP='on': use one of enforce, log, off" in r.stderr


@pytest.mark.parametrize("role", ["service", "switch", "plugin"])
def test_services_switches_and_plugins_hold_no_capability(role):
    r = run_as(role, """
        s = sandbox.proc_status(os.getpid())
        print(s["CapEff"], s["CapPrm"], s["CapBnd"], s["CapAmb"], st["capabilities"])
    """)
    if os.geteuid() != 0:
        pytest.skip("not root: there was nothing to drop")
    assert r.stdout.split() == ["0000000000000000"] * 4 + ["none"], r.stderr


def test_the_worker_keeps_kvm_ioctls_and_clone3_answers_enosys_for_namespaces_are_denied():
    r = run_as("worker", """
        import ctypes, threading, errno
        libc = ctypes.CDLL(None, use_errno=True)
        t = threading.Thread(target=lambda: None); t.start(); t.join()       # glibc: clone3 -> ENOSYS -> clone
        print(libc.syscall(sandbox.syscall_number("clone3"), 0, 0), ctypes.get_errno() == errno.ENOSYS, flush=True)
        libc.syscall(sandbox.syscall_number("unshare"), 0x10000000)          # CLONE_NEWUSER
        print("survived")
    """)
    assert r.stdout.split("\n")[0] == "-1 True" and r.returncode == -signal.SIGSYS, (r.stdout, r.stderr)


def test_a_plugin_may_not_touch_kvm_but_may_do_what_a_device_does():
    r = run_as("plugin", """
        import fcntl, tempfile, threading
        with tempfile.TemporaryFile() as f:               # files, threads: the user's code may
            f.write(b"x")
        threading.Thread(target=lambda: None).start()
        print("ok", flush=True)
        fcntl.ioctl(0, 0xAE00)                            # KVM_GET_API_VERSION, on any fd
        print("survived")
    """)
    assert r.stdout.split("\n")[0] == "ok" and r.returncode == -signal.SIGSYS, (r.stdout, r.stderr)


@pytest.mark.skipif(not sandbox.landlock_abi(), reason="this kernel has no Landlock")
def test_landlock_confines_a_service_to_reading_code_and_a_switch_to_writing_its_dir(tmp_path):
    probe = """
        import json                                       # lazy imports still work
        for path, how in ((os.environ["PROBE_DIR"] + "/f", "w"), ("/etc/hostname", "r"), ("/tmp/pyhv-landlock-probe", "w")):
            try:
                open(path, how).close()
                print("ok", end=" ")
            except PermissionError:
                print("denied", end=" ")
    """
    r = run_as("service", probe, env={"PROBE_DIR": str(tmp_path)})
    assert r.stdout.split() == ["denied", "denied", "denied"], r.stderr
    r = run_as("switch", probe, writable=[tmp_path], env={"PROBE_DIR": str(tmp_path)})
    assert r.stdout.split() == ["ok", "denied", "denied"], r.stderr


def test_sigsys_is_named_as_a_seccomp_kill_and_the_pidfd_tells_a_reaped_status():
    assert sandbox.killed_by(signal.SIGSYS) == sandbox.SIGSYS_TEXT
    assert "HV_SECCOMP=log" in sandbox.SIGSYS_TEXT
    assert sandbox.killed_by(signal.SIGKILL) == "killed by SIGKILL"
    p = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSYS)"])
    pidfd = os.pidfd_open(p.pid)
    try:
        p.wait(30)
        status = sandbox.pidfd_exit_status(pidfd)
        if status is None:
            pytest.skip("this kernel has no PIDFD_INFO_EXIT (Linux 6.15+)")
        assert sandbox.describe_wait_status(status) == sandbox.SIGSYS_TEXT
    finally:
        os.close(pidfd)


def test_collect_names_the_calls_each_role_lacks():
    nr = sandbox.syscall_number("ptrace")
    dmesg = (f'[ 1.0] audit: type=1326 audit(1:2): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=77 comm="python" '
             f'exe="/usr/bin/python3" sig=0 arch=c000003e syscall={nr} compat=0 ip=0x7f code=0x7ffc0000\n'
             '[ 1.1] audit: type=1326 audit(1:3): auid=1 uid=0 gid=0 ses=1 pid=78 comm="x" exe="/x" sig=0 '
             'arch=c000003e syscall=0 compat=0 ip=0x1 code=0x7ffc0000\n') * 2
    assert sandbox.collect(dmesg, "77 service\n") == {"service": {"ptrace": 2}}


def test_a_service_removing_a_file_gets_eacces_and_lives():
    r = run_as("service", """
        try:
            os.unlink("/nonexistent-pyhv-probe")
        except PermissionError:
            print("refused")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.returncode, r.stderr)


def test_a_killed_role_dumps_no_core(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from pyhv.proto import sandbox; import ctypes, resource\n"
                        "resource.setrlimit(resource.RLIMIT_CORE, (-1, -1))\nsandbox.apply('service')\n"
                        "print(resource.getrlimit(resource.RLIMIT_CORE), flush=True)\n"
                        "ctypes.CDLL(None).syscall(sandbox.syscall_number('ptrace'), 0, 0, 0, 0)"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGSYS and r.stdout.strip() == "(0, 0)", (r.stdout, r.stderr)
    assert os.listdir(tmp_path) == []
