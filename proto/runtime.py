"""The runtime dir's layout: every socket, lock and log path in one place, the default dir, and a child's environment.

    RUNTIME/control.sock  hvctl.sock  supervisor.lock  supervisor.log  services.sock
            switch-NAME.sock .lock .json .log       (one learning switch per name)
            guests/NAME/guest.json  console.log  console.sock  worker.log  worker.sock  result.json
                        vconsole.sock  vconsole.log  svc-DEVICE-N-ctl.sock  svc-DEVICE-N-evt.sock
            logs/NAME/console.log  worker.log      (a destroyed guest's, unless destroyed with --purge)

A GuestDir (supervised) and a PrivateDir (`hvctl run`: a temp dir for its
sockets, switches in the default runtime dir) answer the same questions, so
code that needs a host path for a device asks whichever it was given.
"""
import os
import stat

import pyhv
from pyhv.proto.errors import UserError

UNIX_PATH_MAX = 107             # sun_path minus its NUL


def default_dir():
    """$HV_RUNTIME_DIR, else $XDG_RUNTIME_DIR/pyhv, else /tmp/pyhv-UID."""
    if os.environ.get("HV_RUNTIME_DIR"):
        return os.environ["HV_RUNTIME_DIR"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "pyhv")
    return f"/tmp/pyhv-{os.getuid()}"


def host_facts_file():
    """Where facts probed about this host's KVM are kept until the next boot (vcpu_worker/syscall_hook.py).

    /run/pyhv (a tmpfs, empty after a reboot) when we may write there, else a file of our own in the temp dir;
    the contents name the boot and kernel they were measured on.
    """
    if os.geteuid() == 0 or os.access("/run/pyhv", os.W_OK):
        return "/run/pyhv/host-facts.json"
    import tempfile
    return os.path.join(tempfile.gettempdir(), f"pyhv-{os.getuid()}-host-facts.json")


def child_env():
    """os.environ with this pyhv first on PYTHONPATH, so `python -m pyhv....` in a child runs this very code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pyhv.import_root(), env.get("PYTHONPATH")) if p)
    return env


def python_module(module):
    """The argv that runs `python -m pyhv.MODULE` with this interpreter."""
    import sys
    return [sys.executable, "-m", f"pyhv.{module}"]


class _Dir:
    """Sockets of device services and switches, common to both kinds of guest directory."""
    path = ""
    switch_root = ""

    def file(self, leaf):
        return os.path.join(self.path, leaf)

    def service_endpoint(self, device, incarnation, role):
        """The ZeroMQ endpoint of a device service's control ("ctl") or events ("evt") socket."""
        return f"ipc://{self.file(f'svc-{device}-{incarnation}-{role}.sock')}"

    def switch_endpoint(self, name):
        return switch_endpoint(self.switch_root, name)

    def socket_path(self, leaf):
        """A device's host-side unix socket, e.g. vconsole.sock."""
        return self.file(f"{leaf}.sock")

    def longest_socket(self):
        """The longest unix socket path below this directory (it must fit UNIX_PATH_MAX)."""
        return self.service_endpoint("virtio-console", 999, "ctl")[len("ipc://"):]


