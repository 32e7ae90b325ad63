"""What each role's training job is: seeds, data, schedule and budget (smalltalk.plan)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from smalltalk.config import read_config, validate_config
from smalltalk.plan import MODEL_SEED_OFFSET, ROUTER_SEED_STRIDE, plan_job

V = 1024


def demo_config(**training) -> dict:
    config = read_config(REPO / "config.yaml")
    config["training"] = config["training"] | training
    return validate_config(config)


@pytest.fixture
def assignment(tmp_path):
    path = tmp_path / "assignment.parquet"
    seq_ids = np.arange(100, 112, dtype=np.int64)
    experts = np.array([0, 1, 2, 3] * 3, dtype=np.int16)
    pq.write_table(pa.table({"seq_id": seq_ids, "expert": experts}), path)
    return path


def test_em_routers_train_on_their_assignment_prefixes_with_their_own_seeds(assignment):
    config = demo_config()
    routing = config["routing"]
    first = plan_job(config, "router", 2, vocab_size=V, em_round=1, assignment=assignment)
    later = plan_job(config, "router", 2, vocab_size=V, em_round=3, assignment=assignment)
    assert first.seq_ids.tolist() == [102, 106, 110]
    assert first.prefix_len == routing["prefix_len"] - 1  # M - 1 predictions (Eq. 9)
    assert first.training.steps == later.training.steps == routing["steps_per_round"]
    assert first.training.seed == config["seed"] + ROUTER_SEED_STRIDE + 2
    assert later.training.seed == config["seed"] + 3 * ROUTER_SEED_STRIDE + 2
    warmup = config["training"]["router"]["warmup_steps"]
    assert first.training.warmup_steps == warmup and later.training.warmup_steps == 0
    assert first.training.schedule == config["training"]["router"].get("schedule", "auto")
    assert first.model.n_embd == later.model.n_embd and first.model.vocab_size == V


def test_a_router_without_sequences_or_round_is_refused(assignment, tmp_path):
    config = demo_config()
    with pytest.raises(ValueError, match="assigns no sequence"):
        plan_job(config, "router", 7, vocab_size=V, em_round=1, assignment=assignment)
    with pytest.raises(ValueError, match="EM round"):
        plan_job(config, "router", 0, vocab_size=V, assignment=assignment)
    with pytest.raises(ValueError, match="role"):
        plan_job(config, "teacher", 0, vocab_size=V)


@pytest.mark.parametrize("dense_scale", ["batch", "steps"])
def test_the_dense_baseline_sees_as_many_tokens_as_all_experts(dense_scale):
    config = demo_config(dense_scale=dense_scale, branch_steps=0)
    expert = plan_job(config, "expert", 3, vocab_size=V)
    dense = plan_job(config, "dense", None, vocab_size=V)
    n_experts = config["routing"]["n_experts"]
    assert expert.seq_ids is None and expert.prefix_len is None
    assert dense.model == expert.model
    expert_tokens = expert.training.steps * expert.training.batch_size
    assert dense.training.steps * dense.training.batch_size == n_experts * expert_tokens
    assert expert.training.seed == config["seed"] + MODEL_SEED_OFFSET + 3
    assert dense.training.seed == config["seed"] + MODEL_SEED_OFFSET
    assert expert.training.warmup_steps == config["training"]["expert"]["warmup_steps"]


def test_steps_given_to_the_job_override_the_config():
    config = demo_config()
    assert plan_job(config, "expert", 0, vocab_size=V, steps=700).training.steps == 700
    del config["training"]["expert"]["steps"]
    with pytest.raises(ValueError, match="training.expert.steps"):
        plan_job(config, "expert", 0, vocab_size=V)


def test_baselines_get_the_mixtures_whole_budget_at_the_dense_batch(tmp_path):
    """The budget's steps, rounded up, give each baseline at least the mixture's training FLOPs
    and less than one step more; the larger one is the expert at twice its width by default."""
    from smalltalk.flops import train_step_flops, training_flops
    from smalltalk.ledger import baseline_budget
    from smalltalk.plan import baseline_models, planned_training_flops

    config = demo_config()
    experts, dense = planned_training_flops(config, vocab_size=V)
    assert experts == dense  # equal training FLOPs by design (§3.1)
    models = baseline_models(config, vocab_size=V)
    assert set(models) == {"dense_compute", "dense_large"}
    expert = plan_job(config, "expert", 0, vocab_size=V).model
    assert models["dense_compute"][0] == expert
    assert models["dense_large"][0].n_embd == 2 * expert.n_embd
    routing = {"routers: training (Eq. 13)": 0.02 * dense, "routers: scoring": 0.03 * dense}
    budget = baseline_budget(
        expert_config=expert,
        planned_experts=experts,
        planned_dense=dense,
        routing_costs=routing,
        baselines=models,
        out=tmp_path / "budget.json",
    )
    mixture = budget["mixture_flops"]
    assert mixture == pytest.approx(1.05 * dense)
    for name, (model, batch) in models.items():
        plan = plan_job(
            config, "dense", None, vocab_size=V, baseline=name, budget=tmp_path / "budget.json"
        )
        assert plan.model == model and plan.training.batch_size == batch
        assert plan.training.seed == config["seed"] + MODEL_SEED_OFFSET
        spent = training_flops(model, plan.training.steps, batch, model.seq_len)
        assert mixture <= spent < mixture + train_step_flops(model, batch, model.seq_len)
    compute = plan_job(
        config,
        "dense",
        None,
        vocab_size=V,
        baseline="dense_compute",
        budget=tmp_path / "budget.json",
    )
    equal = plan_job(config, "dense", None, vocab_size=V)
    assert compute.training.steps == -(-equal.training.steps * 105 // 100)  # 5 % more tokens


def test_a_baseline_not_configured_or_without_its_budget_is_refused(tmp_path):
    config = demo_config(baselines=["dense_compute"])
    with pytest.raises(ValueError, match="not in training.baselines"):
        plan_job(config, "dense", None, vocab_size=V, baseline="dense_large", budget="x")
    with pytest.raises(ValueError, match="needs the budget file"):
        plan_job(config, "dense", None, vocab_size=V, baseline="dense_compute")
    (tmp_path / "b.json").write_text('{"baselines": {}}')
    with pytest.raises(ValueError, match="no budget for baseline 'dense_compute'"):
        plan_job(
            config,
            "dense",
            None,
            vocab_size=V,
            baseline="dense_compute",
            budget=tmp_path / "b.json",
        )
