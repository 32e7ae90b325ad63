"""The run's ledgers: the FLOPs it spent (paper App. A.3, Eq. 10-16), next to the paper's Table
3, and the bytes its routers exchanged (App. A.4).

Training FLOPs come from each job's summary (steps x batch x Eq. 10, what the job really ran);
scoring FLOPs from the number of sequences each router scored (Eq. 11 at S = M).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from smalltalk import flops
from smalltalk.config import ModelConfig
from smalltalk.files import write_parquet_atomically


def _summary(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def flops_ledger(
    *,
    router_config: ModelConfig,
    expert_config: ModelConfig,
    router_summaries: Sequence[str | os.PathLike],
    em_score_files: Sequence[str | os.PathLike],
    shard_score_files: Sequence[str | os.PathLike],
    expert_summaries: Sequence[str | os.PathLike],
    dense_summary: str | os.PathLike,
    n_experts: int,
    prefix_len: int,
    out: str | os.PathLike,
    routing_method: str = "smalltalk",
) -> pa.Table:
    """One row per cost of the mixture and of the dense baseline, in FLOPs and as a share of
    the dense model's training; then inference per sequence, with and without routing.

    The baseline routing methods run no LM: their routing FLOPs count as zero (TF-IDF and a
    k-means distance cost a negligible fraction of one LM forward pass)."""
    learned = routing_method == "smalltalk"
    experts = sum(_summary(path)["flops"] for path in expert_summaries)
    dense = _summary(dense_summary)["flops"]
    router_training = sum(_summary(path)["flops"] for path in router_summaries)
    score_one = flops.inference_flops(router_config, prefix_len)  # Eq. 11 at S = M
    em_scored = sum(pq.read_metadata(path).num_rows for path in em_score_files)
    shard_scored = sum(pq.read_metadata(path).num_rows for path in shard_score_files)
    em_scoring = em_scored * score_one  # Eq. 14: every router scores its round's block
    shard_scoring = shard_scored * n_experts * score_one if learned else 0  # Eq. 16
    routers = router_training + em_scoring + shard_scoring
    expert_inference = flops.inference_flops(expert_config, expert_config.seq_len)
    routing = flops.routing_inference_flops(router_config, n_experts, prefix_len) if learned else 0
    routing_name = (
        f"routing: {n_experts} routers x {prefix_len} tokens"
        if learned
        else f"routing: {routing_method} (no LM)"
    )
    rows = [
        ("training", "experts (Eq. 15)", experts),
        ("training", "routers: training (Eq. 13)", router_training),
        ("training", "routers: scoring during EM (Eq. 14)", em_scoring),
        ("training", "routers: scoring for sharding (Eq. 16)", shard_scoring),
        ("training", "mixture total (Eq. 12)", experts + routers),
        ("training", "dense baseline (Eq. 10)", dense),
        ("inference per sequence", "one expert or the dense model (Eq. 11)", expert_inference),
        ("inference per sequence", routing_name, routing),
        ("inference per sequence", "mixture total", expert_inference + routing),
    ]
    table = pa.table(
        {
            "phase": [phase for phase, _, _ in rows],
            "component": [name for _, name, _ in rows],
            "flops": [float(value) for _, _, value in rows],
            "relative_to_dense": [
                float(value) / (dense if phase == "training" else expert_inference)
                for phase, _, value in rows
            ],
        }
    )
    write_parquet_atomically(table, out)
    return table


def paper_table3_table(out: str | os.PathLike) -> pa.Table:
    """The paper's Table 3 cost columns, recomputed from its Tables 1-2 (smalltalk.flops)."""
    table = pa.Table.from_pylist(flops.paper_table3())
    write_parquet_atomically(table, out)
    return table


def communication_ledger(
    *,
    assignment_paths: Sequence[str | os.PathLike],
    shard_score_paths: Sequence[str | os.PathLike],
    n_experts: int,
    out: str | os.PathLike,
) -> pa.Table:
    """Bytes of scores exchanged (2 bytes x sequences x routers) per EM round and for sharding,
    then the paper's App. A.4 settings for comparison."""
    rows = []
    for r, path in enumerate(assignment_paths):
        sequences = pq.read_metadata(path).num_rows
        exchanged = 0 if r == 0 else flops.score_exchange_bytes(sequences, n_experts)
        rows.append(
            _ledger_row("this run", f"EM round {r}", sequences, n_experts, exchanged, "all routers")
        )
    sharded = sum(pq.read_metadata(path).num_rows for path in shard_score_paths)
    shard_bytes = flops.score_exchange_bytes(sharded, n_experts)
    rows.append(_ledger_row("this run", "sharding", sharded, n_experts, shard_bytes, "all routers"))
    em_total = sum(row["bytes"] for row in rows if row["stage"].startswith("EM"))
    rows.append(_ledger_row("this run", "EM total", None, n_experts, em_total, "all routers"))
    rows.append(
        _ledger_row("this run", "total", None, n_experts, em_total + shard_bytes, "all routers")
    )
    # App. A.4: 4.4M routers, 128k steps at batch 32 and S = 1024, an exchange every 45M tokens.
    paper_rounds = flops.router_communication_rounds(
        flops.PAPER_ROUTER_STEPS, flops.PAPER_ROUTER_BATCH, 1024, 45_000_000
    )
    for experts in (4, 8, 16, 32):
        per_exchange = flops.router_bytes_per_exchange(45_000_000, experts, 1024)
        rows.append(
            _ledger_row(
                "paper App. A.4",
                f"EM, E={experts}: {paper_rounds} exchanges",
                math.ceil(45_000_000 / 1024) * paper_rounds,
                experts,
                per_exchange * paper_rounds,
                f"per router; {per_exchange / 1e6:.3f} MB per exchange",
            )
        )
    table = pa.Table.from_pylist(rows)
    write_parquet_atomically(table, out)
    return table


def _ledger_row(
    scope: str, stage: str, sequences, routers: int, exchanged: float, note: str
) -> dict:
    return {
        "scope": scope,
        "stage": stage,
        "sequences": sequences,
        "routers": routers,
        "bytes": float(exchanged),
        "megabytes": float(exchanged) / 1e6,
        "note": note,
    }
