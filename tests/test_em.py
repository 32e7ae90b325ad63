"""Router EM files, diagnostics and sharding: sampling, assignment, NMI, the shard check."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from smalltalk import em
from smalltalk.checkpoint import save_weights
from smalltalk.cli import main
from smalltalk.config import ModelConfig
from smalltalk.ledger import communication_ledger
from smalltalk.model import LM
from smalltalk.routers import LMRouters
from smalltalk.shard import check_shards, shard_chunk
from smalltalk.tokens import token_matrix, token_schema

SEQ = 17  # tokens per row (S + 1)


def write_tokens(path, seq_ids, sources=None, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    n = len(seq_ids)
    tokens = rng.integers(3, vocab, size=(n, SEQ), dtype=np.uint16)
    sources = sources if sources is not None else ["a"] * n
    table = pa.Table.from_arrays(
        [
            pa.array(np.asarray(seq_ids, np.int64)),
            pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * SEQ),
                pa.array(tokens.reshape(-1), pa.uint16()),
            ),
            pa.array(sources, pa.string()),
        ],
        schema=token_schema(vocab),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=50)
    return tokens


def test_token_matrix_round_trips(tmp_path):
    tokens = write_tokens(tmp_path / "t.parquet", range(120))
    matrix = token_matrix(pq.read_table(tmp_path / "t.parquet").column("tokens"))
    assert np.array_equal(matrix, tokens)


def test_sample_blocks_is_disjoint_deterministic_and_complete(tmp_path):
    files = []
    for chunk in range(3):
        ids = (chunk << 32) + np.arange(200)
        write_tokens(tmp_path / f"train/c{chunk}.parquet", ids, seed=chunk)
        files.append(tmp_path / f"train/c{chunk}.parquet")
    write_tokens(tmp_path / "val/c0.parquet", (7 << 32) + np.arange(50), sources=["v"] * 50)

    def sample(name):
        blocks = [tmp_path / name / f"b{r}.parquet" for r in range(4)]
        em.sample_blocks(
            train_files=files,
            block_paths=blocks,
            block_size=100,
            probe_files=[tmp_path / "val/c0.parquet"],
            probe_path=tmp_path / name / "probe.parquet",
            probe_size=20,
            seed=5,
        )
        return [pq.read_table(b) for b in blocks], pq.read_table(tmp_path / name / "probe.parquet")

    blocks, probe = sample("a")
    ids = [set(b.column("seq_id").to_pylist()) for b in blocks]
    assert [len(s) for s in ids] == [100] * 4
    assert len(set.union(*ids)) == 400  # disjoint: fresh sequences every round
    assert probe.num_rows == 20 and set(probe.column("source").to_pylist()) == {"v"}
    again, _ = sample("b")
    assert [
        b.sort_by("seq_id").equals(a.sort_by("seq_id")) for a, b in zip(blocks, again, strict=True)
    ] == [True] * 4
    # Rows keep their tokens: the block holds the same row as the source file.
    source = pq.read_table(files[0]).to_pylist()
    by_id = {row["seq_id"]: row for row in source}
    for row in blocks[0].to_pylist():
        if row["seq_id"] in by_id:
            assert row == by_id[row["seq_id"]]


def test_sample_blocks_says_what_to_change_when_data_is_short(tmp_path):
    write_tokens(tmp_path / "train.parquet", np.arange(30))
    with pytest.raises(ValueError, match="routing.sequences_per_round"):
        em.sample_blocks(
            train_files=[tmp_path / "train.parquet"],
            block_paths=[tmp_path / "b0.parquet", tmp_path / "b1.parquet"],
            block_size=20,
            probe_files=[tmp_path / "train.parquet"],
            probe_path=tmp_path / "probe.parquet",
            probe_size=0,
            seed=0,
        )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.integers(0, 3))
def test_nmi_bounds_and_identities(labels, shift):
    labels = np.array(labels)
    assert em.normalized_mutual_information(labels, labels) == pytest.approx(1.0)
    assert em.normalized_mutual_information(labels, (labels + shift) % 4) == pytest.approx(1.0)
    value = em.normalized_mutual_information(labels, np.zeros_like(labels))
    assert 0.0 <= value <= 1.0


def test_nmi_of_independent_labels_is_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 20000), rng.integers(0, 6, 20000)
    assert em.normalized_mutual_information(a, b) < 0.01
    sources = np.repeat(np.array(["x", "y", "z", "w"], dtype=object), 100)
    assert em.normalized_mutual_information(np.repeat(np.arange(4), 100), sources) == 1.0


def test_assign_round_balances_the_gathered_scores(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    seq_ids = rng.permutation(1000)[:90]
    for e in range(3):
        path = tmp_path / f"e{e}.parquet"
        order = rng.permutation(90)  # each router writes its rows in its own order
        nll = rng.normal(3, 1, 90).astype(np.float16)
        pq.write_table(pa.table({"seq_id": seq_ids[order], "nll": nll[order]}), path)
        paths.append(path)
    ids, nll, experts = em.assign_round(paths, tmp_path / "assignment.parquet")
    assert np.array_equal(ids, np.sort(seq_ids))
    assert np.bincount(experts).tolist() == [30, 30, 30]
    table = pq.read_table(tmp_path / "assignment.parquet")
    assert table.column("seq_id").to_pylist() == ids.tolist()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"seq_id": seq_ids[:10], "nll": np.zeros(10, np.float16)}), bad)
    with pytest.raises(ValueError, match="different set of sequences"):
        em.read_scores([paths[0], bad])


def test_check_shards_names_a_truncated_shard_and_fails_without_a_traceback(tmp_path, capsys):
    train = tmp_path / "tokens/train/c0.parquet"
    write_tokens(train, np.arange(10))
    shards = [tmp_path / f"shards/expert={e}/c0.parquet" for e in range(2)]
    write_tokens(shards[0], np.arange(5))
    write_tokens(shards[1], np.arange(5, 10))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    config = REPO / "tests" / "configs" / "tiny.yaml"  # E = 2
    status = main(
        ["check-shards", "--config", str(config), "--train", str(train), "--shards"]
        + [str(path) for path in shards]
        + ["--out", str(tmp_path / "check.json")]
    )
    error = capsys.readouterr().err
    assert status != 0
    assert str(shards[1]) in error and "Traceback" not in error
    assert not (tmp_path / "check.json").exists()


def tiny_router(path, seed):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=16)
    save_weights(LM(config), path)
    return config


def test_shard_chunk_writes_every_row_once_and_check_passes(tmp_path):
    config = tiny_router(tmp_path / "r0.safetensors", 0)
    tiny_router(tmp_path / "r1.safetensors", 1)
    tiny_router(tmp_path / "r2.safetensors", 2)
    routers = [tmp_path / f"r{e}.safetensors" for e in range(3)]
    train = []
    for chunk in range(2):
        path = tmp_path / "tokens/train" / f"c{chunk}.parquet"
        write_tokens(path, (chunk << 32) + np.arange(101), seed=chunk)
        train.append(path)
        shards = [tmp_path / f"shards/expert={e}/c{chunk}.parquet" for e in range(3)]
        loads = shard_chunk(
            tokens_path=path,
            router=LMRouters(config, routers, keep_loaded=True),
            prefix_len=8,
            shard_paths=shards,
            scores_path=tmp_path / f"scores/c{chunk}.parquet",
        )
        assert loads.sum() == 101 and loads.max() <= 34
    shard_files = sorted((tmp_path / "shards").rglob("*.parquet"))
    report = check_shards(
        train_files=train, shard_files=shard_files, n_experts=3, out=tmp_path / "check.json"
    )
    assert report["ok"] and report["train_sequences"] == 202
    # Every shard checked is listed with its rows, for `explain` to compare the shards with.
    assert sorted(report["shards"]) == [
        f"expert={e}/c{c}.parquet" for e in range(3) for c in (0, 1)
    ]
    assert sum(report["shards"].values()) == 202
    assert json.loads((tmp_path / "check.json").read_text())["missing"] == 0
    scores = pq.read_table(tmp_path / "scores/c0.parquet")
    assert scores.schema.field("nll").type.value_type == pa.float16()

    # A lost row, a duplicated row: the check fails loudly and writes no report.
    first = shard_files[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(1), first)
    with pytest.raises(ValueError, match="1 train sequences are in no shard"):
        check_shards(train_files=train, shard_files=shard_files, n_experts=3, out=tmp_path / "x")
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), first)
    with pytest.raises(ValueError, match="in more than one shard"):
        check_shards(train_files=train, shard_files=shard_files, n_experts=3, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()

    ledger = communication_ledger(
        assignment_paths=[],
        shard_score_paths=[tmp_path / "scores/c0.parquet", tmp_path / "scores/c1.parquet"],
        n_experts=3,
        out=tmp_path / "ledger.parquet",
    )
    sharding = [row for row in ledger.to_pylist() if row["stage"] == "sharding"][0]
    assert sharding["bytes"] == 2 * 202 * 3  # 2 bytes x sequences x routers


# ---- when EM ends (routing.stop) -------------------------------------------------------------

STOP = {"changed_below": 0.05, "patience": 2, "nll_min_improvement": None}


def em_rows(changed, nll=None):
    """Diagnostics of rounds 1..r: probe_changed is NaN in round 1 (nothing to compare with)."""
    nll = nll if nll is not None else [4.0 - 0.1 * r for r in range(len(changed))]
    return [
        {"round": r, "probe_changed": c, "mean_routed_nll": n, "nmi_source": 0.5}
        for r, (c, n) in enumerate(zip(changed, nll, strict=True), start=1)
    ]


def stop_round(rows, max_rounds, stop):
    """The first round after which EM ends, and why."""
    for r in range(1, len(rows) + 1):
        if reason := em.em_stop_reason(rows[:r], max_rounds=max_rounds, stop=stop):
            return r, reason
    return None, None


def test_em_stops_once_few_probe_sequences_change_expert_for_patience_rounds():
    rows = em_rows([np.nan, 0.53, 0.04, 0.2, 0.03, 0.01, 0.0, 0.0])
    r, reason = stop_round(rows, 8, STOP)
    assert r == 6
    assert reason.startswith("stable: fewer than 5.0% of the probe sequences changed expert")
    assert reason.endswith("in each of the last 2 rounds")


def test_em_stops_when_the_routed_nll_stops_improving():
    stop = {"changed_below": None, "patience": 2, "nll_min_improvement": 0.01}
    rows = em_rows([np.nan, 0.5, 0.5, 0.5, 0.5, 0.5], nll=[4.0, 3.5, 3.2, 3.195, 3.3, 3.0])
    r, reason = stop_round(rows, 6, stop)
    assert r == 5  # rounds 4 and 5 do not beat round 3's 3.2 by 0.01 nats
    assert reason.startswith("no improvement of the mean routed NLL by 0.01 nats on 3.2000")


def test_em_without_a_stopping_rule_runs_every_round():
    rows = em_rows([np.nan, 0.0, 0.0, 0.0])
    assert stop_round(rows, 4, None) == (4, "reached the maximum of 4 rounds (routing.rounds)")
    off = {"changed_below": None, "patience": 1, "nll_min_improvement": None}
    assert stop_round(rows, 4, off)[0] == 4


def test_em_without_probe_scores_is_never_stable_by_changes():
    rows = em_rows([np.nan] * 5)
    assert stop_round(rows, 5, STOP) == (5, "reached the maximum of 5 rounds (routing.rounds)")


def test_em_stop_refuses_diagnostics_with_a_round_missing():
    rows = em_rows([np.nan, 0.0, 0.0])
    del rows[1]
    with pytest.raises(ValueError, match="rounds 1..r in order, got rounds \\[1, 3\\]"):
        em.em_stop_reason(rows, max_rounds=4, stop=None)


@given(
    changed=st.lists(st.floats(0, 1), min_size=1, max_size=10),
    nll=st.lists(st.floats(0.5, 9), min_size=11, max_size=11),
    patience=st.integers(1, 4),
    changed_below=st.one_of(st.none(), st.floats(0, 1)),
    min_improvement=st.one_of(st.none(), st.floats(0, 1)),
)
def test_em_ends_by_round_t_and_not_before_patience_rounds(
    changed, nll, patience, changed_below, min_improvement
):
    rows = em_rows([np.nan, *changed], nll=nll[: len(changed) + 1])
    stop = {
        "changed_below": changed_below,
        "patience": patience,
        "nll_min_improvement": min_improvement,
    }
    r, reason = stop_round(rows, len(rows), stop)
    assert r is not None and r <= len(rows)
    if r < len(rows):
        assert r > patience  # round 1 has no probe changes, and the NLL needs a round before
        assert reason.startswith(("stable", "no improvement"))


def write_em_round(folder, row, n_experts=2):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([row]), folder / "diagnostics.parquet")
    for e in range(n_experts):
        (folder / f"e{e}.safetensors").write_bytes(f"round {row['round']} router {e}".encode())


def test_finish_em_copies_the_routers_of_the_round_that_ended_em_and_says_why(tmp_path):
    rows = em_rows([np.nan, 0.3, 0.01, 0.02, 0.0])
    for row in rows:
        write_em_round(tmp_path / f"r{row['round']}", row)
    final = [tmp_path / "final" / f"e{e}.safetensors" for e in range(2)]

    def finish(last):
        return em.finish_em(
            diagnostics_paths=[
                tmp_path / f"r{r}" / "diagnostics.parquet" for r in range(1, last + 1)
            ],
            router_paths=[tmp_path / f"r{last}" / f"e{e}.safetensors" for e in range(2)],
            out_routers=final,
            summary_path=tmp_path / "final" / "em.json",
            max_rounds=8,
            stop=STOP,
        )

    with pytest.raises(ValueError, match="EM goes on after round 3"):
        finish(3)
    with pytest.raises(ValueError, match="EM stopped after round 4 .*, not round 5"):
        finish(5)
    finish(4)
    assert [path.read_bytes() for path in final] == [b"round 4 router 0", b"round 4 router 1"]
    summary = json.loads((tmp_path / "final" / "em.json").read_text())
    assert summary["final_round"] == 4 and summary["max_rounds"] == 8
    assert summary["reason"].startswith("stable")
    assert [row["probe_changed"] for row in summary["rounds"]] == [None, 0.3, 0.01, 0.02]
