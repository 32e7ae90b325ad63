"""Segment the training set with the final routers (Algorithm 1, lines 12-13; design stage 4).

One job per train chunk loads all E routers (they are tiny), scores every sequence's prefix,
makes a balanced assignment within the chunk and writes each row into exactly one Hive-style
shard, `shards/expert={e}/{chunk}.parquet`, so DuckDB reads all shards as one table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smalltalk.files import parquet_writers, write_parquet_atomically, write_text_atomically
from smalltalk.routers import Router, RoutingBatch
from smalltalk.routing import balanced_assign


def shard_chunk(
    *,
    tokens_path: str | os.PathLike,
    router: Router,
    prefix_len: int,
    shard_paths: Sequence[str | os.PathLike],
    scores_path: str | os.PathLike,
) -> np.ndarray:
    """Score, assign and write one chunk's shards; returns the sequences per expert.

    `router` is any routing method (`smalltalk.routers`); for `smalltalk` keep its E LMs loaded
    (they are tiny), since every row group is read once and scored by all of them."""
    parquet = pq.ParquetFile(tokens_path)
    id_parts, nll_parts = [], []
    for group in range(parquet.num_row_groups):
        batch = RoutingBatch.from_table(
            parquet.read_row_group(group, columns=["seq_id", "tokens", "source"])
        )
        id_parts.append(batch.seq_ids)
        nll_parts.append(router.costs(batch, [prefix_len])[:, 0])
    seq_ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
    nll = np.concatenate(nll_parts) if nll_parts else np.empty((0, router.n_experts), np.float32)
    # The scores travel as float16 (2 bytes each, App. A.4); assign on exactly what is stored.
    nll = nll.astype(np.float16)
    experts = balanced_assign(nll.astype(np.float32))
    write_parquet_atomically(
        pa.table(
            {
                "seq_id": pa.array(seq_ids, pa.int64()),
                "expert": pa.array(experts.astype(np.int16), pa.int16()),
                "nll": pa.FixedSizeListArray.from_arrays(
                    pa.array(nll.reshape(-1), pa.float16()), router.n_experts
                ),
            }
        ),
        scores_path,
    )
    _write_shards(parquet, experts, shard_paths)
    return np.bincount(experts, minlength=len(shard_paths))


def _write_shards(parquet: pq.ParquetFile, experts: np.ndarray, shard_paths: Sequence) -> None:
    with parquet_writers(shard_paths, parquet.schema_arrow) as writers:
        offset = 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            assigned = experts[offset : offset + table.num_rows]
            offset += table.num_rows
            for expert, writer in enumerate(writers):
                rows = table.filter(pa.array(assigned == expert))
                if rows.num_rows:
                    writer.write_table(rows)


def check_shards(
    *,
    train_files: Sequence[str | os.PathLike],
    shard_files: Sequence[str | os.PathLike],
    n_experts: int,
    out: str | os.PathLike,
) -> dict:
    """Prove with DuckDB that every train seq_id lands in exactly one shard and that every
    chunk's per-expert count obeys the capacity ceil(n_chunk / E). Raises if not."""
    for path in [*train_files, *shard_files]:
        _require_parquet(path)
    con = duckdb.connect()
    con.read_parquet([str(p) for p in train_files], filename=True).select(
        "seq_id, filename AS file"
    ).create_view("train")
    con.read_parquet([str(p) for p in shard_files], hive_partitioning=True, filename=True).select(
        "seq_id, expert, filename AS file"
    ).create_view("shards")
    (train_rows,) = con.execute("SELECT count(*) FROM train").fetchone()
    (shard_rows,) = con.execute("SELECT count(*) FROM shards").fetchone()
    (missing,) = con.execute(
        "SELECT count(*) FROM train ANTI JOIN shards USING (seq_id)"
    ).fetchone()
    (duplicated,) = con.execute(
        "SELECT count(*) FROM (SELECT seq_id FROM shards GROUP BY seq_id HAVING count(*) > 1)"
    ).fetchone()
    (foreign,) = con.execute(
        "SELECT count(*) FROM shards ANTI JOIN train USING (seq_id)"
    ).fetchone()
    chunk = "regexp_extract(file, '([^/]+)\\.parquet$', 1)"
    over_capacity = con.execute(
        f"""
        WITH sizes AS (SELECT {chunk} AS chunk, count(*) AS n FROM train GROUP BY 1),
             loads AS (SELECT {chunk} AS chunk, expert, count(*) AS n FROM shards GROUP BY 1, 2)
        SELECT loads.chunk, loads.expert, loads.n, ceil(sizes.n / $experts) AS capacity
        FROM loads JOIN sizes USING (chunk)
        WHERE loads.n > ceil(sizes.n / $experts)
        """,
        {"experts": n_experts},
    ).fetchall()
    per_expert = dict(
        con.execute("SELECT expert, count(*) FROM shards GROUP BY 1 ORDER BY 1").fetchall()
    )
    report = {
        "train_sequences": train_rows,
        "shard_rows": shard_rows,
        "missing": missing,
        "duplicated": duplicated,
        "not_in_train": foreign,
        "over_capacity": [list(map(_plain, row)) for row in over_capacity],
        "sequences_per_expert": {str(k): v for k, v in per_expert.items()},
    }
    problems = []
    if missing:
        problems.append(f"{missing} train sequences are in no shard")
    if duplicated:
        problems.append(f"{duplicated} sequences are in more than one shard")
    if foreign:
        problems.append(f"{foreign} shard rows are not train sequences")
    if shard_rows != train_rows:
        problems.append(f"{shard_rows} shard rows for {train_rows} train sequences")
    if over_capacity:
        problems.append(f"{len(over_capacity)} (chunk, expert) pairs exceed the capacity")
    report["ok"] = not problems
    if problems:
        raise ValueError("shard check failed: " + "; ".join(problems))
    write_text_atomically(json.dumps(report, indent=2) + "\n", out)
    return report


def _require_parquet(path: str | os.PathLike) -> None:
    """Name a truncated or missing file here; DuckDB would bury its name in a traceback."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"{path}: not a readable Parquet file (truncated?): {error}") from None


def _plain(value):
    return (
        int(value) if isinstance(value, (int, np.integer, float)) and value == int(value) else value
    )
