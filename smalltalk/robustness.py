"""The robustness benchmark's table: one row per (corpus, seed, recipe) run and baseline, and
its summary.

Runs are named `CORPUS/RECIPE@SEED` (benchmarks/robustness/Snakefile). Each row holds the test
perplexity ratio of the mixture to one dense baseline (`dense`: equal tokens; `dense_compute`
and `dense_large`: the mixture's whole training FLOPs, routers included) at M̂ = M with its
paired-bootstrap 95 % interval (the `overall` aggregate), the mixture's training FLOPs over that
baseline's (`flops_ratio`), the final NMI of the segments against the source labels on the EM
probe, and the run's compute time: the sum of its jobs' wall seconds (Snakemake's benchmark
files), which is the run's wall time on one core; runs share the cores, so their own wall times
are not separable.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from smalltalk.files import write_text_atomically
from smalltalk.ledger import BASELINE_LEDGER_NAMES
from smalltalk.stats import MIN_SEEDS, seed_spread, verdict

PathLike = str | os.PathLike
FIELDS = (
    *("corpus", "seed", "recipe", "E", "baseline", "ratio", "ci_low", "ci_high", "flops_ratio"),
    *("nmi", "wall_s"),
)
BASELINE_LEDGER_ROWS = {"dense": "dense baseline (Eq. 10)", **BASELINE_LEDGER_NAMES}
"""Each baseline's training FLOPs in the run's ledger."""


def parse_run_name(name: str) -> tuple[str, str, int]:
    """`CORPUS/RECIPE@SEED` -> (corpus, recipe, seed)."""
    corpus, slash, rest = name.partition("/")
    recipe, at, seed = rest.partition("@")
    if not (slash and at and corpus and recipe and seed.isdigit()):
        raise ValueError(f"a robustness run is named CORPUS/RECIPE@SEED, got {name!r}")
    return corpus, recipe, int(seed)


def _final_nmi(run: Path) -> float | None:
    """The last EM round's NMI on the validation probe; None for routing without EM."""
    path = run / "routers" / "diagnostics.parquet"
    if not path.exists():
        return None
    rows = pq.read_table(path).sort_by("round").to_pylist()
    nmi = rows[-1]["probe_nmi_source"]
    return None if nmi is None or math.isnan(nmi) else nmi


def _job_seconds(run: Path) -> float:
    total = 0.0
    for path in sorted((run / "benchmarks").rglob("*.tsv")):
        with open(path, newline="") as file:
            total += sum(float(row["s"]) for row in csv.DictReader(file, delimiter="\t"))
    return total


def run_rows(name: str, run: PathLike) -> list[dict]:
    """One row per dense baseline the run trained: the mixture's ratio to it at M̂ = M."""
    run = Path(run)
    corpus, recipe, seed = parse_run_name(name)
    config = yaml.safe_load((run / "config.yaml").read_text())
    if config["seed"] != seed:
        raise ValueError(f"{name}: {run}/config.yaml has seed {config['seed']}, not {seed}")
    prefix_len = config["routing"]["prefix_len"]
    overall = [
        row
        for row in pq.read_table(run / "eval/summary/overall.parquet").to_pylist()
        if row["prefix_len"] == prefix_len
    ]
    if len(overall) != 1:
        raise ValueError(f"{run}: the evaluation has no row for M̂ = M = {prefix_len}")
    ledger = pq.read_table(run / "ledger/flops.parquet").to_pylist()
    training = {row["component"]: row["flops"] for row in ledger if row["phase"] == "training"}
    nmi, wall_s = _final_nmi(run), round(_job_seconds(run), 1)
    rows = []
    for baseline, component in BASELINE_LEDGER_ROWS.items():
        suffix = "" if baseline == "dense" else f"_{baseline}"
        if overall[0].get(f"ratio{suffix}") is None or component not in training:
            continue
        rows.append(
            {
                "corpus": corpus,
                "seed": seed,
                "recipe": recipe,
                "E": config["routing"]["n_experts"],
                "baseline": baseline,
                "ratio": overall[0][f"ratio{suffix}"],
                "ci_low": overall[0][f"ratio{suffix}_ci_low"],
                "ci_high": overall[0][f"ratio{suffix}_ci_high"],
                "flops_ratio": training["mixture total (Eq. 12)"] / training[component],
                "nmi": nmi,
                "wall_s": wall_s,
            }
        )
    return rows


def markdown(rows: list[dict], command: str, stamp: str = "") -> str:
    """Every run, then each (corpus, recipe)'s spread over its seeds, with verdicts in words."""
    lines = [
        "# Robustness benchmark",
        "",
        f"Reproduce: `{command}`",
        "",
        stamp,
        "",
        "Test perplexity of the mixture over each dense baseline (dense: equal tokens; "
        "dense_compute: the experts' architecture on the mixture's whole training FLOPs, routers "
        "included; dense_large: a larger model on the same FLOPs), tokens after the routing "
        "prefix, routed by M̂ = M tokens; 95 % paired-bootstrap interval over test sequences. "
        "FLOPs: the mixture's training FLOPs over the baseline's. NMI: segments against source "
        "labels on the EM validation probe. Compute: the run's jobs' seconds added up (its wall "
        "time on one core).",
        "",
        "| corpus | recipe | seed | E | baseline | mixture / baseline [95 % CI] | verdict "
        "| FLOPs | NMI | compute (s) |",
        "|---|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        nmi = "-" if row["nmi"] is None else f"{row['nmi']:.3f}"
        lines.append(
            f"| {row['corpus']} | {row['recipe']} | {row['seed']} | {row['E']} | "
            f"{row['baseline']} | "
            f"{row['ratio']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | "
            f"{verdict(row['ratio'], row['ci_low'], row['ci_high'], b=row['baseline'])} | "
            f"{row['flops_ratio']:.3f} | {nmi} | {row['wall_s']:,.0f} |"
        )
    lines += [
        "",
        "Over seeds (mean, sample std, min-max; Student t 95 % interval of the mean, given from "
        f"{MIN_SEEDS} seeds on):",
        "",
        "| corpus | recipe | baseline | seeds | mean ratio | std | min-max "
        "| 95 % CI of the mean | verdict |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        key = (row["corpus"], row["recipe"], row["baseline"])
        groups.setdefault(key, []).append(row["ratio"])
    for (corpus, recipe, baseline), ratios in groups.items():
        spread = seed_spread(ratios)
        interval = "-" if math.isnan(spread.low) else f"[{spread.low:.3f}, {spread.high:.3f}]"
        words = (
            "fewer than 3 seeds"
            if math.isnan(spread.low)
            else verdict(spread.mean, spread.low, spread.high, b=baseline)
        )
        std = "-" if math.isnan(spread.std) else f"{spread.std:.3f}"
        lines.append(
            f"| {corpus} | {recipe} | {baseline} | {spread.seeds} | {spread.mean:.3f} | {std} | "
            f"{spread.min:.3f}-{spread.max:.3f} | {interval} | {words} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    runs: Mapping[str, PathLike], json_path: PathLike, markdown_path: PathLike, command: str
) -> list[dict]:
    order = list(BASELINE_LEDGER_ROWS)
    rows = sorted(
        (row for name, run in runs.items() for row in run_rows(name, run)),
        key=lambda row: (
            row["corpus"],
            row["recipe"],
            order.index(row["baseline"]),
            row["seed"],
        ),
    )
    write_text_atomically(json.dumps(rows, indent=2) + "\n", json_path)
    from smalltalk.provenance import stamp

    write_text_atomically(markdown(rows, command, stamp(runs.values())), markdown_path)
    return rows
