"""Optional PNG plots: matplotlib (the `plot` extra) behind one check, for `hvctl trace --plot` and the examples.

matplotlib is not a dependency: importing it costs hundreds of ms and tens of
MiB, which no guest needs.  `require(path)` is called before any work is done
(a trace read, an experiment run), so a user without it learns at once, in one
line, how to get it, and nothing is half done; `figure()` gives a headless
(Agg) figure and `save()` writes it.
"""
from pyhv.proto.errors import EXIT_ERROR, HvError
from pyhv.supervisor.output_files import check_writable

INSTALL = "pip install 'pyhv[plot]' (into pyhv's environment; or apt install python3-matplotlib)"


class PlotUnavailable(HvError):
    """--plot was asked for, but matplotlib cannot be imported here."""
    exit_status = EXIT_ERROR


def require(path, option="--plot"):
    """PlotUnavailable unless matplotlib imports; UserError unless a PNG can be written at `path`."""
    check_writable(path, option)
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(f"{option} needs matplotlib, which is not installed: {INSTALL}") from None
    return matplotlib


def figure(rows=1, cols=1, size=(10, 4)):
    """(fig, axes) of a new headless figure; axes is a list, row-major.  Call require() first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, [a for row in axes for a in row]


def save(fig, path, title=None):
    """Write `fig` to `path` (PNG) and free it."""
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

