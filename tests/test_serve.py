"""Using a trained mixture: the Python API, lazy experts, the CLI and the lm-eval adapter.

One tiny mixture is built once per session with the package's own functions (tokenizer, one
tokenized chunk, random tiny routers and experts, shards by source), laid out as the workflow
lays out a results directory (the `results` fixture of conftest.py); every test reads it
through `smalltalk.load`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import N_EXPERTS, REPO, TEXTS, with_random_router

import smalltalk
from smalltalk import checkpoint, cli, scoring, serve
from smalltalk.config import ConfigError, validate_config
from smalltalk.model import LM
from smalltalk.scoring import ensemble_log_weights, sequence_nll, token_logprobs
from smalltalk.serve.analysis import explain
from smalltalk.tokens import token_matrix


@pytest.fixture(autouse=True)
def no_grad():
    """The reference computations below need no gradients."""
    with torch.no_grad():
        yield


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every weights file the mixture reads from disk, in order."""
    seen = []
    original = checkpoint.load_model

    def counting(config, weights, device="auto"):
        seen.append(Path(weights).parent.name)  # e0, e1, ... for experts
        return original(config, weights, device)

    monkeypatch.setattr(checkpoint, "load_model", counting)
    return seen


def expert_of(path_name: str) -> int:
    return int(path_name.removeprefix("e"))


# ---- loading and lazy experts ----------------------------------------------------------------


def test_load_takes_every_path_from_the_results_config(results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing comes from the working directory
    loaded = smalltalk.load(results)
    assert loaded.n_experts == N_EXPERTS and loaded.prefix_len == 8
    assert loaded.loaded_experts == [] and loaded.expert_loads == []  # routers only
    with pytest.raises(FileNotFoundError, match="not a trained results directory"):
        smalltalk.load(tmp_path)


def test_only_requested_experts_are_loaded(results, loads):
    loaded = smalltalk.load(results, max_experts=N_EXPERTS)
    assert loads == ["final"] * N_EXPERTS  # the routers, at once
    loads.clear()
    routings = loaded.route(TEXTS * 3)
    assert loads == []  # routing reads nothing more
    score = loaded.score(TEXTS[0])
    assert [expert_of(name) for name in loads] == [routings[0].expert] == list(score.experts)
    loaded.score(TEXTS)  # every text's expert once, however many texts go to it
    wanted = sorted({r.expert for r in routings})
    assert sorted(expert_of(name) for name in loads) == wanted
    assert sorted(loaded.loaded_experts) == wanted


def test_the_lru_evicts_the_least_recently_used_expert(results, loads):
    loaded = smalltalk.load(results, max_experts=2)
    loads.clear()  # the routers
    resident = []
    for e in (0, 1, 0, 2, 0, 1, 1):
        loaded.expert(e)
        resident.append(loaded.loaded_experts)
    assert resident == [[0], [0, 1], [1, 0], [0, 2], [2, 0], [0, 1], [0, 1]]
    assert [expert_of(name) for name in loads] == loaded.expert_loads == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="no expert 3"):
        loaded.expert(3)


# ---- routing ---------------------------------------------------------------------------------


def test_routing_reads_the_first_m_tokens_and_short_prompts_what_they_have(results):
    loaded = smalltalk.load(results)
    routers = [
        checkpoint.load_model(
            loaded.router_config, results / "routers" / "final" / f"e{e}.safetensors"
        )
        for e in range(N_EXPERTS)
    ]
    prompts = [TEXTS[0], "In the", "God", ""]
    for prompt, routing in zip(prompts, loaded.route(prompts), strict=True):
        ids = loaded.encode(prompt)
        if len(ids) == 1:  # one token: read after EOS, the start of every document
            ids = [loaded.eos_id, *ids]
        used = min(len(ids), loaded.prefix_len)
        assert routing.prefix_tokens == used
        if used == 0:
            assert routing.expert == 0 and all(math.isnan(v) for v in routing.router_nll)
            continue
        tokens = np.array([ids[:used]])
        expected = [float(scoring.prefix_nll(router, tokens, used)[0]) for router in routers]
        np.testing.assert_allclose(routing.router_nll, expected, rtol=1e-6)
        assert routing.expert == int(np.argmin(expected))
    assert 1 < loaded.route(prompts[1]).prefix_tokens < loaded.prefix_len  # a short prompt
    # An explicit M-hat reads fewer tokens, as the evaluation's prefix sweep does.
    assert loaded.route(TEXTS[0], prefix_tokens=4).prefix_tokens == 4
    with pytest.raises(ValueError, match="prefix_tokens"):
        loaded.route(TEXTS[0], prefix_tokens=1)