class RuntimeDir:
    """One supervisor's directory."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.control_sock = self.file("control.sock")
        self.control_endpoint = "ipc://" + self.control_sock
        self.hvctl_sock = self.file("hvctl.sock")       # the same requests, one per SEQPACKET connection
        self.supervisor_lock = self.file("supervisor.lock")
        self.supervisor_log = self.file("supervisor.log")
        self.services_sock = self.file("services.sock")
        self.guests = self.file("guests")

    INCOMING = "incoming-"        # + guest name + "-" + random: a migration's files until the guest is here

    def incoming_prefix(self, name):
        return f"{self.INCOMING}{name}-"

    def file(self, leaf):
        return os.path.join(self.path, leaf)

    def make_private(self):
        """Create the dir 0700, or accept an existing one only if it is a real directory of ours that nobody
        else can write to (a readable one is narrowed to 0700): its sockets take commands that run guests."""
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(self.path)
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"runtime dir {self.path} is not a directory (a symlink?): remove it or choose another")
        if st.st_uid != os.getuid():
            raise UserError(f"runtime dir {self.path} belongs to uid {st.st_uid}, not you (uid {os.getuid()}): "
                            f"choose another with --runtime-dir")
        if st.st_mode & 0o022:
            raise UserError(f"runtime dir {self.path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
                            f"`chmod 700 {self.path}`, or choose another")
        if st.st_mode & 0o077:
            os.chmod(self.path, 0o700)

    def guest(self, name):
        return GuestDir(self, name)

    def kept_logs(self, name):
        """Where a destroyed guest's console.log and worker.log are kept (until a guest of that name is destroyed again)."""
        return os.path.join(self.path, "logs", name)

    def switch_endpoint(self, name):
        return switch_endpoint(self.path, name)

    def switch_file(self, name, ext):
        """switch-NAME.sock / .lock / .json / .log"""
        return self.file(f"switch-{name}.{ext}")


def pid_alive(pid):
    """Is `pid` a live process (a zombie, killed but not yet reaped, is not)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def switch_endpoint(runtime_dir, name):
    """The ZeroMQ endpoint of switch NAME in `runtime_dir`."""
    return f"ipc://{os.path.join(os.path.abspath(runtime_dir), f'switch-{name}.sock')}"


def check_switch_socket(runtime_dir, name):
    """UserError unless switch NAME's socket in `runtime_dir` fits in a unix socket address (else nothing can
    bind it: the NIC would never reach its switch)."""
    path = switch_endpoint(runtime_dir, name)[len("ipc://"):]
    if len(path) > UNIX_PATH_MAX:
        raise UserError(f"--net: switch:{name}: its socket {path} is {len(path)} characters, more than a unix "
                        f"socket allows ({UNIX_PATH_MAX}): use a shorter switch name or runtime dir")


class GuestDir(_Dir):
    """RUNTIME/guests/NAME: a supervised guest's files."""

    def __init__(self, runtime, name):
        self.runtime = runtime
        self.name = name
        self.path = os.path.join(runtime.guests, name)
        self.switch_root = runtime.path
        self.record = self.file("guest.json")
        self.console_log = self.file("console.log")
        self.console_times = self.file("console.times")      # proto/console_times.py
        self.console_sock = self.file("console.sock")
        self.worker_log = self.file("worker.log")
        self.worker_sock = self.file("worker.sock")
        self.worker_endpoint = "ipc://" + self.worker_sock
        self.result = self.file("result.json")

    def log_path(self, leaf):
        return self.file(f"{leaf}.log")


class PrivateDir(_Dir):
    """A standalone guest's (`hvctl run`) temp dir for its sockets; switches live in the default runtime dir."""

    def __init__(self, prefix="pyhv-run-"):
        import tempfile                # here: hvctl run without devices never needs it
        self.path = tempfile.mkdtemp(prefix=prefix)
        if len(self.longest_socket()) > UNIX_PATH_MAX:          # a long TMPDIR: sockets would not bind
            os.rmdir(self.path)
            self.path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.switch_root = os.path.abspath(default_dir())
        with open(self.file("owner.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
        self._sweep(prefix)

    def _sweep(self, prefix):
        """Remove the dirs of earlier runs whose owner died without cleaning up (kill -9 of hvctl run)."""
        import shutil
        parent = os.path.dirname(self.path)
        for leaf in os.listdir(parent):
            path = os.path.join(parent, leaf)
            if not leaf.startswith(prefix) or path == self.path:
                continue
            try:
                if os.lstat(path).st_uid != os.getuid():
                    continue
                with open(os.path.join(path, "owner.pid")) as f:
                    pid = int(f.read())
                if not pid_alive(pid):
                    shutil.rmtree(path, ignore_errors=True)
            except (OSError, ValueError):
                continue               # not ours to judge: no pid file (an older run), or unreadable

    def log_path(self, leaf):
        return None                    # a foreground guest keeps no logs

    def remove(self):
        import shutil
        shutil.rmtree(self.path, ignore_errors=True)
