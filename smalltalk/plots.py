"""Report figures and tables (design stage 7): the paper's Figs. 2, 4b and 5, expert load, EM.

One pure function per figure: input files in, one PNG out, nothing else touched. Figures are drawn
with matplotlib's object API on the Agg canvas (no pyplot state, no display, no network), in DejaVu
Sans, which ships with matplotlib, and saved without a version stamp (PNG carries no date), so the
same inputs give the same bytes. Every file is written under a temporary name beside its target and
then renamed over it, so a failed job never leaves a half-written figure behind.

Inputs are the workflow's own files: `metrics.parquet` of each training run, the shard check JSON,
the evaluation aggregates (`overall`, `per_segment`, `load`, `segment_source`), the EM diagnostics
and contingency tables, and the ledgers.
"""

from __future__ import annotations

import html
import json
import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
from matplotlib import colormaps, style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    Locator,
    MaxNLocator,
    NullLocator,
    PercentFormatter,
)

from smalltalk.files import write_atomically, write_bytes_atomically

PathLike = str | os.PathLike

# ---- style ----------------------------------------------------------------------------------

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
def _styled():
    """Matplotlib's defaults plus STYLE, whatever the user's matplotlibrc says."""
    with style.context(["default", STYLE]):
        yield


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: PathLike) -> Path:
    """The figure as PNG, with no Software stamp, so reruns give identical bytes."""
    return write_atomically(
        out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    )


def _percent(ax, axis: str = "y", decimals: int = 0) -> None:
    getattr(ax, f"{axis}axis").set_major_formatter(PercentFormatter(1.0, decimals=decimals))


def _signed_percent(ratio: float) -> str:
    """+4.2% / −9.3% (a true minus sign) for a ratio of 1.042 / 0.907."""
    return f"{100.0 * (ratio - 1.0):+.1f}%".replace("-", "\u2212")


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4")


# ---- readers --------------------------------------------------------------------------------


def _read(path: PathLike, required: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A Parquet file as {column: array}; nulls become NaN in numeric columns."""
    table = pq.read_table(path)
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _read_many(paths: PathLike | Sequence[PathLike], required: Sequence[str]) -> dict:
    """One or more Parquet files with the same columns, concatenated."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    parts = [_read(path, required) for path in paths]
    if not parts:
        raise ValueError("no input files")
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _select(columns: dict, mask: np.ndarray) -> dict:
    return {name: values[mask] for name, values in columns.items()}


def _pick(columns: dict, key: str, value, path: PathLike) -> tuple[dict, object]:
    """Rows whose `key` equals `value` (None: the largest value present)."""
    present = sorted({v.item() if hasattr(v, "item") else v for v in columns[key]})
    if not present:
        raise ValueError(f"{path}: no rows")
    value = present[-1] if value is None else value
    if value not in present:
        raise ValueError(f"{path}: no rows with {key}={value} (present: {present})")
    return _select(columns, columns[key] == value), value


# ---- Fig. 2: perplexity vs training FLOPs ---------------------------------------------------


class Curve(NamedTuple):
    """A perplexity curve over training, one point per logged step."""

    steps: np.ndarray  # (n,) optimizer steps
    flops: np.ndarray  # (n,) cumulative training FLOPs, summed over the runs
    perplexity: np.ndarray  # (n,)
    validation: bool  # from validation losses (False: training losses, none was logged)


def _has_validation(run: dict) -> bool:
    return "val_loss" in run and bool(np.isfinite(run["val_loss"].astype(float)).any())


def loss_curve(metrics: Sequence[PathLike], validation: bool | None = None) -> Curve:
    """The mixture of the runs in `metrics` (one per expert), or one run (the dense model).

    At each step k logged by all runs: FLOPs = sum_e flops_e(k) and
    perplexity = exp(sum_e val_tokens_e * val_loss_e(k) / sum_e val_tokens_e): the validation
    NLL per token of the whole mixture, each expert on its own validation segment. Runs with no
    validation pass add FLOPs only; when no run has one, training losses stand in, weighted
    equally (every expert trains on the same tokens per step), as they do when `validation` is
    False.
    """
    runs = [_read(path, ["step", "flops", "loss"]) for path in metrics]
    if not runs:
        raise ValueError("no metrics files")
    validated = [_has_validation(run) for run in runs]
    use_validation = any(validated) if validation is None else validation and any(validated)
    steps = set.intersection(*(set(run["step"].tolist()) for run in runs))
    for run, has in zip(runs, validated, strict=True):
        if use_validation and has:
            steps &= set(run["step"][np.isfinite(run["val_loss"].astype(float))].tolist())
    steps = np.array(sorted(steps), dtype=np.int64)
    if not len(steps):
        raise ValueError(f"{', '.join(map(str, metrics))}: no step logged by every run")
    flops = np.zeros(len(steps))
    nll = np.zeros(len(steps))
    weight = np.zeros(len(steps))
    for run, has in zip(runs, validated, strict=True):
        row = {step: i for i, step in enumerate(run["step"].tolist())}  # last row of a step wins
        index = np.array([row[step] for step in steps.tolist()])
        flops += run["flops"][index]
        if not use_validation:
            nll += run["loss"][index]
            weight += 1.0
        elif has:
            tokens = run.get("val_tokens", np.full(len(run["step"]), np.nan)).astype(float)
            known = tokens[np.isfinite(tokens)]
            tokens = np.where(np.isfinite(tokens), tokens, known.max() if len(known) else 1.0)
            nll += tokens[index] * run["val_loss"][index]
            weight += tokens[index]
    with np.errstate(invalid="ignore", divide="ignore"):
        perplexity = np.exp(nll / weight)
    return Curve(steps, flops, perplexity, use_validation)


def _scale_y(ax, values: np.ndarray) -> None:
    """Log scale with plain labels when perplexity spans a wide range, linear otherwise."""
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(_LogTicks())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())


