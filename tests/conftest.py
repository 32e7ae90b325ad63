"""Shared fixtures: corpus files in every supported format, written by the tests themselves."""

from __future__ import annotations

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


_cuda_present: list[bool] = []  # whether this machine has a CUDA GPU, asked once


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Every test runs as on a machine without a GPU, unless it is marked `cuda` (and is then
    skipped without one). The tests compare with float32 references computed on the CPU, or with
    a second run bit for bit; on a CUDA machine the code under test would pick the GPU (device
    'auto') and bf16 (precision 'auto'), whose rounding differs, and CUDA kernels need not give
    the same bits twice. The jobs a test starts (Snakemake's, torchrun's) see no GPU either."""
    import torch

    if not _cuda_present:  # before any test hides the GPU, which CUDA reads once per process
        _cuda_present.append(torch.cuda.is_available())
    if request.node.get_closest_marker("cuda"):
        if not _cuda_present[0]:
            pytest.skip("needs a CUDA GPU")
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


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
