"""`smalltalk export`: a trained mixture as one self-contained folder with its model card.

    out/README.md                     the model card: data and licences, budget, results, use
    out/export.json                   the manifest: experts held, source, sha256 of every file
    out/config.yaml                   the run's resolved config, unchanged
    out/tokenizer/spm.model           the SentencePiece model
    out/routers/final/e{e}.safetensors  the final routers of the experts exported
    out/experts/e{e}/                 Hugging Face layout: config.json, model.safetensors,
                                      configuration_smalltalk.py, modeling_smalltalk.py,
                                      and the training records summary.json, metrics.parquet
    out/dense/                        the same for the dense baseline (weights with --dense)
    out/eval/summary/*.parquet ...    the run's aggregate tables (`RECORDS`)
    out/data/{corpus}/                the inputs' provenance README and licence files

Every file is copied to the place `smalltalk.layout` gives it in an export, so `smalltalk.load`
reads the export with the code that reads a results directory, and routes, scores and generates
exactly as it does there. The folder is built beside `out` and renamed into place; an existing
`out` is replaced only with `force`, and a failure (a full disk included: an OSError naming
`out`) leaves everything as it was, without even the folders made to hold `out`. Expert weights
are rewritten for transformers (the tied embedding stored as `wte.weight`, `format: pt` in the
header); the values are unchanged.

An export exported again is first checked against its manifest (`smalltalk.verify`), as loading
it would be: its files get new digests here, which would otherwise vouch for changed weights.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smalltalk import __version__
from smalltalk.config import ModelConfig
from smalltalk.files import DISK_FULL, new_folders_removed_on_failure
from smalltalk.layout import (
    EXPORT_MANIFEST,
    MixtureFiles,
    mixture_files,
    served_experts,
    workflow_path,
)
from smalltalk.verify import check_mixture, mixture_paths, sha256_of

RECORDS = (
    "eval/summary/*.parquet",  # test perplexities with their intervals (`aggregate.AGGREGATES`)
    "ledger/*.parquet",  # FLOPs and communication
    "harness/scores.parquet",  # lm-eval scores
    "tokens/summary.tsv",  # documents, sequences and tokens per split
    "routers/diagnostics.parquet",  # the EM's rounds
    "routers/final/em.json",  # where and why EM ended
    "segmentation/check.json",  # every train sequence in one shard
)
"""The aggregate tables and records of a run that an export carries, where they exist."""
TRAINING_RECORDS = ("summary.json", "metrics.parquet")  # beside each expert's weights
HF_FILES = ("configuration_smalltalk.py", "modeling_smalltalk.py")  # from smalltalk/hf/
OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' messages end with an errno
AUTO_MAP = {
    "AutoConfig": "configuration_smalltalk.SmallTalkConfig",
    "AutoModelForCausalLM": "modeling_smalltalk.SmallTalkForCausalLM",
}


def export_mixture(
    results: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experts: Sequence[int] | None = None,
    dense: bool = False,
    force: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Export the mixture in `results` (a results directory, or an export) to `out`: all its
    experts or those in `experts`, the dense baseline's weights with `dense`. Returns the
    manifest. Refuses an existing non-empty `out` unless `force`, and an export `results` whose
    files fail their check against its manifest unless `verify` is False."""
    source = mixture_files(results)
    kept = served_experts(experts, source.available_experts, source.n_experts)
    if verify:  # (dense weights it does not hold are "not found" below, not "not listed")
        held_dense = dense and bool((source.manifest or {}).get("dense"))
        check_mixture(source, mixture_paths(source, kept, dense=held_dense))
    out = Path(out).resolve()
    _check_destination(out, [source.root, *_files_to_copy(source, kept, dense)], force)
    build = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)  # left by a run of this process killed earlier
    try:
        with new_folders_removed_on_failure([out.parent]):
            return _build_and_replace(source, kept, dense, build, out)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        # Named after `out`: the file it failed on lay in the build folder, removed since.
        raise OSError(error.errno, os.strerror(error.errno), str(out)) from error


def _build_and_replace(
    source: MixtureFiles, kept: Sequence[int], dense: bool, build: Path, out: Path
) -> dict[str, Any]:
    """Build the export in `build`, then rename it to `out`; `build` is removed if that fails."""
    build.mkdir(parents=True)
    try:
        manifest = _build(source, kept, dense, build)
        _replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return manifest


