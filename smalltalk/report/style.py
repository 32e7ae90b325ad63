"""How every report figure looks and is written: colours, fonts, axes, PNG without a stamp.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display, no
network), in DejaVu Sans, which ships with matplotlib, and saved without a version stamp (PNG
carries no date), so the same inputs give the same bytes. Every file is written under a temporary
name beside its target and then renamed over it (`smalltalk.files.atomic_path`), so a failed job
never leaves a half-written figure behind.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from matplotlib import style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, Locator, NullLocator, PercentFormatter

from smalltalk.files import atomic_path
from smalltalk.report.columns import PathLike

# Okabe-Ito colours (distinguishable with colour-vision deficiency); the dense baseline is grey
# and dashed (translucent in bar charts) in every figure.
MIXTURE = "#0072B2"
DENSE = "#6E6E6E"
ORACLE = "#009E73"
TOPK = "#CC79A7"
TRAIN = "#0072B2"
TEST = "#E69F00"

STYLE = {
    "font.family": "DejaVu Sans",  # bundled with matplotlib: no system fonts needed
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
    "lines.markersize": 4,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
DPI = 150


@contextmanager
def styled():
    """Matplotlib's defaults plus STYLE, whatever the user's matplotlibrc says."""
    with style.context(["default", STYLE]):
        yield


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, out: PathLike) -> Path:
    """The figure as PNG, with no Software stamp, so reruns give identical bytes."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return Path(out)


def percent(ax, axis: str = "y", decimals: int = 0) -> None:
    getattr(ax, f"{axis}axis").set_major_formatter(PercentFormatter(1.0, decimals=decimals))


def signed_percent(ratio: float) -> str:
    """+4.2% / −9.3% (a true minus sign) for a ratio of 1.042 / 0.907."""
    return f"{100.0 * (ratio - 1.0):+.1f}%".replace("-", "\u2212")


def no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")


def scale_y(ax, values: np.ndarray) -> None:
    """Log scale with plain labels when perplexity spans a wide range, linear otherwise."""
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogTicks())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())


class LogTicks(Locator):
    """Ticks at 1, 2, 3, 5 and 7 times each power of ten inside the view."""

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((max(vmin, 1e-12), max(vmax, 1e-12)))
        ticks = [
            m * 10.0**p
            for p in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 3, 5, 7)
        ]
        return [t for t in ticks if lo <= t <= hi]
