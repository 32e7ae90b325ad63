"""Corpus files in, token sequences out (design stages 1-2).

Readers stream documents from RedPajama-V2 `*.json.gz`, SlimPajama / RedPajama-1T
`*.jsonl.zst`, plain `*.jsonl[.gz|.zst]` and Parquet, in constant memory. A chunk (a
group of input files) is tokenized into `tokens/{split}/{chunk}.parquet`: documents are
split by a stable hash of their id, joined with EOS and packed into sequences of S+1
tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from smalltalk.config import SPLITS, DataConfig
from smalltalk.files import parquet_writers, write_text_atomically
from smalltalk.tokens import token_dtype, token_schema

GLOB_CHARS = "*?["
UNKNOWN_SOURCE = "unknown"
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
ORDINAL_BITS = 30  # seq_id = chunk << 32 | split << 30 | ordinal
ENCODE_BATCH_BYTES = 4 << 20
# Longer documents are encoded in pieces: SentencePiece takes ~50 bytes per character encoded.
LONG_DOCUMENT_CHARS = 1 << 18
ROW_GROUP_SEQUENCES = 1024
ZSTD_MAX_FRAME_HEADER = 18
ZSTD_SKIPPABLE_MAGIC = 0x184D2A50  # low 4 bits free
ZSTD_RLE_BLOCK = 1  # its content is one byte, whatever the size it decodes to
COMPRESSION_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)


@dataclass(slots=True, frozen=True)
class Document:
    id: str
    text: str
    source: str


class BadRecordError(ValueError):
    """A record (or a whole file) that cannot be read; names the file and the line."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


OnBadRecord = Callable[[BadRecordError], None] | None


# --------------------------------------------------------------------------- readers


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The frames of a zstd file, one after the other (zstd CLI output and pzstd hold
    several), refusing a file that ends inside a frame.

    The decoder takes the end of the input at a block boundary for the end of the data, so
    a file cut there would read as complete; `zstd -t` refuses it, and so do we.
    """

    def __init__(self, path: Path):
        self.path = path
        raw = open(path, "rb")  # noqa: SIM115 -- closed by the stream reader (closefd)
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.reader.readinto(buffer)
        if count == 0 and len(buffer) and _ends_inside_a_zstd_frame(self.path):
            raise EOFError("the file ends inside a zstd frame")
        return count

    def close(self) -> None:
        self.reader.close()
        super().close()


def _ends_inside_a_zstd_frame(path: Path) -> bool:
    """Walks the frame and block headers (RFC 8878 §3.1) without decoding."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        offset = 0
        while offset < size:
            file.seek(offset)
            header = file.read(ZSTD_MAX_FRAME_HEADER)
            if int.from_bytes(header[:4], "little") & ~0xF == ZSTD_SKIPPABLE_MAGIC:
                offset += 8 + int.from_bytes(header[4:8], "little")
                continue
            try:
                has_checksum = zstandard.get_frame_parameters(header).has_checksum
                offset += zstandard.frame_header_size(header)
            except zstandard.ZstdError:
                return True
            last_block = False
            while not last_block:
                if offset + 3 > size:
                    return True
                file.seek(offset)
                block = int.from_bytes(file.read(3), "little")
                last_block, kind, length = block & 1, block >> 1 & 3, block >> 3
                offset += 3 + (1 if kind == ZSTD_RLE_BLOCK else length)
            offset += 4 if has_checksum else 0
        return offset > size


def _compression_fault(path: Path) -> str | None:
    """Why a compressed file does not decompress to its end (`gzip -t`, `zstd -t`), if so."""
    try:
        with _open_binary(path) as stream:
            while stream.read(1 << 20):
                pass
    except COMPRESSION_ERRORS as error:
        return str(error)
    return None


def _meta_source(meta) -> str | None:
    if isinstance(meta, str):  # some RedPajama-1T dumps store meta as a JSON string
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None
    if isinstance(meta, dict):
        source = meta.get("redpajama_set_name")
        return source if isinstance(source, str) and source else None
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".json.gz", ".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _truncated_or_corrupt(error: object) -> str:
    return f"truncated or corrupt compressed data ({error})"


def _json_lines(
    path: Path,
    doc_key: str,
    text_field: str,
    id_field: str,
    source_field: str,
    on_bad_record: OnBadRecord,
) -> Iterator[Document]:
    # RedPajama-V2 files are named {lang}_{head|middle}.json.gz and carry no domain label.
    default_source = _stem(path) if path.name.lower().endswith(".json.gz") else UNKNOWN_SOURCE
    compressed = path.name.lower().endswith((".gz", ".zst"))
    line_no = 0
    records = 0
    with _open_binary(path) as stream:
        lines = iter(stream)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except COMPRESSION_ERRORS as error:
                _report(
                    BadRecordError(path, line_no + 1, _truncated_or_corrupt(error)), on_bad_record
                )
                return
            line_no += 1
            if not raw.strip():
                continue
            records += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                # Corrupt compressed data often decodes to garbage long before the checksum
                # that proves it, so blame the compression if the file fails its own test.
                fault = _compression_fault(path) if compressed else None
                if fault is not None:
                    _report(
                        BadRecordError(path, line_no, _truncated_or_corrupt(fault)), on_bad_record
                    )
                    return
                compressed = False  # tested once: its bad lines are its own
                reason = "not UTF-8" if isinstance(error, UnicodeDecodeError) else "invalid JSON"
                _report(BadRecordError(path, line_no, f"{reason} ({error})"), on_bad_record)
                continue
            if not isinstance(record, dict):
                _report(BadRecordError(path, line_no, "not a JSON object"), on_bad_record)
                continue
            text = record.get(text_field, record.get("raw_content"))
            if not isinstance(text, str):
                _report(
                    BadRecordError(path, line_no, f"no text (field '{text_field}')"),
                    on_bad_record,
                )
                continue
            doc_id = record.get(id_field, record.get("doc_id"))
            source = record.get(source_field)
            if not isinstance(source, str) or not source:
                source = _meta_source(record.get("meta")) or default_source
            yield Document(
                id=str(doc_id) if doc_id is not None else f"{doc_key}/{line_no - 1}",
                text=text,
                source=source,
            )
    if records == 0:
        _report(BadRecordError(path, None, "file is empty (no records)"), on_bad_record)


