"""Shared fixtures: corpus files in every supported format, written by the tests themselves, and
a tiny trained mixture laid out as the workflow lays out a results directory."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

REPO = Path(__file__).resolve().parents[1]

DOMAINS = {
    "bible": "and the lord spake unto moses saying thou shalt not israel king".split(),
    "code": "def return self import class for in if else none while yield".split(),
    "dictionary": "noun verb adjective obsolete etymology see defn plural latin".split(),
}


def make_records(count: int, seed: int = 0, min_words: int = 5, max_words: int = 120):
    """Records with SlimPajama-style meta: text plus meta.redpajama_set_name."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        domain = rng.choice(sorted(DOMAINS))
        words = rng.choices(DOMAINS[domain], k=rng.randint(min_words, max_words))
        records.append({"text": " ".join(words), "meta": {"redpajama_set_name": domain}})
    return records


def json_lines(records) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def write_jsonl(path: Path, records) -> Path:
    """Write JSON lines, compressed by the file's suffix (.gz, .zst or none)."""
    data = json_lines(records)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, rows: dict) -> Path:
    pq.write_table(pa.table(rows), path)
    return path


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What a CUDA test needs to see the GPU again: whether there is one, and what hiding it
    replaced."""

    present: bool
    is_available: object
    visible_devices: str | None


@pytest.fixture(scope="session", autouse=True)
def gpu_hidden():
    """No GPU for the whole session, session- and module-scoped fixtures included (built before
    any test's own fixtures), nor for the jobs they start (Snakemake's, torchrun's). The tests
    compare with float32 references computed on the CPU, or with a second run bit for bit; on a
    CUDA machine the code under test would pick the GPU (device 'auto') and bf16 (precision
    'auto'), whose rounding differs, and CUDA kernels need not give the same bits twice."""
    import torch

    # Asked before hiding it: CUDA reads CUDA_VISIBLE_DEVICES once per process, when it starts.
    gpu = Gpu(
        torch.cuda.is_available(), torch.cuda.is_available, os.environ.get("CUDA_VISIBLE_DEVICES")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield gpu


@pytest.fixture(autouse=True)
def gpu_only_where_marked_cuda(request, monkeypatch, gpu_hidden):
    """A test marked `cuda` sees the GPU again, and is skipped on a machine without one."""
    import torch

    if not request.node.get_closest_marker("cuda"):
        return
    if not gpu_hidden.present:
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", gpu_hidden.is_available)
    if gpu_hidden.visible_devices is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpu_hidden.visible_devices)


@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    """Three SlimPajama-style .jsonl.zst files of 200 records each."""
    paths = []
    for index in range(3):
        path = tmp_path / "corpus" / f"part-{index}.jsonl.zst"
        path.parent.mkdir(exist_ok=True)
        paths.append(write_jsonl(path, make_records(200, seed=index)))
    return paths


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs, for root where mounting is permitted."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount_point
    # Lazily: a failing run may still hold a file open there.
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Take all of the free space of `disk` but `leave` bytes."""
    stats = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * (stats.f_bavail * stats.f_frsize - leave))


# ---- a tiny trained mixture --------------------------------------------------------------------

N_EXPERTS = 3
TEXTS = [
    "In the beginning God created the heaven and the earth. And the earth was without form",
    "def main(argv):\n    parser = argparse.ArgumentParser()\n    return parser.parse_args(argv)",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition",
]


