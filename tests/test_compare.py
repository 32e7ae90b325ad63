"""`smalltalk compare`: ratios to dense with their intervals and verdicts, runs grouped by seed."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from test_plots import metrics, write

from smalltalk import compare
from smalltalk.cli import main
from smalltalk.stats import verdict

E = 2
M = 32


def make_run(root, ratio, low, high, *, topk=(0.95, 0.93, 0.97), compute=None):
    """A finished run's files as `compare_runs` reads them, at M-hat = 16 and M = 32;
    `compute` (ratio, low, high) adds a compute-matched dense baseline."""
    config = {
        "routing": {"method": "smalltalk", "n_experts": E, "prefix_len": M},
        "models": {"router": {"preset": "demo-router", "n_embd": 32, "n_layer": 2}},
        "training": {},
    }
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for prefix_len, shift in [(16, 0.01), (M, 0.0)]:
        r, lo, hi = ratio + shift, low + shift, high + shift
        rows.append(
            {
                "prefix_len": prefix_len,
                "ppl_mixture": 20.0 * r,
                "ppl_dense": 20.0,
                "ppl_oracle": 18.0,
                "ppl_topk": 20.0 * topk[0],
                "relative_gain": 1 - r,
                "ratio": r,
                "ratio_ci_low": lo,
                "ratio_ci_high": hi,
                "verdict": verdict(r, lo, hi),
                "ratio_topk": topk[0],
                "ratio_topk_ci_low": topk[1],
                "ratio_topk_ci_high": topk[2],
                "verdict_topk": "top-k better",
            }
        )
        if compute:
            c, c_low, c_high = (value + shift for value in compute)
            rows[-1] |= {
                "ppl_dense_compute": 20.0 * r / c,
                "ratio_dense_compute": c,
                "ratio_dense_compute_ci_low": c_low,
                "ratio_dense_compute_ci_high": c_high,
                "verdict_dense_compute": verdict(c, c_low, c_high, b="compute-matched dense"),
            }
    write(root / "eval/summary/overall.parquet", rows)
    ledger = {
        "phase": ["training", "training", "inference per sequence"],
        "component": ["mixture total (Eq. 12)", "dense baseline (Eq. 10)", "mixture total"],
        "flops": [1.1e15, 1.0e15, 1e9],
    }
    if compute:
        ledger["phase"].append("training")
        ledger["component"].append("dense, compute-matched (Eq. 10)")
        ledger["flops"].append(1.1e15)
    write(root / "ledger/flops.parquet", ledger)
    for e in range(E):
        metrics(
            root / f"experts/e{e}/metrics.parquet", scale=1.0, floor=3.0, batch_flops=1e9, val=True
        )
    metrics(root / "dense/metrics.parquet", scale=1.1, floor=3.1, batch_flops=1e9, val=True)
    return root


@pytest.fixture
def runs(tmp_path):
    return {
        "tfidf": make_run(tmp_path / "tfidf", 1.01, 0.99, 1.03),
        "smalltalk@1": make_run(tmp_path / "s1", 0.96, 0.95, 0.97),
        "smalltalk@2": make_run(tmp_path / "s2", 0.98, 0.97, 0.99),
        "smalltalk@3": make_run(tmp_path / "s3", 1.00, 0.99, 1.01),
    }


def test_each_run_carries_its_ratio_interval_and_verdict(runs, tmp_path):
    table = compare.compare_runs(runs, tmp_path / "comparison.parquet")
    at_m = {row["run"]: row for row in table.to_pylist() if row["prefix_len"] == M}
    assert at_m["tfidf"]["group"] == "tfidf"
    assert at_m["smalltalk@2"]["group"] == "smalltalk"
    row = at_m["smalltalk@1"]
    assert (row["ratio"], row["ratio_ci_low"], row["ratio_ci_high"]) == (0.96, 0.95, 0.97)
    assert (row["ratio_topk"], row["verdict_topk"]) == (0.95, "top-k better")


def test_seeds_of_a_recipe_give_mean_spread_and_a_verdict(runs, tmp_path):
    table = compare.compare_runs(runs, tmp_path / "comparison.parquet")
    seeds = {row["prefix_len"]: row for row in compare.seed_summary(table).to_pylist()}
    assert set(seeds) == {16, M}  # the ungrouped tfidf run has no row
    row = seeds[M]
    assert (row["group"], row["seeds"]) == ("smalltalk", 3)
    assert row["ratio_mean"] == pytest.approx(0.98)
    assert row["ratio_std"] == pytest.approx(0.02)
    assert (row["ratio_min"], row["ratio_max"]) == (0.96, 1.0)
    assert row["ratio_ci_low"] < 1 < row["ratio_ci_high"]  # seeds disagree: 0.96 to 1.00
    assert row["verdict"] == "no difference (CI contains 1)"


def test_two_seeds_give_spread_but_no_verdict(runs, tmp_path):
    del runs["smalltalk@3"]
    table = compare.compare_runs(runs, tmp_path / "comparison.parquet")
    (row, _) = compare.seed_summary(table).to_pylist()
    assert row["seeds"] == 2 and math.isnan(row["ratio_ci_low"])
    assert row["verdict"] == "fewer than 3 seeds"


def test_markdown_shows_intervals_verdicts_and_seeds(runs, tmp_path):
    table = compare.compare_runs(runs, tmp_path / "comparison.parquet")
    text = compare.markdown(table, tmp_path / "comparison.md").read_text()
    lines = text.splitlines()
    tfidf = next(line for line in lines if line.startswith("| tfidf "))
    assert "| 1.010 [0.990, 1.030] | no difference (CI contains 1) |" in tfidf
    assert "| 0.950 [0.930, 0.970] |" in tfidf  # top-k
    (seeds,) = [line for line in lines if line.startswith("| smalltalk |")]
    assert "| 3 | 0.980 | 0.020 | 0.960-1.000 |" in seeds
    assert seeds.endswith("| no difference (CI contains 1) |")


def test_ratios_to_the_compute_matched_dense_are_carried_and_summed_over_seeds(tmp_path):
    runs = {
        f"smalltalk@{seed}": make_run(
            tmp_path / str(seed), 0.9, 0.89, 0.91, compute=(0.93 + seed / 100, 0.92, 0.99)
        )
        for seed in (1, 2, 3)
    }
    runs["tfidf"] = make_run(tmp_path / "tfidf", 1.01, 0.99, 1.03)  # no such baseline: "-"
    table = compare.compare_runs(runs, tmp_path / "comparison.parquet")
    at_m = {row["run"]: row for row in table.to_pylist() if row["prefix_len"] == M}
    assert at_m["smalltalk@2"]["ratio_dense_compute"] == pytest.approx(0.95)
    assert at_m["smalltalk@2"]["dense_compute_train_flops"] == 1.1e15
    assert at_m["tfidf"]["ratio_dense_compute"] is None
    (summary,) = [
        row
        for row in compare.seed_summary(table, "dense_compute").to_pylist()
        if row["prefix_len"] == M
    ]
    assert summary["ratio_mean"] == pytest.approx(0.95) and summary["seeds"] == 3
    assert summary["verdict"] == "mixture better"
    text = compare.markdown(table, tmp_path / "comparison.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| smalltalk@1 "))
    assert "| 0.940 [0.920, 0.990] | mixture better | - | - |" in row
    tfidf = next(line for line in text.splitlines() if line.startswith("| tfidf "))
    assert tfidf.endswith("| - | - | - | - |")
    assert "mixture/compute-matched dense perplexity ratio at M̂ = M:" in text


def test_markdown_without_seed_groups_is_one_table(runs, tmp_path):
    table = compare.compare_runs({"tfidf": runs["tfidf"]}, tmp_path / "comparison.parquet")
    text = compare.markdown(table, tmp_path / "comparison.md").read_text()
    assert text.count("\n") == 3 and "seeds" not in text


def test_runs_aggregated_before_the_intervals_are_refused(runs, tmp_path):
    overall = runs["tfidf"] / "eval/summary/overall.parquet"
    pq.write_table(pq.read_table(overall).drop_columns(["ratio_ci_low"]), overall)
    with pytest.raises(ValueError, match="ratio_ci_low.*forcerun aggregate_eval"):
        compare.compare_runs(runs, tmp_path / "comparison.parquet")


def test_cli_writes_the_seed_table_and_draws_error_bars(runs, tmp_path):
    args = [f"--run={name}={path}" for name, path in runs.items()]
    out = {name: tmp_path / f"comparison.{name}" for name in ("parquet", "png", "html")}
    seeds = tmp_path / "seeds.parquet"
    main(
        ["compare", *args, "--out", str(out["parquet"]), "--seeds", str(seeds)]
        + ["--figure", str(out["png"]), "--html", str(out["html"])]
    )
    assert pq.read_table(seeds).column("group").to_pylist() == ["smalltalk", "smalltalk"]
    assert "over seeds" in out["html"].read_text()
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    assert np.isfinite(pq.read_table(out["parquet"]).column("ratio_ci_low").to_numpy()).all()


def test_validation_split_is_compared_from_its_own_summary_and_labelled(runs, tmp_path):
    import shutil

    run = runs["smalltalk@1"]
    (run / "eval/val").mkdir(parents=True)
    shutil.copytree(run / "eval/summary", run / "eval/val/summary")
    val = pq.read_table(run / "eval/val/summary/overall.parquet").to_pylist()
    for row in val:
        row["ratio"] = 0.9
    write(run / "eval/val/summary/overall.parquet", val)

    table = compare.compare_runs({"s": run}, tmp_path / "val.parquet", split="val")
    assert set(table.column("split").to_pylist()) == {"val"}
    assert set(table.column("ratio").to_pylist()) == {0.9}
    assert "| val ppl mixture |" in compare.markdown(table, tmp_path / "val.md").read_text()
    with pytest.raises(FileNotFoundError, match="no val evaluation"):
        compare.compare_runs({"t": runs["tfidf"]}, tmp_path / "none.parquet", split="val")


def test_a_stamped_record_names_its_command_commit_processor_and_precision(runs, tmp_path):
    import subprocess

    from smalltalk.provenance import REPO

    out = tmp_path / "record.md"
    args = [f"--run={name}={path}" for name, path in runs.items()]
    main(["compare", *args, "--out", str(tmp_path / "c.parquet"), "--markdown", str(out)])
    assert not out.read_text().startswith("Made by")
    main(
        ["compare", *args, "--out", str(tmp_path / "c.parquet"), "--markdown", str(out), "--stamp"]
    )
    head = out.read_text().splitlines()[:2]
    assert head[0].startswith("Made by `smalltalk ") and "--stamp" in head[0]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert head[1].startswith(f"Commit {commit}") and "; processor " in head[1]
    assert "; precision unknown; " in head[1]  # these runs have no expert summaries
