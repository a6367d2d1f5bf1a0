"""hvctl: the command line, one module per command group; main() turns every error into one line and an exit status.

`hvctl run` needs no supervisor and must start fast: only the invoked
command's module is imported and only its parser built (argparse with every
command costs ~30 ms), and zmq, msgpack and psutil are imported only by the
commands that talk to a supervisor.  Every user error ends with one line on
stderr and exit status 2 (bad arguments or files) or 1 (unknown guest, no
supervisor, wrong state); never a traceback.  A command module has
`add_commands(add)`; see `build_parser` for what `add` takes.
"""
import argparse
import importlib
import sys

import pyhv
from pyhv.proto import runtime
from pyhv.proto.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, HvError, UserError

PROG = "hvctl"
# command -> the module of pyhv.supervisor.cli that defines it, in help order
COMMANDS = {"run": "run", "supervisor": "daemon", "create": "guests", "start": "guests", "stop": "guests", "shutdown": "guests",
            "pause": "guests", "resume": "guests", "destroy": "guests", "list": "inspect", "info": "inspect",
            "wait": "guests", "logs": "console", "console": "console", "stats": "inspect", "top": "inspect", "events": "inspect",
            "apply": "guests", "snapshot": "state", "restore": "state", "migrate": "state", "guests": "artefacts",
            "trace": "trace"}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _command_in(argv):
    """The subcommand named in argv (skipping --runtime-dir DIR), or None."""
    args = iter(argv)
    for a in args:
        if a == "--runtime-dir":
            next(args, None)
        elif not a.startswith("-"):
            return a
    return None


def build_parser(only=None):
    """The hvctl parser; with `only`, just that subcommand's."""
    help = "supervisor runtime dir (env HV_RUNTIME_DIR; default $XDG_RUNTIME_DIR/pyhv or /tmp/pyhv-UID)"
    common = Parser(add_help=False)     # lets --runtime-dir also follow the command
    common.add_argument("--runtime-dir", metavar="DIR", default=argparse.SUPPRESS, help=help)
    p = Parser(prog=PROG, description="Run KVM guests in the foreground, or manage them through a supervisor.")
    p.add_argument("--runtime-dir", metavar="DIR", default=runtime.default_dir(), help=help)
    p.add_argument("--version", action="version", version=f"{PROG} (pyhv) {pyhv.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name, func, help, *positional):
        """A subcommand: its parser (add its options to it); `func(args)` runs it and returns the exit status."""
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        for arg in positional:
            sp.add_argument(arg)
        sp.set_defaults(func=func)
        return sp

    def add_only(name, *a):
        return add(name, *a) if name == only else _Skipped()

    for module in dict.fromkeys(COMMANDS.values()):
        if only is None or COMMANDS.get(only) == module:
            importlib.import_module(f"{__name__}.{module}").add_commands(add if only is None else add_only)
    return p


class _Skipped:
    """The parser of a command that is not being built."""

    def add_argument(self, *a, **k):
        return None

    def add_mutually_exclusive_group(self, *a, **k):
        return self


def main(argv=None):
    try:
        argv = sys.argv[1:] if argv is None else argv
        command = _command_in(argv)
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        status = args.func(args)
    except HvError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        status = e.exit_status
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except BrokenPipeError:
        status = EXIT_OK
    except ImportError as e:          # a clone without setup.sh, or a broken environment
        print(f"{PROG}: cannot import {e.name or e}: pyhv is not fully installed here "
              f"(run `bash setup.sh` in the checkout, or pip install it)", file=sys.stderr)
        status = EXIT_ERROR
    except OSError as e:              # the environment, not a bug: still one line
        print(f"{PROG}: {e}", file=sys.stderr)
        status = EXIT_ERROR
    sys.exit(status)

