"""Device services and plugin processes of supervised guests: started here at their worker's request, reaped here.

A worker asks on RUNTIME/services.sock (unix SEQPACKET, one SpawnService per
connection with its fds in SCM_RIGHTS, vcpu_worker/launchers.py).  A request
is served only if its sender is the running worker of the guest it names
(SO_PEERCRED) and the device it names is one of that guest's; what the
service does (its kind, options, endpoints, memory size) comes from the
supervisor's own copy of the guest's config, never from the request, and the
fds must be exactly the ones the device's roles need.  A SpawnPlugin is
checked the same way: the plugin it names must be in the guest's config.  The service starts in
its own session with the guest's worker log as stderr; the reply carries its
pid and a pidfd.  Its exit status goes to the supervisor's log.  Services
also exit by themselves when their worker dies (the lifeline pipe), and
whatever is left when a guest ends is killed.  They do not depend on the
supervisor otherwise: they outlive it with their worker, which asks the
next supervisor on this socket when one has to be restarted.

A guest's disk images are opened and locked here when it starts (before its
worker exists: an image another guest holds is refused with exit 2) and kept
until its worker has gone; every incarnation of a disk's service inherits
that same fd, so it shares the lock (devices/virtio/image_lock.py).  A guest
this supervisor did not start (adopted after a restart) has its images
opened on its first service request.
"""
import os
import socket
import subprocess
import sys

from pyhv.devices.virtio import kinds
from pyhv.proto import codec, device_service as ds, plugin as pw, runtime, sandbox
from pyhv.proto.errors import HvError, UserError
from pyhv.proto.messages import Error
from pyhv.vcpu_worker.launchers import plugin_command, plugin_process, service_command

MAX_REQUEST = 64 << 10
MAX_FDS = 96                    # a plugin of a 64-vCPU guest: 66