def _files_to_copy(source: MixtureFiles, kept: Sequence[int], dense: bool) -> list[Path]:
    """The tokenizer and weights the export needs, each checked to exist before anything is
    written."""
    needed = [source.tokenizer, *source.routers(kept), *(source.expert(e) for e in kept)]
    needed += [source.dense] if dense else []
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; has the workflow finished this run?")
    return needed


def _check_destination(out: Path, sources: Sequence[Path], force: bool) -> None:
    """Refuse an `out` that holds what the export reads (the results directory, or a tokenizer or
    dense baseline it shares with other runs), or that lies inside the results directory: with
    `force`, replacing `results/tokens` would delete the run's own files, and even a new folder
    there would be taken for part of the run. `sources[0]` is the results directory."""
    for path in sources:
        if path == out or out in path.parents:
            raise ValueError(f"{out}: holds {path}, which the export reads; choose another --out")
    if sources[0] in out.parents:
        raise ValueError(
            f"{out}: inside the results directory {sources[0]}, which the export reads; "
            "choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: exists and is not empty; give --force to replace it")


def _replace(build: Path, out: Path) -> None:
    """Rename the finished `build` to `out`, moving aside (then deleting) what `out` held."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    elif out.is_dir():
        out.rmdir()
    os.replace(build, out)
    if old is not None:
        shutil.rmtree(old)


# ---- building the folder ---------------------------------------------------------------------


def _build(source: MixtureFiles, kept: Sequence[int], dense: bool, build: Path) -> dict[str, Any]:
    import sentencepiece as spm

    from smalltalk.config import model_config

    shutil.copyfile(source.root / "config.yaml", build / "config.yaml")
    manifest = {
        "format": "smalltalk-export",
        "version": 1,
        "smalltalk_version": __version__,
        "exported_from": str(source.root),
        "method": source.method,
        "n_experts": source.n_experts,
        "experts": list(kept),
        "dense": dense,
    }
    _write_json(manifest, build / EXPORT_MANIFEST)
    target = mixture_files(build)  # where each file goes, as `load` will look for it

    _copy(source.tokenizer, target.tokenizer)
    for router, copy in zip(source.routers(kept), target.routers(kept), strict=True):
        _copy(router, copy)
    tokenizer = spm.SentencePieceProcessor(model_file=str(target.tokenizer))
    config = model_config(source.config, "expert", vocab_size=tokenizer.get_piece_size())
    models = [(source.expert(e), target.expert(e), {"role": "expert", "expert": e}) for e in kept]
    models += [(source.dense, target.dense, {"role": "dense"})] if dense else []
    for weights, copy, role in models:
        write_hf_model(weights, config, copy.parent, eos_token_id=tokenizer.eos_id(), role=role)
    # Training records: every exported expert's, and the dense baseline's even without its
    # weights, since the results compare the mixture with it.
    trained = [(source.expert(e).parent, target.expert(e).parent) for e in kept]
    for folder, copy in [*trained, (source.dense.parent, target.dense.parent)]:
        for name in TRAINING_RECORDS:
            if (folder / name).is_file():
                _copy(folder / name, copy / name)
    for pattern in RECORDS:
        for path in sorted(source.root.glob(pattern)):
            _copy(path, build / path.relative_to(source.root))
    provenance = copy_provenance(source, build / "data")
    manifest["provenance"] = [{"pattern": p.pattern, "folder": p.folder} for p in provenance]

    card = model_card(target, config, provenance, exported_from=source.root)
    (build / "README.md").write_text(card, encoding="utf-8")
    manifest["files"] = {
        path.relative_to(build).as_posix(): sha256_of(path)
        for path in sorted(build.rglob("*"))
        if path.is_file() and path.name != EXPORT_MANIFEST
    }
    _write_json(manifest, build / EXPORT_MANIFEST)
    return manifest


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _write_json(value: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_hf_model(
    weights: Path,
    config: ModelConfig,
    folder: Path,
    *,
    eos_token_id: int,
    role: dict[str, Any],
) -> None:
    """`folder` in the Hugging Face layout: `config.json` naming our model classes (`auto_map`),
    `model.safetensors` and the two modules that define them (`smalltalk/hf/`)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from smalltalk.checkpoint import load_model

    model = load_model(config, weights, "cpu")  # checks that the file holds this model
    # The tied embedding once, as `wte.weight`, the name transformers ties `lm_head` to.
    tensors = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if name != "lm_head.weight"
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    try:
        # One metadata entry, so that the same weights give the same bytes (`save_weights`).
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as error:
        # safetensors reports the OS's errors (a full disk) as its own, with the errno in words.
        if (wrapped := OS_ERROR.search(str(error))) is None:
            raise
        code = int(wrapped[1])
        raise OSError(code, os.strerror(code), str(path)) from error
    hf_config = {
        "architectures": ["SmallTalkForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_type": "smalltalk",
        **dataclasses.asdict(config),
        "rms_norm_eps": model.norm_f.eps,
        "tie_word_embeddings": True,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "smalltalk": {**role, "version": __version__},
    }
    _write_json(hf_config, folder / "config.json")
    for name in HF_FILES:
        source = importlib.resources.files("smalltalk.hf") / name
        (folder / name).write_bytes(source.read_bytes())


# ---- provenance of the inputs ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Provenance:
    pattern: str
    """An input glob of the run's config."""
    folder: str | None
    """Where its provenance files went in the export (`data/{corpus}`), if it has any."""
    licences: str | None = dataclasses.field(default=None, repr=False)
    """The "Licences" section of the corpus README, if it has one."""


def copy_provenance(source: MixtureFiles, into: Path) -> list[Provenance]:
    """For each input glob, the README and licence files of the folder the glob starts in (as
    `data/demo/` documents the demo corpus), copied to `into/{folder name}`."""
    exported = {
        item["pattern"]: item["folder"] for item in (source.manifest or {}).get("provenance", [])
    }  # an export's inputs are elsewhere: their provenance is in its data/ folder
    found, taken = [], {}
    grown = [pattern for entry in source.config.get("grow") or [] for pattern in entry["inputs"]]
    for pattern in [*source.config["inputs"], *grown]:
        fixed = _fixed_parts(pattern)
        if source.exported:
            folder = source.root / exported[pattern] if exported.get(pattern) else None
        elif fixed:
            folder = workflow_path(source.root, source.config, str(Path(*fixed)))
        else:
            folder = None
        if folder is not None and folder.is_file():
            folder = folder.parent
        files = [] if folder is None or not folder.is_dir() else _provenance_files(folder)
        if not files:
            found.append(Provenance(pattern=pattern, folder=None, licences=None))
            continue
        name = taken.get(folder) or _unique(folder.name or "corpus", set(taken.values()))
        taken[folder] = name
        for path in files:
            _copy(path, into / name / path.name)
        readme = next((p for p in files if p.name.lower().startswith("readme")), None)
        licences = _section(readme.read_text(encoding="utf-8"), "licen") if readme else None
        found.append(Provenance(pattern=pattern, folder=f"data/{name}", licences=licences))
    return found


def _fixed_parts(pattern: str) -> list[str]:
    """The leading path components of a glob that hold no wildcard."""
    parts = []
    for part in Path(pattern).parts:
        if any(char in part for char in "*?["):
            break
        parts.append(part)
    return parts


def _provenance_files(folder: Path) -> list[Path]:
    names = re.compile(r"(readme|licen[cs]e|copying|notice)(\.(md|txt|rst))?", re.IGNORECASE)
    return sorted(p for p in folder.iterdir() if p.is_file() and names.fullmatch(p.name))


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _section(markdown: str, heading: str) -> str | None:
    """The body of the first Markdown section whose heading starts with `heading` (any case),
    up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    headings, fenced = [], False  # (line, level, title); "# ..." in a code block is no heading
    for i, line in enumerate(lines):
        fenced ^= line.startswith("```")
        if not fenced and (match := re.match(r"(#+)\s+(.*)", line)):
            headings.append((i, len(match[1]), match[2]))
    for n, (start, level, title) in enumerate(headings):
        if title.lower().startswith(heading):
            ends = [i for i, other, _ in headings[n + 1 :] if other <= level]
            return "\n".join(lines[start + 1 : ends[0] if ends else len(lines)]).strip() or None
    return None


# ---- the model card --------------------------------------------------------------------------


def model_card(
    target: MixtureFiles,
    expert_config: ModelConfig,
    provenance: Sequence[Provenance],
    *,
    exported_from: Path,
) -> str:
    """README.md of an export: what it holds, its data, training budget, results and use."""
    import torch

    from smalltalk.config import model_config
    from smalltalk.model import LM

    config, manifest = target.config, target.manifest
    experts, n_experts = manifest["experts"], target.n_experts
    with torch.device("meta"):  # counts parameters without allocating them
        parameters = LM(expert_config).num_parameters()
    routing = config["routing"]
    kept = "all" if len(experts) == n_experts else f"{len(experts)} of the run's E = {n_experts}"
    router = "no LM (a fitted baseline, `routers/`)"
    if target.method == "smalltalk":
        router_config = model_config(config, "router", vocab_size=expert_config.vocab_size)
        with torch.device("meta"):
            size = _count(LM(router_config).num_parameters())
        router = f"{size} parameters, {_model_line(router_config)} (`routers/final/`)"
    lines = [
        f"# SmallTalk mixture: {len(experts)} experts of {_count(parameters)} parameters",
        "",
        "A mixture of language models trained with SmallTalk (*No Need to Talk: Asynchronous "
        "Mixture of Language Models*): small router LMs score the first M tokens of a text and "
        "the expert whose router finds them likeliest answers alone. Every model is a pre-norm "
        "decoder-only Transformer: RMSNorm, rotary positions, a GELU MLP, tied embeddings.",
        "",
        "| | |",
        "|---|---|",
        f"| experts | {', '.join(map(str, experts))} ({kept}) |",
        f"| routing | `{target.method}`, prefix M = {routing['prefix_len']} tokens |",
        f"| expert model | {_model_line(expert_config)} (`experts/e{{e}}/`) |",
        f"| router model | {router} |",
        f"| tokenizer | SentencePiece, V = {expert_config.vocab_size} (`tokenizer/spm.model`) |",
        f"| dense baseline | {'included (`dense/`)' if manifest['dense'] else 'not included'} |",
        f"| exported from | `{exported_from}` with smalltalk {__version__} |",
        "",
        "## Data",
        "",
        "The run read these inputs (`inputs` in `config.yaml`; then `grow`, the corpora of "
        "experts added later):",
        "",
    ]
    for item in provenance:
        where = f"; provenance in `{item.folder}/`" if item.folder else ""
        lines.append(f"- `{item.pattern}`{where}")
    sources = _table(target.root / "eval" / "summary" / "per_source.parquet")
    if sources:
        labels = sorted({row["source"] for row in sources})
        lines += ["", f"Source labels seen in the test split: {', '.join(labels)}."]
    licences = [item for item in provenance if item.licences]
    if licences:
        lines += ["", "### Licences", ""]
        for item in licences:
            lines += [f"From `{item.folder}/README.md`:", "", _demote(item.licences), ""]
    else:
        lines += ["", "No licence files were found beside the inputs; check the data's terms."]
    lines += ["", *_budget(target, config, expert_config), "", *_results(target, routing)]
    lines += ["", *_usage(experts)]
    return "\n".join(lines).rstrip() + "\n"


def _count(parameters: int) -> str:
    """1.27B, 335M, 4.40M, 31.3k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.3g}{unit}"
    return str(parameters)