# ---- scoring ---------------------------------------------------------------------------------


def test_score_is_the_routed_experts_sequence_nll(results):
    loaded = smalltalk.load(results)
    texts = [text[:30] for text in TEXTS]
    for text, score in zip(texts, loaded.score(texts), strict=True):
        ids = loaded.encode(text)
        expert = loaded.expert(score.routing.expert)
        assert len(ids) <= expert.config.seq_len + 1  # one window: Eq. 1 as the evaluation sums
        expected = float(sequence_nll(expert, torch.tensor([ids]))[0])
        assert score.tokens == len(ids) - 1
        assert score.nll == pytest.approx(expected, rel=1e-4)
        assert score.perplexity == pytest.approx(math.exp(expected / (len(ids) - 1)), rel=1e-4)


def test_long_texts_score_every_token_once(results):
    loaded = smalltalk.load(results)
    text = " ".join(TEXTS)
    ids = loaded.encode(text)
    assert len(ids) > 2 * (loaded.expert_config.seq_len + 1)
    score = loaded.score(text)
    expert = loaded.expert(score.routing.expert)
    expected = 0.0
    for j in range(
        1, len(ids)
    ):  # each token after at most seq_len tokens, windows as long as can be
        window_end = min(len(ids), 1 + -(-j // expert.config.seq_len) * expert.config.seq_len)
        begin = max(0, window_end - expert.config.seq_len - 1)
        logits, _ = expert(torch.tensor([ids[begin:j]]))
        expected -= float(F.log_softmax(logits[0, -1], dim=-1)[ids[j]])
    assert score.tokens == len(ids) - 1
    assert score.nll == pytest.approx(expected, rel=1e-4)


def test_topk_score_mixes_the_top_experts_as_the_evaluation_does(results):
    loaded = smalltalk.load(results, max_experts=N_EXPERTS)
    text = TEXTS[1][:30]
    score = loaded.score(text, topk=2)
    routing = score.routing
    log_weights = ensemble_log_weights(np.array(routing.router_nll), 2, loaded.temperature)
    assert len(score.experts) == 2 and routing.expert in score.experts
    ids = np.array([loaded.encode(text)])
    per_expert = torch.stack(
        [
            token_logprobs(loaded.expert(e), ids, 1)[0].double() + log_weights[e]
            for e in score.experts
        ]
    )
    assert score.nll == pytest.approx(-float(torch.logsumexp(per_expert, 0).sum()), rel=1e-6)
    dense = loaded.score(text, dense=True)
    assert dense.experts == () and dense.nll == pytest.approx(
        float(sequence_nll(loaded.dense(), torch.tensor(ids))[0]), rel=1e-5
    )
    with pytest.raises(ValueError, match="topk"):
        smalltalk.load(results, max_experts=1).score(TEXTS[0], topk=2)


# ---- generation ------------------------------------------------------------------------------


def greedy_reference(model: LM, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the model at every step."""
    ids = list(prompt)
    for _ in range(steps):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_generation_with_the_cache_equals_decoding_without_it(results):
    loaded = smalltalk.load(results)
    prompt = "In the beginning"
    generation = loaded.generate(prompt, max_new_tokens=16, temperature=0, stop_at_eos=False)
    ids = loaded.encode(prompt)
    expert = loaded.expert(generation.routing.expert)
    assert generation.experts == (generation.routing.expert,)
    assert list(generation.tokens) == greedy_reference(expert, ids, 16)
    assert generation.text == loaded.decode(ids + list(generation.tokens))[len(prompt) :]
    # Past seq_len the window slides; both modes slide it the same way.
    long = loaded.generate(prompt, max_new_tokens=80, temperature=0, stop_at_eos=False)
    again = loaded.generate(
        prompt, max_new_tokens=80, temperature=0, stop_at_eos=False, use_cache=False
    )
    assert len(long.tokens) == 80 and long.tokens == again.tokens
    assert long.tokens[:16] == generation.tokens


def test_sampling_is_reproducible_with_a_seed(results):
    loaded = smalltalk.load(results)
    runs = [
        loaded.generate(TEXTS[2], max_new_tokens=24, temperature=1.0, top_k=50, seed=seed)
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0].tokens != runs[2].tokens
    greedy = loaded.generate(TEXTS[2], max_new_tokens=24, temperature=0)
    assert loaded.generate(TEXTS[2], max_new_tokens=24, top_k=1, seed=3).tokens == greedy.tokens


def test_generation_stops_at_a_stop_string_and_mixes_top_experts(results):
    loaded = smalltalk.load(results, max_experts=N_EXPERTS)
    free = loaded.generate(TEXTS[0], max_new_tokens=40, temperature=0, stop_at_eos=False)
    stop = free.text[5:7]
    cut = loaded.generate(TEXTS[0], max_new_tokens=40, temperature=0, stop=[stop])
    assert cut.stopped == "stop" and cut.text == free.text[: free.text.find(stop)]
    mixed = loaded.generate(TEXTS[0], max_new_tokens=8, temperature=0, topk_experts=2)
    assert len(mixed.experts) == 2
    empty = loaded.generate("", max_new_tokens=4, temperature=0, stop_at_eos=False)
    assert len(empty.tokens) == 4  # an empty prompt starts a document


# ---- what the segments hold ------------------------------------------------------------------


def test_explain_shows_every_router_and_what_each_segment_holds(results):
    loaded = smalltalk.load(results)
    explanation = explain(loaded, TEXTS[0])
    routing = loaded.route(TEXTS[0])
    assert explanation["routing"] == routing.as_dict()
    segments = explanation["segments"]
    assert [s["expert"] for s in segments] == list(range(N_EXPERTS))
    assert [s["router_nll"] for s in segments] == list(routing.router_nll)
    for segment in segments:
        shard = pq.read_table(results / "shards" / f"expert={segment['expert']}")
        sources = shard.column("source").to_pylist()
        assert segment["sequences"] == len(sources)
        assert segment["sources"] == pytest.approx(
            {s: sources.count(s) / len(sources) for s in set(sources)}
        )
        assert list(segment["sources"].values()) == sorted(segment["sources"].values())[::-1]
        assert 0 < len(segment["tokens"]) <= 10
        counts = np.bincount(token_matrix(shard.column("tokens")).ravel(), minlength=512)
        ids = [loaded.tokenizer.piece_to_id(piece) for piece in segment["tokens"]]
        assert all(counts[i] > 0 for i in ids)  # each typical token occurs in the segment
    assert sum(s["share"] for s in segments) == pytest.approx(1.0)


def test_explain_refuses_shards_other_than_those_the_shard_check_listed(results, tmp_path, capsys):
    """A run killed while re-sharding leaves some chunks' shards missing: explain must not
    report segment sizes and sources from the rest, and names the file that differs."""
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    shard = copy / "shards" / "expert=1" / "c00000.parquet"
    kept = shard.read_bytes()

    def refusal() -> str:
        assert cli.main(["explain", "--results", str(copy), TEXTS[0]]) == 1
        captured = capsys.readouterr()
        assert not captured.out and "Traceback" not in captured.err
        return captured.err

    shard.unlink()
    error = refusal()
    assert f"{shard}: missing, though {copy / 'segmentation' / 'check.json'} lists it" in error
    shard.write_bytes(kept)
    stray = copy / "shards" / "expert=0" / "c00007.parquet"
    shutil.copy(shard, stray)  # left by a run of more chunks
    assert f"{stray}: a shard that" in refusal()
    stray.unlink()
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)  # rewritten since the check
    assert f"{shard}: {table.num_rows - 1} rows, but {table.num_rows} when" in refusal()
    pq.write_table(table, shard)
    check = copy / "segmentation" / "check.json"
    listing = json.loads(check.read_text())
    check.write_text(json.dumps({k: v for k, v in listing.items() if k != "shards"}))
    shard.unlink()  # a check written before it listed the shards: each expert's rows count
    assert "shards of expert 1: 0 rows, but" in refusal()
    check.unlink()
    assert f"{check}: missing, so nothing says the shards" in refusal()
    check.write_text(json.dumps(listing))
    pq.write_table(table, shard)
    assert cli.main(["explain", "--results", str(copy), TEXTS[0]]) == 0


# ---- retiring experts ------------------------------------------------------------------------


def probe_texts() -> list[str]:
    """Prompts of every length from the three domains: enough to reach every expert."""
    words = " ".join(TEXTS).split()
    return [" ".join(words[i : i + n]) for n in (1, 3, 8) for i in range(0, len(words), 5)]


def test_a_kept_subset_routes_by_the_argmin_of_the_kept_routers_alone(results, monkeypatch):
    texts = probe_texts()
    full = smalltalk.load(results).route(texts)
    retired = full[0].expert  # the first text must go elsewhere now
    kept = [e for e in range(N_EXPERTS) if e != retired]
    read = []  # every weights file loaded, relative to the results
    original = checkpoint.load_model

    def reading(config, weights, device="auto"):
        read.append(Path(weights).relative_to(results).as_posix())
        return original(config, weights, device)

    monkeypatch.setattr(checkpoint, "load_model", reading)
    subset = smalltalk.load(results, experts=kept[::-1], max_experts=N_EXPERTS)
    assert subset.experts == tuple(kept)  # ascending, whatever the order given
    assert read == [f"routers/final/e{e}.safetensors" for e in kept]  # the kept routers only

    for before, after in zip(full, subset.route(texts), strict=True):
        assert after.routers == tuple(kept)
        scores = np.array([before.router_nll[e] for e in kept])
        assert after.router_nll == tuple(scores)  # the same routers, the same numbers
        best = kept[int(np.argmin(np.nan_to_num(scores, nan=0.0)))]
        assert after.expert == best and after.expert != retired
        assert before.expert == after.expert or before.expert == retired

    # Scoring, top-k mixtures and generation use kept experts only, and never load the other.
    for score in subset.score(texts, topk=2):
        assert set(score.experts) <= set(kept)
        if np.isfinite(score.routing.router_nll).all():  # the c-BTM weights of the kept routers
            expected = np.full(N_EXPERTS, -np.inf)
            expected[kept] = ensemble_log_weights(
                np.array(score.routing.router_nll), 2, subset.temperature
            )
            np.testing.assert_array_equal(subset.log_weights(score.routing, 2), expected)
    subset.generate(texts[0], max_new_tokens=4, temperature=0, topk_experts=2)
    assert not any(path.startswith(f"experts/e{retired}/") for path in read)
    assert sorted(subset.expert_loads) == kept and retired not in subset.loaded_experts
    with pytest.raises(ValueError, match=f"expert {retired} is not served"):
        subset.expert(retired)
    with pytest.raises(ValueError, match=r"topk must lie in \[1, 2\]"):
        subset.score(texts[0], topk=3)
    explained = explain(subset, TEXTS[0])
    assert [s["expert"] for s in explained["segments"]] == kept


def test_a_baseline_router_keeps_the_columns_of_the_kept_experts(results, tmp_path):
    copy = with_random_router(results, tmp_path / "random")
    texts = probe_texts()
    full = smalltalk.load(copy).route(texts)
    for before, after in zip(full, smalltalk.load(copy, experts=[1, 2]).route(texts), strict=True):
        costs = [before.router_nll[1], before.router_nll[2]]
        assert after.router_nll == tuple(costs) and after.expert == 1 + int(np.argmin(costs))


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ([], "the list is empty"),
        ([0, 3, 7], r"no expert 3, 7 \(this mixture has experts 0..2\)"),
        ([1, 1], "expert 1 given more than once"),
        ([0, 0, -1], "no expert -1 .*; expert 0 given more than once"),  # every problem at once
        (["1"], "not expert indices: '1'"),
    ],
)
def test_the_experts_to_serve_are_checked(results, experts, message):
    with pytest.raises(ValueError, match=f"^experts: {message}"):
        smalltalk.load(results, experts=experts)


def test_the_cli_serves_the_experts_it_is_given(results, capsys):
    texts = probe_texts()[:6]
    common = ["--results", str(results), "--experts"]
    routed = run_cli(capsys, "route", *common, "0,2", "--json", *texts)
    expected = smalltalk.load(results, experts=[0, 2]).route(texts)
    assert [r["expert"] for r in routed] == [r.expert for r in expected]
    assert all(r["routers"] == [0, 2] and r["expert"] in (0, 2) for r in routed)
    assert cli.main(["route", *common, "2,2", "x"]) == 1
    error = capsys.readouterr().err
    assert error == "smalltalk route: error: experts: expert 2 given more than once\n"
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", *common, "0;2", "x"])
    assert exited.value.code == 2 and "write them as 0,2" in capsys.readouterr().err


def test_the_lm_eval_model_serves_the_experts_of_its_model_args(results):
    from smalltalk.harness import SmallTalkLM

    assert SmallTalkLM(results=str(results), experts="0;2").mixture.experts == (0, 2)
    assert SmallTalkLM(results=str(results), experts=1).mixture.experts == (1,)
    assert SmallTalkLM(results=str(results), experts=[2, 1]).mixture.experts == (1, 2)


# ---- the command line ------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> list[dict]:
    assert cli.main(list(args)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_answers_in_json_from_arguments_files_and_stdin(results, tmp_path, capsys, monkeypatch):
    loaded = smalltalk.load(results)
    common = ["--results", str(results), "--json"]
    routed = run_cli(capsys, "route", *common, TEXTS[0], TEXTS[1])
    assert [r["expert"] for r in routed] == [r.expert for r in loaded.route(TEXTS[:2])]
    assert routed[0]["text"] == TEXTS[0]

    texts = tmp_path / "texts.jsonl"  # JSON lines: texts with newlines in them
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    scored = run_cli(capsys, "score", *common, "--file", str(texts))
    assert [s["nll"] for s in scored] == pytest.approx([s.nll for s in loaded.score(TEXTS)])
    assert scored[1]["text"] == TEXTS[1]

    monkeypatch.setattr(sys, "stdin", io.StringIO("In the beginning\n"))
    (generated,) = run_cli(
        capsys, "generate", *common, "--temperature", "0", "--max-new-tokens", "5"
    )
    assert generated["prompt"] == "In the beginning"
    assert generated["text"] == loaded.generate("In the beginning", 5, temperature=0).text

    (explained,) = run_cli(capsys, "explain", *common, "")  # nothing to route on: NaN -> null
    assert explained["routing"]["router_nll"] == [None] * N_EXPERTS

    assert cli.main(["explain", "--results", str(results), TEXTS[2]]) == 0
    shown = capsys.readouterr().out
    assert "routed to expert" in shown and "*" in shown


def test_cli_score_router_scores_every_sequence_of_a_token_file(results, tmp_path):
    config, router = results / "config.yaml", results / "routers" / "final" / "e0.safetensors"
    out = tmp_path / "scores.parquet"
    tokens = results / "tokens" / "val" / "c00000.parquet"
    tokenizer = results / "tokenizer" / "spm.model"
    assert (
        cli.main(
            [
                "score-router",
                "--config",
                str(config),
                "--weights",
                str(router),
                "--tokenizer",
                str(tokenizer),
                "--tokens",
                str(tokens),
                "--out",
                str(out),
            ]
        )  # fmt: skip
        == 0
    )
    assert pq.read_table(out).num_rows == pq.read_table(tokens).num_rows


def break_results(results: Path, folder: Path, damage: str) -> tuple[Path, str]:
    """A copy of `results` with one kind of damage, and the file the error must name."""
    broken = folder / "broken"
    if damage == "only a config":
        broken.mkdir()
        shutil.copy(results / "config.yaml", broken)
        return broken, str(broken / "tokenizer" / "spm.model")
    shutil.copytree(results, broken)
    if damage == "truncated experts":
        for e in range(N_EXPERTS):
            path = broken / "experts" / f"e{e}" / "model.safetensors"
            path.write_bytes(path.read_bytes()[:100])
        return broken, "model.safetensors: not weights of this model"
    if damage == "empty router":
        path = broken / "routers" / "final" / "e1.safetensors"
        path.write_bytes(b"")
        return broken, f"{path}: not weights of this model"
    if damage == "no tokenizer":
        path = broken / "tokenizer" / "spm.model"
        path.unlink()
        return broken, f"{path}: tokenizer not found"
    path = broken / "config.yaml"
    if damage == "invalid config":
        path.write_text(path.read_text().replace("seq_len: 32", "seq_len: long"))
        return broken, f"{path}: invalid configuration:\n  seq_len: 'long' is not of type"
    path.write_text(path.read_text() + "seq_len: 32\n")  # a key given twice
    return broken, f"{path}: not valid YAML: duplicate key 'seq_len'"


@pytest.mark.parametrize(
    "damage",
    [
        "truncated experts",
        "empty router",
        "no tokenizer",
        "only a config",
        "invalid config",
        "twice",
    ],
)
def test_a_broken_results_directory_fails_naming_the_file(results, tmp_path, capsys, damage):
    broken, message = break_results(results, tmp_path, damage)
    assert cli.main(["score", "--results", str(broken), TEXTS[0]]) == 1
    error = capsys.readouterr().err
    assert message in error and error.startswith("smalltalk score: error: ")


def with_config_changed(results: Path, copy: Path, change: str) -> tuple[Path, str]:
    """A copy of `results` whose config.yaml is not that of its weights, and what the error
    must say: the file refused, the tensor or field, and both values."""
    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("shards", "harness", "tokens"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    router = copy / "routers" / "final" / "e0.safetensors"
    if change == "router width":
        config["models"]["router"]["n_embd"] = 4_000_000  # ~10^14 parameters
        said = f"{router}: tensor blocks.0.attn.c_attn.weight is [96, 32] in the file but "
        said += "[12000000, 4000000] in the model the config describes"
    elif change == "expert depth":
        config["models"]["expert"]["n_layer"] = 6
        said = f"{copy / 'experts' / 'e0' / 'model.safetensors'}: the file lacks tensors "
        said += "blocks.1.attn.c_attn.weight, blocks.1.attn.c_proj.weight, blocks.1.mlp.c_fc"
    else:  # the context length, which no tensor's shape records but training's header does
        router_config = smalltalk.load(results).router_config
        model = checkpoint.load_model(router_config, router, "cpu")
        recorded = {"role": "router", "model_config": dataclasses.asdict(router_config)}
        checkpoint.save_weights(model, router, metadata=recorded)
        config["seq_len"] = 64
        said = f"{router}: these weights are of a model with seq_len = 32 (recorded in its "
        said += "header), but the config gives seq_len = 64"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy, said


@pytest.mark.parametrize("change", ["router width", "expert depth", "context length"])
def test_a_config_that_is_not_that_of_the_weights_is_refused_before_any_model_is_built(
    results, tmp_path, capsys, monkeypatch, change
):
    changed, said = with_config_changed(results, tmp_path / "changed", change)

    def allocate(*args, **kwargs):
        raise AssertionError("a model was allocated before its weights were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", allocate)
    assert cli.main(["score", "--results", str(changed), TEXTS[0]]) == 1
    printed = capsys.readouterr()
    assert printed.err.startswith(f"smalltalk score: error: {said}") and printed.out == ""
    with pytest.raises(ValueError, match="the config"):
        smalltalk.load(changed)


def test_texts_that_are_not_utf8_or_missing_are_refused(results, tmp_path, capsys, monkeypatch):
    common = ["route", "--results", str(results)]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    assert cli.main([*common, "--file", str(latin1)]) == 1
    assert f"error: {latin1}: not UTF-8 text" in capsys.readouterr().err
    assert cli.main([*common, "--file", str(tmp_path)]) == 1
    assert f"error: {tmp_path}: cannot read it: Is a directory" in capsys.readouterr().err
    assert cli.main([*common, "caf\udce9"]) == 1  # how Python passes on the bytes of argv
    assert "error: text argument 1: not UTF-8 text" in capsys.readouterr().err
    for data, message in ((b"caf\xe9\n\x00\xff", "stdin: not UTF-8 text"), (b"", "no texts")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        assert cli.main(common) == 1
        assert f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": 5}', '"text" is 5, not a string'),
        ('{"text": null}', '"text" is null, not a string'),
        ('{"nottext": "a"}', "a JSON object without a \"text\" field (its keys: 'nottext')"),
        ('{"text": "caf\\udce9"}', "not valid Unicode (lone surrogate U+DCE9 at position 3)"),
    ],
    ids=["number", "null", "missing", "lone surrogate"],
)
def test_a_json_line_without_a_text_string_is_refused_naming_the_file_and_line(
    results, tmp_path, capsys, line, message
):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(f'{{"text": "fine"}}\n\n{line}\n')
    for command in ("route", "score", "generate", "explain"):
        assert cli.main([command, "--results", str(results), "--file", str(texts)]) == 1
        printed = capsys.readouterr()
        assert printed.err == f"smalltalk {command}: error: {texts}, line 3: {message}\n"
        assert printed.out == ""


def test_a_line_that_is_not_a_json_object_is_a_text_as_it_stands(results, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    lines = ["{not JSON, but code}", "5", '["a list"]', '"a string"']
    texts.write_text("\n".join(lines) + "\n")
    routed = run_cli(capsys, "route", "--results", str(results), "--json", "--file", str(texts))
    assert [r["text"] for r in routed] == lines


def test_a_text_that_is_not_valid_unicode_is_refused_by_the_mixture(results):
    loaded = smalltalk.load(results)
    bad = "caf\ud800"
    for call in (loaded.route, loaded.score):
        with pytest.raises(ValueError, match=r"^text 2 is not valid Unicode \(lone surrogate "):
            call([TEXTS[0], bad])
        with pytest.raises(
            ValueError, match=r"^text is not valid Unicode \(lone surrogate U\+D800 "
        ):
            call(bad)
    with pytest.raises(ValueError, match=r"^prompt is not valid Unicode \(.* at position 3\)$"):
        loaded.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^text is not valid Unicode"):
        explain(loaded, bad)


def test_a_seed_torch_cannot_take_is_refused_naming_it(results, capsys):
    for seed, message in (
        ("99999999999999999999999", "must be at most 2**64 - 1"),
        ("-1", "must be at least 0"),
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(["generate", "--results", str(results), "--seed", seed, TEXTS[0]])
        assert exited.value.code == 2
        assert f"argument --seed: {message}, got {seed}" in capsys.readouterr().err
    loaded = smalltalk.load(results)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*64 - 1\], got -1"):
        loaded.generate(TEXTS[0], max_new_tokens=2, seed=-1)
    loaded.generate(TEXTS[0], max_new_tokens=2, seed=2**64 - 1)  # the largest torch takes


@pytest.mark.parametrize(
    "option",
    [
        ["--temperature", "nan"],
        ["--temperature", "-1"],
        ["--threads", "0"],
        ["--max-new-tokens", "-5"],
        ["--max-new-tokens", "1e12"],
        ["--max-experts", "0"],
        ["--top-k", "0"],
    ],
    ids=" ".join,
)
def test_serving_options_out_of_range_are_refused(results, capsys, option):
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--results", str(results), *option, TEXTS[0]])
    assert exited.value.code == 2
    assert f"argument {option[0]}: " in capsys.readouterr().err


def test_generation_length_is_bounded(results, capsys):
    loaded = smalltalk.load(results)
    for wrong in (0, -5, serve.MAX_NEW_TOKENS + 1):
        with pytest.raises(ValueError, match="max_new_tokens must lie in"):
            loaded.generate(TEXTS[0], max_new_tokens=wrong)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        loaded.generate(TEXTS[0], temperature=math.nan)
    assert cli.main(["generate", "--results", str(results), "--max-new-tokens", "10" * 6, "x"]) == 1
    assert "max_new_tokens must lie in [1, 65536]" in capsys.readouterr().err


def test_threads_sharing_a_mixture_never_hold_more_than_max_experts(results, monkeypatch):
    loaded = smalltalk.load(results, max_experts=1)
    resident = []
    original = checkpoint.load_model

    def slow(config, weights, device="auto"):
        resident.append(len(loaded.loaded_experts))
        time.sleep(0.05)  # long enough for the other threads to ask for their experts
        model = original(config, weights, device)
        resident.append(len(loaded.loaded_experts))
        return model

    monkeypatch.setattr(checkpoint, "load_model", slow)
    start = threading.Barrier(4)

    def serve(first: int) -> None:
        start.wait()
        for e in range(first, first + 3):
            loaded.expert(e % N_EXPERTS)
            resident.append(len(loaded.loaded_experts))

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded.expert_loads) >= 3 and max(resident) <= 1


# ---- lm-evaluation-harness -------------------------------------------------------------------


def test_harness_task_is_built_from_the_test_split(results):
    folder = results / "harness" / "continuation_choice"
    task = yaml.safe_load((folder / "continuation_choice.yaml").read_text())
    assert task["dataset_path"] == "json" and task["output_type"] == "multiple_choice"
    questions = [json.loads(line) for line in (folder / "continuation_choice.jsonl").open()]
    assert len(questions) == 24
    test = pq.read_table(results / "tokens" / "test" / "c00000.parquet")
    ids, tokens = test.column("seq_id").to_pylist(), token_matrix(test.column("tokens"))
    rows = dict(zip(ids, tokens, strict=True))
    loaded = smalltalk.load(results)
    for question in questions:
        tokens = rows[question["seq_id"]].tolist()
        assert len(set(question["choices"])) == 4
        assert question["context"] == loaded.decode(tokens[:8])  # the routing prefix M
        answer = question["choices"][question["gold"]]
        assert question["context"] + answer == loaded.decode(tokens[:16])
    assert len({q["gold"] for q in questions}) > 1


def test_the_adapter_scores_as_the_experts_do(results):
    from lm_eval.api.instance import Instance

    from smalltalk.harness import SmallTalkLM

    lm = SmallTalkLM(results=str(results), max_experts=1)
    pairs = [(TEXTS[0][:20], TEXTS[0][20:35]), (TEXTS[1][:25], TEXTS[1][25:40]), ("", "Emma")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    answers = lm.loglikelihood(requests)
    loaded = lm.mixture
    for (context, continuation), (logprob, greedy) in zip(pairs, answers, strict=True):
        # lm-eval's split: the context's own tokens, then the rest of the whole text's
        context_ids = loaded.encode(context) if context else [loaded.eos_id]
        rest = loaded.encode(context + continuation)[len(context_ids) if context else 0 :]
        whole, n = context_ids + rest, len(rest)
        routed = context_ids if len(context_ids) >= 2 else whole
        expert = loaded.expert(loaded.route_ids([routed])[0].expert)
        logits, _ = expert(torch.tensor([whole[:-1]]))
        logprobs = F.log_softmax(logits[0, -n:], dim=-1)  # (n, V)
        targets = torch.tensor(whole[-n:])
        assert logprob == pytest.approx(float(logprobs[torch.arange(n), targets].sum()), rel=1e-5)
        assert greedy == bool((logprobs.argmax(dim=-1) == targets).all())

    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXTS[2],), 0)])
    routing = loaded.route(TEXTS[2])
    ids = [loaded.eos_id, *loaded.encode(TEXTS[2])]  # lm-eval scores the first token after EOS
    expected = float(serve.sequence_logprobs(loaded.expert(routing.expert), ids).sum())
    assert rolling[0] == pytest.approx(expected, rel=1e-5)

    prompt = "In the beginning"
    free = loaded.generate(prompt, max_new_tokens=12, temperature=0)
    assert len(free.text) >= 5
    until = free.text[3:5]
    (generated,) = lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": [until], "max_gen_toks": 12}), 0)]
    )
    assert generated == free.text[: free.text.find(until)]
    assert len(loaded.loaded_experts) == 1  # max_experts=1 held throughout


def test_the_adapter_mixes_top_k_experts_per_token(results):
    from lm_eval.api.instance import Instance

    from smalltalk.harness import SmallTalkLM

    lm = SmallTalkLM(results=str(results), topk=2, max_experts=N_EXPERTS)
    context, continuation = TEXTS[2][:20], TEXTS[2][20:30]
    ((logprob, _),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    loaded = lm.mixture
    context_ids = loaded.encode(context)
    rest = loaded.encode(context + continuation)[len(context_ids) :]
    whole, targets = context_ids + rest, torch.tensor(rest)
    weights = loaded.log_weights(loaded.route_ids([context_ids])[0], 2)
    rows = []
    for e in np.flatnonzero(np.isfinite(weights)):
        logits, _ = loaded.expert(int(e))(torch.tensor([whole[:-1]]))
        logprobs = F.log_softmax(logits[0, -len(rest) :], dim=-1)[torch.arange(len(rest)), targets]
        rows.append(logprobs.double() + weights[e])
    assert len(rows) == 2
    expected = float(
        torch.logsumexp(torch.stack(rows), dim=0).sum()
    )  # log sum_e w_e p_e, per token
    assert logprob == pytest.approx(expected, rel=1e-6)


def test_lm_eval_runs_the_local_task_offline(results, tmp_path, capsys):
    out, raw = tmp_path / "scores.parquet", tmp_path / "lm_eval.json"
    args = ["lm-eval", "--results", str(results), "--models", "mixture", "dense", "--limit", "12"]
    assert cli.main([*args, "--out", str(out), "--raw", str(raw)]) == 0
    table = pq.read_table(out).to_pylist()
    assert {(row["model"], row["metric"]) for row in table} == {
        (model, metric) for model in ("mixture", "dense") for metric in ("acc", "acc_norm")
    }
    for row in table:
        assert row["task"] == "continuation_choice" and row["examples"] == 12
        assert 0 <= row["value"] <= 1 and row["stderr"] >= 0
    assert "continuation_choice" in json.loads(raw.read_text())["mixture"]["results"]
    assert "mixture  continuation_choice" in capsys.readouterr().out


def test_lm_eval_names_an_unknown_task_and_the_tasks_there_are(results, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    args = ["lm-eval", "--results", str(results), "--tasks", "evil", "--out", str(out)]
    assert cli.main(args) == 1
    error = capsys.readouterr().err
    assert error.startswith(
        "smalltalk lm-eval: error: unknown lm-eval task 'evil': the tasks of this run and "
        "--include-path are continuation_choice; lm-eval's own "
    )
    assert "listed by 'lm-eval ls tasks'" in error and "Traceback" not in error
    assert not out.exists()


def test_lm_eval_never_imports_code_planted_in_the_results(results, tmp_path):
    planted = tmp_path / "results"
    shutil.copytree(results, planted)
    marker = tmp_path / "imported"
    for folder in ("continuation_choice", "planted"):  # the workflow's task, and a new one
        task_dir = planted / "harness" / folder
        task_dir.mkdir(exist_ok=True)
        (task_dir / "utils.py").write_text(
            f"open({str(marker)!r}, 'w').close()\n\ndef docs(dataset):\n    return dataset\n"
        )
        task = task_dir / "continuation_choice.yaml"
        text = task.read_text() if task.exists() else ""
        task.write_text(text + "process_docs: !function utils.docs\n")
    args = ["lm-eval", "--results", str(planted), "--limit", "4", "--threads", "1"]
    assert cli.main(args) == 0
    assert not marker.exists()


def test_config_refuses_options_that_do_not_fit_a_sequence():
    raw = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    validate_config(raw | {"harness": {"continuation_tokens": 49}})  # M = 16: 16 + 49 = S + 1
    with pytest.raises(ConfigError, match="harness.continuation_tokens: a question's M=16 tokens"):
        validate_config(raw | {"harness": {"continuation_tokens": 50}})
