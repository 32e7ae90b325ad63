"""Segment the training set with the final routers (Algorithm 1, lines 12-13; design stage 4).

One job per train chunk loads all E routers (they are tiny), scores every sequence's prefix,
makes a balanced assignment within the chunk and writes each row into exactly one Hive-style
shard, `shards/expert={e}/{chunk}.parquet`, so DuckDB reads all shards as one table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

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
        # The shards checked, with their rows: what `checked_shards` compares those present with.
        "shards": {shard_name(path): pq.read_metadata(path).num_rows for path in shard_files},
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


def shard_name(path: str | os.PathLike) -> str:
    """A shard's name under the shards folder: expert={e}/{chunk}.parquet."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def checked_shards(shards: Path, check: Path) -> list[Path]:
    """The shards in `shards` (`shards/expert={e}/*.parquet`), once they are the very ones the
    shard check `check` (segmentation/check.json) found complete: none missing, none it did not
    see, each with the rows it counted. Raises FileNotFoundError or ValueError naming the first
    shard that differs, so that no report is made from part of the segmentation (a run killed
    while it re-sharded leaves the shards of the chunks it had not finished missing)."""
    rerun = "run the workflow again, which rebuilds and checks the shards"
    if not check.is_file():
        raise FileNotFoundError(
            f"{check}: missing, so nothing says the shards in {shards} are complete; {rerun}"
        )
    report = json.loads(check.read_text())
    present = {shard_name(path): path for path in sorted(shards.glob("expert=*/*.parquet"))}
    listed = report.get("shards")
    if listed is None:  # a check written before it listed the shards: each expert's rows
        return _shards_as_counted(present, report["sequences_per_expert"], check, rerun)
    missing = sorted(set(listed) - set(present))
    if missing:
        more = f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"{shards / missing[0]}: missing{more}, though {check} lists it; {rerun}"
        )
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise ValueError(
            f"{present[unlisted[0]]}: a shard that {check} does not list (left by another "
            f"run?); delete it or {rerun}"
        )
    for name, rows in sorted(listed.items()):
        found = pq.read_metadata(present[name]).num_rows
        if found != rows:
            raise ValueError(
                f"{present[name]}: {found} rows, but {rows} when {check} was written; {rerun}"
            )
    return [present[name] for name in sorted(listed)]


def _shards_as_counted(
    present: dict[str, Path], counted: dict[str, int], check: Path, rerun: str
) -> list[Path]:
    rows: dict[str, int] = {}
    for name, path in present.items():
        expert = name.split("/")[0].removeprefix("expert=")
        rows[expert] = rows.get(expert, 0) + pq.read_metadata(path).num_rows
    for expert in sorted(set(rows) | set(counted), key=int):
        if rows.get(expert, 0) != counted.get(expert, 0):
            raise ValueError(
                f"shards of expert {expert}: {rows.get(expert, 0)} rows, but {check} counted "
                f"{counted.get(expert, 0)}: a shard is missing or changed since; {rerun}"
            )
    return list(present.values())


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
