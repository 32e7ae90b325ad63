"""Growing a mixture: chunk names and seq_ids of grown corpora, the config's `grow` entries, and
the table of the mixture after growing against before (numbers recomputed with numpy)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smalltalk.config import ConfigError, validate_config
from smalltalk.data import GROWN_CHUNKS, parse_chunk_name, plan_chunks, plan_grown_chunks
from smalltalk.evaluate import EVAL_SCHEMA
from smalltalk.files import write_parquet_atomically
from smalltalk.grow import ALL, RUN_CORPUS, grow_summary
from smalltalk.stats import bootstrap_ratio

E = 3  # the run's experts; grow entries k get experts E + k
M = 8


# ---- chunks of grown corpora -------------------------------------------------------------------


def test_grown_chunks_are_named_and_numbered_apart_from_the_runs_own(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (tmp_path / name).write_text("{}\n")
    own = plan_chunks([str(tmp_path / "*.jsonl")], 2)
    grown = plan_grown_chunks(1, [str(tmp_path / "*.jsonl")], 2)
    assert [c.name for c in own] == ["c00000", "c00001"]
    assert [c.name for c in grown] == ["g1c00000", "g1c00001"]
    assert [c.files for c in grown] == [c.files for c in own]
    assert [c.index for c in grown] == [2 * GROWN_CHUNKS, 2 * GROWN_CHUNKS + 1]
    for chunk in own + grown:
        assert parse_chunk_name(chunk.name)[1] == chunk.index
    assert parse_chunk_name("g1c00001") == (1, 2 * GROWN_CHUNKS + 1)
    assert parse_chunk_name("c00007") == (None, 7)


@given(st.integers(0, 100), st.integers(0, GROWN_CHUNKS - 1))
def test_a_grown_chunks_seq_ids_never_meet_another_corpus(entry, index):
    chunk = (entry + 1) * GROWN_CHUNKS + index
    assert parse_chunk_name(f"g{entry}c{index:05d}") == (entry, chunk)
    # seq_id = chunk << 32 | ...: the corpus is read back from the upper bits.
    seq_id = (chunk << 32) | 12345
    assert (seq_id >> 32) // GROWN_CHUNKS - 1 == entry
    assert seq_id < 2**63


@pytest.mark.parametrize("name", ["x00001", "gc00001", "g1", "c", "g-1c00001"])
def test_a_name_that_is_no_chunk_is_refused(name):
    with pytest.raises(ValueError, match="not a chunk name"):
        parse_chunk_name(name)


# ---- the config ------------------------------------------------------------------------------


def base_config(**overrides):
    from conftest import REPO

    from smalltalk.config import read_config

    return read_config(REPO / "config.yaml") | overrides


def test_grow_entries_are_checked_all_at_once():
    entries = [
        {"name": "code", "inputs": ["data/docs/*.jsonl.zst"]},
        {"name": "code", "inputs": ["more/*.jsonl"]},
        {"name": "bad name", "inputs": []},
        {"name": "x", "inputs": ["a"], "weight": 2},
    ]
    with pytest.raises(ConfigError) as error:
        validate_config(base_config(grow=entries))
    message = str(error.value)
    assert "'code' is given more than once" in message
    assert "grow.2.name" in message and "grow.2.inputs" in message
    assert "grow.3" in message and "weight" in message


def test_only_router_lms_can_grow():
    config = base_config(grow=[{"name": "docs", "inputs": ["data/docs/*.jsonl.zst"]}])
    config["routing"] = config["routing"] | {"method": "tfidf_kmeans"}
    with pytest.raises(ConfigError, match="only a mixture routed by router LMs can grow"):
        validate_config(config)
    assert validate_config(base_config())["grow"] == []


# ---- after against before ----------------------------------------------------------------------


def eval_rows(seq_ids, sources, experts, nll, prefix_len=M, n_tokens=10):
    n = len(seq_ids)
    return pa.table(
        {
            "seq_id": np.asarray(seq_ids, np.int64),
            "source": list(sources),
            "prefix_len": np.full(n, prefix_len, np.int32),
            "expert": np.asarray(experts, np.int16),
            "router_nll": [[0.0] * (E + 1)] * n,
            "n_tokens": np.full(n, n_tokens, np.int32),
            "nll_expert": np.asarray(nll, np.float64),
            "nll_dense": np.full(n, 30.0),
            "n_tokens_full": np.full(n, n_tokens, np.int32),
            "nll_expert_full": np.asarray(nll, np.float64),
            "nll_dense_full": np.full(n, 30.0),
            "oracle_expert": np.asarray(experts, np.int16),
            "nll_oracle": np.asarray(nll, np.float64),
            "nll_topk": np.asarray(nll, np.float64),
        },
        schema=EVAL_SCHEMA,
    )


def test_grow_summary_compares_each_corpus_and_source_before_and_after(tmp_path):
    rng = np.random.default_rng(0)
    n_run, n_new = 60, 40
    grown_chunk = 1 * GROWN_CHUNKS  # grow entry 0, its chunk 0
    seq_ids = np.concatenate([np.arange(n_run), (grown_chunk << 32) + np.arange(n_new)])
    sources = ["law"] * 30 + ["web"] * 30 + ["docs"] * n_new
    before_experts = rng.integers(0, E, size=n_run + n_new)
    after_experts = before_experts.copy()
    after_experts[n_run:][: n_new * 3 // 4] = E  # three quarters of the new corpus go to it
    after_experts[:6] = E  # and it captures 6 old sequences
    nll_before = rng.uniform(20, 30, size=n_run + n_new)
    nll_after = nll_before * np.where(after_experts == E, 0.9, 1.0)
    other_m = eval_rows(seq_ids, sources, before_experts, nll_before, prefix_len=4)
    write_parquet_atomically(
        eval_rows(seq_ids, sources, before_experts, nll_before), tmp_path / "b0.parquet"
    )
    write_parquet_atomically(other_m, tmp_path / "b1.parquet")
    # The after rows in another file order: pairs are made by seq_id.
    order = rng.permutation(n_run + n_new)
    after = eval_rows(
        seq_ids[order], np.asarray(sources)[order], after_experts[order], nll_after[order]
    )
    write_parquet_atomically(after, tmp_path / "a0.parquet")

    table = grow_summary(
        after=[tmp_path / "a0.parquet"],
        before=[tmp_path / "b0.parquet", tmp_path / "b1.parquet"],
        n_experts=E,
        names=["docs"],
        prefix_len=M,
        out=tmp_path / "grow.parquet",
    )
    rows = {(row["corpus"], row["source"]): row for row in table.to_pylist()}
    assert list(rows) == [
        (ALL, ALL),
        (RUN_CORPUS, ALL),
        (RUN_CORPUS, "law"),
        (RUN_CORPUS, "web"),
        ("docs", ALL),
        ("docs", "docs"),
    ]
    groups = {
        (ALL, ALL): np.ones(n_run + n_new, bool),
        (RUN_CORPUS, ALL): np.arange(n_run + n_new) < n_run,
        (RUN_CORPUS, "law"): np.arange(n_run + n_new) < 30,
        ("docs", ALL): np.arange(n_run + n_new) >= n_run,
    }
    for key, at in groups.items():
        row = rows[key]
        assert row["sequences"] == at.sum()
        np.testing.assert_allclose(
            row["ppl_before"], np.exp(nll_before[at].sum() / (10 * at.sum()))
        )
        np.testing.assert_allclose(row["ppl_after"], np.exp(nll_after[at].sum() / (10 * at.sum())))
        (ci,) = bootstrap_ratio(nll_after[at], nll_before[at], np.full(at.sum(), 10))
        np.testing.assert_allclose(
            [row["ratio"], row["ratio_ci_low"], row["ratio_ci_high"]], list(ci)
        )
        assert row["to_grown"] == pytest.approx((after_experts[at] == E).mean())
    assert rows[("docs", ALL)]["to_own"] == pytest.approx(0.75)
    assert rows[(RUN_CORPUS, ALL)]["to_own"] is None
    assert rows[(RUN_CORPUS, ALL)]["to_grown"] == pytest.approx(6 / n_run)
    assert rows[("docs", ALL)]["verdict"] == "grown better"
    assert rows[(RUN_CORPUS, "web")]["verdict"] == "no difference (CI contains 1)"


# ---- what a grown router takes of the run's train split ----------------------------------------


def test_capture_takes_the_rows_whose_grown_router_beats_every_run_router(tmp_path):
    import pyarrow.parquet as pq
    import torch

    from smalltalk.checkpoint import save_weights
    from smalltalk.config import ModelConfig
    from smalltalk.grow import capture_chunk
    from smalltalk.model import LM
    from smalltalk.routers import LMRouters, RoutingBatch
    from smalltalk.tokens import token_schema

    config = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    save_weights(LM(config), tmp_path / "router.safetensors")
    rng = np.random.default_rng(0)
    n = 40
    tokens = rng.integers(0, 64, size=(n, 17), dtype=np.uint16)
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(n, dtype=np.int64) + 7),
            pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * 17), pa.array(tokens.reshape(-1))
            ),
            pa.array(["web"] * n),
        ],
        schema=token_schema(64),
    )

    pq.write_table(table, tmp_path / "train.parquet", row_group_size=16)  # several row groups
    router = LMRouters(config, [tmp_path / "router.safetensors"], device="cpu")
    new = router.costs(RoutingBatch.from_table(table), [8])[:, 0, 0].astype(np.float16)
    # The run's routers: one row in three beaten, one in three tied, one in three better.
    run = np.stack([new + 1, new + 2, new + 3], axis=1).astype(np.float16)
    run[1::3, 2] = new[1::3]  # a tie stays with the run
    run[2::3, 0] = new[2::3] - 1
    scores = pa.table(
        {
            "seq_id": table.column("seq_id"),
            "expert": pa.array(np.zeros(n, np.int16)),
            "nll": pa.FixedSizeListArray.from_arrays(pa.array(run.reshape(-1), pa.float16()), 3),
        }
    )
    pq.write_table(scores, tmp_path / "scores.parquet")
    taken = capture_chunk(
        tokens_path=tmp_path / "train.parquet",
        shard_scores_path=tmp_path / "scores.parquet",
        router=router,
        prefix_len=8,
        out=tmp_path / "captured.parquet",
    )
    captured = pq.read_table(tmp_path / "captured.parquet")
    assert taken == captured.num_rows == len(range(0, n, 3))
    assert captured.column("seq_id").to_pylist() == list(range(7, 7 + n, 3))
    assert captured.schema == table.schema

    # Scores of other sequences (a stale file) are refused, and nothing is written.
    pq.write_table(scores.slice(1), tmp_path / "stale.parquet")
    with pytest.raises(ValueError, match="stale.parquet: scores other sequences"):
        capture_chunk(
            tokens_path=tmp_path / "train.parquet",
            shard_scores_path=tmp_path / "stale.parquet",
            router=router,
            prefix_len=8,
            out=tmp_path / "again.parquet",
        )
    assert not (tmp_path / "again.parquet").exists()


def test_a_grown_router_trains_as_long_and_on_as_many_sequences_as_an_em_router(tmp_path):
    import json

    import pyarrow.parquet as pq

    from smalltalk.grow import GROWN_ROUTER_STEP_SHARE, grown_router_plan
    from smalltalk.tokens import token_schema

    entry = {"name": "docs", "inputs": ["data/docs/*.jsonl.zst"]}
    config = validate_config(base_config(grow=[entry, entry | {"name": "more", "router_steps": 7}]))
    n = 5000  # more than the sample
    table = pa.Table.from_arrays(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * 3), pa.array(np.ones(3 * n, np.uint16))
            ),
            pa.array(["docs"] * n),
        ],
        schema=token_schema(1024),
    )
    pq.write_table(table, tmp_path / "train.parquet")
    (tmp_path / "em.json").write_text(json.dumps({"final_round": 3}))
    routing = config["routing"]
    e = routing["n_experts"]
    plan = grown_router_plan(config, e, tmp_path / "em.json", [tmp_path / "train.parquet"])
    assert plan.steps == round(GROWN_ROUTER_STEP_SHARE * 3 * routing["steps_per_round"])
    assert 0 < plan.steps <= 3 * routing["steps_per_round"]
    assert len(plan.seq_ids) == len(set(plan.seq_ids)) == 3 * routing["sequences_per_round"] // e
    assert plan.prefix_len == routing["prefix_len"] - 1
    again = grown_router_plan(config, e, tmp_path / "em.json", [tmp_path / "train.parquet"])
    assert np.array_equal(plan.seq_ids, again.seq_ids)  # same seed, same sample
    other = grown_router_plan(config, e + 1, tmp_path / "em.json", [tmp_path / "train.parquet"])
    assert other.steps == 7 and other.seed_offset != plan.seed_offset
    for index in (e - 1, e + 2):
        with pytest.raises(ValueError, match="no grown router"):
            grown_router_plan(config, index, tmp_path / "em.json", [tmp_path / "train.parquet"])
