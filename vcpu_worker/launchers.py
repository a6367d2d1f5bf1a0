"""How a guest's helper processes start: device services and plugins (by this worker, or by the supervisor), switches.

Supervised guests have their services started by the supervisor, which
spawns and watches every process of a guest.  The worker still owns the fds
a service needs (the KVM ioeventfds/irqfds it registered, the memfd, the
lifeline pipe), so SupervisorLauncher sends them over RUNTIME/services.sock
(SCM_RIGHTS) with a SpawnService that names only the device and the
incarnation; the supervisor builds the ServiceSpec from its own copy of the
guest's config (supervisor/services.py).  `hvctl run` uses LocalLauncher: the
same ServiceSpec, built here, for a child of this process.  Either way the
proxy (devices/virtio/proxy.py) gets a ServiceProcess it watches and signals
through a pidfd (no pid-reuse race), and binds the endpoints `endpoints()`
names.  Device plugins (devices/plugin/) start the same two ways, from a
PluginProcess and a SpawnPlugin.
"""
import base64
import os
import select
import signal
import socket
import subprocess
import time

from pyhv.devices.net.switch import ALREADY_SERVED
from pyhv.devices.virtio import kinds
from pyhv.devices.virtio.proxy import LauncherAbsent
from pyhv.proto import codec, device_service as ds, plugin as pw, runtime, sandbox
from pyhv.proto.errors import PeerFailed, ProtocolError
from pyhv.proto.messages import Error

REPLY_BYTES = 4096
SWITCH_START_TIMEOUT = 10.0
REAP_WAIT = 2.0               # describe_exit: how long a dead service may take to be reaped by the supervisor


def service_command(spec):
    """The argv of a device-service process for `spec`."""
    return runtime.python_module("devices.virtio.service") + [
        "--spec", base64.b64encode(codec.encode(spec, ds.SPEC)).decode()]


def plugin_command(proc):
    """The argv of the process of a device plugin (a PluginProcess)."""
    return runtime.python_module("devices.plugin.host") + [
        "--spec", base64.b64encode(codec.encode(proc, pw.PLUGIN_SPEC)).decode()]


def plugin_process(config, index, mem_size, fds):
    """The PluginProcess of plugin `index` of `config`, with `fds` (PluginFds as the process will see them)."""
    return pw.PluginProcess(config.plugins[index], pw.device_name(index), mem_size, fds)


def switch_command(runtime_dir, name, idle_exit=0.0):
    """The argv of the switch process NAME of `runtime_dir` (a RuntimeDir)."""
    return runtime.python_module("devices.net.switch") + [
        "--name", name, "--endpoint", runtime_dir.switch_endpoint(name), "--lock", runtime_dir.switch_file(name, "lock"),
        "--stats", runtime_dir.switch_file(name, "json"), "--idle-exit", str(idle_exit)]


