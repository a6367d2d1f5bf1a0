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


def build_config(name, kernel, boot="linux", load_addr=None, initrd=None, cmdline=None, mem=None, vcpus=None,
                 timeout=None, pin=None, compat=None, devices=None, gdb=None):
    """A validated GuestConfig from option strings as argparse gives them (None = default).

    `devices` maps a device kind's name to its option's value(s) (devices/virtio/kinds.py).
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
    )
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
        _check_file(path, what)
    total = sum(os.path.getsize(path) for path, _ in images)
    if total > config.mem_bytes:
        raise UserError(f"{' and '.join(what for _, what in images)}: {total} bytes do not fit in --mem "
                        f"{config.mem_bytes >> 20} MiB")
    for d in config.devices:
        kinds.kind(d.kind).check_host(d.options)


def _check_file(path, what):
    if not os.path.isfile(path):
        raise UserError(f"no such {what} file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} file is not readable: {path}")
