"""Corpus files in, token sequences out (design stages 1-2).

Input files are grouped into chunks; a chunk is tokenized into `tokens/{split}/{chunk}.parquet`:
its documents (read by `smalltalk.corpus`) are split by a stable hash of their id, joined with EOS
and packed into sequences of S+1 tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smalltalk.config import SPLITS, DataConfig
from smalltalk.corpus import BadRecordError, Document, OnBadRecord, read_documents
from smalltalk.files import (
    new_folders_removed_on_failure,
    parquet_writers,
    write_text_atomically,
)
from smalltalk.tokens import token_dtype, token_schema

GLOB_CHARS = "*?["
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
ORDINAL_BITS = 30  # seq_id = chunk << 32 | split << 30 | ordinal
ENCODE_BATCH_BYTES = 4 << 20
# Longer documents are encoded in pieces: SentencePiece takes ~50 bytes per character encoded.
LONG_DOCUMENT_CHARS = 1 << 18
ROW_GROUP_SEQUENCES = 1024


def read_corpus_file(
    path: str, data: DataConfig, on_bad_record: OnBadRecord = None
) -> Iterator[Document]:
    """`read_documents` with the config's field names and ids relative to the input patterns."""
    return read_documents(
        path,
        doc_key=document_key(path, data.inputs),
        text_field=data.text_field,
        id_field=data.id_field,
        source_field=data.source_field,
        on_bad_record=on_bad_record,
    )


# --------------------------------------------------------------------------- chunks


@dataclass(slots=True, frozen=True)
class Chunk:
    index: int
    name: str
    files: tuple[str, ...]


def _static_prefix(pattern: str) -> str:
    """The directory part of a glob pattern before its first wildcard."""
    parts = Path(pattern).parts
    static = []
    for part in parts[:-1]:
        if any(char in part for char in GLOB_CHARS):
            break
        static.append(part)
    return str(Path(*static)) if static else "."


