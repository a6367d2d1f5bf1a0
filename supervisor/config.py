"""Guest configuration from user options, and the checks against this host: files, CPUs, device kinds.

Used by `hvctl run`/`create` (before anything is spawned) and again by the
supervisor on Create and Start, since a request may come from anywhere and
files may change.  Every failure is a UserError with one line that names the
option and the fix.  No msgpack/zmq import here: `hvctl run` must start fast.
"""
import os

from pyhv.devices.virtio import kinds
from pyhv.proto import guest
from pyhv.proto.errors import UserError
from pyhv.proto.guest import DEFAULT_MEM_BYTES, GuestConfig, parse_cpu_list, parse_int, parse_size
from pyhv.supervisor.output_files import check_writable


def build_config(name, kernel, boot="linux", load_addr=None, initrd=None, cmdline=None, mem=None, vcpus=None,
                 timeout=None, pin=None, compat=None, devices=None, plugins=None, gdb=None, trace=None):
    """A validated GuestConfig from option strings as argparse gives them (None = default).

    `devices` maps a device kind's name to its option's value(s) (devices/virtio/kinds.py); `plugins` is the
    list of `--device MODULE:CLASS[,KEY=VALUE...]` values, paths and module names resolved from this cwd (each
    class is loaded once, in a process of its own, to learn what it declares: `describe_plugins`).
    """
    try:
        t = None if timeout is None else float(timeout)
    except ValueError:
        raise UserError(f"--timeout: {timeout!r} is not a number of seconds") from None
    config = GuestConfig(
        name=name,
        kernel=os.path.abspath(kernel),
        boot=boot,
        load_addr=None if load_addr is None else parse_int(load_addr, "--load-addr"),
        initrd=None if initrd is None else os.path.abspath(initrd),
        cmdline="" if cmdline is None else cmdline,
        mem_bytes=DEFAULT_MEM_BYTES if mem is None else parse_size(mem),
        vcpus=1 if vcpus is None else parse_int(vcpus, "--vcpus"),
        timeout=t,
        pin=[] if pin is None else parse_cpu_list(pin),
        compat="nested" if compat is None else compat,
        devices=kinds.specs_from_options(devices or {}),
        gdb=gdb,
        trace=None if trace is None else os.path.abspath(trace),
    )
    if plugins:
        ports, virtio = describe_plugins([guest.parse_plugin(text, os.getcwd()) for text in plugins])
        config = config.replace(plugins=ports, devices=config.devices + virtio)
    validate(config)
    return config


def validate(config, boot_files=True):
    """Raise UserError unless `config` can be handed to a worker on this host (files included).

    Without `boot_files` the kernel and initrd are not needed (a guest restored from a snapshot has its RAM).
    """
    guest.check(config)
    kinds.validate(config.devices)
    host_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if config.mem_bytes > host_mem:
        raise UserError(f"--mem: {config.mem_bytes >> 20} MiB is more than this host has ({host_mem >> 20} MiB)")
    host_cpus = os.sched_getaffinity(0)
    for cpu in config.pin:
        if cpu not in host_cpus:
            raise UserError(f"--pin: host CPU {cpu} is not available here (have {sorted(host_cpus)})")
    images = ([(config.kernel, "kernel")] + ([(config.initrd, "initrd")] if config.initrd is not None else [])
              if boot_files else [])
    for path, what in images:
        if not os.path.isabs(path):     # the worker opens it from the guest's dir: only an absolute path is clear
            raise UserError(f"{what} path {path!r} is relative: give an absolute one (hvctl and the Python API "
                            f"resolve it from the caller's directory)")
        _check_file(path, what)
    total = sum(os.path.getsize(path) for path, _ in images)
    if total > config.mem_bytes:
        raise UserError(f"{' and '.join(what for _, what in images)}: {total} bytes do not fit in --mem "
                        f"{config.mem_bytes >> 20} MiB")
    for d in config.devices:
        kinds.kind(d.kind).check_host(d.options)
    for p in config.plugins:
        if p.module.endswith(".py"):
            _check_file(p.module, "plugin")
    if config.plugins:
        from pyhv.vcpu_worker.platform import check_plugins
        check_plugins(config)
    if config.trace is not None:
        check_writable(config.trace, "--trace")


PLUGIN_LOAD_TIMEOUT = 30.0


def describe_plugins(specs):
    """([PluginSpec] of port/MMIO plugins with what they declare, [DeviceSpec] of virtio plugins) for PluginSpecs.

    Each class is loaded and built once, in a process of its own (devices/plugin/host.py --describe), all at
    once: the user's code never runs in this process.  A module name is pinned to the sys.path entry it was
    found in, so the supervisor's plugin process imports the same code whatever its environment.
    """
    import base64
    import json
    import subprocess
    from pyhv.proto import runtime
    procs = []
    for p in specs:
        if p.module.endswith(".py"):
            _check_file(p.module, "plugin")
        arg = base64.b64encode(json.dumps({"module": p.module, "cls": p.cls, "options": p.options,
                                           "path": p.path}).encode()).decode()
        procs.append(subprocess.Popen(runtime.python_module("devices.plugin.host") + ["--describe", arg], cwd="/",
                                      env=runtime.child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    ports, virtio = [], []
    try:
        for p, proc in zip(specs, procs):
            try:
                out, err = proc.communicate(timeout=PLUGIN_LOAD_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise UserError(f"{p.what}: the plugin did not load within {PLUGIN_LOAD_TIMEOUT:g} s") from None
            try:
                answer = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise UserError(f"{p.what}: the plugin's process failed: {last}") from None
            if "error" in answer:
                raise UserError(answer["error"])
            p = p.replace(path=answer.get("path", p.path))
            if "virtio" in answer:
                virtio.append(kinds.Plugin.spec(p, answer["virtio"]["queues"]))
            else:
                d = answer["port"]
                ranges = lambda pairs: [guest.PluginRange(b, n) for b, n in pairs]  # noqa: E731
                ports.append(p.replace(pio=ranges(d["pio"]), mmio=ranges(d["mmio"]), irq=d["irq"]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return ports, virtio


def _check_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"no such {what} file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} file is not readable: {path}")
