"""The workflow's Parquet tables as {column: array}, and the rows a figure shows."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

PathLike = str | os.PathLike


def read_columns(path: PathLike, required: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A Parquet file as {column: array}; nulls become NaN in numeric columns."""
    table = pq.read_table(path)
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def read_concatenated(paths: PathLike | Sequence[PathLike], required: Sequence[str]) -> dict:
    """One or more Parquet files with the same columns, concatenated."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    parts = [read_columns(path, required) for path in paths]
    if not parts:
        raise ValueError("no input files")
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def select_rows(columns: dict, mask: np.ndarray) -> dict:
    return {name: values[mask] for name, values in columns.items()}


def rows_where(columns: dict, key: str, value, path: PathLike) -> tuple[dict, object]:
    """Rows whose `key` equals `value` (None: the largest value present)."""
    present = sorted({v.item() if hasattr(v, "item") else v for v in columns[key]})
    if not present:
        raise ValueError(f"{path}: no rows")
    value = present[-1] if value is None else value
    if value not in present:
        raise ValueError(f"{path}: no rows with {key}={value} (present: {present})")
    return select_rows(columns, columns[key] == value), value