def plan_chunks(
    inputs: Iterable[str], files_per_chunk: int, base_dir: str | os.PathLike | None = None
) -> list[Chunk]:
    """Expand the input globs (sorted, duplicates removed) into chunks of consecutive files.

    Relative patterns are taken from `base_dir` (default: the working directory) and the
    returned paths stay as the patterns wrote them. A pattern matching no file is an
    error: a silently empty corpus is never what the user meant.
    """
    import glob

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    files: dict[str, None] = {}
    for position, pattern in enumerate(inputs):
        absolute = pattern if os.path.isabs(pattern) else str(base / pattern)
        matches = sorted(
            path for path in glob.glob(absolute, recursive=True) if os.path.isfile(path)
        )
        if not matches:
            raise FileNotFoundError(f"inputs[{position}]: '{pattern}' matches no file")
        for match in matches:
            shown = match if os.path.isabs(pattern) else os.path.relpath(match, base)
            files.setdefault(shown)
    ordered = list(files)
    count = -(-len(ordered) // files_per_chunk)
    width = max(5, len(str(count - 1)))
    return [
        Chunk(
            index=index,
            name=f"c{index:0{width}d}",
            files=tuple(ordered[index * files_per_chunk : (index + 1) * files_per_chunk]),
        )
        for index in range(count)
    ]


GROWN_CHUNKS = 1 << 24  # chunk indices of the corpus of grow entry k start at (k + 1) << 24


def plan_grown_chunks(position: int, inputs: Iterable[str], files_per_chunk: int) -> list[Chunk]:
    """The chunks of grow entry `position`'s corpus, named g{position}c..., with indices apart
    from the run's own chunks and from other entries', so every seq_id stays unique."""
    if not 0 <= position < 2**31 // GROWN_CHUNKS - 1:
        raise ValueError(f"grow entry {position}: too many grow entries for the seq_id layout")
    return [
        Chunk(
            index=(position + 1) * GROWN_CHUNKS + chunk.index,
            name=f"g{position}{chunk.name}",
            files=chunk.files,
        )
        for chunk in plan_chunks(inputs, files_per_chunk)
    ]


def parse_chunk_name(name: str) -> tuple[int | None, int]:
    """(grow entry or None, chunk index) of a chunk name: c00003 or g0c00003."""
    import re

    match = re.fullmatch(r"(?:g(\d+))?c(\d+)", name)
    if match is None:
        raise ValueError(f"not a chunk name: {name!r} (c00003, or g0c00003 for grow entry 0)")
    grown, index = match.groups()
    if grown is None:
        return None, int(index)
    return int(grown), (int(grown) + 1) * GROWN_CHUNKS + int(index)


def document_key(path: str, inputs: Iterable[str]) -> str:
    """A file's name relative to the static prefix of its input pattern.

    Used in generated document ids so that splits do not change when a corpus moves.
    """
    normalized = os.path.normpath(path)
    owners = []
    for pattern in inputs:
        prefix = os.path.normpath(_static_prefix(pattern))
        inside = normalized.startswith(prefix.rstrip(os.sep) + os.sep)
        if inside or (prefix == "." and not os.path.isabs(normalized)):
            owners.append(prefix)
    return os.path.relpath(normalized, max(owners, key=len)) if owners else normalized


# --------------------------------------------------------------------------- splits


def split_of(doc_id: str, splits: dict[str, float]) -> str:
    """The split of a document: a stable hash of its id, compared with cumulative fractions."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    position = int.from_bytes(digest, "little") / 2**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += splits[name]
        if position < cumulative:
            return name
    return next(name for name in reversed(SPLITS) if splits[name] > 0)


# --------------------------------------------------------------------------- packing


def text_pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at most `size` characters whose tokens are those of the whole.

    A piece ends before a space between two words, and that space is left out: SentencePiece
    puts its own before the next piece (the dummy prefix), and no token crosses the space that
    starts a word. Only where `size` characters hold no such space is the text cut anywhere,
    which may change the tokens next to the cut.
    """
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and (text[cut - 1] == " " or text[cut + 1] == " "):
            cut = text.rfind(" ", start + 1, cut)
        if cut > start:
            yield text[start:cut]
            start = cut + 1
        else:
            yield text[start : start + size]
            start += size
    yield text[start:]


@dataclass(slots=True)
class SplitStats:
    documents: int = 0
    empty_documents: int = 0
    text_bytes: int = 0
    tokens: int = 0  # document tokens plus one EOS each
    sequences: int = 0
    dropped_tokens: int = 0  # the final remainder, shorter than one sequence


class SequencePacker:
    """Joins documents (each followed by EOS) and cuts the stream into sequences of `length`.

    A sequence's `source` is that of the document holding its first token.
    """

    def __init__(self, length: int, eos_id: int, dtype: np.dtype):
        self.length = length
        self.eos_id = eos_id
        self.dtype = dtype
        self.carry = np.empty(0, dtype=dtype)
        self.carry_source = ""

    def add(self, documents: list[list[int]], sources: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (tokens (n, length), sources (n,)) of the sequences completed by `documents`."""
        if not documents:
            return np.empty((0, self.length), self.dtype), np.empty(0, dtype=object)
        lengths = np.fromiter((len(doc) + 1 for doc in documents), np.int64, len(documents))
        eos = (self.eos_id,)
        flat = np.fromiter(
            chain.from_iterable(chain(doc, eos) for doc in documents),
            dtype=self.dtype,
            count=int(lengths.sum()),
        )
        doc_starts = len(self.carry) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        doc_sources = np.asarray(sources, dtype=object)
        if len(self.carry):
            doc_starts = np.concatenate(([0], doc_starts))
            doc_sources = np.concatenate((np.asarray([self.carry_source], object), doc_sources))
        stream = np.concatenate((self.carry, flat))
        count = len(stream) // self.length
        used = count * self.length
        sequence_starts = np.arange(count, dtype=np.int64) * self.length
        owners = np.searchsorted(doc_starts, sequence_starts, side="right") - 1
        self.carry = stream[used:].copy()
        if len(self.carry):
            owner = np.searchsorted(doc_starts, used, side="right") - 1
            self.carry_source = doc_sources[owner]
        return stream[:used].reshape(count, self.length), doc_sources[owners]


def _sequence_table(
    schema: pa.Schema, seq_ids: np.ndarray, tokens: np.ndarray, sources: np.ndarray
) -> pa.Table:
    count, length = tokens.shape
    offsets = pa.array(np.arange(count + 1, dtype=np.int32) * length)
    values = pa.array(tokens.reshape(-1), type=schema.field("tokens").type.value_type)
    return pa.Table.from_arrays(
        [
            pa.array(seq_ids, pa.int64()),
            pa.ListArray.from_arrays(offsets, values, type=schema.field("tokens").type),
            pa.array(sources.tolist(), pa.string()),
        ],
        schema=schema,
    )


@dataclass(slots=True)
class ChunkStats:
    chunk: str
    files: list[str]
    splits: dict[str, SplitStats] = field(default_factory=lambda: {s: SplitStats() for s in SPLITS})
    bad_records: int = 0
    bad_record_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def encode(
    processor, batch: list[Document], dtype, threads: int
) -> Iterator[list[int] | np.ndarray]:
    """The token ids of each document of `batch`, in order: short ones in one multi-threaded
    SentencePiece call, long ones piece by piece (`text_pieces`)."""
    short = iter(
        processor.encode(
            [doc.text for doc in batch if len(doc.text) <= LONG_DOCUMENT_CHARS],
            num_threads=threads,
        )
    )
    for doc in batch:
        if len(doc.text) <= LONG_DOCUMENT_CHARS:
            yield next(short)
        else:  # as an array: a list of Python ints takes ~36 bytes a token
            pieces = text_pieces(doc.text, LONG_DOCUMENT_CHARS)
            yield np.concatenate([np.asarray(processor.encode(p), dtype) for p in pieces])


def _document_batches(
    chunk: Chunk, data: DataConfig, handler: OnBadRecord, stats: ChunkStats
) -> Iterator[list[Document]]:
    """The chunk's documents with text, in batches of about ENCODE_BATCH_BYTES of text (the
    last one possibly empty); empty documents are counted in `stats` and left out."""
    batch: list[Document] = []
    batch_bytes = 0
    for path in chunk.files:
        for doc in read_corpus_file(path, data, handler):
            if not doc.text.strip():
                stats.splits[split_of(doc.id, data.splits)].empty_documents += 1
                continue
            batch.append(doc)
            batch_bytes += len(doc.text)
            if batch_bytes >= ENCODE_BATCH_BYTES:
                yield batch
                batch, batch_bytes = [], 0
    yield batch


def _write_sequences(
    writer: pq.ParquetWriter,
    schema: pa.Schema,
    chunk: Chunk,
    split: str,
    split_stats: SplitStats,
    tokens: np.ndarray,
    sources: np.ndarray,
) -> None:
    """Append packed sequences to a split's token file, numbering them after the ones before."""
    ordinals = split_stats.sequences + np.arange(len(tokens), dtype=np.int64)
    if ordinals[-1] >= 2**ORDINAL_BITS:
        raise ValueError(f"chunk {chunk.name} holds too many {split} sequences for seq_id")
    seq_ids = (chunk.index << 32) | (SPLIT_CODES[split] << ORDINAL_BITS) | ordinals
    split_stats.sequences += len(tokens)
    writer.write_table(
        _sequence_table(schema, seq_ids, tokens, sources), row_group_size=ROW_GROUP_SEQUENCES
    )


def tokenize_chunk(
    *,
    chunk: Chunk,
    data: DataConfig,
    tokenizer_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    stats_path: str | os.PathLike,
    threads: int = 1,
) -> ChunkStats:
    """Tokenize one chunk into `{out_dir}/{split}/{chunk.name}.parquet` and a stats JSON.

    Outputs appear only when the whole chunk succeeded: everything is written to
    temporary names and renamed at the end, and removed if anything fails, with the folders
    made for them.
    """
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    vocab_size = processor.get_piece_size()
    dtype = token_dtype(vocab_size)
    schema = token_schema(vocab_size)
    length = data.seq_len + 1
    if chunk.index >= 2**31:
        raise ValueError(f"chunk index {chunk.index} does not fit the seq_id layout")

    stats = ChunkStats(chunk=chunk.name, files=list(chunk.files))
    writers: dict[str, pq.ParquetWriter] = {}
    packers = {split: SequencePacker(length, processor.eos_id(), dtype) for split in SPLITS}

    def on_bad_record(error: BadRecordError) -> None:
        stats.bad_records += 1
        if len(stats.bad_record_examples) < 20:
            stats.bad_record_examples.append(str(error))

    handler = on_bad_record if data.on_bad_record == "skip" else None

    def flush(batch: list[Document]) -> None:
        by_split: dict[str, tuple[list, list]] = {split: ([], []) for split in SPLITS}
        for doc, ids in zip(batch, encode(processor, batch, dtype, threads), strict=True):
            split = split_of(doc.id, data.splits)
            split_stats = stats.splits[split]
            split_stats.documents += 1
            split_stats.text_bytes += len(doc.text.encode("utf-8"))
            split_stats.tokens += len(ids) + 1
            by_split[split][0].append(ids)
            by_split[split][1].append(doc.source)
        for split, (token_lists, sources) in by_split.items():
            tokens, seq_sources = packers[split].add(token_lists, sources)
            if len(tokens):
                _write_sequences(
                    writers[split], schema, chunk, split, stats.splits[split], tokens, seq_sources
                )

    finals = [Path(out_dir) / split / f"{chunk.name}.parquet" for split in SPLITS]
    folders = [*(final.parent for final in finals), Path(stats_path).parent]
    with new_folders_removed_on_failure(folders):  # a failed chunk leaves no empty split folder
        with parquet_writers(finals, schema) as split_writers:
            writers.update(zip(SPLITS, split_writers, strict=True))
            for batch in _document_batches(chunk, data, handler, stats):
                flush(batch)
            for split, packer in packers.items():
                stats.splits[split].dropped_tokens = len(packer.carry)
        # Stats last: their presence says the chunk's token files are complete.
        try:
            write_text_atomically(json.dumps(stats.as_dict(), indent=2) + "\n", stats_path)
        except BaseException:
            for final in finals:  # token files without stats would pass for a finished chunk
                final.unlink(missing_ok=True)
            raise
    return stats


def summarize_stats(stats_paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> Path:
    """One TSV row per split with the totals of every chunk's stats file, then their sum, "all".

    Bad records have no split (most have no readable id), so they are counted in "all" only.
    """
    totals = {split: SplitStats() for split in SPLITS}
    chunks = bad_records = 0
    for path in stats_paths:
        stats = json.loads(Path(path).read_text())
        chunks += 1
        bad_records += stats["bad_records"]
        for split, values in stats["splits"].items():
            for name, value in values.items():
                setattr(totals[split], name, getattr(totals[split], name) + value)
    columns = list(SplitStats.__dataclass_fields__)
    rows = [
        [split, chunks, *(getattr(totals[split], name) for name in columns), ""] for split in SPLITS
    ]
    sums = [sum(getattr(split_stats, name) for split_stats in totals.values()) for name in columns]
    rows.append(["all", chunks, *sums, bad_records])
    lines = ["\t".join(["split", "chunks", *columns, "bad_records"])]
    lines += ["\t".join(map(str, row)) for row in rows]
    return write_text_atomically("\n".join(lines) + "\n", out)
