"""Evaluation: per-sequence rows against direct scoring, the top-k ensemble against a naive loop,
the DuckDB aggregates against numpy, and the routed validation subsets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from smalltalk import checkpoint, scoring
from smalltalk.aggregate import AGGREGATES, aggregate
from smalltalk.checkpoint import save_weights
from smalltalk.config import ModelConfig
from smalltalk.evaluate import (
    EVAL_SCHEMA,
    eval_schema,
    evaluate_chunk,
    merge_part,
    route_part,
    route_sequences,
    score_part,
    split_by_expert,
)
from smalltalk.model import LM
from smalltalk.routers import LMRouters
from smalltalk.routing import route
from smalltalk.scoring import sequence_nll
from smalltalk.stats import bootstrap_ratio, verdict
from smalltalk.tokens import token_schema

CONFIG = ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, n_embd=16)
S = CONFIG.seq_len  # rows hold S + 1 tokens
E = 3
M = 8  # the training routing prefix: tokens 8..16 are scored after it
PREFIX_LENS = [8, 2, 4, 12, 8]  # unsorted, with a repeat: evaluated as [2, 4, 8, 12]
SOURCES = ["code", "law", "web"]


def write_tokens(path, seq_ids, seed):
    rng = np.random.default_rng(seed)
    n = len(seq_ids)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(n, S + 1), dtype=np.uint16)
    table = pa.Table.from_arrays(
        [
            pa.array(np.asarray(seq_ids, np.int64)),
            pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * (S + 1)),
                pa.array(tokens.reshape(-1), pa.uint16()),
            ),
            pa.array(rng.choice(SOURCES, size=n).tolist(), pa.string()),
        ],
        schema=token_schema(CONFIG.vocab_size),
    )
    pq.write_table(table, path)
    return tokens


def write_model(path, seed):
    torch.manual_seed(seed)
    model = LM(CONFIG)
    with torch.no_grad():  # sharper, more distinct distributions than the 0.02-std init gives
        for parameter in model.parameters():
            parameter.mul_(5.0)
    save_weights(model, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    paths = {
        "routers": [write_model(root / f"router{e}.safetensors", seed=e) for e in range(E)],
        "experts": [write_model(root / f"expert{e}.safetensors", seed=10 + e) for e in range(E)],
        "dense": write_model(root / "dense.safetensors", seed=20),
        "chunks": [root / "c0.parquet", root / "c1.parquet"],
        "root": root,
    }
    paths["tokens"] = [
        write_tokens(paths["chunks"][0], 1000 + np.arange(23), seed=0),
        write_tokens(paths["chunks"][1], 2000 + np.arange(11), seed=1),
    ]
    return paths


def run(setup, out, chunk=0, **overrides):
    arguments = dict(
        tokens_path=setup["chunks"][chunk],
        router=LMRouters(CONFIG, setup["routers"], device="cpu"),
        expert_config=CONFIG,
        expert_weights=setup["experts"],
        dense_weights=setup["dense"],
        prefix_lens=PREFIX_LENS,
        train_prefix_len=M,
        topk=2,
        temperature=0.5,
        batch_size=4,
        out=out,
        device="cpu",  # the references below run in float32 on the CPU, whatever the machine
    )
    return evaluate_chunk(**{**arguments, **overrides})


@pytest.fixture(scope="module")
def evaluated(setup):
    return run(setup, setup["root"] / "eval-c0.parquet")


def columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def load(paths):
    return [checkpoint.load_model(CONFIG, path, device="cpu") for path in paths]


# ---- per-sequence rows -----------------------------------------------------------------------


def test_one_row_per_sequence_and_prefix_length(setup, evaluated):
    n = len(setup["tokens"][0])
    prefixes = sorted(set(PREFIX_LENS))
    assert evaluated.schema == EVAL_SCHEMA
    assert pq.read_table(setup["root"] / "eval-c0.parquet").equals(evaluated)
    assert evaluated.num_rows == n * len(prefixes)
    rows = columns(evaluated)
    assert np.array_equal(rows["seq_id"], np.repeat(1000 + np.arange(n), len(prefixes)))
    assert np.array_equal(rows["prefix_len"], np.tile(prefixes, n))
    sources = pq.read_table(setup["chunks"][0]).column("source").to_pylist()
    assert rows["source"].tolist() == np.repeat(sources, len(prefixes)).tolist()
    assert set(rows["n_tokens"]) == {S + 1 - M} and set(rows["n_tokens_full"]) == {S}


def test_nll_columns_equal_sequence_nll(setup, evaluated):
    tokens = torch.from_numpy(setup["tokens"][0].astype(np.int64))
    experts = load(setup["experts"])
    after = np.stack([sequence_nll(x, tokens, start=M).numpy() for x in experts], axis=1)
    full = np.stack([sequence_nll(x, tokens).numpy() for x in experts], axis=1)
    (dense,) = load([setup["dense"]])
    rows = columns(evaluated)
    sequence = np.repeat(np.arange(len(tokens)), len(set(PREFIX_LENS)))
    routed = rows["expert"].astype(int)
    close = dict(rtol=1e-5, atol=0)
    np.testing.assert_allclose(rows["nll_expert"], after[sequence, routed], **close)
    np.testing.assert_allclose(rows["nll_expert_full"], full[sequence, routed], **close)
    np.testing.assert_allclose(
        rows["nll_dense"], sequence_nll(dense, tokens, start=M).numpy()[sequence], **close
    )
    np.testing.assert_allclose(
        rows["nll_dense_full"], sequence_nll(dense, tokens).numpy()[sequence], **close
    )
    # The oracle: the best expert in hindsight on the same tokens, a bound on any routing.
    assert np.array_equal(rows["oracle_expert"], after.argmin(axis=1)[sequence])
    np.testing.assert_allclose(rows["nll_oracle"], after.min(axis=1)[sequence], **close)
    assert (rows["nll_oracle"] <= rows["nll_expert"]).all()
    assert (rows["nll_oracle"] < rows["nll_expert"]).any()  # routing is not trivially perfect


def test_routed_expert_is_the_argmin_of_the_routers_prefix_nll(setup, evaluated):
    tokens = setup["tokens"][0]
    routers = load(setup["routers"])
    router_nll = np.stack(evaluated.column("router_nll").to_numpy(zero_copy_only=False))
    expected = np.stack(
        [
            np.stack([scoring.prefix_nll(router, tokens, m) for router in routers], axis=1)
            for m in sorted(set(PREFIX_LENS))
        ],
        axis=1,
    ).reshape(-1, E)  # (n * P, E), rows as in the file
    assert np.array_equal(router_nll, expected)  # the very scores training assigns with
    assert np.array_equal(evaluated.column("expert").to_numpy(), route(router_nll))
    # Mean per predicted token: the sum over the first M̂ tokens divided by M̂ - 1 (Eq. 9).
    prefix = torch.from_numpy(tokens[:, :4].astype(np.int64))
    np.testing.assert_allclose(
        expected.reshape(len(tokens), -1, E)[:, 1, 0],
        sequence_nll(routers[0], prefix).numpy() / 3,
        rtol=1e-6,
    )


# ---- the top-k ensemble (c-BTM style) --------------------------------------------------------


def naive_topk_nll(experts, sequence, router_nll, topk, temperature):
    """-sum_t log sum_e w_e p_e(x_t) over tokens t >= M, one token and one expert at a time."""
    chosen = sorted(range(E), key=lambda e: (router_nll[e], e))[:topk]
    scaled = np.array([-router_nll[e] / temperature for e in chosen], dtype=np.float64)
    weights = np.exp(scaled - scaled.max())
    weights /= weights.sum()
    with torch.no_grad():
        inputs = torch.from_numpy(sequence[None, :-1].astype(np.int64))
        probs = [torch.softmax(expert(inputs)[0][0].double(), -1).numpy() for expert in experts]
    total = 0.0
    for t in range(M, S + 1):
        mixture = 0.0
        for w, e in zip(weights, chosen, strict=True):
            mixture += w * probs[e][t - 1, sequence[t]]  # probs[e][t - 1] predicts token t
        total -= np.log(mixture)
    return total


def test_topk_matches_a_naive_per_token_loop(setup, evaluated):
    experts = load(setup["experts"])
    rows = evaluated.slice(0, 6 * len(set(PREFIX_LENS)))  # the first six sequences
    tokens = setup["tokens"][0]
    for row in rows.to_pylist():
        sequence = tokens[row["seq_id"] - 1000]
        expected = naive_topk_nll(experts, sequence, row["router_nll"], topk=2, temperature=0.5)
        assert row["nll_topk"] == pytest.approx(expected, rel=1e-5)


def test_topk_with_equal_weights_is_the_average_probability(setup, tmp_path):
    hot = run(setup, tmp_path / "hot.parquet", topk=E, temperature=1e9)  # w_e = 1 / E
    experts = load(setup["experts"])
    tokens = setup["tokens"][0]
    for row in hot.slice(0, 8).to_pylist():
        sequence = tokens[row["seq_id"] - 1000]
        expected = naive_topk_nll(experts, sequence, [0.0] * E, topk=E, temperature=1.0)
        assert row["nll_topk"] == pytest.approx(expected, rel=1e-5)
    # A uniform mixture loses at most log E nats per token against any one expert (the oracle).
    rows = columns(hot)
    assert (rows["nll_topk"] <= rows["nll_oracle"] + rows["n_tokens"] * np.log(E)).all()


def test_topk_of_one_or_at_low_temperature_is_the_routed_expert(setup, tmp_path):
    one = columns(run(setup, tmp_path / "k1.parquet", topk=1, temperature=3.0))
    np.testing.assert_allclose(one["nll_topk"], one["nll_expert"], rtol=1e-12)
    # k = E but a temperature far below the gap between the best two routers: weight ~ one-hot.
    router_nll = np.sort(np.stack(one["router_nll"]), axis=1)
    gap = (router_nll[:, 1] - router_nll[:, 0]).min()
    assert gap > 0
    cold = columns(run(setup, tmp_path / "cold.parquet", topk=E, temperature=gap / 100))
    np.testing.assert_allclose(cold["nll_topk"], cold["nll_expert"], rtol=1e-9)


# ---- slicing, determinism, edge cases --------------------------------------------------------


def test_slices_do_not_change_the_rows(setup, evaluated, tmp_path):
    sliced = columns(run(setup, tmp_path / "sliced.parquet", slice_rows=5))
    whole = columns(evaluated)
    for name in ("seq_id", "prefix_len", "expert", "oracle_expert", "n_tokens"):
        assert np.array_equal(sliced[name], whole[name]), name
    for name in ("nll_expert", "nll_dense", "nll_oracle", "nll_topk", "nll_expert_full"):
        np.testing.assert_allclose(sliced[name], whole[name], rtol=1e-6, err_msg=name)


def test_same_inputs_give_identical_bytes(setup, tmp_path):
    first = run(setup, tmp_path / "a" / "eval.parquet", chunk=1)
    run(setup, tmp_path / "b" / "eval.parquet", chunk=1)
    assert (tmp_path / "a/eval.parquet").read_bytes() == (tmp_path / "b/eval.parquet").read_bytes()
    for name in ("a", "b"):
        aggregate([tmp_path / "a" / "eval.parquet"], tmp_path / name / "summary")
    for table in AGGREGATES:
        a, b = (tmp_path / name / "summary" / f"{table}.parquet" for name in ("a", "b"))
        assert a.read_bytes() == b.read_bytes(), table
    assert first.num_rows == 11 * len(set(PREFIX_LENS))


def test_empty_chunk_writes_an_empty_file(setup, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(token_schema(CONFIG.vocab_size).empty_table(), empty)
    table = run(setup, tmp_path / "eval.parquet", tokens_path=empty)
    assert table.num_rows == 0 and pq.read_schema(tmp_path / "eval.parquet") == EVAL_SCHEMA


# ---- the workflow's parts: one router's routes, one model's scores, the merge ------------------


def evaluate_in_parts(setup, folder, chunk=0, tokens_path=None, **merge):
    """What the workflow's jobs do: route_part per router, score_part per model, merge_part."""
    tokens = tokens_path or setup["chunks"][chunk]
    routes = []
    for e, weights in enumerate(setup["routers"]):
        routes.append(folder / f"route-e{e}.parquet")
        route_part(
            tokens_paths=[tokens],
            router=LMRouters(CONFIG, [weights], device="cpu"),
            prefix_lens=PREFIX_LENS,
            out=routes[-1],
        )
    scores = []
    for name, weights in [*enumerate(setup["experts"]), ("dense", setup["dense"])]:
        scores.append(folder / f"score-{name}.parquet")
        score_part(
            tokens_paths=[tokens],
            model_config=CONFIG,
            weights=weights,
            train_prefix_len=M,
            batch_size=4,
            out=scores[-1],
            device="cpu",
        )
    merge = {"topk": 2, "temperature": 0.5, **merge}
    return merge_part(
        tokens_paths=[tokens],
        routes=routes,
        expert_scores=scores[:-1],
        dense_scores=scores[-1],
        out=folder / "eval.parquet",
        **merge,
    )


