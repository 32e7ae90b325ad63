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
