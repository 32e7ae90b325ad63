"""Compare finished runs of the workflow (routing methods, E, router sizes) at equal FLOPs.

Each run is a results directory; everything is read from its own files: the resolved
`config.yaml`, `eval/summary/overall.parquet` (test perplexity per M̂), `ledger/flops.parquet`
and the experts' and dense model's `metrics.parquet` (validation curves). One row per (run, M̂);
the figure shows the test gain over dense per run, its dependence on M̂ (paper Fig. 4b), and the
validation gain along training (paper Fig. 2), the curve that says how the gain moves with
tokens seen.

Every mixture/dense perplexity ratio comes with its 95 % paired-bootstrap interval over the test
sequences and a verdict in words (`smalltalk.stats`). Runs of one recipe trained with different
seeds are named `RECIPE@SEED` (say `smalltalk-e4@1`, `smalltalk-e4@2`, `smalltalk-e4@3`): the
part before the `@` is the run's group, and `seed_summary` gives each group's mean ratio, its
spread (std, min-max) and, from 3 seeds on, a t interval over the seeds and its verdict.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from smalltalk.aggregate import BASELINE_NAMES
from smalltalk.files import write_parquet_atomically, write_text_atomically
from smalltalk.ledger import BASELINE_LEDGER_NAMES
from smalltalk.stats import MIN_SEEDS, seed_spread, verdict

PathLike = str | os.PathLike


def _flops(ledger: dict, component: str, phase: str = "training") -> float | None:
    """A ledger row's FLOPs; None where the run's ledger has no such row."""
    for row_phase, name, value in zip(
        ledger["phase"], ledger["component"], ledger["flops"], strict=True
    ):
        if row_phase == phase and name == component:
            return float(value)
    return None


def _router_name(config: dict) -> str:
    router = config["models"]["router"]
    sizes = [f"{key}={router[key]}" for key in ("n_embd", "n_layer") if key in router]
    return " ".join([router.get("preset", "custom"), *sizes])


def validation_curves(run: PathLike) -> tuple:
    """(mixture, dense) `report.Curve`s of one run's validation perplexity over training."""
    from smalltalk.report.training import loss_curve

    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    experts = [run / f"experts/e{e}/metrics.parquet" for e in range(config["routing"]["n_experts"])]
    dense_dir = Path(config["training"].get("dense_from") or run / "dense")
    return loss_curve(experts), loss_curve([dense_dir / "metrics.parquet"])


RATIO_COLUMNS = [
    *("ratio", "ratio_ci_low", "ratio_ci_high", "verdict"),
    *("ratio_topk", "ratio_topk_ci_low", "ratio_topk_ci_high", "verdict_topk"),
]
"""What `compare_runs` takes from each run's overall aggregate: ratios to dense, CIs, verdicts."""

BASELINE_COLUMNS = {
    baseline: [
        f"ppl_{baseline}",
        *(f"ratio_{baseline}{end}" for end in ("", "_ci_low", "_ci_high")),
        f"verdict_{baseline}",
    ]
    for baseline in BASELINE_NAMES
}
"""The same against each dense baseline on the mixture's whole budget, where the run has it
(None where it has not)."""


def group_of(run: str) -> str:
    """The recipe a run belongs to: its name up to the first "@" (`smalltalk-e4@2`: seed 2)."""
    return run.partition("@")[0]


SUMMARIES = {"test": "eval/summary", "val": "eval/val/summary"}
"""Where a run's evaluation aggregates of each split are (the validation ones on request:
`snakemake RESULTS/eval/val/summary/overall.parquet`)."""


def summary_dir(split: str, experts: Sequence[int] | None = None) -> str:
    """Where a run's aggregates of `split` are: of all its experts, or of the subset `experts`
    (retired ones left out, `snakemake RESULTS/eval/test/subsets/0-2/summary/overall.parquet`)."""
    if split not in SUMMARIES:
        raise ValueError(f"split must be one of {', '.join(SUMMARIES)}, got {split!r}")
    if experts is None:
        return SUMMARIES[split]
    return f"eval/{split}/subsets/{'-'.join(map(str, sorted(experts)))}/summary"


