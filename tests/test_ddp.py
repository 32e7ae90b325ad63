"""Data-parallel training: two CPU processes under torchrun (gloo) take the same steps as one
process at the same global batch, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_train import TINY, write_tokens  # the synthetic token files, shared with test_train

from smalltalk.config import TrainConfig
from smalltalk.train import fit

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    from smalltalk.train import fit
    from smalltalk.config import TrainConfig
    from test_train import TINY

    data, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    fit(TINY, TrainConfig(**config), data, out, role="expert")
    """
)

CONFIG = dict(
    steps=8, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, ckpt_every=4, log_every=1,
    shuffle_buffer=64, precision="fp32", threads=1,
)  # fmt: skip


def test_two_processes_match_one(tmp_path: Path):
    for i in range(2):
        write_tokens(tmp_path / "tokens" / f"{i}.parquet", 64, first_seq_id=100 * i, seed=i)
    (tmp_path / "worker.py").write_text(WORKER)
    # Two micro-batches of 4 sequences, 2 per process, against one batch of 8 in one process.
    ddp_config = CONFIG | {"grad_accum": 2}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(tmp_path / "worker.py"), str(tmp_path / "tokens"), str(tmp_path / "ddp"),
        json.dumps(ddp_config),
    ]  # fmt: skip
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode and "gloo" in result.stderr.lower() and "connect" in result.stderr.lower():
        pytest.skip(f"no loopback networking for gloo here: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]

    threads = torch.get_num_threads()
    try:
        fit(TINY, TrainConfig(**CONFIG), tmp_path / "tokens", tmp_path / "one", role="expert")
    finally:
        torch.set_num_threads(threads)

    one = pq.read_table(tmp_path / "one" / "metrics.parquet").to_pydict()
    two = pq.read_table(tmp_path / "ddp" / "metrics.parquet").to_pydict()
    assert two["step"] == one["step"] == list(range(1, 9))
    assert two["tokens"] == one["tokens"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert two["loss"][-1] < two["loss"][0]

    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    written = sorted(str(p.relative_to(tmp_path / "ddp")) for p in (tmp_path / "ddp").rglob("*"))
    assert not [name for name in written if ".tmp" in name]  # no second writer left debris
    assert "model.safetensors" in written and "ckpt/step-00000004" in written
