"""Training curves: the paper's Fig. 2, perplexity against cumulative training FLOPs.

Inputs are the `metrics.parquet` logs of the experts' and the dense model's training runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from smalltalk.ledger import BASELINE_LEDGER_NAMES
from smalltalk.report.columns import read_columns
from smalltalk.report.style import (
    DENSE,
    MIXTURE,
    PathLike,
    new_figure,
    save,
    scale_y,
    signed_percent,
    styled,
)


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
    runs = [read_columns(path, ["step", "flops", "loss"]) for path in metrics]
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


BASELINE_STYLES = {
    "dense_compute": ("compute-matched dense", "#E69F00", "D"),
    "dense_large": ("larger dense", "#D55E00", "^"),
}
"""Label, colour and marker of each dense baseline on the mixture's whole budget."""


def perplexity_vs_flops(
    expert_metrics: Sequence[PathLike],
    dense_metrics: PathLike,
    out: PathLike,
    baseline_metrics: Sequence[str] = (),
    ledger: PathLike | None = None,
    overall: PathLike | None = None,
) -> Path:
    """Paper Fig. 2: validation perplexity against cumulative training FLOPs, mixture vs dense
    and the dense baselines on the mixture's budget (`baseline_metrics`: NAME=metrics.parquet).
    With the run's FLOPs `ledger`, the mixture's curve starts at what its routers spent; with the
    test `overall` summary a second panel puts every model at its total training FLOPs, at its
    test perplexity, with the paired-bootstrap 95 % interval of its ratio to the mixture."""
    mixture = loss_curve(expert_metrics)
    dense = loss_curve([dense_metrics])
    baselines = {}
    for item in baseline_metrics:
        name, _, path = item.partition("=")
        baselines[name] = loss_curve([path])
    curves = [mixture, dense, *baselines.values()]
    if len({curve.validation for curve in curves}) > 1:  # like with like: all on training loss
        mixture = loss_curve(expert_metrics, validation=False)
        dense = loss_curve([dense_metrics], validation=False)
        baselines = {
            name.partition("=")[0]: loss_curve([name.partition("=")[2]], validation=False)
            for name in baseline_metrics
        }
    routing = _routing_flops(ledger) if ledger else 0.0
    split = "validation" if mixture.validation else "training"
    with styled():
        fig = new_figure(12.5 if overall else 7.0, 4.6)
        ax, *final = fig.subplots(1, 2 if overall else 1, squeeze=False)[0]
        n = len(expert_metrics)
        ax.plot(
            mixture.flops + routing,
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
            label=f"dense, equal tokens (final {dense.perplexity[-1]:.2f})",
        )
        for name, curve in baselines.items():
            label, colour, marker = BASELINE_STYLES.get(name, (name, DENSE, "x"))
            ax.plot(
                curve.flops,
                curve.perplexity,
                marker=marker,
                markersize=4,
                linestyle=":",
                color=colour,
                label=f"{label} (final {curve.perplexity[-1]:.2f})",
            )
        ax.set_xscale("log")
        scale_y(
            ax,
            np.concatenate(
                [mixture.perplexity, dense.perplexity, *(c.perplexity for c in baselines.values())]
            ),
        )
        where = "routers' FLOPs, then the sum over experts" if ledger else "sum over experts"
        ax.set_xlabel(f"cumulative training FLOPs (mixture: {where}; log scale)")
        ax.set_ylabel(f"{split} perplexity")
        gain = signed_percent(mixture.perplexity[-1] / dense.perplexity[-1])
        title = f"{split.capitalize()} perplexity vs training cost (paper Fig. 2)"
        if split == "training":
            title += "\nno validation losses logged: training losses shown"
        ax.set_title(title)
        ax.legend(title=f"at the end: mixture {gain} vs dense", loc="upper right", fontsize=8)
        if overall:
            _final_points(final[0], overall, ledger)
        return save(fig, out)


def _routing_flops(ledger: PathLike) -> float:
    """What the routers spent before the experts trained (Eq. 13 + 14 + 16), from the ledger."""
    rows = read_columns(ledger, ["phase", "component", "flops"])
    routers = [
        value
        for phase, name, value in zip(rows["phase"], rows["component"], rows["flops"], strict=True)
        if phase == "training" and str(name).startswith("routers:")
    ]
    return float(sum(routers))


def _final_points(ax, overall: PathLike, ledger: PathLike | None) -> None:
    """Every model at its total training FLOPs and its test perplexity at M-hat = M. A baseline's
    bar is the 95 % paired-bootstrap interval of the mixture's ratio to it, turned into its own
    perplexity (ppl_mixture / ratio bounds): its distance from the mixture, sequences resampled."""
    rows = read_columns(overall, ["prefix_len", "ppl_mixture", "ppl_dense"])
    at = int(np.argmax(rows["prefix_len"]))  # M: the largest swept prefix
    costs = {}
    if ledger:
        table = read_columns(ledger, ["phase", "component", "flops"])
        costs = {
            str(name): float(value)
            for phase, name, value in zip(
                table["phase"], table["component"], table["flops"], strict=True
            )
            if phase == "training"
        }
    mixture_ppl = float(rows["ppl_mixture"][at])
    points = [
        ("mixture", MIXTURE, "o", costs.get("mixture total (Eq. 12)"), mixture_ppl, ""),
        (
            "dense, equal tokens",
            DENSE,
            "s",
            costs.get("dense baseline (Eq. 10)"),
            float(rows["ppl_dense"][at]),
            "",
        ),
    ]
    for name, (label, colour, marker) in BASELINE_STYLES.items():
        if f"ppl_{name}" in rows:
            points.append(
                (
                    label,
                    colour,
                    marker,
                    costs.get(BASELINE_LEDGER_NAMES[name]),
                    float(rows[f"ppl_{name}"][at]),
                    name,
                )
            )
    for label, colour, marker, cost, ppl, name in points:
        if cost is None:
            continue
        error = None
        if name and f"ratio_{name}_ci_low" in rows:
            low, high = rows[f"ratio_{name}_ci_low"][at], rows[f"ratio_{name}_ci_high"][at]
            error = [[max(ppl - mixture_ppl / high, 0)], [max(mixture_ppl / low - ppl, 0)]]
        ax.errorbar(
            [cost],
            [ppl],
            yerr=error,
            marker=marker,
            color=colour,
            capsize=3,
            linestyle="none",
            label=f"{label}: {ppl:.2f}",
        )
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))  # the costs differ by percents
    ax.set_xlabel("total training FLOPs (mixture: routers included)")
    ax.set_ylabel("test perplexity (M\u0302 = M)")
    ax.set_title("Every model at its whole training cost")
    ax.legend(loc="best", fontsize=8)
