"""Writing results so that a failure never leaves a half-written file under a final name, nor a
temporary file beside it; fingerprints that tell whether input files changed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pyarrow loads in a second: the config and the Snakefile need none of it
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
def new_folders_removed_on_failure(folders: Iterable[str | os.PathLike]) -> Iterator[None]:
    """The folders among `folders` and their parents that do not exist yet are removed again,
    deepest first, if the block fails: a failed job leaves no empty folder behind.

    Only empty ones: a folder that another job has written into meanwhile stays, with its files.
    (Snakemake creates a job's output folders before it starts, so under the workflow none of
    them is new; this is for the commands run by hand.)
    """
    missing = set()
    for folder in folders:
        for path in [Path(folder).absolute(), *Path(folder).absolute().parents]:
            if path.exists():
                break
            missing.add(path)
    try:
        yield
    except BaseException:
        for path in sorted(missing, key=lambda path: len(path.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty, or gone already
                path.rmdir()
        raise


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


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(temporary path)` beside `path`, then rename it over `path`: for writers that
    only take a file name (matplotlib, pyarrow, torch)."""
    with atomic_path(path) as temp:
        write(temp)
    return Path(path)


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
    import pyarrow.parquet as pq

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


PARQUET_MAGIC = b"PAR1"


def fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """One digest of these files' contents, in this order (not of their names or times, so a
    copied or re-created results tree keeps it).

    A Parquet file counts by its size and footer, which records every row group's row count and
    every column chunk's offset, compressed size and min/max: rewritten with other rows or other
    tokens it changes; only a rewrite keeping all of those (the same rows reordered inside one
    row group) would go unnoticed. The footer costs one seek however large the shard, where
    hashing the contents would read every shard in full before each (re)start: hundreds of GB
    for a paper-scale dense baseline. Other files (a router's starting weights) are hashed whole.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            digest.update(size.to_bytes(8, "little"))
            file.seek(max(size - 8, 0))
            tail = file.read()
            if size >= 12 and tail[4:] == PARQUET_MAGIC:
                footer = int.from_bytes(tail[:4], "little") + 8
                file.seek(max(size - footer, 0))
                digest.update(file.read(footer))
            else:
                file.seek(0)
                digest.update(hashlib.file_digest(file, "blake2b").digest())
    return digest.hexdigest()
