"""Training batches from token Parquet files: shuffled, bounded in memory, resumable exactly.

Input: the tokenizer's `tokens/{split}/*.parquet` or the shards `shards/expert={e}/*.parquet`,
with columns `seq_id` (int64, unique) and `tokens` (list<uint16|uint32> of S+1 tokens). An example
is one row: inputs `tokens[:-1]`, targets `tokens[1:]`.

The order of one epoch is a pure function of (seed, epoch):

1. the row groups of all files are visited in a random order drawn from (seed, epoch), which
   shuffles files and the parts of large files alike;
2. rows are read in slices of at most `read_rows`, never a whole file, and rows whose `seq_id`
   is not in `seq_ids` are dropped (EM rounds train router e on its assigned sequences, §2.2);
3. every `shuffle_buffer` consecutive kept rows are permuted among themselves by a generator
   drawn from (seed, epoch, buffer index), then emitted.

So the cursor is two integers, (epoch, examples consumed in the epoch), and resuming costs one
buffer: whole row groups before it are skipped by their row counts in the Parquet footer (or by
reading their `seq_id` column alone when filtering). A plain streaming shuffle buffer, which swaps
each incoming row with a random resident one, would mix across its boundaries but would need its
whole contents saved with every checkpoint; permuting consecutive blocks of rows that already
arrive in shuffled row-group order needs nothing saved.

Epochs repeat without end; the training loop stops when its budget is spent. Under data-parallel
training every rank reads the same global batch and keeps every `world_size`-th row of it, so
the global batch is the single-process batch whatever the number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch


def parquet_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The Parquet files named, directories searched recursively; absolute and sorted, so that the
    order (and hence every shuffle drawn from it) does not depend on how the caller named them."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files = set()
    for path in (Path(p).resolve() for p in paths):
        if path.is_dir():
            files.update(path.rglob("*.parquet"))
        elif path.is_file():
            files.add(path)
        else:
            raise FileNotFoundError(f"no such token file or directory: {path}")
    return sorted(files)


@dataclass(frozen=True, slots=True)
class RowGroup:
    path: Path
    index: int
    num_rows: int


class TokenStream:
    """An endless iterator of (inputs, targets) int64 batches of shape (batch_size / world_size, T),
    T = S, or `prefix_len` when routers train on prefixes only (Eq. 9)."""

    def __init__(
        self,
        files: str | os.PathLike | Iterable[str | os.PathLike],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 16384,
        prefix_len: int | None = None,
        seq_ids: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
        read_rows: int = 1024,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if shuffle_buffer < 1 or read_rows < 1:
            raise ValueError("shuffle_buffer and read_rows must be positive")
        self.files = parquet_files(files)
        if not self.files:
            raise ValueError(f"no Parquet files found in {files}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.seq_ids = None if seq_ids is None else np.unique(np.asarray(seq_ids, dtype=np.int64))
        self.rank, self.world_size = rank, world_size
        self.read_rows = read_rows

        self.row_groups = []
        for path in self.files:
            with pq.ParquetFile(path) as parquet:
                missing = {"seq_id", "tokens"} - set(parquet.schema_arrow.names)
                if missing:
                    raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
                metadata = parquet.metadata
                self.row_groups += [
                    RowGroup(path, i, metadata.row_group(i).num_rows)
                    for i in range(metadata.num_row_groups)
                    if metadata.row_group(i).num_rows > 0
                ]
        if not self.row_groups:
            raise ValueError(f"the token files hold no rows: {[str(f) for f in self.files]}")

        # Row length S+1, from the first row; every row read is checked against it.
        first = self.row_groups[0]
        with pq.ParquetFile(first.path) as parquet:
            batch = next(parquet.iter_batches(batch_size=1, row_groups=[0], columns=["tokens"]))
        self.row_len = len(batch.column("tokens")[0])
        if prefix_len is not None and not 0 < prefix_len < self.row_len:
            raise ValueError(f"prefix_len {prefix_len} must lie in [1, {self.row_len - 1}] (S)")
        self.prefix_len = prefix_len
        self.seq_len = prefix_len or self.row_len - 1  # T, tokens per example

        self.epoch = 0  # the cursor: epoch, and examples of it already handed out
        self.consumed = 0

    # ---- the cursor -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"cursor saved with seed {state['seed']}, stream has {self.seed}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    # ---- batches --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        examples = self._examples(self.epoch, self.consumed)
        while True:
            batch = [next(examples) for _ in range(self.batch_size)]
            self.epoch, index, _ = batch[-1]
            self.consumed = index + 1
            mine = batch[self.rank :: self.world_size]  # this rank's share of the global batch
            rows = torch.from_numpy(np.stack([row for _, _, row in mine]).astype(np.int64))
            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B/w, T) each

    def _examples(self, epoch: int, start: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, index in epoch, row) from the cursor on, epoch after epoch."""
        while True:
            index = start - 1
            for index, row in enumerate(self._epoch(epoch, start), start):
                yield epoch, index, row
            if start == 0 and index < 0:
                raise ValueError("no token rows pass the seq_ids filter: nothing to train on")
            epoch, start = epoch + 1, 0

    def _epoch(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        """Rows of one epoch from its `start`-th on: permuted blocks of `shuffle_buffer` rows."""
        first_block = start // self.shuffle_buffer
        rows = self._kept_rows(epoch, skip=first_block * self.shuffle_buffer)
        for block_index, block in enumerate(_blocks(rows, self.shuffle_buffer), first_block):
            order = np.random.default_rng((self.seed, epoch, block_index)).permutation(len(block))
            if block_index == first_block:
                order = order[start - first_block * self.shuffle_buffer :]
            for i in order:
                yield block[i]

    def _kept_rows(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        """Slices (n, S+1) of the epoch's kept rows in row-group order, less the first `skip`."""
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.row_groups))
        for group in (self.row_groups[i] for i in order):
            if skip:
                kept = group.num_rows if self.seq_ids is None else self._count_kept(group)
                if kept <= skip:  # the whole row group lies before the cursor
                    skip -= kept
                    continue
            for rows in self._read(group):
                dropped = min(skip, len(rows))
                skip -= dropped
                if dropped < len(rows):
                    yield rows[dropped:]

    def _read(self, group: RowGroup) -> Iterator[np.ndarray]:
        columns = ["tokens"] if self.seq_ids is None else ["seq_id", "tokens"]
        with pq.ParquetFile(group.path) as parquet:
            for batch in parquet.iter_batches(
                batch_size=self.read_rows, row_groups=[group.index], columns=columns
            ):
                tokens = batch.column("tokens")
                lengths = pc.list_value_length(tokens)
                if (
                    pc.min(lengths).as_py() != self.row_len
                    or pc.max(lengths).as_py() != self.row_len
                ):
                    raise ValueError(
                        f"{group.path}: rows must all hold S+1 = {self.row_len} tokens"
                    )
                rows = tokens.flatten().to_numpy().reshape(-1, self.row_len)  # (n, S+1), no copy
                if self.seq_ids is not None:
                    rows = rows[np.isin(batch.column("seq_id").to_numpy(), self.seq_ids)]
                if self.prefix_len is not None:
                    # Keep only the prefix, so the shuffle buffer holds M+1 tokens per row, not S+1.
                    rows = np.ascontiguousarray(rows[:, : self.prefix_len + 1])
                yield rows

    def _count_kept(self, group: RowGroup) -> int:
        with pq.ParquetFile(group.path) as parquet:
            seq_ids = parquet.read_row_group(group.index, columns=["seq_id"]).column("seq_id")
        return int(np.isin(seq_ids.to_numpy(), self.seq_ids).sum())


def _blocks(slices: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup row slices into blocks of exactly `size` rows (the last one may be shorter)."""
    pending, count = [], 0
    for rows in slices:
        pending.append(rows)
        count += len(rows)
        while count >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            pending, count = [joined[size:]], count - size
    if count:
        yield np.concatenate(pending)
