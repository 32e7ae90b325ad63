"""A short run on the real demo corpus learns far more than token frequencies."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from conftest import REPO

from smalltalk.config import (
    DataConfig,
    TokenizerConfig,
    model_config,
    train_config,
    validate_config,
)
from smalltalk.data import plan_chunks, tokenize_chunk
from smalltalk.tokenizer import train_tokenizer
from smalltalk.train import fit


def test_a_short_run_beats_the_unigram_entropy_of_the_demo_corpus(tmp_path):
    config = validate_config(
        {
            "inputs": [str(REPO / "data" / "demo" / "demo-000.jsonl.zst")],
            "splits": {"train": 0.9, "val": 0.05, "test": 0.05},
            "seq_len": 64,
            "routing": {"n_experts": 1, "prefix_len": 8},
            "tokenizer": {"vocab_size": 512, "sample_bytes": 1_000_000},
            "models": {"expert": {"preset": "tiny", "n_embd": 64, "n_head": 2, "n_layer": 2}},
            "training": {"expert": {"lr": 0.006, "warmup_steps": 20, "ckpt_every": 0}},
        }
    )
    data = DataConfig.from_config(config)
    model = train_tokenizer(
        files=list(data.inputs),
        data=data,
        tokenizer=TokenizerConfig.from_config(config),
        out_model=tmp_path / "spm.model",
    )
    (chunk,) = plan_chunks(data.inputs, 1)
    tokenize_chunk(
        chunk=chunk,
        data=data,
        tokenizer_model=model,
        out_dir=tmp_path / "tokens",
        stats_path=tmp_path / "stats.json",
    )
    train = tmp_path / "tokens" / "train" / f"{chunk.name}.parquet"
    tokens = np.concatenate(pq.read_table(train).column("tokens").to_numpy())
    counts = np.bincount(tokens, minlength=512)
    frequencies = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(frequencies * np.log(frequencies)).sum())  # nats per token

    summary = fit(
        model_config(config, "expert", vocab_size=512),
        train_config(config, "expert", steps=300, threads=1),
        [train],
        tmp_path / "run",
        role="expert",
        val_files=[tmp_path / "tokens" / "val" / f"{chunk.name}.parquet"],
        val_every=0,
    )
    metrics = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    val_loss = [row["val_loss"] for row in metrics if row["val_loss"] is not None][-1]
    # A model of token frequencies alone cannot go below the unigram entropy; context does.
    assert summary["final_loss"] < unigram_entropy - 0.8, (summary["final_loss"], unigram_entropy)
    assert val_loss < unigram_entropy - 0.8, (val_loss, unigram_entropy)
