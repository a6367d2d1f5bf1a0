"""Files the user names for output (--trace, --stats-json, --plot): refused before anything runs if they cannot be written."""
import os

from pyhv.proto.errors import UserError


def check_writable(path, option):
    """UserError unless `path` can be created or overwritten: a file (or nothing yet) in a writable directory."""
    where = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(where) or not os.access(where, os.W_OK | os.X_OK) \
            or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{option}: cannot write {path} (give a file in an existing, writable directory)")
