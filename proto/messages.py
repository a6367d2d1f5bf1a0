"""Typed messages: the Message base, the @message decorator, and a Channel per kind of socket.

A message class's annotations are its wire schema (`proto.codec` checks each
field against them on receipt): use only str, int, float, bool, bytes, dict,
dict[K, V], list[...], X | None and other message classes.  A Channel names
the top-level messages one socket carries (the control socket's, a device
service's, the spawn socket's), so a message of one channel is never accepted
on another.  No msgpack/zmq import here: `hvctl run` imports this module and
must start fast.
"""


class Message:
    """Base of every message: construction, equality and repr from the class's field annotations.

    Not dataclasses: generating dozens of them (and importing inspect) took
    longer than booting a guest, and `hvctl run` imports this module.
    """
    TYPE = None
    FIELDS = ()          # field names in order, set by @message
    DEFAULTS = {}        # name -> default value, or a factory for list/dict defaults

    def __init__(self, *args, **kwargs):
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{self.TYPE} takes at most {len(self.FIELDS)} positional fields")
        values = dict(zip(self.FIELDS, args))
        for k, v in kwargs.items():
            if k not in self.FIELDS or k in values:
                raise TypeError(f"{self.TYPE}: unexpected or repeated field {k!r}")
            values[k] = v
        for name in self.FIELDS:
            if name not in values:
                if name not in self.DEFAULTS:
                    raise TypeError(f"{self.TYPE}: missing field {name!r}")
                default = self.DEFAULTS[name]
                values[name] = default() if callable(default) else default
            setattr(self, name, values[name])

    def __eq__(self, other):
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __repr__(self):
        return f"{self.TYPE}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def replace(self, **changes):
        """A copy with some fields changed."""
        return type(self)(**{**{n: getattr(self, n) for n in self.FIELDS}, **changes})


def to_plain(value):
    """Messages (nested too) to plain dicts and lists, for msgpack and JSON."""
    if isinstance(value, Message):
        return {n: to_plain(getattr(value, n)) for n in value.FIELDS}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def message(cls):
    """Make `cls` a message (TYPE = its class name): its annotations are its fields, class attributes its defaults."""
    annotations = cls.__dict__.get("__annotations__", {})
    cls.FIELDS = tuple(annotations)
    cls.DEFAULTS = {n: cls.__dict__[n] for n in cls.FIELDS if n in cls.__dict__}
    for n in cls.DEFAULTS:
        delattr(cls, n)
    cls.TYPE = cls.__name__
    return cls


class Channel:
    """The top-level messages one kind of socket carries; use an instance as a class decorator."""

    def __init__(self, name, *shared):
        self.name = name
        self.types = {}             # TYPE -> class
        for cls in shared:
            self.types[cls.TYPE] = cls

    def __call__(self, cls):
        if cls.__dict__.get("TYPE") != cls.__name__:     # not yet a message (shared ones already are)
            cls = message(cls)
        self.types[cls.TYPE] = cls
        return cls

    def get(self, type_name):
        return self.types.get(type_name)

    def __contains__(self, cls):
        return self.types.get(getattr(cls, "TYPE", None)) is cls


# --- the replies every channel shares ---------------------------------------------

@message
class Ok(Message):
    """The request was done; nothing to report."""


@message
class Error(Message):
    """A request failed: `kind` is one of proto.errors.KINDS, `message` one line for the user."""
    kind: str
    message: str

    @classmethod
    def of(cls, error):
        """The Error reply for an HvError."""
        return cls(error.kind, str(error))