class _LogTicks(Locator):
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


def perplexity_vs_flops(
    expert_metrics: Sequence[PathLike], dense_metrics: PathLike, out: PathLike
) -> Path:
    """Paper Fig. 2: validation perplexity against cumulative training FLOPs, mixture vs dense."""
    mixture = loss_curve(expert_metrics)
    dense = loss_curve([dense_metrics])
    if mixture.validation != dense.validation:  # compare like with like: both on training loss
        mixture = loss_curve(expert_metrics, validation=False)
        dense = loss_curve([dense_metrics], validation=False)
    split = "validation" if mixture.validation else "training"
    with _styled():
        fig = _figure(7.0, 4.6)
        ax = fig.add_subplot()
        n = len(expert_metrics)
        ax.plot(
            mixture.flops,
            mixture.perplexity,
            marker="o",
            color=MIXTURE,
            label=f"mixture of {n} experts (final {mixture.perplexity[-1]:.2f})",
        )
        ax.plot(
            dense.flops,
            dense.perplexity,
            marker="s",
            linestyle="--",
            color=DENSE,
            label=f"dense baseline (final {dense.perplexity[-1]:.2f})",
        )
        ax.set_xscale("log")
        _scale_y(ax, np.concatenate([mixture.perplexity, dense.perplexity]))
        ax.set_xlabel("cumulative training FLOPs (mixture: sum over experts; log scale)")
        ax.set_ylabel(f"{split} perplexity")
        gain = _signed_percent(mixture.perplexity[-1] / dense.perplexity[-1])
        title = f"{split.capitalize()} perplexity vs training cost (paper Fig. 2)"
        if split == "training":
            title += "\nno validation losses logged: training losses shown"
        ax.set_title(title)
        ax.legend(title=f"at the end: mixture {gain} vs dense", loc="upper right")
        return _save(fig, out)


# ---- load per expert ------------------------------------------------------------------------


