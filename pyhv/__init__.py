"""pyhv: one import namespace for the layers proto, devices, vcpu_worker and supervisor.

The layers are top-level folders of the repository; they are installed as
pyhv.proto, pyhv.devices, ... (pyproject.toml maps each folder), so pyhv's
`supervisor` never meets supervisord's on the same path.  In a checkout this
package holds only this file, and its __path__ is the repository root, where
the folders are.
"""
import os

__version__ = "0.2.0"

_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "proto")):
    __path__.append(os.path.dirname(_here))     # a checkout: the layers sit beside this folder


def import_root():
    """The directory to put on PYTHONPATH so that a child process finds this pyhv (`python -m pyhv....`)."""
    return os.path.dirname(_here)


def __getattr__(name):
    """`from pyhv import Client`: the Python API (supervisor/api.py), imported only when asked for."""
    if name == "Client":
        from pyhv.supervisor.api import Client
        return Client
    raise AttributeError(f"module 'pyhv' has no attribute {name!r}")
