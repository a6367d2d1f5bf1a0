"""Loading a user's device class (`--device MODULE:CLASS[,KEY=VALUE...]`) and reading what it declares.

Runs only in a plugin's own process (devices/plugin/host.py, or a device
service for a virtio plugin): the user's module may do anything at import,
so it is never imported by the worker or the supervisor.  A class is either a
port/MMIO device (attributes `pio`, `mmio`, optional `irq`; methods `read`,
`write`) or a virtio device model (a VirtioDevice subclass, usually
ThreadedBackend), which runs behind a virtio-pci function like the built-in
models.
"""
import importlib
import importlib.util
import os
import re
import sys

from pyhv.devices.virtio.device import VirtioDevice
from pyhv.proto.errors import UserError, one_line
from pyhv.proto.guest import MAX_PLUGIN_RANGES, PluginRange, check_plugin_ranges

MAX_VIRTIO_QUEUES = 64


class PluginError(UserError):
    """The plugin cannot be loaded, or declared something unusable."""


def exception_text(e):
    """`Type: message` of an exception raised by the user's code, on one line."""
    text = one_line(e)
    return text if text == type(e).__name__ else f"{type(e).__name__}: {text}"


def load(spec):
    """CLASS(**options) of a PluginSpec (or anything with module, cls, options, path); PluginError otherwise."""
    if spec.path and spec.path not in sys.path:
        sys.path.insert(0, spec.path)
    what = f"--device {spec.module}:{spec.cls}"
    try:
        if spec.module.endswith(".py"):
            name = "pyhv_plugin_" + re.sub(r"\W", "_", os.path.basename(spec.module)[:-3])
            found = importlib.util.spec_from_file_location(name, spec.module)
            if found is None:
                raise ImportError(f"{spec.module} is not a Python file")
            module = importlib.util.module_from_spec(found)
            sys.modules[name] = module
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(spec.module)
    except BaseException as e:          # the user's module: anything at all, SystemExit included
        raise PluginError(f"{what}: cannot import {spec.module}: {exception_text(e)}") from None
    cls = getattr(module, spec.cls, None)
    if not isinstance(cls, type):
        raise PluginError(f"{what}: {spec.module} has no class {spec.cls}")
    try:
        return cls(**spec.options)
    except BaseException as e:
        args = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
        raise PluginError(f"{what}: {spec.cls}({args}) raised {exception_text(e)}") from None


def declared(instance, what):
    """A port/MMIO plugin instance's (pio, mmio, irq), checked; PluginError otherwise."""
    name = type(instance).__name__

    def ranges(attr):
        value = getattr(instance, attr, None) or []
        try:
            pairs = [(int(b), int(n)) for b, n in value]
        except (TypeError, ValueError):
            raise PluginError(f"{what}: {name}.{attr} must be a list of (base, length) pairs, not {value!r}") from None
        if len(pairs) > MAX_PLUGIN_RANGES:
            raise PluginError(f"{what}: {name}.{attr} has more than {MAX_PLUGIN_RANGES} ranges")
        return [PluginRange(b, n) for b, n in pairs]

    pio, mmio = ranges("pio"), ranges("mmio")
    irq = getattr(instance, "irq", None)
    if irq is not None and type(irq) is not int:
        raise PluginError(f"{what}: {name}.irq must be an int line 0-23 or None, not {irq!r}")
    try:
        check_plugin_ranges(what, pio, mmio, irq)
    except UserError as e:
        raise PluginError(str(e)) from None
    for method in ("read", "write"):
        if not callable(getattr(instance, method, None)):
            raise PluginError(f"{what}: {name} has no {method}() method")
    return pio, mmio, irq


def virtio_queues(instance, what):
    """A virtio plugin's queue count, checked against its description; PluginError otherwise."""
    name = type(instance).__name__
    n = instance.num_queues
    if type(n) is not int or not 1 <= n <= MAX_VIRTIO_QUEUES:
        raise PluginError(f"{what}: {name}.num_queues must be 1-{MAX_VIRTIO_QUEUES}, not {n!r}")
    sizes = tuple(instance.queue_max_sizes)
    if len(sizes) != n or not all(type(s) is int and 0 < s <= 32768 and s & (s - 1) == 0 for s in sizes):
        raise PluginError(f"{what}: {name}.queue_max_sizes must be {n} powers of two up to 32768, not {sizes!r}")
    if type(instance.device_type) is not int or not 0 < instance.device_type < 0x100:
        raise PluginError(f"{what}: {name}.device_type must be a virtio device ID 1-255, not {instance.device_type!r}")
    return n


def import_root(spec):
    """The sys.path entry a module-name plugin was imported from (None for a .py path or where unknown)."""
    if spec.module.endswith(".py"):
        return None
    top = sys.modules.get(spec.module.split(".")[0])
    origin = getattr(top, "__file__", None)
    if not origin:
        return spec.path
    origin = os.path.dirname(os.path.abspath(origin))
    return os.path.dirname(origin) if os.path.basename(getattr(top, "__file__")).startswith("__init__.") else origin


def describe(spec):
    """What `--describe` prints: {"port": {pio, mmio, irq}} or {"virtio": {queues}}, with "path"; or {"error"}."""
    what = f"--device {spec.module}:{spec.cls}"
    try:
        instance = load(spec)
        found = {"path": import_root(spec)}
        if isinstance(instance, VirtioDevice):
            try:
                return {"virtio": {"queues": virtio_queues(instance, what)}, **found}
            finally:
                instance.close()
        pio, mmio, irq = declared(instance, what)
        return {"port": {"pio": [[r.base, r.length] for r in pio], "mmio": [[r.base, r.length] for r in mmio],
                         "irq": irq}, **found}
    except PluginError as e:
        return {"error": str(e)}
