"""The device kinds: one table of every kind of virtio device, what the user types for it, what it needs, what runs it.

A kind says how `hvctl run`/`create` asks for it (its option), how that
option becomes a DeviceSpec in the guest's config and how such a spec is
checked, the device's name in the guest, the host-side options its service
needs (resolved through the `host` it is given: a socket path, a switch
endpoint; this module knows no runtime dir), whether a dead service may be
replaced, and which model its service builds.  The CLI, config validation,
the worker's device manager, the supervisor's spawn checks and the service
process all read this table: adding a kind is a Kind here, its model, and
its test.
"""
import importlib
import os
import re

from pyhv.proto.device_service import ServiceSpec
from pyhv.proto.errors import UserError
from pyhv.proto.guest import DeviceSpec, PluginSpec, check_plugin_source, format_mac, parse_mac

IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")        # Linux IFNAMSIZ - 1
SWITCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")


class Kind:
    name = ""                 # DeviceSpec.kind
    flag = ""                 # its hvctl run/create option
    own_option = True         # False: another option makes its specs (--device, for virtio plugins)
    metavar = None            # None: a switch that takes no value
    help = ""
    max_count = 1
    restartable = True        # a killed service is replaced and its queues resume from used.idx
    in_worker = False         # its VirtioDevice runs in the worker (vhost-user: the back end is the user's process)
    snapshottable = True      # its whole state can be saved (`hvctl snapshot`, `migrate`)
    model = ""                # "module:Class", imported only where the model runs
    options = ()              # the option names a DeviceSpec of this kind may carry
    service_options_needed = ()   # what build() needs from service_options()

    def device_name(self, n):
        """The device's name in the guest (PCI device, service, `hvctl info`)."""
        return f"virtio-{self.name}{n}" if self.max_count > 1 else f"virtio-{self.name}"

    def parse(self, value):
        """The option's value as the user typed it (True for a switch) -> the DeviceSpec options; UserError."""
        return {}

    def validate(self, options):
        """UserError unless `options` (from a config, maybe guest.json or the wire) is a usable spec of this kind."""
        extra = set(options) - set(self.options)
        if extra:
            raise UserError(f"{self.flag}: unknown option {sorted(extra)[0]!r}")

    def check_host(self, options):
        """What this host must have for the device (files, permissions); UserError.  Nothing by default."""

    def describe(self, options):
        """The spec as `hvctl info` shows it."""
        return ""

    def switches(self, options):
        """Net switches the device needs running."""
        return []

    def service_options(self, options, host):
        """The options its service gets: `options` with host-side resources resolved by `host`."""
        return dict(options)

    def open_image(self, options):
        """The host file its service works on (a disk image), opened and locked by whoever starts the service and
        held while the guest runs (devices/virtio/image_lock.py); None for kinds without one.  UserError."""
        return None

    def is_image(self, options, fd):
        """Whether `fd` (handed over by a peer) is what open_image() would have opened for `options`."""
        return False

    def model_class(self):
        module, _, cls = self.model.partition(":")
        return getattr(importlib.import_module(module), cls)

    def num_queues(self, options):
        """How many virtqueues a device of this kind with these options has (its eventfds are made before it runs)."""
        return self.model_class().num_queues

    def build(self, options):
        """The model, in the process that runs it, from service_options(); a kind with an image also takes
        `image`, the fd open_image() gave (None: it opens the file itself, unlocked, as in-process tests do)."""
        return self.model_class()()

    def build_checked(self, options, image=None):
        """build() after checking that `options` (from a ServiceSpec) has what it needs; UserError otherwise."""
        missing = [o for o in self.service_options_needed if not isinstance(options.get(o), str)]
        if missing:
            raise UserError(f"a {self.name} service needs option {missing[0]!r}")
        return self.build(options) if image is None else self.build(options, image)


class Rng(Kind):
    name, flag, model = "rng", "--rng", "pyhv.devices.virtio.rng:VirtioRng"
    help = "add a virtio-rng PCI device (entropy from the host)"

    def describe(self, options):
        return "entropy from the host"


