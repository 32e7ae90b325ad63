"""The robustness benchmark's table, from run directories laid out as the workflow writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from smalltalk.robustness import parse_run_name, write_results


def fake_run(
    folder: Path, *, seed: int, ratio: float, low: float, high: float, nmi=0.4, compute=None
) -> Path:
    """A finished run's files; `compute` (ratio, low, high) adds a compute-matched baseline."""
    (folder / "eval" / "summary").mkdir(parents=True)
    (folder / "ledger").mkdir()
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"seed": seed, "routing": {"prefix_len": 32, "n_experts": 4}})
    )
    rows = [
        {"prefix_len": m, "ratio": r, "ratio_ci_low": lo, "ratio_ci_high": hi}
        for m, r, lo, hi in ((16, 1.2, 1.1, 1.3), (32, ratio, low, high))
    ]
    ledger = [
        {"phase": "training", "component": "mixture total (Eq. 12)", "flops": 105.0},
        {"phase": "training", "component": "dense baseline (Eq. 10)", "flops": 100.0},
    ]
    if compute:
        for row, values in zip(rows, ((1.1, 1.0, 1.2), compute), strict=True):
            row.update(zip(("ratio_dense_compute", "ratio_dense_compute_ci_low",
                            "ratio_dense_compute_ci_high"), values, strict=True))  # fmt: skip
        ledger.append(
            {"phase": "training", "component": "dense, compute-matched (Eq. 10)", "flops": 106.0}
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "eval/summary/overall.parquet")
    pq.write_table(pa.Table.from_pylist(ledger), folder / "ledger/flops.parquet")
    if nmi is not None:
        (folder / "routers").mkdir()
        diagnostics = {"round": [0, 1, 2], "probe_nmi_source": [0.0, 0.2, nmi]}
        pq.write_table(pa.table(diagnostics), folder / "routers/diagnostics.parquet")
    for job, seconds in (("tokenize/c00000", 2.5), ("experts/e0", 10.0)):
        path = folder / "benchmarks" / f"{job}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\n{seconds}\t0:00:{seconds}\n")
    return folder


def test_rows_take_the_ratio_at_the_routing_prefix_the_final_nmi_and_the_summed_job_time(
    tmp_path: Path,
):
    runs = {
        f"demo/default@{seed}": fake_run(
            tmp_path / str(seed), seed=seed, ratio=0.95 + i / 100, low=0.94, high=0.99 + i / 100
        )
        for i, seed in enumerate((1234, 1, 2))
    }
    runs["docs/default@1"] = fake_run(
        tmp_path / "d", seed=1, ratio=1.05, low=1.01, high=1.09, nmi=None, compute=(0.9, 0.8, 1.0)
    )
    rows = write_results(runs, tmp_path / "r.json", tmp_path / "r.md", "make it")
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    demo = [row for row in rows if row["corpus"] == "demo"]
    assert [row["seed"] for row in demo] == [1, 2, 1234]
    assert demo[-1] == {
        "corpus": "demo", "seed": 1234, "recipe": "default", "E": 4, "baseline": "dense",
        "ratio": 0.95, "ci_low": 0.94, "ci_high": 0.99, "flops_ratio": 1.05, "nmi": 0.4,
        "wall_s": 12.5,
    }  # fmt: skip
    docs = [(row["baseline"], row["ratio"], row["flops_ratio"]) for row in rows[3:]]
    assert docs == [("dense", 1.05, 1.05), ("dense_compute", 0.9, 105 / 106)]
    text = (tmp_path / "r.md").read_text()
    assert "`make it`" in text and "; processor " in text
    assert (
        "| docs | default | 1 | 4 | dense | 1.050 [1.010, 1.090] | dense better | 1.050 | - |"
        in (text)
    )
    assert "| docs | default | 1 | 4 | dense_compute | 0.900 [0.800, 1.000] | no difference" in text
    assert "| demo | default | dense | 3 | 0.960 |" in text
    assert "| docs | default | dense_compute | 1 |" in text
    assert "fewer than 3 seeds" in text  # docs has one seed: no interval, no verdict


def test_a_run_whose_seed_or_name_does_not_match_is_refused(tmp_path: Path):
    run = fake_run(tmp_path / "a", seed=7, ratio=1.0, low=0.9, high=1.1)
    with pytest.raises(ValueError, match="has seed 7, not 8"):
        write_results({"demo/default@8": run}, tmp_path / "r.json", tmp_path / "r.md", "x")
    with pytest.raises(ValueError, match="CORPUS/RECIPE@SEED"):
        parse_run_name("demo-default@7")
