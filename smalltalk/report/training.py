"""Training curves: the paper's Fig. 2, perplexity against cumulative training FLOPs.

Inputs are the `metrics.parquet` logs of the experts' and the dense model's training runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

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
    with styled():
        fig = new_figure(7.0, 4.6)
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
        scale_y(ax, np.concatenate([mixture.perplexity, dense.perplexity]))
        ax.set_xlabel("cumulative training FLOPs (mixture: sum over experts; log scale)")
        ax.set_ylabel(f"{split} perplexity")
        gain = signed_percent(mixture.perplexity[-1] / dense.perplexity[-1])
        title = f"{split.capitalize()} perplexity vs training cost (paper Fig. 2)"
        if split == "training":
            title += "\nno validation losses logged: training losses shown"
        ax.set_title(title)
        ax.legend(title=f"at the end: mixture {gain} vs dense", loc="upper right")
        return save(fig, out)