class Blk(Kind):
    name, flag, metavar, max_count = "blk", "--disk", "PATH[,ro]", 8
    model = "pyhv.devices.virtio.blk:VirtioBlk"
    options = ("path", "ro")
    service_options_needed = ("path",)
    help = ("add a virtio-blk PCI device backed by a raw image file (repeatable; ,ro: read-only); each device "
            "model runs in its own process")

    def parse(self, value):
        path, sep, opt = value.rpartition(",")
        if not sep or opt not in ("ro", "rw"):
            path, opt = value, "rw"
        if not path:
            raise UserError("--disk: empty path")
        return {"path": os.path.abspath(path), **({"ro": "1"} if opt == "ro" else {})}

    def validate(self, options):
        super().validate(options)
        path = options.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise UserError(f"--disk: {path!r} is not an absolute path")
        if options.get("ro", "1") != "1":
            raise UserError(f"--disk: bad ro={options['ro']!r}")

    def check_host(self, options):
        path, ro = options["path"], "ro" in options
        if not os.path.isfile(path):
            raise UserError(f"--disk: {path}: no such file (a raw disk image is needed, e.g. truncate -s 64M disk.img)")
        if not os.access(path, os.R_OK if ro else os.R_OK | os.W_OK):
            raise UserError(f"--disk: {path}: not {'readable' if ro else 'readable and writable'}"
                            f"{'' if ro else ' (add ,ro for a read-only disk)'}")
        if os.path.getsize(path) < 512:
            raise UserError(f"--disk: {path}: smaller than one 512-byte sector")

    def describe(self, options):
        return options["path"] + (",ro" if "ro" in options else "")

    def open_image(self, options):
        from pyhv.devices.virtio.image_lock import open_image
        return open_image(options["path"], "ro" in options)

    def is_image(self, options, fd):
        from pyhv.devices.virtio.image_lock import is_image
        return is_image(fd, options["path"], "ro" in options)

    def build(self, options, image=None):
        return self.model_class()(options["path"], read_only="ro" in options, fd=image)


class Console(Kind):
    name, flag, model = "console", "--vconsole", "pyhv.devices.virtio.console:HostedConsole"
    service_options_needed = ("socket", "log")
    help = ("add a virtio-console PCI device (/dev/hvc0 in the guest); its host side is a unix socket "
            "(vconsole.sock in the guest's runtime dir, or a temp dir for run; see stats)")

    def describe(self, options):
        return "a second console on vconsole.sock"

    def service_options(self, options, host):
        return {"socket": host.socket_path("vconsole"), "log": host.log_path("vconsole") or ""}

    def build(self, options):
        return self.model_class()(options["socket"], options["log"] or None)


class Net(Kind):
    name, flag, metavar, max_count = "net", "--net", "tap:IFNAME|switch:NAME[,mac=MAC]", 4
    model = "pyhv.devices.virtio.net:VirtioNet"
    options = ("port", "mac")
    service_options_needed = ("port", "mac")
    help = ("add a virtio-net PCI device (repeatable): on a host TAP interface, or on the virtual switch NAME "
            "that connects the guests of one supervisor (runtime dir) without host networking")

    def parse(self, value):
        head, _, opts = value.partition(",")
        macs = []
        for opt in filter(None, opts.split(",")):
            key, _, mac = opt.partition("=")
            if key != "mac":
                raise UserError(f"--net: bad option {opt!r} in {value!r} (the only option is mac=52:54:00:12:34:56)")
            macs.append(mac)
        if len(macs) > 1:
            raise UserError(f"--net: {value!r} gives mac= {len(macs)} times")
        options = {"port": head, "mac": macs[0].lower() if macs else None}
        self.check_port(head, value)
        if options["mac"] is None:      # a random locally administered one, kept in the config
            options["mac"] = format_mac(bytes([0x52, 0x54, 0x00]) + os.urandom(3))
        self.validate(options, value)
        return options

    @staticmethod
    def check_port(port, shown):
        kind, _, name = port.partition(":")
        if not (kind == "tap" and IFNAME_RE.match(name) or kind == "switch" and SWITCH_RE.match(name)):
            raise UserError(f"--net: {shown!r}: use tap:IFNAME (a host TAP interface, at most 15 characters) or "
                            f"switch:NAME (a virtual switch shared by this supervisor's guests)[,mac=MAC]")

    def validate(self, options, shown=None):
        super().validate(options)
        self.check_port(options.get("port") or "", shown or options.get("port"))
        try:
            parse_mac(options.get("mac"))
        except UserError as e:
            raise UserError(f"--net: {e}") from None

    def describe(self, options):
        return f"{options['port']},mac={options['mac']}"

    def switches(self, options):
        kind, _, name = options["port"].partition(":")
        return [name] if kind == "switch" else []

    def service_options(self, options, host):
        kind, _, name = options["port"].partition(":")
        port = f"switch:{host.switch_endpoint(name)}" if kind == "switch" else options["port"]
        return {"port": port, "mac": options["mac"]}

    def build(self, options):
        from pyhv.devices.net.ports import PortError, open_port
        model = self.model_class()(parse_mac(options["mac"]))
        try:
            model.port = open_port(options["port"], model.deliver)
        except PortError:
            model.close()
            raise
        return model


