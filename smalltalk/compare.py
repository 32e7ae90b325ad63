"""Compare finished runs of the workflow (routing methods, E, router sizes) at equal FLOPs.

Each run is a results directory; everything is read from its own files: the resolved
`config.yaml`, `eval/summary/overall.parquet` (test perplexity per M̂), `ledger/flops.parquet`
and the experts' and dense model's `metrics.parquet` (validation curves). One row per (run, M̂);
the figure shows the test gain over dense per run, its dependence on M̂ (paper Fig. 4b), and the
validation gain along training (paper Fig. 2), the curve that says how the gain moves with
tokens seen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from smalltalk.files import write_parquet_atomically, write_text_atomically

PathLike = str | os.PathLike


def _flops(ledger: dict, component: str) -> float:
    return float(ledger["flops"][ledger["component"].index(component)])


def _router_name(config: dict) -> str:
    router = config["models"]["router"]
    sizes = [f"{key}={router[key]}" for key in ("n_embd", "n_layer") if key in router]
    return " ".join([router.get("preset", "custom"), *sizes])


def validation_curves(run: PathLike) -> tuple:
    """(mixture, dense) `plots.Curve`s of one run's validation perplexity over training."""
    from smalltalk.plots import loss_curve

    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    experts = [run / f"experts/e{e}/metrics.parquet" for e in range(config["routing"]["n_experts"])]
    dense_dir = Path(config["training"].get("dense_from") or run / "dense")
    return loss_curve(experts), loss_curve([dense_dir / "metrics.parquet"])


def compare_runs(runs: Mapping[str, PathLike], out: PathLike) -> pa.Table:
    """One row per (run, inference prefix M̂): method, E, router, test perplexities and gain,
    final validation perplexities and gain, and training FLOPs of mixture and dense."""
    rows = []
    for name, run in runs.items():
        run = Path(run)
        config = yaml.safe_load((run / "config.yaml").read_text())
        overall = pq.read_table(run / "eval/summary/overall.parquet").to_pylist()
        ledger = pq.read_table(run / "ledger/flops.parquet").to_pydict()
        mixture, dense = validation_curves(run)
        mixture_flops = _flops(ledger, "mixture total (Eq. 12)")
        dense_flops = _flops(ledger, "dense baseline (Eq. 10)")
        for row in overall:
            rows.append(
                {
                    "run": name,
                    "method": config["routing"]["method"],
                    "n_experts": config["routing"]["n_experts"],
                    "router": _router_name(config)
                    if config["routing"]["method"] == "smalltalk"
                    else "-",
                    "train_prefix_len": config["routing"]["prefix_len"],
                    "prefix_len": row["prefix_len"],
                    "ppl_mixture": row["ppl_mixture"],
                    "ppl_dense": row["ppl_dense"],
                    "test_gain": row["relative_gain"],
                    "ppl_topk": row["ppl_topk"],
                    "ppl_oracle": row["ppl_oracle"],
                    "val_ppl_mixture": float(mixture.perplexity[-1]),
                    "val_ppl_dense": float(dense.perplexity[-1]),
                    "val_gain": float(1 - mixture.perplexity[-1] / dense.perplexity[-1]),
                    "mixture_train_flops": mixture_flops,
                    "dense_train_flops": dense_flops,
                    "flops_ratio": mixture_flops / dense_flops,
                }
            )
    if not rows:
        raise ValueError("no runs to compare")
    table = pa.Table.from_pylist(rows)
    write_parquet_atomically(table, out)
    return table


def markdown(table: pa.Table, out: PathLike) -> Path:
    """The rows at each run's training prefix M as a Markdown table (for the README)."""
    lines = [
        "| run | method | E | router | test ppl mixture | test ppl dense | test gain "
        "| top-k | val gain | mixture/dense FLOPs |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.to_pylist():
        if row["prefix_len"] != row["train_prefix_len"]:
            continue
        lines.append(
            f"| {row['run']} | {row['method']} | {row['n_experts']} | {row['router']} "
            f"| {row['ppl_mixture']:.2f} | {row['ppl_dense']:.2f} | {100 * row['test_gain']:+.1f}% "
            f"| {row['ppl_topk']:.2f} | {100 * row['val_gain']:+.1f}% "
            f"| {row['flops_ratio']:.3f} |"
        )
    return write_text_atomically("\n".join(lines) + "\n", out)


def comparison_figure(table: PathLike, runs: Mapping[str, PathLike], out: PathLike) -> Path:
    """Three panels: test gain over dense at M̂ = M per run; test gain vs M̂; validation gain
    along training against the mixture's cumulative training FLOPs."""
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter

    from smalltalk import plots

    columns = plots._read(table, ["run", "prefix_len", "train_prefix_len", "test_gain"])
    names = list(dict.fromkeys(columns["run"].tolist()))
    colours = colormaps["tab10"].colors
    with plots._styled():
        fig = plots._figure(14.0, 4.6)
        bars, sweep, curves = fig.subplots(1, 3)
        at_m = columns["prefix_len"] == columns["train_prefix_len"]
        gains = [float(columns["test_gain"][at_m & (columns["run"] == name)][0]) for name in names]
        bars.barh(names, gains, color=[colours[i % 10] for i in range(len(names))])
        bars.axvline(0, color=plots.DENSE, linestyle="--", linewidth=1.0)
        bars.invert_yaxis()
        plots._percent(bars, "x", decimals=1)
        bars.set_xlabel("test perplexity gain over dense at equal FLOPs (M\u0302 = M)")
        bars.set_title("Gain over the dense baseline")
        for i, name in enumerate(names):
            mine = columns["run"] == name
            order = np.argsort(columns["prefix_len"][mine])
            sweep.plot(
                columns["prefix_len"][mine][order],
                columns["test_gain"][mine][order],
                marker="o",
                color=colours[i % 10],
                label=name,
            )
            mixture, dense = validation_curves(runs[name])
            steps = np.intersect1d(mixture.steps, dense.steps)
            keep_m, keep_d = np.isin(mixture.steps, steps), np.isin(dense.steps, steps)
            curves.plot(
                mixture.flops[keep_m],
                1 - mixture.perplexity[keep_m] / dense.perplexity[keep_d],
                color=colours[i % 10],
                marker=".",
                label=name,
            )
        sweep.axhline(0, color=plots.DENSE, linestyle="--", linewidth=1.0)
        sweep.set_xscale("log", base=2)
        sweep.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        plots._percent(sweep, "y", decimals=1)
        sweep.set_xlabel("routing prefix length M\u0302 at inference (tokens)")
        sweep.set_ylabel("test gain over dense")
        sweep.set_title("Gain vs routing prefix (Fig. 4b)")
        curves.axhline(0, color=plots.DENSE, linestyle="--", linewidth=1.0)
        curves.set_xscale("log")
        plots._percent(curves, "y", decimals=1)
        curves.set_xlabel("mixture training FLOPs so far (dense: the same)")
        curves.set_ylabel("validation gain over dense")
        curves.set_title("Gain along training (Fig. 2)")
        curves.legend(loc="lower right", fontsize=7)
        return plots._save(fig, out)