def test_the_parts_merge_to_the_rows_of_one_evaluation(setup, evaluated, tmp_path):
    merged = evaluate_in_parts(setup, tmp_path)
    assert merged.schema == EVAL_SCHEMA
    whole = columns(evaluated)
    for name, values in columns(merged).items():
        if name == "router_nll":
            assert np.array_equal(np.stack(values), np.stack(whole[name]))
        elif name == "source":
            assert values.tolist() == whole[name].tolist()
        else:  # the top-k mix may round its last bit differently (numpy vs torch logaddexp)
            np.testing.assert_allclose(values, whole[name], rtol=1e-12, err_msg=name)


def test_a_subset_of_the_experts_routes_among_its_own_routers_and_keeps_their_indices(
    setup, evaluated, tmp_path
):
    kept = [0, 2]
    subset = columns(evaluate_in_parts(setup, tmp_path, experts=kept))
    router_nll = np.stack(columns(evaluated)["router_nll"])[:, kept]
    expected = np.asarray(kept)[route(router_nll)]
    assert np.array_equal(subset["expert"], expected)
    assert set(subset["oracle_expert"]) <= set(kept)
    assert {len(values) for values in subset["router_nll"]} == {len(kept)}
    # Topk 2 of 2 experts mixes both, so it never does worse than both of them.
    whole = columns(evaluated)
    assert np.array_equal(subset["nll_dense"], whole["nll_dense"])
    on_routed = whole["expert"] == subset["expert"]
    np.testing.assert_allclose(subset["nll_expert"][on_routed], whole["nll_expert"][on_routed])