def ensure_switch(runtime_dir, name, idle_exit=15.0):
    """Switch NAME runs in `runtime_dir` afterwards (one is started if nobody serves it): for `hvctl run`.

    The switch outlives this process (its own session; it exits `idle_exit`
    seconds after its last port).  Supervised guests' switches are the
    supervisor's (supervisor/switches.py).
    """
    from pyhv.devices.net.switch import is_served
    runtime_dir.make_private()          # 0700 whatever the umask (its sockets carry the guests' frames), or refused
    if is_served(runtime_dir.switch_file(name, "lock")):
        return
    log_path = runtime_dir.switch_file(name, "log")
    with open(log_path, "ab") as log:
        p = subprocess.Popen(switch_command(runtime_dir, name, idle_exit), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=log, start_new_session=True, cwd="/", env=runtime.child_env())
    sock = runtime_dir.switch_endpoint(name)[len("ipc://"):]
    deadline = time.monotonic() + SWITCH_START_TIMEOUT
    while not os.path.exists(sock):
        rc = p.poll()
        if rc == ALREADY_SERVED:
            return                              # another one won the race: it serves
        if rc is not None or time.monotonic() > deadline:
            with open(log_path, "rb") as f:
                last = (f.read().decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise PeerFailed(f"switch {name}: could not start: {last}")
        time.sleep(0.01)


class ServiceProcess:
    """A device service or plugin process, watched and signalled through its pidfd (whoever its parent is)."""

    def __init__(self, pid, pidfd, popen=None, what="service"):
        self.pid, self.pidfd, self.popen, self.what = pid, pidfd, popen, what
        self.returncode = None          # ours: the exit status; someone else's child: "exited"
        self._status = None             # someone else's child: its wait status once reaped (reaped_status)

    def poll(self):
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            elif select.select([self.pidfd], [], [], 0)[0]:
                self.returncode = "exited"
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if self.popen is not None:
                try:
                    self.returncode = self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise TimeoutError(f"service pid {self.pid} still running") from None
            elif select.select([self.pidfd], [], [], timeout)[0]:
                self.returncode = "exited"
            else:
                raise TimeoutError(f"service pid {self.pid} still running")
        return self.returncode

    def kill(self):
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except OSError:
            pass                        # gone already

    def describe_exit(self):
        rc, who = self.returncode, f"{self.what} pid {self.pid}"
        if rc == "exited":
            status = self.reaped_status(REAP_WAIT)
            if status is None:
                return f"{who} ended (its exit status is in the supervisor's log)"
            return f"{who} {sandbox.describe_wait_status(status)}"
        if rc is not None and rc < 0:
            return f"{who} {sandbox.killed_by(-rc)}"
        return f"{who} exited with status {rc}"

    def reaped_status(self, timeout=0.0):
        """Someone else's child: its wait status from the pidfd once its parent (the supervisor, which reaps
        every TICK) has reaped it, waiting up to `timeout`; None if not reaped by then or the kernel cannot say.
        Kept once known, so a caller can wait for it before taking a lock and describe_exit() under it."""
        deadline = time.monotonic() + timeout
        while self._status is None and self.pidfd is not None:
            self._status = sandbox.pidfd_exit_status(self.pidfd)
            if self._status is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return self._status

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class LocalLauncher:
    """Starts a guest's device services as children of this process (`hvctl run`).

    It holds the guest's disk images, opened and locked here before the guest
    runs (ImageInUse, a UserError, if another guest has one), until `close()`
    or this process ends; every service incarnation inherits the same fds.
    """

    def __init__(self, config, host):
        self.config, self.host = config, host
        self.images = kinds.open_images(config.devices)

    def endpoints(self, device, incarnation):
        return (self.host.service_endpoint(device, incarnation, "ctl"),
                self.host.service_endpoint(device, incarnation, "evt"))

    def start(self, device, incarnation, fds):
        fds = fds.replace(image=self.images.get(device))
        spec = kinds.service_spec(self.config.devices, device, self.host, self.config.mem_bytes, incarnation, fds)
        return self._popen(service_command(spec), fds.all(), "service")

    def start_plugin(self, index, fds):
        proc = plugin_process(self.config, index, self.config.mem_bytes, fds)
        return self._popen(plugin_command(proc), fds.all(), "plugin process")

    @staticmethod
    def _popen(argv, fds, what):
        p = subprocess.Popen(argv, pass_fds=fds, start_new_session=True, cwd="/", env=runtime.child_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return ServiceProcess(p.pid, os.pidfd_open(p.pid), p, what)

    def close(self):
        """Let go of the images (the services that still hold them keep them locked until they end)."""
        images, self.images = self.images, {}
        for fd in images.values():
            os.close(fd)


class SupervisorLauncher:
    """Asks the supervisor to start the services of guest `guest` (whose files are GuestDir `host`).

    With no supervisor listening (killed, or being upgraded) it raises LauncherAbsent, and the proxy asks again
    until the next supervisor, which has adopted this worker, answers."""

    def __init__(self, sock_path, guest, host, timeout=10.0):
        self.sock_path, self.guest, self.host, self.timeout = sock_path, guest, host, timeout

    def endpoints(self, device, incarnation):
        return (self.host.service_endpoint(device, incarnation, "ctl"),
                self.host.service_endpoint(device, incarnation, "evt"))

    def start(self, device, incarnation, fds):
        msg = ds.SpawnService(self.guest, device, incarnation, ds.ServiceFds.positions(len(fds.notify), len(fds.irq)))
        return self._ask(msg, fds.all(), "service")

    def start_plugin(self, index, fds):
        return self._ask(pw.SpawnPlugin(self.guest, index, pw.PluginFds.positions(len(fds.sockets))), fds.all(),
                         "plugin process")

    def _ask(self, msg, fds, what):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.sock_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise LauncherAbsent(f"no supervisor serves {self.sock_path} ({e.strerror})") from None
            except OSError as e:
                raise PeerFailed(f"the supervisor did not start the {what}: {e}") from None
            try:
                socket.send_fds(s, [codec.encode(msg, ds.SPAWN)], fds)
                data, got, _, _ = socket.recv_fds(s, REPLY_BYTES, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError as e:
                raise PeerFailed(f"the supervisor did not start the {what}: {e}") from None
        try:
            reply = codec.decode(data, ds.SPAWN, expect=(ds.ServiceSpawned, Error))
            if isinstance(reply, Error) or len(got) != 1:
                raise PeerFailed(f"the supervisor refused to start the {what}: "
                                 f"{reply.message if isinstance(reply, Error) else 'no pidfd in its reply'}")
        except (ProtocolError, PeerFailed) as e:
            for fd in got:
                os.close(fd)
            raise PeerFailed(str(e)) from None
        return ServiceProcess(reply.pid, got[0], what=what)
