"""`smalltalk export`: a self-contained copy of a trained mixture that serves exactly as the run,
whose experts load in Hugging Face transformers, written atomically, with its model card.

The run is a copy of conftest's tiny mixture with the aggregate tables a finished workflow
leaves (test perplexities with intervals, the FLOPs ledger, training summaries) added.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import N_EXPERTS, REPO, TEXTS, fill, with_random_router

import smalltalk
from smalltalk import checkpoint, cli, export
from smalltalk.serve import decode
from smalltalk.serve.analysis import explain

OVERALL = {
    "prefix_len": [4, 8],
    "sequences": [120, 120],
    "ppl_mixture": [31.5, 21.37],
    "ppl_dense": [30.0, 22.07],
    "ppl_topk": [29.0, 20.46],
    "ratio": [1.05, 0.968],
    "ratio_ci_low": [1.02, 0.959],
    "ratio_ci_high": [1.08, 0.976],
    "verdict": ["dense better", "mixture better"],
    "ratio_topk": [0.97, 0.927],
    "ratio_topk_ci_low": [0.95, 0.922],
    "ratio_topk_ci_high": [0.99, 0.932],
    "verdict_topk": ["top-k better", "top-k better"],
}
LEDGER = {
    "phase": ["training", "training"],
    "component": ["experts (Eq. 15)", "dense baseline (Eq. 10)"],
    "flops": [1.5e15, 1.4e15],
    "relative_to_dense": [1.071, 1.0],
}


@pytest.fixture(scope="module")
def run(results, tmp_path_factory) -> Path:
    """The tiny mixture with a finished run's tables beside it."""
    root = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(results, root)
    (root / "eval" / "summary").mkdir(parents=True)
    pq.write_table(pa.table(OVERALL), root / "eval" / "summary" / "overall.parquet")
    per_source = {"prefix_len": [8, 8], "source": ["bible", "austen"], "sequences": [60, 60]}
    pq.write_table(pa.table(per_source), root / "eval" / "summary" / "per_source.parquet")
    (root / "ledger").mkdir()
    pq.write_table(pa.table(LEDGER), root / "ledger" / "flops.parquet")
    for folder in [*(f"experts/e{e}" for e in range(N_EXPERTS)), "dense"]:
        summary = {"tokens": 36_000, "flops": 1.2e14, "seconds": 12.5}
        (root / folder / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "mixture"
    assert cli.main(["export", "--results", str(run), "--out", str(out), "--dense"]) == 0
    return out


def probe_texts() -> list[str]:
    words = " ".join(TEXTS).split()
    return [" ".join(words[i : i + n]) for n in (1, 3, 12) for i in range(0, len(words), 4)]


# ---- the export serves as the run does -------------------------------------------------------


@torch.no_grad()
def test_an_export_routes_scores_and_generates_exactly_as_its_results(run, exported):
    here, there = smalltalk.load(run, max_experts=2), smalltalk.load(exported, max_experts=2)
    texts = probe_texts()
    assert there.experts == tuple(range(N_EXPERTS)) and there.files.exported
    assert there.route(texts) == here.route(texts)
    for topk in (1, 2):
        assert there.score(texts, topk=topk) == here.score(texts, topk=topk)
    assert there.score(texts[:3], dense=True) == here.score(texts[:3], dense=True)
    for prompt in TEXTS:
        kwargs = {"max_new_tokens": 12, "temperature": 0, "stop_at_eos": False}
        assert there.generate(prompt, **kwargs) == here.generate(prompt, **kwargs)
        sampled = {"max_new_tokens": 12, "temperature": 1.0, "seed": 3, "topk_experts": 2}
        assert there.generate(prompt, **sampled) == here.generate(prompt, **sampled)
    requests = [(here.encode(t[:20]), here.encode(t[20:40])) for t in TEXTS]
    assert there.loglikelihoods(requests) == here.loglikelihoods(requests)


def test_an_export_of_some_experts_serves_them_alone(run, exported, tmp_path):
    out = tmp_path / "two"
    assert cli.main(["export", "--results", str(run), "--out", str(out), "--experts", "2,0"]) == 0
    two = smalltalk.load(out)
    assert two.experts == (0, 2)
    held = {p.relative_to(out).as_posix() for p in out.rglob("*.safetensors")}
    assert held == {
        "routers/final/e0.safetensors",
        "routers/final/e2.safetensors",
        "experts/e0/model.safetensors",
        "experts/e2/model.safetensors",
    }  # no expert 1, no router 1, no dense weights
    texts = probe_texts()
    assert two.route(texts) == smalltalk.load(run, experts=[0, 2]).route(texts)
    assert smalltalk.load(exported, experts=[0, 2]).route(texts) == two.route(texts)
    with pytest.raises(ValueError, match=r"expert 1 not here \(this export holds experts 0, 2\)"):
        smalltalk.load(out, experts=[1])
    with pytest.raises(FileNotFoundError, match="holds no dense baseline"):
        two.score(TEXTS[0], dense=True)
    with pytest.raises(FileNotFoundError, match="an export holds no training shards"):
        explain(two, TEXTS[0])

    one = tmp_path / "one"  # an export exports again: a subset of a subset
    export.export_mixture(out, one, experts=[2])
    assert smalltalk.load(one).experts == (2,)
    assert "data/demo/README.md" in json.loads((one / "export.json").read_text())["files"]


def test_an_export_of_a_baseline_routed_run_routes_as_it(results, tmp_path):
    run = with_random_router(results, tmp_path / "random")
    export.export_mixture(run, tmp_path / "out", experts=[1, 2])
    assert (tmp_path / "out" / "routers" / "random.npz").is_file()
    texts = probe_texts()
    exported = smalltalk.load(tmp_path / "out")
    assert exported.route(texts) == smalltalk.load(run, experts=[1, 2]).route(texts)


# ---- what the folder holds -------------------------------------------------------------------


def test_an_export_holds_its_files_tables_and_a_model_card(run, exported):
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["experts"] == list(range(N_EXPERTS)) and manifest["dense"] is True
    copied = ["config.yaml", "tokenizer/spm.model", "routers/final/e1.safetensors"]
    copied += ["eval/summary/overall.parquet", "eval/summary/per_source.parquet"]
    copied += ["ledger/flops.parquet", "experts/e2/summary.json", "dense/summary.json"]
    for name in copied:  # as the run wrote them
        assert (exported / name).read_bytes() == (run / name).read_bytes()
    for folder in [*(f"experts/e{e}" for e in range(N_EXPERTS)), "dense"]:
        files = {p.name for p in (exported / folder).iterdir()}
        assert files == {
            "config.json",
            "model.safetensors",
            "configuration_smalltalk.py",
            "modeling_smalltalk.py",
            "summary.json",
        }
        config = json.loads((exported / folder / "config.json").read_text())
        assert config["model_type"] == "smalltalk"
        assert config["architectures"] == ["SmallTalkForCausalLM"]
        assert (
            config["auto_map"]["AutoModelForCausalLM"] == "modeling_smalltalk.SmallTalkForCausalLM"
        )
    for name, digest in manifest["files"].items():  # every file, with its checksum
        assert (exported / name).is_file() and len(digest) == 64
    assert {"README.md", "data/demo/README.md", *copied} <= set(manifest["files"])
    assert not list(exported.parent.glob(".mixture*"))  # no temporary folder left

    card = (exported / "README.md").read_text()
    demo_licences = (REPO / "data" / "demo" / "README.md").read_text().split("## Licences")[1]
    assert "demo-000.jsonl.zst" in card and "provenance in `data/demo/`" in card
    assert demo_licences.strip().splitlines()[0] in card  # the corpus's licences, quoted
    assert "Source labels seen in the test split: austen, bible." in card
    assert "0.968 [0.959, 0.976]" in card and "mixture better" in card  # results with their CIs
    assert "0.927 [0.922, 0.932]" in card
    assert "| dense baseline (Eq. 10) | 1.400e+15 | 1.000 |" in card  # the FLOPs ledger
    assert "| expert 0 | 36,000 | 1.200e+14 | 12 |" in card
    assert "smalltalk.load(" in card and "trust_remote_code=True" in card
    assert "smalltalk verify path/to/this/folder" in card


def test_the_same_run_exports_the_same_bytes(run, exported, tmp_path):
    again = tmp_path / "again"
    export.export_mixture(run, again, dense=True)
    first = json.loads((exported / "export.json").read_text())["files"]
    second = json.loads((again / "export.json").read_text())["files"]
    assert first == second


# ---- writing it safely -----------------------------------------------------------------------


def test_an_export_never_overwrites_unless_forced_and_leaves_nothing_when_it_fails(
    run, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", "--results", str(run), "--out", str(out)]) == 1
    assert "exists and is not empty; give --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(export, "model_card", broken)
    assert cli.main(["export", "--results", str(run), "--out", str(out), "--force"]) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched by the failed export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    monkeypatch.undo()

    assert cli.main(["export", "--results", str(run), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export.export_mixture(run, empty, experts=[1])  # an empty folder needs no --force
    assert smalltalk.load(empty).experts == (1,)

    for inside in (run, run.parent):  # the results, or a folder holding them
        assert cli.main(["export", "--results", str(run), "--out", str(inside), "--force"]) == 1
        assert "which the export reads; choose another --out" in capsys.readouterr().err
    assert (run / "config.yaml").is_file()


NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"
"""What safetensors 0.8 raises when the disk fills under `save_file` (a SafetensorError)."""


def test_an_export_onto_a_full_disk_fails_in_one_line_naming_it_and_leaves_nothing(
    run, tmp_path, capsys, monkeypatch
):
    import safetensors.torch
    from safetensors import SafetensorError

    real_save_file, saved = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        if saved:  # the disk fills during the second expert
            raise SafetensorError(NO_SPACE)
        saved.append(path)
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "exports" / "of" / "mixture"  # in folders that the export makes
    assert cli.main(["export", "--results", str(run), "--out", str(out)]) == 1
    assert saved and capsys.readouterr().err == (
        f"smalltalk export: error: {out}: No space left on device\n"
    )
    assert list(tmp_path.iterdir()) == []  # no build folder, nor the folders made for `out`


def test_an_export_onto_a_really_full_disk_fails_in_one_line_and_leaves_nothing(
    run, small_disk, capsys, monkeypatch
):
    import safetensors.torch

    real_save_file, raised = safetensors.torch.save_file, []

    def save_file(*args, **kwargs):
        try:
            return real_save_file(*args, **kwargs)
        except Exception as error:
            raised.append(type(error).__name__)
            raise

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    fill(small_disk, leave=400_000)  # room for the tokenizer and routers, not for an expert too
    out = small_disk / "exports" / "mixture"
    assert cli.main(["export", "--results", str(run), "--out", str(out)]) == 1
    assert raised == ["SafetensorError"]  # the expert's weights met the full disk
    assert capsys.readouterr().err == f"smalltalk export: error: {out}: No space left on device\n"
    assert [path.name for path in small_disk.iterdir()] == ["filler"]


def test_an_export_inside_the_results_directory_is_refused_and_deletes_nothing(
    run, tmp_path, capsys
):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shards"))
    (copy / "tokens" / "stray").mkdir()  # an empty folder of the run: replaced without --force
    before = sorted(path.relative_to(copy) for path in copy.rglob("*"))
    for out in ("tokens", "tokens/stray", "experts", "new-folder"):
        args = ["export", "--results", str(copy), "--out", str(copy / out), "--force"]
        assert cli.main(args) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"smalltalk export: error: {copy.resolve() / out}: ")
        assert error.endswith("which the export reads; choose another --out\n")
        if out != "experts":  # which holds the weights it reads, and says so
            assert f": inside the results directory {copy.resolve()}, which" in error
    assert sorted(path.relative_to(copy) for path in copy.rglob("*")) == before


def test_an_export_whose_config_is_not_that_of_its_experts_is_refused(exported, tmp_path, capsys):
    changed = tmp_path / "changed"
    shutil.copytree(exported, changed)
    config = changed / "config.yaml"
    assert "\nseq_len: 32\n" in config.read_text()
    config.write_text(config.read_text().replace("\nseq_len: 32\n", "\nseq_len: 65536\n"))
    generate = ["generate", "--results", str(changed), "--max-new-tokens", "2", "x"]
    assert cli.main(generate) == 1  # its sha256 is no longer the one export.json records
    assert capsys.readouterr().err.startswith(
        f"smalltalk generate: error: {config.resolve()}: changed since the export"
    )
    # Unchecked, the config is still compared with the weights' own record of their shapes.
    expert = changed.resolve() / "experts" / "e0" / "model.safetensors"
    assert cli.main([*generate, "--no-verify"]) == 1
    printed = capsys.readouterr()
    assert printed.err == (
        f"smalltalk generate: error: {expert}: these weights are of a model with seq_len = 32 "
        f"(recorded in {expert.with_name('config.json')}), but the config gives seq_len = 65536\n"
    )
    assert printed.out == ""


def test_load_runs_no_code_from_an_export(exported, tmp_path):
    planted = tmp_path / "planted"
    shutil.copytree(exported, planted)
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for path in planted.rglob("*.py"):
        path.write_text(payload + path.read_text())
    (planted / "tokenizer" / "__init__.py").write_text(payload)
    before = set(sys.modules)
    mixture = smalltalk.load(planted)  # it reads no Python file, so none of them is checked
    mixture.score(TEXTS, topk=2)
    mixture.generate(TEXTS[0], max_new_tokens=4, temperature=0)
    mixture.score(TEXTS[0], dense=True)
    assert not marker.exists()
    assert not {
        name for name in set(sys.modules) - before if "smalltalk" in name and "modeling" in name
    }
    assert cli.main(["verify", str(planted)]) == 1  # but transformers would run them


# ---- checked against its manifest ------------------------------------------------------------


def zero_every_tensor(path: Path) -> None:
    """Rewrite a safetensors file with every tensor zeroed: the same names, shapes and header
    metadata, so that only the digest tells."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as weights:
        metadata, names = weights.metadata(), weights.keys()
        tensors = {name: torch.zeros_like(weights.get_tensor(name)) for name in names}
    save_file(tensors, path, metadata=metadata)


CHANGED = "changed since the export (its sha256 is not the one export.json records)"
DAMAGES = {  # what happened to the copy: (the file it names, what is wrong with it)
    "zeroed": ("experts/e1/model.safetensors", CHANGED),
    "deleted": ("experts/e0/model.safetensors", "missing (export.json lists it)"),
    "stray": ("routers/final/e3.safetensors", "not listed in export.json"),
    "tokenizer": ("tokenizer/spm.model", CHANGED),
}


def damaged_copy(exported: Path, copy: Path, damage: str) -> Path:
    shutil.copytree(exported, copy)
    name = DAMAGES[damage][0]
    if damage == "zeroed":
        zero_every_tensor(copy / name)
    elif damage == "deleted":
        (copy / name).unlink()
    elif damage == "stray":
        shutil.copyfile(copy / "routers" / "final" / "e0.safetensors", copy / name)
    else:
        with open(copy / name, "ab") as file:
            file.write(b"\0")
    return copy.resolve()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_load_and_verify_refuse_an_export_whose_files_are_not_those_it_lists(
    exported, tmp_path, capsys, damage
):
    damaged = damaged_copy(exported, tmp_path / "damaged", damage)
    name, problem = DAMAGES[damage]
    with pytest.raises(ValueError) as refused:
        smalltalk.load(damaged)
    assert str(refused.value).startswith(f"{damaged / name}: {problem}")

    assert cli.main(["score", "--results", str(damaged), TEXTS[0]]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith(f"smalltalk score: error: {damaged / name}: {problem}")
    assert printed.err.count("\n") == 1 and "Traceback" not in printed.err

    assert cli.main(["verify", str(damaged)]) == 1
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert [line for line in lines if not line.endswith(": ok")] == [f"{name}: {problem}"]
    listed = json.loads((damaged / "export.json").read_text())["files"]
    assert len(lines) == len(listed) + (damage == "stray")  # every file listed, one line each
    assert (
        printed.err
        == f"smalltalk verify: error: {damaged}: 1 of {len(lines)} files fail the check\n"
    )

    out = tmp_path / "again"  # exported again, it would get digests vouching for the damage
    assert cli.main(["export", "--results", str(damaged), "--out", str(out)]) == 1
    assert f"error: {damaged / name}: {problem}" in capsys.readouterr().err
    assert not out.exists()


@torch.no_grad()
def test_an_export_loads_unchecked_with_verify_false(exported, tmp_path, capsys):
    zeroed = damaged_copy(exported, tmp_path / "zeroed", "zeroed")
    mixture = smalltalk.load(zeroed, experts=[1], verify=False)
    vocab_size = mixture.expert_config.vocab_size
    # Zeroed weights give every token the same logit: perplexity V, and not a word said.
    assert mixture.score(TEXTS[0]).perplexity == pytest.approx(vocab_size, rel=1e-5)
    assert cli.main(["score", "--results", str(zeroed), "--no-verify", "--json", TEXTS[0]]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == TEXTS[0]
    deleted = damaged_copy(exported, tmp_path / "deleted", "deleted")
    assert smalltalk.load(deleted, experts=[1, 2], verify=False).experts == (1, 2)


def test_verify_passes_a_sound_export_file_by_file_and_refuses_a_results_directory(
    run, exported, capsys
):
    assert cli.main(["verify", str(exported)]) == 0
    listed = json.loads((exported / "export.json").read_text())["files"]
    assert capsys.readouterr().out.splitlines() == [f"{name}: ok" for name in listed]
    assert cli.main(["verify", str(run)]) == 1
    assert capsys.readouterr().err == (
        f"smalltalk verify: error: {run.resolve()}: no export.json, so not an export (a results "
        "directory records no sha256 to check)\n"
    )
    assert smalltalk.load(run, verify=True).experts == tuple(range(N_EXPERTS))  # as before


def test_files_are_hashed_in_chunks_as_hashlib_hashes_them_whole(tmp_path):
    from smalltalk.verify import CHUNK_BYTES, sha256_of

    for size in (0, 1, CHUNK_BYTES, 2 * CHUNK_BYTES + 17):
        path = tmp_path / f"{size}.bin"
        data = np.random.default_rng(size).bytes(size)
        path.write_bytes(data)
        assert sha256_of(path) == hashlib.sha256(data).hexdigest()


# ---- Hugging Face transformers ---------------------------------------------------------------


@torch.no_grad()
def test_transformers_loads_every_exported_model_with_our_logits(
    run, exported, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")

    ours = smalltalk.load(run)
    torch.manual_seed(0)
    ids = torch.randint(0, ours.expert_config.vocab_size, (2, ours.expert_config.seq_len))
    folders = [*(f"experts/e{e}" for e in range(N_EXPERTS)), "dense"]
    for folder in folders:
        source = run / folder / "model.safetensors"
        model = checkpoint.load_model(ours.expert_config, source, "cpu")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            exported / folder, trust_remote_code=True
        ).eval()
        assert type(hf).__name__ == "SmallTalkForCausalLM"
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
        expected, _ = model(ids)  # (2, S, V)
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-4, rtol=0)
        # Decoding with transformers' cache: every step's logits are those of our model over the
        # whole sequence so far, and the greedy tokens are ours.
        prompt = ours.encode(TEXTS[0])[:6]
        generated = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full, _ = model(generated.sequences[:, :-1])  # (1, 15, V)
        steps = torch.stack(generated.logits, dim=1)  # (1, 10, V)
        torch.testing.assert_close(steps, full[:, len(prompt) - 1 :], atol=1e-4, rtol=0)
        greedy = decode([model], [0.0], prompt, max_new_tokens=10, choose=lambda s: int(s.argmax()))
        assert generated.sequences[0, len(prompt) :].tolist() == list(greedy)
    modeling = (exported / "experts" / "e0" / "modeling_smalltalk.py").read_text()
    assert "import smalltalk" not in modeling and "from smalltalk" not in modeling
    np.testing.assert_array_equal(  # the exported weights are the run's, value for value
        hf.lm_head.weight.numpy(),
        checkpoint.load_model(
            ours.expert_config, run / "dense" / "model.safetensors"
        ).lm_head.weight.numpy(),
    )