class ServiceLauncher:
    def __init__(self, runtime_dir, registry):
        self.registry = registry
        self.path = runtime_dir.services_sock
        try:
            os.unlink(self.path)        # stale: the supervisor lock says nobody serves it
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(64)
        self.procs = {}                 # guest name -> [Popen]
        self.images = {}                # guest name -> {device name: image fd, locked}
        self.started = self.refused = 0

    def fileno(self):
        return self.sock.fileno()

    def serve(self):
        """Answer every pending connection (called when the listening socket is readable)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            with conn:
                conn.settimeout(2.0)
                self._serve_one(conn)

    def _serve_one(self, conn):
        fds = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
            reply_fds = []
            try:
                msg = codec.decode(data, ds.SPAWN, expect=(ds.SpawnService, pw.SpawnPlugin))
                spawn = self._spawn_plugin if isinstance(msg, pw.SpawnPlugin) else self._spawn
                pid, pidfd = spawn(conn, msg, fds)
                reply, reply_fds = ds.ServiceSpawned(pid), [pidfd]
            except (HvError, OSError) as e:
                self.refused += 1
                reply = Error.of(UserError(f"cannot start the device service: {e}"))
                print(f"supervisor: refused a device service request: {e}", file=sys.stderr, flush=True)
            try:
                socket.send_fds(conn, [codec.encode(reply, ds.SPAWN)], reply_fds)
            finally:
                for fd in reply_fds:
                    os.close(fd)
        except OSError:
            pass                        # the worker went away mid-request: its restart logic asks again
        finally:
            for fd in fds:
                os.close(fd)

    # -- disk images ------------------------------------------------------------------
    def open_images(self, g, given=None):
        """Open and lock guest g's images that are not held yet (`given`: {device: fd} handed over with it, now
        ours); UserError, with nothing held for it, if one is in use."""
        held = self.images.setdefault(g.name, {})
        held.update(given or {})
        try:
            for name, _, _ in kinds.named(g.config.devices):
                self._image(g, name)
        except BaseException:
            self.release_images(g.name)
            raise
        return held

    def _image(self, g, device):
        """The image fd of `device` for its service (opened and locked now if we do not hold it yet)."""
        held = self.images.setdefault(g.name, {})
        for name, k, d in kinds.named(g.config.devices):
            if name == device and name not in held:
                fd = k.open_image(d.options)
                if fd is not None:
                    held[name] = fd
        return held.get(device)

    def release_images(self, name):
        """Close guest `name`'s image fds (its locks go once its services have gone too)."""
        for fd in self.images.pop(name, {}).values():
            os.close(fd)

    # -- services -------------------------------------------------------------------------
    def _spawn(self, conn, msg, fds):
        g = self._guest_of(conn, msg.guest)
        names = {name: (kind, spec) for name, kind, spec in kinds.named(g.config.devices)}
        if msg.device not in names:
            raise UserError(f"guest {g.name} has no device {msg.device!r}")
        kind, spec = names[msg.device]
        nq = kind.num_queues(spec.options)
        if msg.fds != ds.ServiceFds.positions(nq, nq + 1) or len(fds) != 2 + 2 * nq + 1:
            raise UserError(f"{len(fds)} fds in the wrong roles for {msg.device} ({nq} queues)")
        if not 1 <= msg.incarnation <= 1 << 20:
            raise UserError(f"bad incarnation {msg.incarnation}")
        image = self._image(g, msg.device)
        theirs = msg.fds.renumbered(fds).replace(image=image)
        spec = kinds.service_spec(g.config.devices, msg.device, g.files, g.config.mem_bytes, msg.incarnation, theirs)
        return self._popen(g, service_command(spec), theirs.all())

    def _spawn_plugin(self, conn, msg, fds):
        g = self._guest_of(conn, msg.guest)
        if not 0 <= msg.index < len(g.config.plugins):
            raise UserError(f"guest {g.name} has no plugin {msg.index}")
        if not 1 <= len(msg.fds.sockets) <= g.config.vcpus or msg.fds != pw.PluginFds.positions(len(msg.fds.sockets)) \
                or len(fds) != 2 + len(msg.fds.sockets):
            raise UserError(f"{len(fds)} fds in the wrong roles for plugin {msg.index}")
        proc = plugin_process(g.config, msg.index, g.config.mem_bytes, msg.fds.renumbered(fds))
        return self._popen(g, plugin_command(proc), fds)

    def _popen(self, g, argv, fds):
        with open(g.files.worker_log, "ab") as log:
            p = subprocess.Popen(argv, pass_fds=fds, start_new_session=True, cwd="/", env=runtime.child_env(),
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        self.procs.setdefault(g.name, []).append(p)
        self.started += 1
        return p.pid, os.pidfd_open(p.pid)

    def _guest_of(self, conn, name):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        g = self.registry.get(name)
        if g.proc is None or g.proc.pid != pid:
            raise UserError(f"pid {pid} is not the worker of guest {name}")
        return g

    def watch(self):
        """Reap ended services and log how they ended."""
        for name, procs in list(self.procs.items()):
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                how = sandbox.killed_by(-rc) if rc < 0 else f"exited with status {rc}"
                print(f"supervisor: device service pid {p.pid} of guest {name} {how}", file=sys.stderr, flush=True)
            if not procs:
                del self.procs[name]

    def guest_ended(self, name):
        """The guest's worker is gone: its services must go too (they normally already have), and its images."""
        for p in self.procs.get(name, []):
            if p.poll() is None:
                p.kill()
        for p in self.procs.get(name, []):
            p.wait()
        self.watch()
        self.release_images(name)

    def close(self, kill=True):
        """Stop serving; the services still running are killed, or (kill=False) left to their guests, which
        run on for the next supervisor (holding their disk images' locks in their own fds)."""
        if kill:
            for name in list(self.procs) + list(self.images):
                self.guest_ended(name)
        for name in list(self.images):
            self.release_images(name)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
