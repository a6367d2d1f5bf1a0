"""Fleets: a guest spec file (TOML or JSON) that `hvctl apply` turns into guests, created and started together.

    [defaults]                  # every guest's options unless it says otherwise
    kernel = "guest.bin"        # paths are relative to the spec file
    boot = "raw64"
    mem = "32M"
    timeout = 60

    [[guest]]
    name = "web"                # with count: web-0 .. web-99
    count = 100
    vcpus = 2
    nets = ["switch:lab"]
    trace = "traces/{name}.trace"   # optional: one exit trace per guest

The options are hvctl run's, as the Python API takes them (supervisor/api.py:
disks=[...], nets=[...], rng=true, vconsole=true).  Every guest is checked
before anything is created: a bad spec changes nothing.
"""
import json
import os

from pyhv.proto.errors import UserError

PATH_OPTIONS = ("kernel", "initrd", "trace")
MAX_COUNT = 10000


def read(path):
    """[(name, options)] from a spec file; UserError with the reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read spec file {path}: {e.strerror}") from None
    try:
        if path.endswith(".json"):
            spec = json.loads(raw)
        else:
            import tomllib
            spec = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid spec file: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("guest"), list) or not spec["guest"]:
        raise UserError(f"{path}: needs at least one [[guest]] table (or a \"guest\" list in JSON)")
    defaults = spec.get("defaults", {})
    if not isinstance(defaults, dict) or set(spec) - {"defaults", "guest"}:
        raise UserError(f"{path}: only [defaults] and [[guest]] belong at the top level")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, entry in enumerate(spec["guest"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UserError(f"{path}: guest #{i + 1} needs a name")
        options = {**defaults, **entry}
        name, count = options.pop("name"), options.pop("count", None)
        if count is not None and (type(count) is not int or not 1 <= count <= MAX_COUNT):
            raise UserError(f"{path}: guest {name}: count must be a whole number in 1..{MAX_COUNT}")
        for key in PATH_OPTIONS:
            if isinstance(options.get(key), str):
                options[key] = os.path.join(base, options[key])
        if "disks" in options and isinstance(options["disks"], list):
            options["disks"] = [os.path.join(base, d) if isinstance(d, str) else d for d in options["disks"]]
        names = [name] if count is None else [f"{name}-{k}" for k in range(count)]
        trace = options.get("trace")
        if isinstance(trace, str) and len(names) > 1 and "{name}" not in trace:
            raise UserError(f"{path}: guest {name}: {count} guests cannot share one trace file: put {{name}} in "
                            f"its name (trace = \"traces/{{name}}.trace\")")
        out += [(n, {**options, "trace": trace.replace("{name}", n)} if isinstance(trace, str) else dict(options))
                for n in names]
    return out


def apply(client, path):
    """Create and start every guest of the spec; their Guest handles."""
    configs = []
    for name, options in read(path):
        if "kernel" not in options:
            raise UserError(f"{path}: guest {name} has no kernel")
        try:
            configs.append(client.config(name, options.pop("kernel"), **options))
        except TypeError as e:
            raise UserError(f"{path}: guest {name}: {e}") from None
    existing = {g.name for g in client.list()} & {c.name for c in configs}
    if existing:
        raise UserError(f"{path}: guest {sorted(existing)[0]} already exists (destroy it first)")
    return client.create_many(configs, start=True)