def compare_runs(
    runs: Mapping[str, PathLike],
    out: PathLike,
    split: str = "test",
    experts: Sequence[int] | None = None,
) -> pa.Table:
    """One row per (run, inference prefix M̂): group, method, E, router, the split's perplexities,
    gain, ratio to dense with its 95 % interval and verdict (mixture and top-k), the training
    curves' final validation perplexities and gain, and training FLOPs of mixture and dense.
    `split` is "test" (what results are quoted on) or "val" (what settings are chosen on);
    `experts` serves that subset of each run's experts (E counts them; curves and FLOPs stay
    those of the whole run)."""
    rows = []
    for name, run in runs.items():
        run = Path(run)
        config = yaml.safe_load((run / "config.yaml").read_text())
        summary = run / summary_dir(split, experts) / "overall.parquet"
        if not summary.exists():
            raise FileNotFoundError(
                f"{summary}: no {split} evaluation; build it with `snakemake {summary}`"
            )
        overall = pq.read_table(summary)
        missing = sorted(set(RATIO_COLUMNS) - set(overall.column_names))
        if missing:
            raise ValueError(
                f"{summary} lacks {', '.join(missing)}: it predates the confidence intervals; "
                "rebuild it with `snakemake --forcerun aggregate_eval`"
            )
        overall = overall.to_pylist()
        ledger = pq.read_table(run / "ledger/flops.parquet").to_pydict()
        mixture, dense = validation_curves(run)
        mixture_flops = _flops(ledger, "mixture total (Eq. 12)")
        dense_flops = _flops(ledger, "dense baseline (Eq. 10)")
        for row in overall:
            rows.append(
                {
                    "run": name,
                    "group": group_of(name),
                    "split": split,
                    "method": config["routing"]["method"],
                    "n_experts": len(experts)
                    if experts
                    else config["routing"]["n_experts"] + len(config.get("grow") or []),
                    "router": _router_name(config)
                    if config["routing"]["method"] == "smalltalk"
                    else "-",
                    "train_prefix_len": config["routing"]["prefix_len"],
                    "prefix_len": row["prefix_len"],
                    "ppl_mixture": row["ppl_mixture"],
                    "ppl_dense": row["ppl_dense"],
                    "gain": row["relative_gain"],
                    "ppl_topk": row["ppl_topk"],
                    "ppl_oracle": row["ppl_oracle"],
                    **{column: row[column] for column in RATIO_COLUMNS},
                    "val_ppl_mixture": float(mixture.perplexity[-1]),
                    "val_ppl_dense": float(dense.perplexity[-1]),
                    "val_gain": float(1 - mixture.perplexity[-1] / dense.perplexity[-1]),
                    "mixture_train_flops": mixture_flops,
                    "dense_train_flops": dense_flops,
                    "flops_ratio": mixture_flops / dense_flops,
                    **{
                        column: row.get(column)
                        for columns in BASELINE_COLUMNS.values()
                        for column in columns
                    },
                    **{
                        f"{baseline}_train_flops": _flops(ledger, component)
                        for baseline, component in BASELINE_LEDGER_NAMES.items()
                    },
                    "mixture_inference_flops": _flops(
                        ledger, "mixture total", "inference per sequence"
                    ),
                    "dense_large_inference_flops": _flops(
                        ledger, BASELINE_LEDGER_NAMES["dense_large"], "inference per sequence"
                    ),
                }
            )
    if not rows:
        raise ValueError("no runs to compare")
    table = pa.Table.from_pylist(rows)
    write_parquet_atomically(table, out)
    return table