def expert_load(
    train_check_json: PathLike,
    eval_load: PathLike,
    out: PathLike,
    *,
    prefix_len: int | None = None,
) -> Path:
    """Share of sequences per expert: train shards (balanced assignment, the shard check's counts)
    next to test sequences under argmin routing at prefix `prefix_len` (None: the largest)."""
    counts = json.loads(Path(train_check_json).read_text())["sequences_per_expert"]
    train = {int(e): int(n) for e, n in counts.items()}
    load, prefix_len = _pick(
        _read(eval_load, ["prefix_len", "expert", "sequences"]), "prefix_len", prefix_len, eval_load
    )
    test: dict[int, int] = {}
    for e, n in zip(load["expert"].tolist(), load["sequences"].tolist(), strict=True):
        test[int(e)] = test.get(int(e), 0) + int(n)
    n_experts = max([*train, *test]) + 1
    experts = np.arange(n_experts)
    train_n = np.array([train.get(e, 0) for e in experts], dtype=float)
    test_n = np.array([test.get(e, 0) for e in experts], dtype=float)
    train_share = train_n / max(train_n.sum(), 1.0)
    test_share = test_n / max(test_n.sum(), 1.0)
    with _styled():
        fig = _figure(max(6.0, 0.45 * n_experts + 3.0), 4.4)
        ax = fig.add_subplot()
        width = 0.4
        bars = [
            ax.bar(
                experts - width / 2,
                train_share,
                width,
                color=TRAIN,
                label=f"train shards, balanced assignment ({int(train_n.sum()):,} sequences)",
            ),
            ax.bar(
                experts + width / 2,
                test_share,
                width,
                color=TEST,
                label=f"test, argmin routing at M\u0302 = {prefix_len} "
                f"({int(test_n.sum()):,} sequences)",
            ),
        ]
        ax.axhline(1.0 / n_experts, color="0.25", linestyle=":", linewidth=1.2, label="even, 1/E")
        if n_experts <= 12:
            for group in bars:
                ax.bar_label(group, labels=[f"{b.get_height():.0%}" for b in group], fontsize=8)
        ax.set_xticks(experts)
        ax.set_xlabel("expert e (segment)")
        ax.set_ylabel("share of sequences")
        _percent(ax)
        ax.set_ylim(0, max(train_share.max(), test_share.max(), 1.0 / n_experts) * 1.15)
        ax.set_title(f"Load per expert: train shards vs test routing (E = {n_experts})")
        fig.legend(loc="outside lower center", ncols=1)
        return _save(fig, out)


# ---- Fig. 5: per-segment perplexity ---------------------------------------------------------


def segment_perplexity(per_segment: PathLike, prefix_len: int, out: PathLike) -> Path:
    """Paper Fig. 5: test perplexity of each expert on its routed segment (opaque, darker = larger
    share of the test data) and of the dense model on the same segment (translucent, overlaid)."""
    rows, prefix_len = _pick(
        _read(per_segment, ["prefix_len", "expert", "share", "ppl_expert", "ppl_dense"]),
        "prefix_len",
        prefix_len,
        per_segment,
    )
    order = np.argsort(rows["expert"], kind="stable")
    rows = _select(rows, order)
    experts = rows["expert"].astype(int)
    share = rows["share"].astype(float)
    ppl_expert = rows["ppl_expert"].astype(float)
    ppl_dense = rows["ppl_dense"].astype(float)
    n = len(experts)
    shades = ListedColormap(colormaps["Blues"](np.linspace(0.3, 1.0, 256)), name="share")
    norm = Normalize(0.0, max(float(np.nanmax(share)), 1e-9) if n else 1.0)
    with _styled():
        fig = _figure(max(6.0, 0.45 * n + 3.5), 4.6)
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
                    _signed_percent(pe / pd),
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
        return _save(fig, out)


# ---- Fig. 4b: prefix length -----------------------------------------------------------------


def prefix_sensitivity(
    overall: PathLike, out: PathLike, *, train_prefix_len: int | None = None
) -> Path:
    """Paper Fig. 4b: test perplexity against the routing prefix length M-hat used at inference,
    for the routed mixture, the dense baseline, the oracle (best expert per sequence) and the
    top-k ensemble; a dotted line marks the training prefix M when given. Where the aggregate
    has them, the mixture and top-k points carry the 95 % interval of their ratio to dense,
    drawn on the perplexity scale (dense perplexity times the ratio's bounds)."""
    rows = _read(overall, ["prefix_len", "ppl_mixture", "ppl_dense"])
    rows = _select(rows, np.argsort(rows["prefix_len"], kind="stable"))
    m = rows["prefix_len"].astype(int)
    lines = [
        ("ppl_mixture", "mixture, argmin routing", MIXTURE, "-", "o", ""),
        ("ppl_topk", "top-k ensemble", TOPK, "-.", "D", "_topk"),
        ("ppl_oracle", "oracle (best expert per sequence)", ORACLE, ":", "^", None),
        ("ppl_dense", "dense baseline", DENSE, "--", "s", None),
    ]
    with _styled():
        fig = _figure(6.8, 4.4)
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
        return _save(fig, out)


# ---- EM convergence -------------------------------------------------------------------------