class Plugin(Kind):
    """A user's virtio device model (`--device MODULE:CLASS` naming a VirtioDevice subclass, docs/plugins.md).

    Its spec carries where the class is, the options it is built with (as `arg.KEY`) and its queue count, which
    supervisor/config.py learnt by loading it once in a process of its own: the worker makes the device's
    eventfds from it and never imports the user's code; the service that does checks the count again.
    """
    name, flag, max_count, own_option = "plugin", "--device", 8, False
    help = "a virtio device model of your own: --device MODULE:CLASS naming a VirtioDevice subclass"
    service_options_needed = ("module", "class", "queues")
    ARG = "arg."

    @classmethod
    def spec(cls, plugin, queues):
        """The DeviceSpec of virtio plugin `plugin` (a PluginSpec) with `queues` virtqueues."""
        options = {"module": plugin.module, "class": plugin.cls, "queues": str(queues),
                   **({"path": plugin.path} if plugin.path else {}),
                   **{cls.ARG + k: v for k, v in plugin.options.items()}}
        return DeviceSpec(cls.name, options)

    @classmethod
    def plugin(cls, options):
        """The PluginSpec a spec's options name."""
        return PluginSpec(options["module"], options["class"], path=options.get("path"),
                          options={k[len(cls.ARG):]: v for k, v in options.items() if k.startswith(cls.ARG)})

    def validate(self, options):
        fixed = {"module", "class", "queues", "path"}
        extra = [k for k in options if k not in fixed and not k.startswith(self.ARG)]
        if extra:
            raise UserError(f"--device: unknown option {extra[0]!r} in a virtio plugin's spec")
        if not all(isinstance(options.get(k), str) for k in ("module", "class", "queues")):
            raise UserError("--device: a virtio plugin needs module, class and queues")
        if not options["queues"].isdigit() or not 1 <= int(options["queues"]) <= 64:
            raise UserError(f"--device: a virtio plugin's queues must be 1-64, not {options['queues']!r}")
        p = self.plugin(options)
        check_plugin_source(p.module, p.cls, p.options, p.path)

    def check_host(self, options):
        if options["module"].endswith(".py") and not os.path.isfile(options["module"]):
            raise UserError(f"--device: no such plugin file: {options['module']}")

    def describe(self, options):
        return f"{options['module']}:{options['class']} (virtio plugin)"

    def num_queues(self, options):
        return int(options["queues"])

    def build(self, options):
        from pyhv.devices.plugin.loader import PluginError, load, virtio_queues
        from pyhv.devices.virtio.device import VirtioDevice
        spec = self.plugin(options)
        model = load(spec)
        if not isinstance(model, VirtioDevice):
            raise PluginError(f"{spec.what}: {spec.cls} is no longer a VirtioDevice; create the guest again")
        n = virtio_queues(model, spec.what)
        if n != self.num_queues(options):
            model.close()
            raise PluginError(f"{spec.what}: {spec.cls} now has {n} queues, not {options['queues']} as when the "
                              f"guest was created; create the guest again")
        return model


