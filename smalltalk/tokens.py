"""Token files: their Parquet schema, their rows as a matrix, and seeded samples of their rows.

Every stage reads and writes sequences in one layout: `seq_id` (int64), `tokens` (a list of
uint16, or uint32 for vocabularies over 65,536), `source` (string), one row per sequence of
S + 1 tokens.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smalltalk.files import parquet_writers


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def token_schema(vocab_size: int) -> pa.Schema:
    value_type = pa.uint16() if vocab_size <= 2**16 else pa.uint32()
    return pa.schema(
        [
            pa.field("seq_id", pa.int64(), nullable=False),
            pa.field("tokens", pa.list_(value_type), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ]
    )


def token_matrix(tokens: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<uint16|uint32> column of equal-length rows as an (n, L) array, no Python loop."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    if len(tokens) == 0:
        return np.empty((0, 0), dtype=np.uint16)
    values = tokens.flatten().to_numpy()
    return values.reshape(len(tokens), -1)


def sampling_keys(seq_ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random key per seq_id (SplitMix64): sorting by it samples uniformly."""
    with np.errstate(over="ignore"):
        z = seq_ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_seq_ids(files: Sequence[str | os.PathLike], count: int, seed: int) -> np.ndarray:
    """A sample of `count` seq_ids of the token files (all of them if they hold fewer), the same
    for the same files and seed: those with the smallest sampling keys, in key order."""
    best_ids = np.empty(0, dtype=np.int64)
    best_keys = np.empty(0, dtype=np.uint64)
    for path in files:
        new_ids = pq.read_table(path, columns=["seq_id"]).column("seq_id").to_numpy()
        ids = np.concatenate((best_ids, new_ids))
        keys = np.concatenate((best_keys, sampling_keys(new_ids, seed)))
        if len(keys) > count:
            keep = np.argpartition(keys, count - 1)[:count]
            ids, keys = ids[keep], keys[keep]
        best_ids, best_keys = ids, keys
    order = np.argsort(best_keys, kind="stable")
    return best_ids[order]


def gather_rows(
    files: Sequence[str | os.PathLike], block_of: dict[int, int], paths: Sequence
) -> None:
    """Copy the rows whose seq_id is in `block_of` into the file of their block."""
    wanted = np.fromiter(block_of, dtype=np.int64, count=len(block_of))
    schema = pq.read_schema(files[0]) if files else None
    with parquet_writers(paths, schema) as writers:
        for path in files:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                ids = table.column("seq_id").to_numpy()
                hit = np.isin(ids, wanted)
                if not hit.any():
                    continue
                rows = table.filter(pa.array(hit))
                blocks = np.array([block_of[i] for i in ids[hit].tolist()])
                for block in np.unique(blocks):
                    writers[block].write_table(rows.filter(pa.array(blocks == block)))
