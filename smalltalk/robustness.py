"""The robustness benchmark's table: one row per (corpus, seed, recipe) run, and its summary.

Runs are named `CORPUS/RECIPE@SEED` (benchmarks/robustness/Snakefile). Each row holds the test
mixture/dense perplexity ratio at M̂ = M with its paired-bootstrap 95 % interval (the `overall`
aggregate), the final NMI of the segments against the source labels on the EM probe, and the
run's compute time: the sum of its jobs' wall seconds (Snakemake's benchmark files), which is the
run's wall time on one core; runs share the cores, so their own wall times are not separable.
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
from smalltalk.stats import MIN_SEEDS, seed_spread, verdict

PathLike = str | os.PathLike
FIELDS = ("corpus", "seed", "recipe", "E", "ratio", "ci_low", "ci_high", "nmi", "wall_s")


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


def run_row(name: str, run: PathLike) -> dict:
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
    return {
        "corpus": corpus,
        "seed": seed,
        "recipe": recipe,
        "E": config["routing"]["n_experts"],
        "ratio": overall[0]["ratio"],
        "ci_low": overall[0]["ratio_ci_low"],
        "ci_high": overall[0]["ratio_ci_high"],
        "nmi": _final_nmi(run),
        "wall_s": round(_job_seconds(run), 1),
    }


def markdown(rows: list[dict], command: str) -> str:
    """Every run, then each (corpus, recipe)'s spread over its seeds, with verdicts in words."""
    lines = [
        "# Robustness benchmark",
        "",
        f"Reproduce: `{command}`",
        "",
        "Test perplexity of the mixture over the dense baseline at equal training FLOPs, tokens "
        "after the routing prefix, routed by M̂ = M tokens; 95 % paired-bootstrap interval over "
        "test sequences. NMI: segments against source labels on the EM validation probe. "
        "Compute: the run's jobs' seconds added up (its wall time on one core).",
        "",
        "| corpus | recipe | seed | E | mixture / dense [95 % CI] | verdict | NMI | compute (s) |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for row in rows:
        nmi = "-" if row["nmi"] is None else f"{row['nmi']:.3f}"
        lines.append(
            f"| {row['corpus']} | {row['recipe']} | {row['seed']} | {row['E']} | "
            f"{row['ratio']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] | "
            f"{verdict(row['ratio'], row['ci_low'], row['ci_high'])} | {nmi} | "
            f"{row['wall_s']:,.0f} |"
        )
    lines += [
        "",
        "Over seeds (mean, sample std, min-max; Student t 95 % interval of the mean, given from "
        f"{MIN_SEEDS} seeds on):",
        "",
        "| corpus | recipe | seeds | mean ratio | std | min-max | 95 % CI of the mean | verdict |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["corpus"], row["recipe"]), []).append(row["ratio"])
    for (corpus, recipe), ratios in groups.items():
        spread = seed_spread(ratios)
        interval = "-" if math.isnan(spread.low) else f"[{spread.low:.3f}, {spread.high:.3f}]"
        words = (
            "fewer than 3 seeds"
            if math.isnan(spread.low)
            else verdict(spread.mean, spread.low, spread.high)
        )
        std = "-" if math.isnan(spread.std) else f"{spread.std:.3f}"
        lines.append(
            f"| {corpus} | {recipe} | {spread.seeds} | {spread.mean:.3f} | {std} | "
            f"{spread.min:.3f}-{spread.max:.3f} | {interval} | {words} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    runs: Mapping[str, PathLike], json_path: PathLike, markdown_path: PathLike, command: str
) -> list[dict]:
    rows = sorted(
        (run_row(name, run) for name, run in runs.items()),
        key=lambda row: (row["corpus"], row["recipe"], row["seed"]),
    )
    write_text_atomically(json.dumps(rows, indent=2) + "\n", json_path)
    write_text_atomically(markdown(rows, command), markdown_path)
    return rows