@pytest.fixture(scope="session")
def results(tmp_path_factory) -> Path:
    """A results directory as the workflow leaves it, with random tiny models (S = 32, M = 8):
    tokenizer, one tokenized chunk, routers, experts and dense, shards by source and the
    continuation-choice task, built with the package's own functions. Serving and export tests
    read it and never change it."""
    import numpy as np
    import sentencepiece as spm
    import torch
    import yaml

    from smalltalk import cli
    from smalltalk.checkpoint import save_weights
    from smalltalk.config import (
        DataConfig,
        TokenizerConfig,
        model_config,
        validate_config,
        write_resolved_config,
    )
    from smalltalk.data import plan_chunks, tokenize_chunk
    from smalltalk.model import LM
    from smalltalk.shard import shard_name
    from smalltalk.tokenizer import train_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve") / "results"
    raw = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    raw |= {
        "results": str(root),
        "inputs": [str(REPO / "data" / "demo" / "demo-000.jsonl.zst")],
        "splits": {"train": 0.8, "val": 0.1, "test": 0.1},
        "seq_len": 32,
        "tokenizer": {"vocab_size": 512, "sample_bytes": 200_000, "sample_files": 1},
        "harness": {"examples": 24, "choices": 4, "continuation_tokens": 8},
    }
    raw["routing"] |= {"n_experts": N_EXPERTS, "prefix_len": 8, "rounds": 1}
    config = validate_config(raw)
    write_resolved_config(config, root / "config.yaml")
    data = DataConfig.from_config(config)
    spm_model = root / "tokenizer" / "spm.model"
    train_tokenizer(
        files=list(data.inputs),
        data=data,
        tokenizer=TokenizerConfig.from_config(config),
        out_model=spm_model,
    )
    (chunk,) = plan_chunks(data.inputs, data.files_per_chunk)
    tokenize_chunk(
        chunk=chunk,
        data=data,
        tokenizer_model=spm_model,
        out_dir=root / "tokens",
        stats_path=root / "tokens" / "stats" / "c00000.json",
    )
    vocab_size = spm.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()
    for role, paths in (
        ("router", [root / "routers" / "final" / f"e{e}.safetensors" for e in range(N_EXPERTS)]),
        ("expert", [root / "experts" / f"e{e}" / "model.safetensors" for e in range(N_EXPERTS)]),
        ("expert", [root / "dense" / "model.safetensors"]),
    ):
        for seed, path in enumerate(paths):
            torch.manual_seed(100 * len(str(path)) + seed)
            model = LM(model_config(config, role, vocab_size=vocab_size))
            with torch.no_grad():  # sharper than the 0.02 init, so the models disagree clearly
                model.wte.weight.mul_(4)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(model, path, metadata={"role": role})
    # Shards by source (a segmentation with distinct source mixes), as the workflow writes them.
    train = pq.read_table(root / "tokens" / "train" / "c00000.parquet")
    sources = sorted(set(train.column("source").to_pylist()))
    experts = np.array([sources.index(s) % N_EXPERTS for s in train.column("source").to_pylist()])
    for e in range(N_EXPERTS):
        shard = root / "shards" / f"expert={e}" / "c00000.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(train.filter(pa.array(experts == e)), shard)
    # The shard check's listing, which `explain` compares the shards with (by source, these
    # shards would fail its capacity check, so the report is written here).
    shards = sorted((root / "shards").glob("expert=*/*.parquet"))
    (root / "segmentation").mkdir()
    (root / "segmentation" / "check.json").write_text(
        json.dumps(
            {
                "ok": True,
                "sequences_per_expert": {
                    str(e): int((experts == e).sum()) for e in range(N_EXPERTS)
                },
                "shards": {shard_name(path): pq.read_metadata(path).num_rows for path in shards},
            }
        )
    )
    cli.main(
        ["harness-task", "--config", str(root / "config.yaml"), "--tokenizer", str(spm_model),
         "--out-dir", str(root / "harness" / "continuation_choice"),
         str(root / "tokens" / "test" / "c00000.parquet")]
    )  # fmt: skip
    return root


def with_random_router(results: Path, copy: Path) -> Path:
    """A copy of the `results` mixture routed by the `random` baseline (a fitted `.npz`)."""
    import shutil

    import yaml

    from smalltalk.routers import fit_baseline

    shutil.copytree(results, copy, ignore=shutil.ignore_patterns("shards", "harness"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["routing"]["method"] = "random"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    fit_baseline(
        method="random",
        sample_paths=[copy / "tokens" / "train" / "c00000.parquet"],
        n_experts=N_EXPERTS,
        prefix_len=8,
        seed=5,
        tokenizer_model=copy / "tokenizer" / "spm.model",
        out=copy / "routers" / "random.npz",
    )
    return copy