def _model_line(config: ModelConfig) -> str:
    return f"L = {config.n_layer}, H = {config.n_embd}, A = {config.n_head}, S = {config.seq_len}"


def _demote(markdown: str) -> str:
    """Headings two levels down, to sit under the card's own."""
    return re.sub(r"^(#+)", r"\1##", markdown, flags=re.MULTILINE)


def _table(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _budget(target: MixtureFiles, config: dict, expert_config: ModelConfig) -> list[str]:
    training = config["training"]
    expert = training["expert"]
    per_expert = expert["steps"] * expert["batch_size"] * config["seq_len"]
    lines = [
        "## Training budget",
        "",
        f"Each expert: {expert['steps']:,} steps of {expert['batch_size']} sequences of "
        f"{config['seq_len']} tokens, {per_expert:,} tokens, on its own segment only. The dense "
        f"baseline: as many tokens as all {target.n_experts} experts together "
        f"(`training.dense_scale: {training.get('dense_scale', 'batch')}`).",
    ]
    rows = []
    for e in target.manifest["experts"]:
        summary = target.expert(e).parent / "summary.json"
        if summary.is_file():
            rows.append((f"expert {e}", json.loads(summary.read_text())))
    dense_summary = target.dense.parent / "summary.json"
    if dense_summary.is_file():
        rows.append(("dense", json.loads(dense_summary.read_text())))
    if rows:
        lines += ["", "| model | tokens | FLOPs (Eq. 10) | seconds |", "|---|---:|---:|---:|"]
        for name, summary in rows:
            lines.append(
                f"| {name} | {summary.get('tokens', 0):,} | {summary.get('flops', 0):.3e} | "
                f"{summary.get('seconds', 0):,.0f} |"
            )
    ledger = _table(target.root / "ledger" / "flops.parquet")
    if ledger:
        lines += [
            "",
            "FLOPs ledger of the run (`ledger/flops.parquet`, paper App. A.3):",
            "",
            "| phase | component | FLOPs | relative to dense |",
            "|---|---|---:|---:|",
        ]
        for row in ledger:
            lines.append(
                f"| {row['phase']} | {row['component']} | {row['flops']:.3e} | "
                f"{row['relative_to_dense']:.3f} |"
            )
    return lines


def _results(target: MixtureFiles, routing: dict) -> list[str]:
    from smalltalk.compare import ratio_with_ci

    lines = ["## Results", ""]
    overall = _table(target.root / "eval" / "summary" / "overall.parquet")
    if not overall:
        return [*lines, "The run's evaluation tables were not found; no results to report."]
    if len(target.manifest["experts"]) < target.n_experts:
        lines += [
            "Measured by the run with all of its experts: the experts left out of this export "
            "took part in these figures.",
            "",
        ]
    lines += [
        "Test split, perplexity on the tokens after the routing prefix, routed by the first "
        "M-hat tokens; mixture/dense with its 95 % paired-bootstrap interval over test "
        "sequences (`eval/summary/overall.parquet`).",
        "",
        "| M-hat | sequences | ppl mixture | ppl dense | mixture/dense (95 % CI) | verdict "
        "| ppl top-k | top-k/dense (95 % CI) |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in overall:
        star = " (M)" if row["prefix_len"] == routing["prefix_len"] else ""
        lines.append(
            f"| {row['prefix_len']}{star} | {row['sequences']:,} | {row['ppl_mixture']:.2f} | "
            f"{row['ppl_dense']:.2f} | {ratio_with_ci(row)} | {row['verdict']} | "
            f"{row['ppl_topk']:.2f} | {ratio_with_ci(row, '_topk')} |"
        )
    harness = _table(target.root / "harness" / "scores.parquet")
    if harness:
        lines += ["", "lm-evaluation-harness (`harness/scores.parquet`):", ""]
        lines += ["| model | task | metric | value | stderr |", "|---|---|---|---:|---:|"]
        for row in harness:
            stderr = f"{row['stderr']:.3f}" if row["stderr"] is not None else ""
            lines.append(
                f"| {row['model']} | {row['task']} | {row['metric']} | {row['value']:.4f} "
                f"| {stderr} |"
            )
    return lines


def _usage(experts: Sequence[int]) -> list[str]:
    e = experts[0]
    return [
        "## How to load",
        "",
        "With the `smalltalk` package (routing, scoring and generation as in the run; it reads "
        "data files only, each checked against its sha256 in `export.json` first, and runs no "
        "code from this folder):",
        "",
        "```python",
        "import smalltalk",
        "",
        'mixture = smalltalk.load("path/to/this/folder")',
        'mixture.route("In the beginning").expert',
        'mixture.generate("It is a truth", max_new_tokens=40, temperature=0).text',
        "```",
        "",
        "```bash",
        'smalltalk generate --results path/to/this/folder --temperature 0 "It is a truth"',
        "smalltalk verify path/to/this/folder   # every file against its sha256 in export.json",
        "```",
        "",
        "One expert alone with Hugging Face transformers (`pip install smalltalk[hf]`); the "
        "model code ships in its folder, hence `trust_remote_code`. Tokenize with "
        "`sentencepiece` and `tokenizer/spm.model`; each document starts after EOS:",
        "",
        "```python",
        "import sentencepiece, torch",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("experts/e{e}", trust_remote_code=True)',
        'tokenizer = sentencepiece.SentencePieceProcessor(model_file="tokenizer/spm.model")',
        'ids = torch.tensor([tokenizer.encode("In the beginning")])',
        "logits = model(ids).logits",
        "```",
    ]
