"""Writing results so that a failure never leaves a half-written file under a final name, nor a
temporary file beside it."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temporary_path(path: str | os.PathLike) -> Path:
    """A hidden name beside `path`, unique to this process (same filesystem: rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def naming_a_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Give a full disk's error, raised while writing `path`, that path as its file name.

    Neither Python's nor pyarrow's write errors name the file, and "No space left on device"
    alone does not say which disk.
    """
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL or error.filename is not None:
            raise
        raise OSError(error.errno, os.strerror(error.errno), str(path)) from error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` to write to: renamed over `path` when the block succeeds,
    removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    try:
        with naming_a_full_disk(path):
            yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_parquet_atomically(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write `table` as zstd Parquet to a temporary name beside `path`, then rename."""
    with parquet_writers([path], table.schema) as (writer,):
        writer.write_table(table)
    return Path(path)


def write_text_atomically(text: str, path: str | os.PathLike) -> Path:
    return write_bytes_atomically(text.encode(), path)


def write_bytes_atomically(data: bytes, path: str | os.PathLike) -> Path:
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


@contextmanager
def parquet_writers(
    paths: Sequence[str | os.PathLike], schema: pa.Schema
) -> Iterator[list[pq.ParquetWriter]]:
    """One zstd Parquet writer per path, all writing to temporary names.

    On a clean exit every file is closed and renamed into place; on an exception the
    temporary files are removed and no final name is touched.
    """
    temps = [temporary_path(path) for path in paths]
    writers: list[pq.ParquetWriter] = []
    try:
        with naming_a_full_disk(paths[0] if len(paths) == 1 else os.path.commonpath(paths)):
            for temp in temps:
                temp.parent.mkdir(parents=True, exist_ok=True)
                writers.append(pq.ParquetWriter(temp, schema, compression="zstd"))
            yield writers
            while writers:
                writers.pop().close()
        for temp, path in zip(temps, paths, strict=True):
            os.replace(temp, path)
    finally:
        for writer in writers:
            # On a full disk close() fails again; the error on its way out already says why.
            with contextlib.suppress(Exception):
                writer.close()
        for temp in temps:
            temp.unlink(missing_ok=True)
