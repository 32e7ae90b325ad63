"""Test evaluation: the paper's Fig. 5 (perplexity per segment) and Fig. 4b (against the routing
prefix length M-hat), from the evaluation's `per_segment` and `overall` aggregates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_rgb
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, PercentFormatter

from smalltalk.report.columns import read_columns, rows_where, select_rows
from smalltalk.report.style import (
    DENSE,
    MIXTURE,
    ORACLE,
    TOPK,
    PathLike,
    new_figure,
    save,
    signed_percent,
    styled,
)


def segment_perplexity(per_segment: PathLike, prefix_len: int, out: PathLike) -> Path:
    """Paper Fig. 5: test perplexity of each expert on its routed segment (opaque, darker = larger
    share of the test data) and of the dense model on the same segment (translucent, overlaid)."""
    rows, prefix_len = rows_where(
        read_columns(per_segment, ["prefix_len", "expert", "share", "ppl_expert", "ppl_dense"]),
        "prefix_len",
        prefix_len,
        per_segment,
    )
    order = np.argsort(rows["expert"], kind="stable")
    rows = select_rows(rows, order)
    experts = rows["expert"].astype(int)
    share = rows["share"].astype(float)
    ppl_expert = rows["ppl_expert"].astype(float)
    ppl_dense = rows["ppl_dense"].astype(float)
    n = len(experts)
    shades = ListedColormap(colormaps["Blues"](np.linspace(0.3, 1.0, 256)), name="share")
    norm = Normalize(0.0, max(float(np.nanmax(share)), 1e-9) if n else 1.0)
    with styled():
        fig = new_figure(max(6.0, 0.45 * n + 3.5), 4.6)
        ax = fig.add_subplot()
        x = np.arange(n)
        width = 0.7
        # The dense bar behind, translucent; the expert's opaque bar over it; the dense bar's
        # outline on top, so its height shows even where the expert's bar is taller.
        ax.bar(x, ppl_dense, width, color=DENSE, alpha=0.3, linewidth=0, zorder=2)
        ax.bar(x, ppl_expert, width, color=shades(norm(share)), linewidth=0, zorder=3)
        ax.bar(x, ppl_dense, width, fill=False, edgecolor=DENSE, linewidth=1.0, zorder=4)
        for xi, pe, pd in zip(x, ppl_expert, ppl_dense, strict=True):
            if np.isfinite(pe) and np.isfinite(pd) and pd > 0:
                ax.annotate(
                    signed_percent(pe / pd),
                    (xi, max(pe, pd)),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8 if n <= 16 else 6,
                )
            elif not np.isfinite(pe):
                ax.annotate("no data", (xi, 0), ha="center", va="bottom", fontsize=7, color="0.4")
        ax.set_xticks(x, [str(e) for e in experts])
        ax.set_xlabel("routed segment = expert e")
        ax.set_ylabel("test perplexity")
        top = np.nanmax(np.concatenate([ppl_expert, ppl_dense, [1.0]]))
        ax.set_ylim(0, top * 1.15)
        ax.grid(axis="x", visible=False)
        colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=shades), ax=ax, pad=0.01)
        colorbar.set_label("share of test sequences routed to the expert")
        colorbar.formatter = PercentFormatter(1.0, decimals=0)
        colorbar.update_ticks()
        fig.legend(
            handles=[
                Patch(color=shades(0.75), label="expert e on its segment (opaque)"),
                Patch(
                    facecolor=(*to_rgb(DENSE), 0.3),
                    edgecolor=DENSE,
                    label="dense baseline, same sequences (translucent)",
                ),
            ],
            loc="outside lower center",
            ncols=1,
            title="above the bars: expert's perplexity relative to dense",
        )
        ax.set_title(
            f"Per-segment test perplexity, expert vs dense (paper Fig. 5), M\u0302 = {prefix_len}"
        )
        return save(fig, out)


def prefix_sensitivity(
    overall: PathLike, out: PathLike, *, train_prefix_len: int | None = None
) -> Path:
    """Paper Fig. 4b: test perplexity against the routing prefix length M-hat used at inference,
    for the routed mixture, the dense baseline, the oracle (best expert per sequence) and the
    top-k ensemble; a dotted line marks the training prefix M when given. Where the aggregate
    has them, the mixture and top-k points carry the 95 % interval of their ratio to dense,
    drawn on the perplexity scale (dense perplexity times the ratio's bounds)."""
    rows = read_columns(overall, ["prefix_len", "ppl_mixture", "ppl_dense"])
    rows = select_rows(rows, np.argsort(rows["prefix_len"], kind="stable"))
    m = rows["prefix_len"].astype(int)
    lines = [
        ("ppl_mixture", "mixture, argmin routing", MIXTURE, "-", "o", ""),
        ("ppl_topk", "top-k ensemble", TOPK, "-.", "D", "_topk"),
        ("ppl_oracle", "oracle (best expert per sequence)", ORACLE, ":", "^", None),
        ("ppl_dense", "dense baseline", DENSE, "--", "s", None),
    ]
    with styled():
        fig = new_figure(6.8, 4.4)
        ax = fig.add_subplot()
        for column, label, color, linestyle, marker, ratio in lines:
            if column not in rows or not np.isfinite(rows[column].astype(float)).any():
                continue
            bounds = [f"ratio{ratio}_ci_low", f"ratio{ratio}_ci_high"] if ratio is not None else []
            if bounds and all(bound in rows for bound in bounds):
                low, high = (rows["ppl_dense"] * rows[bound] for bound in bounds)
                errors = np.stack([rows[column] - low, high - rows[column]]).clip(min=0)
                label += " (95 % CI)"
            else:
                errors = None
            ax.errorbar(
                m,
                rows[column],
                yerr=errors,
                label=label,
                color=color,
                ls=linestyle,
                marker=marker,
                capsize=3,
            )
        if train_prefix_len is not None:
            ax.axvline(
                train_prefix_len,
                color="0.3",
                linestyle=":",
                linewidth=1.0,
                label=f"training prefix M = {train_prefix_len}",
            )
        ax.set_xscale("log", base=2)
        ticks = sorted(set(m.tolist()) | ({train_prefix_len} if train_prefix_len else set()))
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        if len(ticks) == 1:
            ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
        ax.set_xlabel("routing prefix length M\u0302 at inference (tokens; log scale)")
        ax.set_ylabel("test perplexity")
        ax.set_title("Test perplexity vs routing prefix length (paper Fig. 4b)")
        ax.legend(loc="best")
        return save(fig, out)
