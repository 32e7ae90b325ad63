"""Corpus files in, documents out: readers of RedPajama-V2 `*.json.gz`, SlimPajama / RedPajama-1T
`*.jsonl.zst`, plain `*.jsonl[.gz|.zst]` and Parquet, streaming in constant memory. A record that
cannot be read is a `BadRecordError` naming the file and the line.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from smalltalk.unicode import unicode_problem

UNKNOWN_SOURCE = "unknown"
ZSTD_MAX_FRAME_HEADER = 18
ZSTD_SKIPPABLE_MAGIC = 0x184D2A50  # low 4 bits free
ZSTD_RLE_BLOCK = 1  # its content is one byte, whatever the size it decodes to
COMPRESSION_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)
# What json.loads raises on a line it cannot read: a JSONDecodeError, a UnicodeDecodeError (both
# ValueErrors), a ValueError for an integer of more than sys.get_int_max_str_digits() digits, or a
# RecursionError for arrays or objects nested deeper than the interpreter's stack.
JSON_ERRORS = (ValueError, RecursionError)
# What pyarrow raises on a Parquet file it cannot read, footer or pages: its own errors
# (ArrowInvalid, ArrowNotImplementedError, ArrowMemoryError for a size read from garbage...),
# OSError, and a UnicodeDecodeError (a ValueError) for a column name that is not UTF-8.
PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError)


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
        # One line, as the command line prints it: pyarrow's and zstd's own words may hold several.
        self.reason = reason = " ".join(part.strip() for part in reason.strip().splitlines())
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


OnBadRecord = Callable[[BadRecordError], None] | None


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


def _not_an_id(field: str, value: object) -> str | None:
    """Why a record's id cannot be one, or None. An id names a document and decides its split by
    its text (`str(value)`): a JSON array or object would be named by Python's spelling of it,
    which is almost surely a wrong `fields.id`, not an id."""
    if isinstance(value, (list, dict)):
        kind = "an array" if isinstance(value, list) else "an object"
        return f"field '{field}' is {kind}, not a string or number"
    return None


def _not_unicode(fields: dict[str, object]) -> str | None:
    """Why one of a record's strings is not valid Unicode, naming the field, or None. JSON can
    spell a lone surrogate ("\\ud800"), which no tokenizer, Parquet file or UTF-8 codec takes."""
    for name, value in fields.items():
        problem = unicode_problem(value) if isinstance(value, str) else None
        if problem is not None:
            return f"field '{name}' is not valid Unicode ({problem})"
    return None


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
            except JSON_ERRORS as error:
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
            problem = _not_an_id(id_field, doc_id) or _not_unicode(
                {text_field: text, id_field: doc_id, source_field: source}
            )
            if problem is not None:
                _report(BadRecordError(path, line_no, problem), on_bad_record)
                continue
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
        schema = parquet.schema_arrow
        rows_in_file = parquet.metadata.num_rows
    except PARQUET_ERRORS as error:
        _report(BadRecordError(path, None, f"not a readable Parquet file ({error})"), on_bad_record)
        return
    problem = _column_problem(schema, text_field, id_field, source_field)
    if problem is not None:
        _report(BadRecordError(path, None, problem), on_bad_record)
        return
    if rows_in_file == 0:
        _report(BadRecordError(path, None, "file is empty (no records)"), on_bad_record)
        return
    fields = (text_field, id_field, source_field)
    columns = [name for name in fields if name in schema.names]
    batches = parquet.iter_batches(columns=columns, batch_size=1024)
    row = 0
    while True:
        try:
            batch = next(batches)
            texts, ids, sources = (_column_values(batch, name) for name in fields)
        except StopIteration:
            break
        except PARQUET_ERRORS as error:
            # The footer reads but a page does not (a corrupt or cut file): the rows after it
            # are lost with it, so go on with the next file, as with a broken compressed stream.
            _report(
                BadRecordError(path, row + 1, f"unreadable Parquet data ({error})"), on_bad_record
            )
            return
        for text, doc_id, source in zip(texts, ids, sources, strict=True):
            row += 1
            values = {text_field: text, id_field: doc_id, source_field: source}
            problem = _not_utf8(values)
            if problem is None and not isinstance(text, str):
                problem = f"no text (column '{text_field}' is null)"
            problem = problem or _not_unicode(values)
            if problem is not None:
                _report(BadRecordError(path, row, problem), on_bad_record)
                continue
            yield Document(
                id=str(doc_id) if doc_id is not None else f"{doc_key}/{row - 1}",
                text=text,
                source=source if isinstance(source, str) and source else UNKNOWN_SOURCE,
            )


def _column_problem(
    schema: pa.Schema, text_field: str, id_field: str, source_field: str
) -> str | None:
    """Why the columns of a Parquet file cannot give documents, naming the column, or None. A
    column of another type would otherwise be read as Python spells its values: an id column
    of lists gives ids "[1, 2]", a source column of numbers gives no source at all."""
    if text_field not in schema.names:
        return f"no text column '{text_field}' (has {sorted(set(schema.names))})"
    wanted = (
        ("text", text_field, "strings", _holds_strings),
        ("id", id_field, "strings or integers", _holds_ids),
        ("source", source_field, "strings", _holds_sources),
    )
    for role, name, kind, holds in wanted:
        count = len(schema.get_all_field_indices(name))
        if count > 1:  # which of them is meant cannot be told
            return f"{role} column '{name}' appears {count} times"
        if count == 1 and not holds(schema.field(name).type):
            return f"{role} column '{name}' holds {schema.field(name).type}, not {kind}"
    return None


def _column_values(batch: pa.RecordBatch, name: str) -> list:
    """A column's values as Python objects (None where the file has no such column). A string that
    is not UTF-8, which a writer that does not check can store, is given as its
    UnicodeDecodeError, so that its row is named instead of the whole batch failing."""
    if name not in batch.schema.names:
        return [None] * batch.num_rows
    column = batch.column(name)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [_python_value(value) for value in column]


def _python_value(scalar: pa.Scalar) -> object:
    try:
        return scalar.as_py()
    except UnicodeDecodeError as error:
        return error


def _not_utf8(fields: dict[str, object]) -> str | None:
    """Why one of a row's strings is not UTF-8 (`_column_values`), naming the field, or None."""
    for name, value in fields.items():
        if isinstance(value, UnicodeDecodeError):
            return f"field '{name}' is not UTF-8 ({value})"
    return None


def _holds_strings(column: pa.DataType) -> bool:
    """Whether a column's values read as Python strings (a dictionary of strings does too)."""
    if pa.types.is_dictionary(column):
        column = column.value_type
    return (
        pa.types.is_string(column)
        or pa.types.is_large_string(column)
        or pa.types.is_string_view(column)
    )


def _holds_ids(column: pa.DataType) -> bool:
    """Strings or integers (an id column of nulls only: every id is generated)."""
    value_type = column.value_type if pa.types.is_dictionary(column) else column
    return _holds_strings(column) or pa.types.is_integer(value_type) or pa.types.is_null(column)


def _holds_sources(column: pa.DataType) -> bool:
    """Strings (a source column of nulls only: every source is unknown)."""
    return _holds_strings(column) or pa.types.is_null(column)


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
    the compressed stream or a Parquet page itself is broken).
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