def em_convergence(
    diagnostics: PathLike | Sequence[PathLike], out: PathLike, em: PathLike | None = None
) -> Path:
    """Four panels over EM rounds (Algorithm 1): NMI of segments against sources, the share of
    validation probe sequences whose argmin expert changed, the mean routed prefix NLL, and the
    largest expert's load under the balanced assignment and under argmin routing. With `em`
    (routers/final/em.json) a line marks the round that ended EM and the title says why."""
    rows = _read_many(diagnostics, ["round", "nmi_source"])
    rows = _select(rows, np.argsort(rows["round"], kind="stable"))
    rounds = rows["round"].astype(int)
    n_experts = sum(name.startswith("load_e") for name in rows)

    def column(name: str) -> np.ndarray:
        return rows[name].astype(float) if name in rows else np.full(len(rounds), np.nan)

    def draw(ax, name: str, label: str, color: str, linestyle: str = "-", marker: str = "o"):
        values = column(name)
        ok = np.isfinite(values)
        if ok.any():
            ax.plot(rounds[ok], values[ok], label=label, color=color, ls=linestyle, marker=marker)
        return ok.any()

    with _styled():
        fig = _figure(9.0, 6.2)
        axes = fig.subplots(2, 2, sharex=True)
        (nmi, changed), (nll, load) = axes

        draw(nmi, "nmi_source", "EM block, balanced assignment", MIXTURE)
        draw(nmi, "probe_nmi_source", "validation probe, argmin routing", TEST, "--", "s")
        nmi.set_ylim(0, 1.02)
        nmi.set_ylabel("NMI(segment; source)")
        nmi.set_title("Segments vs data sources")
        nmi.legend(loc="best")

        if draw(changed, "probe_changed", "probe sequences", MIXTURE):
            _percent(changed)
            changed.set_ylim(bottom=0)
        else:
            _no_data(changed, "needs two rounds with probe scores")
        changed.set_ylabel("changed expert since last round")
        changed.set_title("Routing stability (validation probe)")

        if not draw(nll, "mean_routed_nll", "EM block", MIXTURE):
            _no_data(nll, "no router scores yet (round 0 is random)")
        nll.set_ylabel("NLL (nats per token)")
        nll.set_title("Mean prefix NLL of the chosen router")

        draw(load, "max_load", "balanced assignment", MIXTURE)
        draw(load, "argmin_max_load", "argmin routing (no capacity)", TEST, "--", "s")
        if n_experts:
            load.axhline(1.0 / n_experts, color="0.25", ls=":", lw=1.2, label="even, 1/E")
        _percent(load)
        busiest = np.r_[column("max_load"), column("argmin_max_load"), 1.0 / max(n_experts, 1)]
        busiest = busiest[np.isfinite(busiest)]
        load.set_ylim(0, min(1.0, 1.2 * max(busiest.max() if len(busiest) else 1.0, 0.05)))
        load.set_ylabel("largest expert's share")
        load.set_title("Load of the busiest expert (EM block)")
        load.legend(loc="best")

        for ax in (nll, load):
            ax.set_xlabel("EM round")
        for ax in axes.flat:
            if len(set(rounds.tolist())) <= 20:
                ax.xaxis.set_major_locator(FixedLocator(sorted(set(rounds.tolist()))))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(rounds):
                ax.set_xlim(rounds.min() - 0.5, rounds.max() + 0.5)
        title = f"EM convergence of the routers (Algorithm 1, E = {n_experts or '?'})"
        if em is not None:
            ended = json.loads(Path(em).read_text())
            for ax in axes.flat:
                ax.axvline(ended["final_round"], color="0.25", ls="--", lw=1.0)
            why = f"ended after round {ended['final_round']}: {ended['reason']}"
            title += "\n" + textwrap.fill(why, 80)
        fig.suptitle(title)
        return _save(fig, out)


# ---- segment x source -----------------------------------------------------------------------


