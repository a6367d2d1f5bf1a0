"""`python -m bench [NAME...]`: run the benchmarks (every bench/*.py with a run(args)), print one table, write JSON."""
import importlib
import pkgutil
import sys

from bench import common

SKIP = {"common", "__main__"}


def discover():
    """Every module in bench/ with a run(args) function."""
    names = [m.name for m in pkgutil.iter_modules([str(common.BENCH)])
             if m.name not in SKIP and not m.name.startswith("_")]
    return [n for n in names if hasattr(importlib.import_module(f"bench.{n}"), "run")]


def main():
    names = discover()
    p = common.parser(__doc__)
    p.prog = "python -m bench"
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {', '.join(names)})")
    p.set_defaults(json=str(common.DEFAULT_JSON))
    args = p.parse_args()
    unknown = set(args.names) - set(names)
    if unknown:
        p.error(f"no such benchmark: {', '.join(sorted(unknown))} (have {', '.join(names)})")
    rows = []
    for name in args.names or names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += importlib.import_module(f"bench.{name}").run(args)
    print()
    common.report(rows, args)


if __name__ == "__main__":
    main()