def seed_summary(table: pa.Table, baseline: str = "dense") -> pa.Table:
    """One row per (group of two or more runs, M̂): the seeds' mixture/`baseline` ratios
    (dense, dense_compute or dense_large) as mean, std, min and max, a t interval of the mean
    (NaN below `MIN_SEEDS` seeds) and its verdict."""
    column = "ratio" if baseline == "dense" else f"ratio_{baseline}"
    runs: dict[tuple, dict[str, float]] = {}
    for row in table.to_pylist():
        if row.get(column) is not None:
            runs.setdefault((row["group"], row["prefix_len"]), {})[row["run"]] = row[column]
    rows = []
    for (group, prefix_len), ratios in runs.items():
        if len(ratios) < 2:
            continue
        spread = seed_spread(list(ratios.values()))
        rows.append(
            {
                "group": group,
                "prefix_len": prefix_len,
                "seeds": spread.seeds,
                "ratio_mean": spread.mean,
                "ratio_std": spread.std,
                "ratio_min": spread.min,
                "ratio_max": spread.max,
                "ratio_ci_low": spread.low,
                "ratio_ci_high": spread.high,
                "verdict": verdict(
                    spread.mean, spread.low, spread.high, b=BASELINE_NAMES.get(baseline, "dense")
                )
                if spread.seeds >= MIN_SEEDS
                else f"fewer than {MIN_SEEDS} seeds",
            }
        )
    return pa.Table.from_pylist(rows, schema=SEED_SCHEMA)


SEED_SCHEMA = pa.schema(
    [
        ("group", pa.string()),
        ("prefix_len", pa.int64()),
        ("seeds", pa.int64()),
        ("ratio_mean", pa.float64()),
        ("ratio_std", pa.float64()),
        ("ratio_min", pa.float64()),
        ("ratio_max", pa.float64()),
        ("ratio_ci_low", pa.float64()),
        ("ratio_ci_high", pa.float64()),
        ("verdict", pa.string()),
    ]
)


def ratio_with_ci(row: Mapping, suffix: str = "") -> str:
    """0.968 [0.951, 0.985]: a row's ratio{suffix} and its 95 % interval, as tables print them;
    "-" where the run has no such ratio (a baseline it did not train)."""
    if row.get(f"ratio{suffix}") is None:
        return "-"
    low, high = row[f"ratio{suffix}_ci_low"], row[f"ratio{suffix}_ci_high"]
    return f"{row[f'ratio{suffix}']:.3f} [{low:.3f}, {high:.3f}]"