def test_a_stale_score_file_is_refused_with_its_name(setup, tmp_path):
    evaluate_in_parts(setup, tmp_path)
    score_part(
        tokens_paths=[setup["chunks"][1]],  # another chunk's sequences
        model_config=CONFIG,
        weights=setup["experts"][1],
        train_prefix_len=M,
        batch_size=4,
        out=tmp_path / "score-1.parquet",
        device="cpu",
    )
    with pytest.raises(ValueError, match=r"score-1\.parquet: scores other sequences"):
        merge_part(
            tokens_paths=[setup["chunks"][0]],
            routes=[tmp_path / f"route-e{e}.parquet" for e in range(E)],
            expert_scores=[tmp_path / f"score-{e}.parquet" for e in range(E)],
            dense_scores=tmp_path / "score-dense.parquet",
            topk=2,
            temperature=0.5,
            out=tmp_path / "again.parquet",
        )
    assert not (tmp_path / "again.parquet").exists()


def test_an_empty_chunk_goes_through_every_part(setup, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(token_schema(CONFIG.vocab_size).empty_table(), empty)
    table = evaluate_in_parts(setup, tmp_path, tokens_path=empty)
    assert table.num_rows == 0 and table.schema == EVAL_SCHEMA


def test_bad_arguments_are_all_reported(setup, tmp_path):
    with pytest.raises(ValueError) as error:
        run(setup, tmp_path / "x.parquet", topk=E + 1, prefix_lens=[1, 4], train_prefix_len=S + 1)
    for word in ("topk", "prefix_lens", "train_prefix_len"):
        assert word in str(error.value)
    assert not (tmp_path / "x.parquet").exists()


# ---- aggregates ------------------------------------------------------------------------------


def perplexity(nll, tokens):
    return float(np.exp(nll.sum() / tokens.sum()))


def assert_ratio_interval(row, suffix, rows, at, nll, name):
    """The row's ratio of `nll` to dense: its perplexities' ratio, with the bootstrap interval
    of the selected sequences taken in seq_id order, and the verdict for that interval."""
    ratio = row[f"ratio{suffix}"]
    ppl = "ppl_mixture" if nll == "nll_expert" else "ppl_topk"
    assert ratio == pytest.approx(row[ppl] / row["ppl_dense"], rel=1e-12)
    order = np.argsort(rows["seq_id"][at], kind="stable")
    ci = bootstrap_ratio(*(rows[c][at][order] for c in (nll, "nll_dense", "n_tokens")))[0]
    assert (ratio, row[f"ratio{suffix}_ci_low"], row[f"ratio{suffix}_ci_high"]) == ci
    assert row[f"verdict{suffix}"] == verdict(*ci, a=name)


def test_aggregates_equal_a_numpy_recomputation(setup, evaluated, tmp_path):
    files = [setup["root"] / "eval-c0.parquet", tmp_path / "eval-c1.parquet"]
    run(setup, files[1], chunk=1)
    tables = aggregate(files, tmp_path / "summary")
    for name, table in tables.items():
        assert pq.read_table(tmp_path / "summary" / f"{name}.parquet").equals(table)
    rows = columns(pa.concat_tables([pq.read_table(path) for path in files]))
    close = dict(rel=1e-12)

    overall = tables["overall"].to_pylist()
    assert [row["prefix_len"] for row in overall] == sorted(set(PREFIX_LENS))
    for row in overall:
        at = rows["prefix_len"] == row["prefix_len"]
        n, n_full = rows["n_tokens"][at], rows["n_tokens_full"][at]
        for column, nll, count in [
            ("ppl_mixture", "nll_expert", n),
            ("ppl_dense", "nll_dense", n),
            ("ppl_oracle", "nll_oracle", n),
            ("ppl_topk", "nll_topk", n),
            ("ppl_mixture_full", "nll_expert_full", n_full),
            ("ppl_dense_full", "nll_dense_full", n_full),
        ]:
            assert row[column] == pytest.approx(perplexity(rows[nll][at], count), **close), column
        assert row["relative_gain"] == pytest.approx(1 - row["ppl_mixture"] / row["ppl_dense"])
        assert row["ppl_oracle"] <= row["ppl_mixture"]
        assert (row["sequences"], row["tokens"]) == (34, 34 * (S + 1 - M))
        assert_ratio_interval(row, "", rows, at, "nll_expert", "mixture")
        assert_ratio_interval(row, "_topk", rows, at, "nll_topk", "top-k")

    per_segment = tables["per_segment"].to_pylist()
    assert len(per_segment) == len(set(PREFIX_LENS)) * E  # every expert, routed to or not
    for row in per_segment:
        at = (rows["prefix_len"] == row["prefix_len"]) & (rows["expert"] == row["expert"])
        assert row["sequences"] == at.sum()
        assert row["share"] == pytest.approx(at.sum() / 34, **close)
        if at.any():
            n = rows["n_tokens"][at]
            assert row["ppl_expert"] == pytest.approx(perplexity(rows["nll_expert"][at], n))
            assert row["ppl_dense"] == pytest.approx(perplexity(rows["nll_dense"][at], n))
    assert tables["load"].column("sequences").to_pylist() == [r["sequences"] for r in per_segment]

    for row in tables["per_source"].to_pylist():
        at = (rows["prefix_len"] == row["prefix_len"]) & (rows["source"] == row["source"])
        n = rows["n_tokens"][at]
        assert row["sequences"] == at.sum()
        assert row["ppl_mixture"] == pytest.approx(perplexity(rows["nll_expert"][at], n), **close)
        assert row["ppl_dense"] == pytest.approx(perplexity(rows["nll_dense"][at], n), **close)
        assert_ratio_interval(row, "", rows, at, "nll_expert", "mixture")

    counts = {}
    keys = (rows[name].tolist() for name in ("prefix_len", "expert", "source"))
    for key in zip(*keys, strict=True):
        counts[key] = counts.get(key, 0) + 1
    heatmap = {
        (r["prefix_len"], r["expert"], r["source"]): r["sequences"]
        for r in tables["segment_source"].to_pylist()
    }
    assert heatmap == counts


def test_aggregate_lists_experts_no_sequence_was_routed_to(tmp_path):
    rows = {name: [] for name in EVAL_SCHEMA.names}
    for seq_id, expert in enumerate([0, 0, 1]):  # expert 2 gets nothing
        values = dict(seq_id=seq_id, source="web", prefix_len=4, expert=expert)
        values.update(router_nll=[1.0, 2.0, 3.0], n_tokens=2, n_tokens_full=4, oracle_expert=0)
        values.update(nll_expert=1.0 + seq_id, nll_dense=2.0, nll_expert_full=2.0)
        values.update(nll_dense_full=4.0, nll_oracle=1.0, nll_topk=1.5)
        for name, value in values.items():
            rows[name].append(value)
    pq.write_table(pa.table(rows, schema=EVAL_SCHEMA), tmp_path / "eval.parquet")
    tables = aggregate([tmp_path / "eval.parquet"], tmp_path / "summary")
    segments = tables["per_segment"].to_pylist()
    assert [(r["expert"], r["sequences"], r["share"]) for r in segments] == [
        (0, 2, pytest.approx(2 / 3)),
        (1, 1, pytest.approx(1 / 3)),
        (2, 0, 0.0),
    ]
    assert segments[2]["ppl_expert"] is None and segments[0]["ppl_expert"] == pytest.approx(
        np.exp(3.0 / 4)
    )
    assert tables["load"].column("sequences").to_pylist() == [2, 1, 0]
    assert tables["overall"].column("ppl_mixture").to_pylist() == [pytest.approx(np.exp(6 / 6))]


RATIO_COLUMNS = ["ratio", "ratio_ci_low", "ratio_ci_high", "verdict"]


def test_ratio_intervals_do_not_depend_on_the_order_of_the_files(setup, evaluated, tmp_path):
    files = [setup["root"] / "eval-c0.parquet", tmp_path / "eval-c1.parquet"]
    run(setup, files[1], chunk=1)
    aggregate(files, tmp_path / "forward")
    aggregate(files[::-1], tmp_path / "backward")
    for name in ("overall", "per_source"):
        forward, backward = (
            pq.read_table(tmp_path / order / f"{name}.parquet") for order in ("forward", "backward")
        )
        assert forward.select(RATIO_COLUMNS).equals(backward.select(RATIO_COLUMNS)), name


def test_verdict_says_which_model_is_better_and_when_neither_is(tmp_path):
    # Source "clear": the mixture saves 0.2 nats on every token of 50 sequences; "noisy": it
    # gains or loses 1 nat per token at random, no better than dense on average.
    rng = np.random.default_rng(0)
    shift = np.concatenate([np.full(50, -0.2), rng.choice([-1.0, 1.0], size=50)])
    n = 10
    rows = {
        "seq_id": np.arange(100),
        "source": ["clear"] * 50 + ["noisy"] * 50,
        "prefix_len": np.full(100, 4),
        "expert": np.zeros(100),
        "router_nll": [[1.0]] * 100,
        "n_tokens": np.full(100, n),
        "nll_dense": np.full(100, 3.0 * n),
        "nll_expert": 3.0 * n + shift * n,
        "nll_topk": np.full(100, 3.4 * n),  # 0.4 nats worse per token than dense
        "n_tokens_full": np.full(100, n),
        "nll_expert_full": 3.0 * n + shift * n,
        "nll_dense_full": np.full(100, 3.0 * n),
        "oracle_expert": np.zeros(100),
        "nll_oracle": 3.0 * n + shift * n,
    }
    pq.write_table(pa.table(rows, schema=EVAL_SCHEMA), tmp_path / "eval.parquet")
    tables = aggregate([tmp_path / "eval.parquet"], tmp_path / "summary")
    (overall,) = tables["overall"].to_pylist()
    assert overall["verdict_topk"] == "dense better"
    assert overall["ratio_topk"] == pytest.approx(np.exp(0.4))
    by_source = {row["source"]: row for row in tables["per_source"].to_pylist()}
    assert by_source["clear"]["verdict"] == "mixture better"
    assert by_source["clear"]["ratio_ci_high"] == pytest.approx(np.exp(-0.2))
    assert by_source["noisy"]["verdict"] == "no difference (CI contains 1)"
    assert by_source["noisy"]["ratio_ci_low"] < 1 < by_source["noisy"]["ratio_ci_high"]


def test_each_further_baseline_gets_its_own_ratio_interval_and_verdict(tmp_path):
    """A column nll_{baseline} gives ppl_{baseline} and the mixture's ratio to it, beside (not
    instead of) the ratio to the equal-token dense model."""
    n, sequences = 10, 60
    rng = np.random.default_rng(1)
    mixture = 3.0 * n + rng.normal(0, 0.1, sequences) * n
    rows = {
        "seq_id": np.arange(sequences),
        "source": ["a"] * sequences,
        "prefix_len": np.full(sequences, 4),
        "expert": np.zeros(sequences),
        "router_nll": [[1.0]] * sequences,
        "n_tokens": np.full(sequences, n),
        "nll_expert": mixture,
        "nll_dense": mixture + 0.3 * n,  # dense 0.3 nats worse per token
        "n_tokens_full": np.full(sequences, n),
        "nll_expert_full": mixture,
        "nll_dense_full": mixture + 0.3 * n,
        "oracle_expert": np.zeros(sequences),
        "nll_oracle": mixture,
        "nll_topk": mixture,
        "nll_dense_compute": mixture + 0.1 * n,  # 0.1 nats worse: still a clear win
        "nll_dense_large": mixture - 0.2 * n,  # 0.2 nats better
    }
    schema = eval_schema(["dense_compute", "dense_large"])
    pq.write_table(pa.table(rows, schema=schema), tmp_path / "eval.parquet")
    tables = aggregate([tmp_path / "eval.parquet"], tmp_path / "summary")
    for name in ("overall", "per_source"):
        (row,) = tables[name].to_pylist()
        assert row["ratio"] == pytest.approx(np.exp(-0.3))
        assert row["ratio_dense_compute"] == pytest.approx(np.exp(-0.1))
        assert row["verdict_dense_compute"] == "mixture better"
        assert row["ratio_dense_large"] == pytest.approx(np.exp(0.2))
        assert row["verdict_dense_large"] == "larger dense better"
        low, high = row["ratio_dense_large_ci_low"], row["ratio_dense_large_ci_high"]
        assert low == pytest.approx(high)  # the same shift on every sequence: no spread
        assert row["ppl_dense_compute"] == pytest.approx(row["ppl_mixture"] * np.exp(0.1))


def test_a_baselines_scores_become_its_column(setup, evaluated, tmp_path):
    """merge-part --baseline-scores NAME=FILE: the model's NLLs of the tokens after the prefix."""
    score = tmp_path / "score-large.parquet"
    score_part(
        tokens_paths=[setup["chunks"][0]],
        model_config=CONFIG,
        weights=setup["experts"][1],  # any model of the architecture will do
        train_prefix_len=M,
        batch_size=4,
        out=score,
        device="cpu",
    )
    merged = evaluate_in_parts(setup, tmp_path, baseline_scores={"dense_large": score})
    assert merged.schema == eval_schema(["dense_large"])
    plain = evaluate_in_parts(setup, tmp_path / "plain")
    assert merged.drop_columns(["nll_dense_large"]).equals(plain)
    per_sequence = pq.read_table(score).column("nll_after").to_numpy()
    expected = np.repeat(per_sequence, len(merged) // len(per_sequence))  # a row per M-hat
    np.testing.assert_array_equal(columns(merged)["nll_dense_large"], expected)


# ---- routed validation subsets ---------------------------------------------------------------


def test_route_sequences_is_argmin_routing_of_the_first_rows(setup, tmp_path):
    routing = route_sequences(
        tokens_path=setup["chunks"][0],
        router=LMRouters(CONFIG, setup["routers"], device="cpu"),
        prefix_len=M,
        out=tmp_path / "routing.parquet",
        limit=10,
    )
    assert pq.read_table(tmp_path / "routing.parquet").equals(routing)
    assert routing.schema == pa.schema([("seq_id", pa.int64()), ("expert", pa.int16())])
    assert routing.column("seq_id").to_pylist() == list(range(1000, 1010))
    tokens = setup["tokens"][0][:10]
    nll = np.stack([scoring.prefix_nll(r, tokens, M) for r in load(setup["routers"])], axis=1)
    assert np.array_equal(routing.column("expert").to_numpy(), route(nll))


def test_split_by_expert_writes_each_experts_rows(setup, tmp_path):
    seq_ids = [1000, 1003, 2001, 1007, 2010]
    experts = [1, 0, 1, 0, 1]  # expert 2: none
    routing = tmp_path / "routing.parquet"
    routed = {"seq_id": pa.array(seq_ids, pa.int64()), "expert": pa.array(experts, pa.int16())}
    pq.write_table(pa.table(routed), routing)
    outs = [tmp_path / f"val/expert={e}.parquet" for e in range(E)]
    assert split_by_expert(setup["chunks"], routing, outs) == [2, 3, 0]
    source = pa.concat_tables([pq.read_table(path) for path in setup["chunks"]])
    original = {row["seq_id"]: row for row in source.to_pylist()}
    for e, out in enumerate(outs):
        table = pq.read_table(out)
        assert table.schema == source.schema
        wanted = sorted(s for s, x in zip(seq_ids, experts, strict=True) if x == e)
        assert sorted(table.column("seq_id").to_pylist()) == wanted
        assert all(row == original[row["seq_id"]] for row in table.to_pylist())

    pq.write_table(pa.table({"seq_id": [1000], "expert": pa.array([5], pa.int16())}), routing)
    with pytest.raises(ValueError, match="experts"):
        split_by_expert(setup["chunks"], routing, outs)
    pq.write_table(pa.table({"seq_id": [9], "expert": pa.array([0], pa.int16())}), routing)
    with pytest.raises(ValueError, match="no token file"):
        split_by_expert(setup["chunks"], routing, outs)
