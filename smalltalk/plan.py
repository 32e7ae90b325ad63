"""What one training job of the workflow is: the model, the training settings and the sequences
of a role (router, expert, dense baseline) and its index, from the run's config.

The roles differ in four ways, all decided here:
- seeds: EM router e in round r uses seed + 1000 r + e, expert e seed + 100,000 + e, the dense
  baseline seed + 100,000 (a grown router's own offset is `grow.grown_router_plan`'s);
- data: a router trains on the sequences the last assignment gave it, and only on the first M
  tokens of each (the M - 1 predictions it is scored on, Eq. 9) unless `routing.train_on` says
  otherwise; experts and the dense baseline read their whole token files;
- schedule: routers warm up in their first EM round only and then keep going from their
  previous weights (`config.train_config`);
- budget: the dense baseline sees as many tokens as all E experts together (§3.1), through E
  times the batch or E times the steps (`training.dense_scale`); the baselines of
  `training.baselines` get the mixture's whole training FLOPs, routers included, at the dense
  batch (`baseline_models`, `ledger.baseline_budget`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smalltalk.config import (
    ROLES,
    ModelConfig,
    TrainConfig,
    model_config,
    router_train_prefix_len,
    train_config,
)
from smalltalk.em import assigned_seq_ids
from smalltalk.flops import training_flops
from smalltalk.grow import grown_router_plan

ROUTER_SEED_STRIDE = 1000  # router e of round r: seed + 1000 r + e
MODEL_SEED_OFFSET = 100_000  # expert e: seed + 100,000 + e; the dense baseline: + 100,000


@dataclass(frozen=True)
class JobPlan:
    """One training job: what `train.fit` receives besides its files."""

    model: ModelConfig
    training: TrainConfig
    seq_ids: np.ndarray | None = None  # the rows of the token files to train on (None: all)
    prefix_len: int | None = None  # tokens of each row to learn (None: all)


def plan_job(
    config: dict,
    role: str,
    index: int | None,
    *,
    vocab_size: int,
    em_round: int | None = None,
    assignment: str | os.PathLike | None = None,
    em_summary: str | os.PathLike | None = None,
    data: Sequence[str | os.PathLike] = (),
    steps: int | None = None,
    threads: int | None = None,
    baseline: str | None = None,
    budget: str | os.PathLike | None = None,
) -> JobPlan:
    """The plan of training job `role` `index`: an EM router (`em_round` and the `assignment`
    it trains on), a grown router (`em_summary` of the EM it joins, its corpus's `data`), an
    expert or the dense baseline (`steps` overrides `training.expert.steps`), or with `baseline`
    a dense baseline of `training.baselines` on the mixture's whole budget (its `budget` file,
    `ledger.baseline_budget`)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if baseline is not None:
        return _baseline_plan(config, baseline, budget, vocab_size=vocab_size, threads=threads)
    model = model_config(config, "router" if role == "router" else "expert", vocab_size=vocab_size)
    seq_ids, prefix_len, first_round = None, None, True
    if role == "router" and em_summary is not None:
        grown = grown_router_plan(config, index, em_summary, data, steps)
        steps, seed_offset = grown.steps, grown.seed_offset
        seq_ids, prefix_len = grown.seq_ids, grown.prefix_len
    elif role == "router":
        if assignment is None or em_round is None:
            raise ValueError("a router needs its EM round and assignment (or an EM summary)")
        routing = config["routing"]
        seq_ids = assigned_seq_ids(assignment, index)
        if len(seq_ids) == 0:
            raise ValueError(f"{assignment} assigns no sequence to router {index}")
        prefix_len = router_train_prefix_len(config)
        steps = routing["steps_per_round"]
        first_round = em_round <= 1
        seed_offset = ROUTER_SEED_STRIDE * em_round + index
    else:
        steps = steps or config["training"]["expert"].get("steps")
        if steps is None:
            raise ValueError("training.expert.steps is not set")
        seed_offset = MODEL_SEED_OFFSET + (index or 0)
    training = train_config(
        config, role, steps=steps, seed_offset=seed_offset, first_round=first_round, threads=threads
    )
    if role == "dense":
        # Equal training FLOPs (§3.1): as many tokens as all E experts together.
        n_experts = config["routing"]["n_experts"]
        if config["training"]["dense_scale"] == "batch":
            training = dataclasses.replace(training, batch_size=training.batch_size * n_experts)
        else:
            training = dataclasses.replace(training, steps=training.steps * n_experts)
    return JobPlan(model=model, training=training, seq_ids=seq_ids, prefix_len=prefix_len)


BASELINES = ("dense_compute", "dense_large")
"""The dense baselines given the mixture's whole training budget (`training.baselines`)."""


def baseline_models(config: dict, *, vocab_size: int) -> dict[str, tuple[ModelConfig, int]]:
    """Each configured baseline's model and batch: the experts' architecture (dense_compute) or
    `models.dense_large`, at the equal-token dense baseline's batch."""
    dense = plan_job(config, "dense", None, vocab_size=vocab_size)
    roles = {"dense_compute": "expert", "dense_large": "dense_large"}
    return {
        name: (model_config(config, roles[name], vocab_size=vocab_size), dense.training.batch_size)
        for name in config["training"]["baselines"]
    }


def planned_training_flops(config: dict, *, vocab_size: int) -> tuple[int, int]:
    """(the E experts', the equal-token dense baseline's) training FLOPs as configured (Eq. 15,
    Eq. 10): equal by design, whatever `training.dense_scale` says."""
    expert = plan_job(config, "expert", 0, vocab_size=vocab_size)
    dense = plan_job(config, "dense", None, vocab_size=vocab_size)
    seq_len = expert.model.seq_len
    n_experts = config["routing"]["n_experts"]
    return (
        n_experts
        * training_flops(expert.model, expert.training.steps, expert.training.batch_size, seq_len),
        training_flops(dense.model, dense.training.steps, dense.training.batch_size, seq_len),
    )


def _baseline_plan(
    config: dict,
    baseline: str,
    budget: str | os.PathLike | None,
    *,
    vocab_size: int,
    threads: int | None,
) -> JobPlan:
    """A dense baseline on the mixture's budget: from scratch (no trunk: a different schedule),
    the dense baseline's seed and settings, the steps its budget file gives."""
    if baseline not in config["training"]["baselines"]:
        raise ValueError(
            f"baseline {baseline!r} is not in training.baselines {config['training']['baselines']}"
        )
    if budget is None:
        raise ValueError(f"baseline {baseline!r} needs the budget file (baseline-budget)")
    planned = json.loads(Path(budget).read_text())["baselines"].get(baseline)
    if planned is None:
        raise ValueError(f"{budget}: no budget for baseline {baseline!r} (stale file?)")
    model, batch = baseline_models(config, vocab_size=vocab_size)[baseline]
    training = train_config(
        config, "dense", steps=planned["steps"], seed_offset=MODEL_SEED_OFFSET, threads=threads
    )
    training = dataclasses.replace(training, batch_size=batch)
    return JobPlan(model=model, training=training)