class VhostUser(Kind):
    """A device whose queues a vhost-user back end serves (devices/virtio/vhost_user.py): its front end runs in
    the worker, there is no device service, and the back end is the user's own process."""
    name, flag, metavar, max_count = "vhost-user", "--vhost-user", "blk|fs,socket=PATH[,tag=TAG]", 8
    model = "pyhv.devices.virtio.vhost_user:VhostUserDevice"
    options = ("type", "socket", "tag")
    service_options_needed = ("type", "socket")
    in_worker, restartable, snapshottable = True, False, False
    TYPES = ("blk", "fs")
    DEFAULT_TAG = "fs"
    help = ("add a virtio device served by a vhost-user back end listening on unix socket PATH (repeatable): "
            "blk (e.g. qemu-storage-daemon's vhost-user-blk export) or fs (virtiofsd; the guest mounts TAG, "
            "default fs); pyhv does not start it, and a guest with one cannot be snapshotted")

    def device_name(self, n):
        return f"vhost-user{n}"

    def num_queues(self, options):
        """Its back end's to say, at connect time in the worker (which makes the eventfds then): no service."""
        raise UserError("a vhost-user device has no device service: its queues are its back end's")

    def parse(self, value):
        kind, *opts = value.split(",")
        options = {"type": kind}
        for opt in opts:
            key, sep, v = opt.partition("=")
            if not sep or key not in ("socket", "tag") or key in options:
                raise UserError(f"--vhost-user: bad option {opt!r} in {value!r} (use blk|fs,socket=PATH[,tag=TAG])")
            options[key] = os.path.abspath(v) if key == "socket" and v else v
        if kind == "fs":
            options.setdefault("tag", self.DEFAULT_TAG)
        self.validate(options)
        return options

    def validate(self, options):
        super().validate(options)
        kind, path, tag = options.get("type"), options.get("socket"), options.get("tag")
        if kind not in self.TYPES:
            raise UserError(f"--vhost-user: device type {kind!r} is not one of {', '.join(self.TYPES)}")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise UserError(f"--vhost-user: give socket=PATH, the back end's unix socket (got {path!r})")
        if len(path.encode()) > 107:
            raise UserError(f"--vhost-user: socket path {path} is longer than a unix socket allows (107 bytes)")
        if kind == "fs":
            if not isinstance(tag, str) or not 1 <= len(tag.encode()) <= 36 or not tag.isprintable():
                raise UserError(f"--vhost-user: tag {tag!r} is not 1 to 36 printable bytes")
        elif tag is not None:
            raise UserError("--vhost-user: tag= is for fs devices only")

    def check_host(self, options):
        import stat
        path = options["socket"]
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            raise UserError(f"--vhost-user: no back end listens on {path}: start it first (see the README's "
                            f"vhost-user section)") from None
        if not is_socket:
            raise UserError(f"--vhost-user: {path} is not a unix socket")

    def describe(self, options):
        return f"{options['type']},socket={options['socket']}" + (f",tag={options['tag']}" if "tag" in options else "")

    def build(self, options):
        from pyhv.devices.virtio.vhost_user import connect
        extra = {"tag": options["tag"]} if options["type"] == "fs" else {}
        return connect(options["type"], options["socket"], **extra)


KINDS = {k.name: k for k in (Rng(), Blk(), Console(), Net(), Plugin(), VhostUser())}   # also the PCI slot order


def kind(name):
    try:
        return KINDS[name]
    except KeyError:
        raise UserError(f"unknown device kind {name!r} (known: {', '.join(KINDS)})") from None


def specs_from_options(values):
    """{kind name: the option's value(s) as parsed by argparse} -> [DeviceSpec] in slot order."""
    out = []
    for k in KINDS.values():
        given = values.get(k.name)
        if given in (None, False, []):
            continue
        for v in given if isinstance(given, list) else [given]:
            out.append(DeviceSpec(k.name, k.parse(v)))
    return out


def validate(devices):
    """UserError unless every DeviceSpec is a valid one and no kind appears more often than it may."""
    counts = {}
    for d in devices:
        k = kind(d.kind)
        k.validate(d.options)
        counts[k.name] = counts.get(k.name, 0) + 1
        if counts[k.name] > k.max_count:
            raise UserError(f"{k.flag}: at most {k.max_count} {'devices' if k.max_count > 1 else 'device'}")


def named(devices):
    """[(device name, Kind, DeviceSpec)] in slot order, names numbered per kind."""
    counts = {}
    out = []
    for d in devices:
        k = kind(d.kind)
        n = counts[k.name] = counts.get(k.name, -1) + 1
        out.append((k.device_name(n), k, d))
    return out


def open_images(devices):
    """{device name: fd} of every image the devices' services work on, each opened and locked (open_image);
    UserError (none left open) if one cannot be."""
    images = {}
    try:
        for name, k, d in named(devices):
            fd = k.open_image(d.options)
            if fd is not None:
                images[name] = fd
    except BaseException:
        for fd in images.values():
            os.close(fd)
        raise
    return images


def switches(devices):
    """Every net switch the devices need, in order, once each."""
    return list(dict.fromkeys(s for d in devices for s in kind(d.kind).switches(d.options)))


def service_spec(devices, device, host, mem_size, incarnation, fds):
    """The ServiceSpec of device `device` (a name from named()); UserError if the guest has no such device."""
    for name, k, d in named(devices):
        if name == device:
            if k.in_worker:
                raise UserError(f"{name} has no device service (its front end runs in the worker)")
            control = host.service_endpoint(name, incarnation, "ctl")
            events = host.service_endpoint(name, incarnation, "evt")
            return ServiceSpec(kind=k.name, name=name, mem_size=mem_size, control=control, events=events,
                               options=k.service_options(d.options, host), fds=fds)
    raise UserError(f"the guest has no device {device!r}")


def check_snapshottable(devices, guest):
    """UserError if a device's state cannot be saved (a vhost-user back end's): no snapshot, no migration."""
    for name, k, d in named(devices):
        if not k.snapshottable:
            raise UserError(f"guest {guest} cannot be snapshotted or migrated: {name} ({k.name} "
                            f"{k.describe(d.options)}) keeps its state in its back end process, which pyhv cannot save")
