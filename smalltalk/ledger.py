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
from smalltalk.files import write_parquet_atomically, write_text_atomically


def _summary(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def routing_flops(
    *,
    router_config: ModelConfig,
    router_summaries: Sequence[str | os.PathLike],
    em_score_files: Sequence[str | os.PathLike],
    shard_score_files: Sequence[str | os.PathLike],
    n_experts: int,
    prefix_len: int,
    routing_method: str = "smalltalk",
) -> dict[str, int | float]:
    """What the routers add to the experts' training (Eq. 13, 14 and 16), from what the run
    really did: the routers' job summaries and the number of sequences each scoring pass read."""
    learned = routing_method == "smalltalk"
    score_one = flops.inference_flops(router_config, prefix_len)  # Eq. 11 at S = M
    em_scored = sum(pq.read_metadata(path).num_rows for path in em_score_files)
    shard_scored = sum(pq.read_metadata(path).num_rows for path in shard_score_files)
    return {
        "routers: training (Eq. 13)": sum(_summary(path)["flops"] for path in router_summaries),
        # Eq. 14: every router scores its round's block.
        "routers: scoring during EM (Eq. 14)": em_scored * score_one,
        "routers: scoring for sharding (Eq. 16)": (
            shard_scored * n_experts * score_one if learned else 0
        ),
    }


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
    baseline_summaries: dict[str, str | os.PathLike] | None = None,
    baseline_configs: dict[str, ModelConfig] | None = None,
) -> pa.Table:
    """One row per cost of the mixture and of the dense baselines, in FLOPs and as a share of
    the equal-token dense model's training; then inference per sequence, with and without
    routing, and of every dense baseline of another size.

    The baseline routing methods run no LM: their routing FLOPs count as zero (TF-IDF and a
    k-means distance cost a negligible fraction of one LM forward pass)."""
    learned = routing_method == "smalltalk"
    experts = sum(_summary(path)["flops"] for path in expert_summaries)
    dense = _summary(dense_summary)["flops"]
    routing_costs = routing_flops(
        router_config=router_config,
        router_summaries=router_summaries,
        em_score_files=em_score_files,
        shard_score_files=shard_score_files,
        n_experts=n_experts,
        prefix_len=prefix_len,
        routing_method=routing_method,
    )
    routers = sum(routing_costs.values())
    expert_inference = flops.inference_flops(expert_config, expert_config.seq_len)
    routing = flops.routing_inference_flops(router_config, n_experts, prefix_len) if learned else 0
    routing_name = (
        f"routing: {n_experts} routers x {prefix_len} tokens"
        if learned
        else f"routing: {routing_method} (no LM)"
    )
    baseline_summaries = baseline_summaries or {}
    baseline_configs = baseline_configs or {}
    rows = [
        ("training", "experts (Eq. 15)", experts),
        *(("training", name, value) for name, value in routing_costs.items()),
        ("training", "mixture total (Eq. 12)", experts + routers),
        ("training", "dense baseline (Eq. 10)", dense),
        *(
            ("training", BASELINE_LEDGER_NAMES[name], _summary(path)["flops"])
            for name, path in baseline_summaries.items()
        ),
        ("inference per sequence", "one expert or the dense model (Eq. 11)", expert_inference),
        ("inference per sequence", routing_name, routing),
        ("inference per sequence", "mixture total", expert_inference + routing),
        *(
            (
                "inference per sequence",
                BASELINE_LEDGER_NAMES[name],
                flops.inference_flops(model, model.seq_len),
            )
            for name, model in baseline_configs.items()
        ),
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


BASELINE_LEDGER_NAMES = {
    "dense_compute": "dense, compute-matched (Eq. 10)",
    "dense_large": "dense, larger (Eq. 10)",
}
"""The ledger's row of each dense baseline trained on the mixture's whole budget."""


def baseline_budget(
    *,
    expert_config: ModelConfig,
    planned_experts: float,
    planned_dense: float,
    routing_costs: dict[str, int | float],
    baselines: dict[str, tuple[ModelConfig, int]],
    out: str | os.PathLike,
) -> dict:
    """The steps of each dense baseline that gets the mixture's whole training budget: the
    experts' planned FLOPs (Eq. 15) plus what the routers spent (Eq. 13, 14, 16), divided by one
    step of that model at its batch (`baselines`: name -> (model, batch)), rounded up so the
    baseline never gets less than the mixture spent. Written as JSON for the training jobs."""
    mixture = planned_experts + sum(routing_costs.values())
    budget = {
        "mixture_flops": float(mixture),
        "experts_flops": float(planned_experts),
        "dense_flops": float(planned_dense),
        "routing_flops": {name: float(value) for name, value in routing_costs.items()},
        "baselines": {},
    }
    for name, (model, batch) in baselines.items():
        step = flops.train_step_flops(model, batch, model.seq_len)
        steps = math.ceil(mixture / step)
        budget["baselines"][name] = {
            "steps": steps,
            "batch_size": batch,
            "flops": float(steps * step),
            "flops_per_token_vs_expert": flops.forward_flops(model, 1, model.seq_len)
            / flops.forward_flops(expert_config, 1, expert_config.seq_len),
        }
    write_text_atomically(json.dumps(budget, indent=2) + "\n", out)
    return budget


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