def segment_source_heatmap(
    contingency_or_segment_source: PathLike,
    out: PathLike,
    *,
    em_round: int | None = None,
    prefix_len: int | None = None,
) -> Path:
    """Where each segment's sequences come from: segment x source counts, each row normalised
    to shares. Reads an EM contingency table (column `round`; None: the last round) or the
    evaluation's `segment_source` (column `prefix_len`; None: the largest)."""
    path = contingency_or_segment_source
    rows = _read(path, ["expert", "source", "sequences"])
    if "round" in rows:
        rows, em_round = _pick(rows, "round", em_round, path)
        where = f"train sequences of EM round {em_round}, balanced assignment"
    elif "prefix_len" in rows:
        rows, prefix_len = _pick(rows, "prefix_len", prefix_len, path)
        where = f"test sequences, argmin routing at M\u0302 = {prefix_len}"
    else:
        where = "sequences"
    sources = sorted({"(none)" if s is None else str(s) for s in rows["source"]})
    n_experts = int(rows["expert"].max()) + 1 if len(rows["expert"]) else 0
    counts = np.zeros((n_experts, len(sources)))
    column = {source: j for j, source in enumerate(sources)}
    for e, s, n in zip(rows["expert"], rows["source"], rows["sequences"], strict=True):
        counts[int(e), column["(none)" if s is None else str(s)]] += n
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with _styled():
        fig = _figure(max(6.0, 0.85 * len(sources) + 3.5), max(3.4, 0.42 * n_experts + 2.0))
        ax = fig.add_subplot()
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        ax.grid(False)
        detailed = n_experts * len(sources) <= 120
        for (e, j), value in np.ndenumerate(shares):
            text = f"{value:.0%}"
            if detailed:
                text += f"\n{int(counts[e, j]):,}"
            ax.text(
                j,
                e,
                text,
                ha="center",
                va="center",
                fontsize=7 if detailed else 6,
                color="white" if value > 0.55 else "0.15",
            )
        ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
        ax.set_yticks(
            range(n_experts), [f"{e}  (n={int(totals[e, 0]):,})" for e in range(n_experts)]
        )
        ax.set_xlabel("data source")
        ax.set_ylabel("segment = expert e")
        colorbar = fig.colorbar(image, ax=ax, pad=0.01)
        colorbar.set_label("share of the segment's sequences")
        colorbar.formatter = PercentFormatter(1.0, decimals=0)
        colorbar.update_ticks()
        ax.set_title(
            f"Source mix of each segment\n{where}"
            + ("; cells: share and count" if detailed else "")
        )
        return _save(fig, out)


# ---- tables ---------------------------------------------------------------------------------

_CSS = """
.smalltalk-tables { font-family: "DejaVu Sans", Verdana, sans-serif; font-size: 13px; }
.smalltalk-tables h3 { font-size: 14px; margin: 18px 0 6px; }
.smalltalk-tables table { border-collapse: collapse; margin-bottom: 12px; }
.smalltalk-tables th, .smalltalk-tables td { padding: 3px 10px; border-bottom: 1px solid #ddd; }
.smalltalk-tables th { background: #f2f2f2; text-align: left; border-bottom: 2px solid #999; }
.smalltalk-tables td.num { text-align: right; font-variant-numeric: tabular-nums; }
.smalltalk-tables tr:hover td { background: #f8f8f8; }
"""


def format_value(value) -> str:
    """A table cell: integers with thousands separators, floats to four significant digits
    (scientific beyond a million or below a thousandth), missing values as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2014"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isinf(value):
            return "\u221e" if value > 0 else "\u2212\u221e"
        if value == 0:
            return "0"
        if abs(value) >= 1e6 or abs(value) < 1e-3:
            return f"{value:.3e}"
        if value == round(value) and abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def tables_html(tables: Mapping[str, PathLike], out: PathLike) -> Path:
    """Render Parquet tables, {title: path}, as one self-contained HTML fragment: a heading and a
    plain <table> each, CSS scoped to the fragment, numbers formatted by `format_value`."""
    parts = [f'<div class="smalltalk-tables">\n<style>{_CSS}</style>']
    for title, path in tables.items():
        table = pq.read_table(path)
        numeric = [
            t.startswith(("int", "uint", "float", "double", "decimal"))
            for t in map(str, table.schema.types)
        ]
        parts.append(f"<h3>{html.escape(str(title))}</h3>")
        parts.append("<table>")
        parts.append(
            "<tr>"
            + "".join(f"<th>{html.escape(name)}</th>" for name in table.column_names)
            + "</tr>"
        )
        for row in table.to_pylist():
            cells = (
                f'<td class="num">{html.escape(format_value(value))}</td>'
                if is_number
                else f"<td>{html.escape(format_value(value))}</td>"
                for value, is_number in zip(row.values(), numeric, strict=True)
            )
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</div>\n")
    text = "\n".join(parts)
    # ASCII with character references: the fragment needs no charset declaration.
    return write_bytes_atomically(text.encode("ascii", "xmlcharrefreplace"), out)


# The CLI (`smalltalk plot <figure> ...`) dispatches on these names.
FIGURES: dict[str, Callable[..., Path]] = {
    "perplexity_vs_flops": perplexity_vs_flops,
    "expert_load": expert_load,
    "segment_perplexity": segment_perplexity,
    "prefix_sensitivity": prefix_sensitivity,
    "em_convergence": em_convergence,
    "segment_source": segment_source_heatmap,
}
