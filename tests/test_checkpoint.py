"""Checkpoints: a round trip restores everything, only complete ones count, and a run killed
after a checkpoint resumes to exactly the losses and weights of a run never interrupted."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY, write_tokens  # the synthetic token files, shared with test_train

from smalltalk.checkpoint import (
    STATE,
    WEIGHTS,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_metadata,
    read_state,
    rng_state,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from smalltalk.config import TrainConfig
from smalltalk.model import LM
from smalltalk.train import fit

REPO = Path(__file__).resolve().parents[1]


def trained_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = LM(TINY)
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.99), "cpu")
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()  # so the optimizer has moments to save
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path):
    model, optimizer = trained_model_and_optimizer(seed=0)
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    state = {"stream": {"epoch": 2, "consumed": 31, "seed": 0}, "seconds": 1.5}
    path = save_checkpoint(tmp_path / "ckpt", 12, model, optimizer, state, keep_last=2)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    fresh, fresh_optimizer = trained_model_and_optimizer(seed=1)
    restored = load_checkpoint(path, fresh, fresh_optimizer)
    assert restored["step"] == 12 and restored["stream"] == state["stream"]
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    for key in saved["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(saved["state"][key][name], loaded["state"][key][name])
    assert loaded["param_groups"] == saved["param_groups"]
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(after[0], expected[0])
    np.testing.assert_array_equal(after[1], expected[1])
    assert after[2] == expected[2]
    # The state holds only what the safe unpickler admits.
    torch.load(path / STATE, weights_only=True)


def test_a_run_saved_on_more_gpus_than_it_resumes_on_restores_the_ones_it_sees(monkeypatch):
    """torchrun's ranks each save every visible GPU's generator; resumed where fewer are visible,
    the others' states are skipped, not an invalid device."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.__setitem__(i, s))
    state = rng_state()
    saved = [torch.full((16,), fill, dtype=torch.uint8) for fill in range(4)]  # four GPUs
    set_rng_state(state | {"cuda": saved})
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[i], saved[i]) for i in (0, 1))


def test_only_complete_checkpoints_count_and_the_last_k_are_kept(tmp_path: Path):
    model, optimizer = trained_model_and_optimizer()
    ckpt = tmp_path / "ckpt"
    for step in (100, 200, 300, 400):
        save_checkpoint(ckpt, step, model, optimizer, {}, keep_last=3)
    assert checkpoint_steps(ckpt) == [200, 300, 400]
    (ckpt / "step-00000500").mkdir()  # killed mid-write, by hand: weights but no state
    save_weights(model, ckpt / "step-00000500" / WEIGHTS)
    (ckpt / ".tmp-step-00000600-123").mkdir()  # killed before the rename
    assert latest_checkpoint(ckpt) == ckpt / "step-00000400"
    save_checkpoint(ckpt, 700, model, optimizer, {}, keep_last=1)
    assert checkpoint_steps(ckpt) == [700]
    assert not list(ckpt.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch.compile's imports
def test_weights_are_saved_without_compile_or_ddp_prefixes(tmp_path: Path):
    model, _ = trained_model_and_optimizer()
    compiled = torch.compile(model)  # not run: only its wrapper's `_orig_mod.` names matter
    assert all(name.startswith("_orig_mod.") for name in compiled.state_dict())
    save_weights(compiled, tmp_path / "w.safetensors", metadata={"model_config": {"n_layer": 1}})
    names = set(load_file(tmp_path / "w.safetensors"))
    assert names and not any(name.startswith(("_orig_mod.", "module.")) for name in names)
    assert "lm_head.weight" not in names or "wte.weight" not in names  # the tied table once
    assert read_metadata(tmp_path / "w.safetensors") == {"model_config": {"n_layer": 1}}
    fresh = LM(TINY)
    load_weights(fresh, tmp_path / "w.safetensors")
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)
    assert fresh.lm_head.weight.data_ptr() == fresh.wte.weight.data_ptr()  # still tied