def markdown(table: pa.Table, out: PathLike, head: str | None = None) -> Path:
    """The rows at each run's training prefix M as a Markdown table (for the README), and, when
    runs are grouped by seed, their spread over seeds below it; `head` (a record's provenance)
    comes first."""
    split = table.column("split")[0].as_py() if len(table) else "test"
    lines = [head] if head else []
    lines += [
        f"| run | method | E | router | {split} ppl mixture | {split} ppl dense | {split} gain "
        "| mixture/dense (95 % CI) | verdict | top-k | top-k/dense (95 % CI) | val gain (curves) "
        "| mixture/dense FLOPs | mixture/compute-matched dense (95 % CI) | verdict "
        "| mixture/larger dense (95 % CI) | larger dense/mixture inference FLOPs |",
        "|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    at_m = [row for row in table.to_pylist() if row["prefix_len"] == row["train_prefix_len"]]
    for row in at_m:
        large = row.get("dense_large_inference_flops")
        inference = f"{large / row['mixture_inference_flops']:.2f}" if large else "-"
        lines.append(
            f"| {row['run']} | {row['method']} | {row['n_experts']} | {row['router']} "
            f"| {row['ppl_mixture']:.2f} | {row['ppl_dense']:.2f} | {100 * row['gain']:+.1f}% "
            f"| {ratio_with_ci(row)} | {row['verdict']} "
            f"| {row['ppl_topk']:.2f} | {ratio_with_ci(row, '_topk')} "
            f"| {100 * row['val_gain']:+.1f}% | {row['flops_ratio']:.3f} "
            f"| {ratio_with_ci(row, '_dense_compute')} | {row.get('verdict_dense_compute') or '-'} "
            f"| {ratio_with_ci(row, '_dense_large')} | {inference} |"
        )
    at_m_table = pa.Table.from_pylist(at_m, schema=table.schema)
    for baseline, title in [("dense", "dense"), *BASELINE_NAMES.items()]:
        lines += _seed_lines(seed_summary(at_m_table, baseline).to_pylist(), title)
    return write_text_atomically("\n".join(lines) + "\n", out)


def _seed_lines(groups: list[dict], baseline: str) -> list[str]:
    """The seed-summary table of one baseline, in Markdown; nothing without seed groups."""
    lines = []
    if groups:
        lines += [
            "",
            f"Over seeds (runs named RECIPE@SEED), mixture/{baseline} perplexity ratio at M̂ = M:",
            "",
            "| recipe | seeds | mean ratio | std | min-max | 95 % CI over seeds | verdict |",
            "|---|---:|---:|---:|---|---|---|",
        ]
        for row in groups:
            interval = (
                f"[{row['ratio_ci_low']:.3f}, {row['ratio_ci_high']:.3f}]"
                if row["seeds"] >= MIN_SEEDS
                else "-"
            )
            lines.append(
                f"| {row['group']} | {row['seeds']} | {row['ratio_mean']:.3f} "
                f"| {row['ratio_std']:.3f} | {row['ratio_min']:.3f}-{row['ratio_max']:.3f} "
                f"| {interval} | {row['verdict']} |"
            )
    return lines


def comparison_figure(table: PathLike, runs: Mapping[str, PathLike], out: PathLike) -> Path:
    """Three panels: the gain over dense on the table's split at M̂ = M per run; that gain vs M̂;
    validation gain along training against the mixture's cumulative training FLOPs."""
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter

    from smalltalk.report.columns import read_columns
    from smalltalk.report.style import DENSE, new_figure, percent, save, styled

    columns = read_columns(
        table,
        ["run", "split", "prefix_len", "train_prefix_len", "gain", "ratio_ci_low", "ratio_ci_high"],
    )
    split = str(columns["split"][0])
    names = list(dict.fromkeys(columns["run"].tolist()))
    colours = colormaps["tab10"].colors
    with styled():
        fig = new_figure(14.0, 4.6)
        bars, sweep, curves = fig.subplots(1, 3)
        at_m = columns["prefix_len"] == columns["train_prefix_len"]
        first = [int(np.flatnonzero(at_m & (columns["run"] == name))[0]) for name in names]
        # The headline where every run has it: the gain at equal total compute, routers
        # included (the compute-matched dense baseline); else at equal expert FLOPs.
        ratio, against = "ratio", "dense at equal expert FLOPs"
        compute = columns.get("ratio_dense_compute")
        if compute is not None and np.isfinite(compute[first].astype(float)).all():
            ratio, against = "ratio_dense_compute", "compute-matched dense"
        gains = 1 - columns[ratio][first].astype(float)
        # gain = 1 - ratio, so the ratio's interval [low, high] is [1 - high, 1 - low] in gain.
        errors = np.stack(
            [
                gains - (1 - columns[f"{ratio}_ci_high"][first].astype(float)),
                (1 - columns[f"{ratio}_ci_low"][first].astype(float)) - gains,
            ]
        ).clip(min=0)  # (2, runs); the clip drops rounding below zero, which matplotlib refuses
        bars.barh(
            names,
            gains,
            xerr=errors,
            color=[colours[i % 10] for i in range(len(names))],
            error_kw={"ecolor": "0.2", "capsize": 3, "linewidth": 1.0},
        )
        bars.axvline(0, color=DENSE, linestyle="--", linewidth=1.0)
        bars.invert_yaxis()
        percent(bars, "x", decimals=1)
        bars.set_xlabel(f"{split} perplexity gain over {against} (M\u0302 = M; 95 % CI)")
        bars.set_title("Gain over the dense baseline")
        for i, name in enumerate(names):
            mine = columns["run"] == name
            order = np.argsort(columns["prefix_len"][mine])
            sweep.plot(
                columns["prefix_len"][mine][order],
                columns["gain"][mine][order],
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
        sweep.axhline(0, color=DENSE, linestyle="--", linewidth=1.0)
        sweep.set_xscale("log", base=2)
        sweep.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        percent(sweep, "y", decimals=1)
        sweep.set_xlabel("routing prefix length M\u0302 at inference (tokens)")
        sweep.set_ylabel(f"{split} gain over dense")
        sweep.set_title("Gain vs routing prefix (Fig. 4b)")
        curves.axhline(0, color=DENSE, linestyle="--", linewidth=1.0)
        curves.set_xscale("log")
        percent(curves, "y", decimals=1)
        curves.set_xlabel("mixture training FLOPs so far (dense: the same)")
        curves.set_ylabel("validation gain over dense")
        curves.set_title("Gain along training (Fig. 2)")
        curves.legend(loc="lower right", fontsize=7)
        return save(fig, out)