def _parquet(
    path: Path,
    doc_key: str,
    text_field: str,
    id_field: str,
    source_field: str,
    on_bad_record: OnBadRecord,
) -> Iterator[Document]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        _report(BadRecordError(path, None, f"not a readable Parquet file ({error})"), on_bad_record)
        return
    names = set(parquet.schema_arrow.names)
    if text_field not in names:
        _report(
            BadRecordError(path, None, f"no text column '{text_field}' (has {sorted(names)})"),
            on_bad_record,
        )
        return
    columns = [name for name in (text_field, id_field, source_field) if name in names]
    if parquet.metadata.num_rows == 0:
        _report(BadRecordError(path, None, "file is empty (no records)"), on_bad_record)
        return
    row = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        data = batch.to_pydict()
        texts = data[text_field]
        ids = data.get(id_field, [None] * len(texts))
        sources = data.get(source_field, [None] * len(texts))
        for text, doc_id, source in zip(texts, ids, sources, strict=True):
            row += 1
            if not isinstance(text, str):
                _report(
                    BadRecordError(path, row, f"no text (column '{text_field}' is null)"),
                    on_bad_record,
                )
                continue
            yield Document(
                id=str(doc_id) if doc_id is not None else f"{doc_key}/{row - 1}",
                text=text,
                source=source if isinstance(source, str) and source else UNKNOWN_SOURCE,
            )


def _report(error: BadRecordError, on_bad_record: OnBadRecord) -> None:
    if on_bad_record is None:
        raise error
    on_bad_record(error)


def read_documents(
    path: str | os.PathLike,
    *,
    doc_key: str | None = None,
    text_field: str = "text",
    id_field: str = "id",
    source_field: str = "source",
    on_bad_record: OnBadRecord = None,
) -> Iterator[Document]:
    """Stream the documents of one corpus file, whatever its format, in constant memory.

    The format follows the name: `*.parquet` (columns `text_field`, optional `id_field`
    and `source_field`); `*.json.gz` (RedPajama-V2: text in `raw_content`, id `doc_id`);
    `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst` (text in `text_field`, optional id and source;
    SlimPajama's source is `meta.redpajama_set_name`). Documents without an id get
    `{doc_key}/{line index}`, where `doc_key` defaults to the path as given.

    A bad record raises BadRecordError naming the file and line, unless `on_bad_record`
    is given: then it receives the error and reading goes on (with the next file, when
    the compressed stream itself is broken).
    """
    path = Path(path)
    doc_key = doc_key if doc_key is not None else str(path)
    name = path.name.lower()
    if not path.is_file():
        _report(BadRecordError(path, None, "no such file"), on_bad_record)
        return iter(())
    fields = dict(text_field=text_field, id_field=id_field, source_field=source_field)
    if name.endswith(".parquet"):
        return _parquet(path, doc_key, on_bad_record=on_bad_record, **fields)
    if name.endswith((".json.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return _json_lines(path, doc_key, on_bad_record=on_bad_record, **fields)
    raise BadRecordError(
        path,
        None,
        "unsupported format (expected .parquet, .json.gz, .jsonl, .jsonl.gz or .jsonl.zst)",
    )


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
    temporary names and renamed at the end, and removed if anything fails.
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

    def encode(batch: list[Document]) -> Iterator[list[int] | np.ndarray]:
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

    def flush(batch: list[Document]) -> None:
        by_split: dict[str, tuple[list, list]] = {split: ([], []) for split in SPLITS}
        for doc, ids in zip(batch, encode(batch), strict=True):
            split = split_of(doc.id, data.splits)
            split_stats = stats.splits[split]
            split_stats.documents += 1
            split_stats.text_bytes += len(doc.text.encode("utf-8"))
            split_stats.tokens += len(ids) + 1
            by_split[split][0].append(ids)
            by_split[split][1].append(doc.source)
        for split, (token_lists, sources) in by_split.items():
            tokens, seq_sources = packers[split].add(token_lists, sources)
            write(split, tokens, seq_sources)

    def write(split: str, tokens: np.ndarray, sources: np.ndarray) -> None:
        if not len(tokens):
            return
        split_stats = stats.splits[split]
        ordinals = split_stats.sequences + np.arange(len(tokens), dtype=np.int64)
        if ordinals[-1] >= 2**ORDINAL_BITS:
            raise ValueError(f"chunk {chunk.name} holds too many {split} sequences for seq_id")
        seq_ids = (chunk.index << 32) | (SPLIT_CODES[split] << ORDINAL_BITS) | ordinals
        split_stats.sequences += len(tokens)
        writers[split].write_table(
            _sequence_table(schema, seq_ids, tokens, sources), row_group_size=ROW_GROUP_SEQUENCES
        )

    finals = [Path(out_dir) / split / f"{chunk.name}.parquet" for split in SPLITS]
    with parquet_writers(finals, schema) as split_writers:
        writers.update(zip(SPLITS, split_writers, strict=True))
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
                    flush(batch)
                    batch, batch_bytes = [], 0
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