def test_the_same_weights_are_written_as_the_same_bytes(tmp_path: Path):
    """safetensors writes its header's metadata from a randomly seeded hash map: with more than
    one entry (save_model adds one per tied tensor) identical runs wrote different files."""
    model, _ = trained_model_and_optimizer()
    metadata = {"role": "expert", "model_config": dataclasses.asdict(TINY), "step": 7}
    for attempt in range(8):  # each save seeds its map anew: 8 agreeing by chance is 1 in 128
        save_weights(model, tmp_path / f"{attempt}.safetensors", metadata=metadata)
    written = {path.read_bytes() for path in tmp_path.glob("*.safetensors")}
    assert len(written) == 1
    assert read_metadata(tmp_path / "0.safetensors") == metadata


# ---- resume after SIGKILL -------------------------------------------------------------------

# A training process that SIGKILLs itself right after writing checkpoint `kill_at` (-1: never).
CHILD = textwrap.dedent(
    """
    import dataclasses, json, os, signal, sys
    import smalltalk.train
    from smalltalk.train import fit
    from smalltalk.config import TrainConfig
    from test_train import TINY

    data, out, kill_at, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    save_checkpoint = smalltalk.train.save_checkpoint

    def save_then_die(ckpt_dir, step, *args, **kwargs):
        path = save_checkpoint(ckpt_dir, step, *args, **kwargs)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a node failure
        return path

    smalltalk.train.save_checkpoint = save_then_die
    model_config = dataclasses.replace(TINY, dropout=0.1)
    fit(model_config, TrainConfig(**json.loads(config)), data, out, role="expert")
    """
)

RESUME_CONFIG = dict(
    steps=14, batch_size=6, lr=1e-2, min_lr=1e-3, warmup_steps=3, ckpt_every=4,
    keep_last=2, log_every=1, shuffle_buffer=40, precision="fp32", threads=1, seed=3,
)  # fmt: skip


def test_killed_run_resumes_bitwise_identically(tmp_path: Path):
    """Dropout on, so the RNG state matters; shuffle buffer small, so the cursor lies mid-buffer
    and mid-epoch (14 steps x 6 rows over 60 rows crosses an epoch)."""
    for i in range(2):
        write_tokens(tmp_path / "tokens" / f"{i}.parquet", 30, first_seq_id=100 * i, seed=i)
    (tmp_path / "child.py").write_text(CHILD)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}

    def run_child(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        args = [tmp_path / "child.py", tmp_path / "tokens", out, kill_at, json.dumps(RESUME_CONFIG)]
        args = [sys.executable, *map(str, args)]
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)

    interrupted = tmp_path / "interrupted"
    killed = run_child(interrupted, kill_at=8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(interrupted / "ckpt") == [4, 8]
    assert not (interrupted / "model.safetensors").exists()
    # Snakemake deletes an unfinished job's outputs before running it again: the rows logged
    # before the checkpoint must come back from the checkpoint itself.
    (interrupted / "metrics.parquet").unlink()
    resumed = run_child(interrupted, kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-00000008" in resumed.stderr

    threads = torch.get_num_threads()
    try:  # the uninterrupted run, in this process: one interpreter start-up less
        model_config = dataclasses.replace(TINY, dropout=0.1)
        config = TrainConfig(**RESUME_CONFIG)
        fit(model_config, config, tmp_path / "tokens", tmp_path / "straight", role="expert")
    finally:
        torch.set_num_threads(threads)

    straight = pq.read_table(tmp_path / "straight" / "metrics.parquet").to_pydict()
    again = pq.read_table(interrupted / "metrics.parquet").to_pydict()
    assert again["step"] == straight["step"] == list(range(1, 15))
    assert again["loss"] == straight["loss"]  # bitwise: floats compared with ==
    assert again["grad_norm"] == straight["grad_norm"]
    final_a = load_file(tmp_path / "straight" / "model.safetensors")
    final_b = load_file(interrupted / "model.safetensors")
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


class _Planted:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_planted_with_code_is_refused_without_running_it(tmp_path: Path):
    marker = tmp_path / "ran"
    planted = tmp_path / "ckpt" / "step-00000001"
    planted.mkdir(parents=True)
    torch.save({"step": 1, "payload": _Planted(marker)}, planted / STATE)
    with pytest.raises(pickle.UnpicklingError):
        read_state(planted)
    assert not marker.exists()
