"""Guest state commands: snapshot and restore (not implemented yet: they say so and change nothing)."""
from pyhv.proto.errors import UserError

NOT_IMPLEMENTED = "snapshot/restore is not implemented yet"


def cmd_not_implemented(args):
    raise UserError(NOT_IMPLEMENTED)


def add_commands(add):
    add("snapshot", cmd_not_implemented, "(not implemented yet)", "name", "dir")
    add("restore", cmd_not_implemented, "(not implemented yet)", "dir").add_argument("--name")
