"""Write the bad-input corpus of tests/test_bad_inputs.py into this folder, byte for byte the
same each time (gzip without a timestamp, zstd and Parquet as the installed libraries write them).

    .venv/bin/python tests/data/bad/make.py

Each file holds one kind of bad input and is a few hundred bytes; tests/test_bad_inputs.py says
which reader meets it and the one-line error it must give. Inputs too large to commit (a 5 MB
line, JSON nested 100 000 deep) are written by the test itself, in its tmp_path.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

HERE = Path(__file__).resolve().parent
GOOD = [{"text": f"record {i}: the quick brown fox jumps over the lazy dog"} for i in range(4)]


def lines(records) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def parquet(table: pa.Table, **options) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def corrupt_page(good: pa.Table) -> bytes:
    """A Parquet file whose footer and schema read but whose one data page does not decode: the
    last bytes of its snappy-compressed page overwritten."""
    data = bytearray(parquet(good, compression="snappy", use_dictionary=False))
    column = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(0)
    end = column.data_page_offset + column.total_compressed_size
    data[end - 8 : end] = b"\xff" * 8
    return bytes(data)


def not_utf8_column_name() -> bytes:
    """A Parquet file whose footer names a column in bytes that are not UTF-8: its "\u00e9" (C3
    A9) turned into Latin-1's E9 E9, of the same length, so that the footer still parses (in the
    schema and in the column chunk's path both)."""
    data = parquet(pa.table({"text": ["a"], "\u00e9tiquette": ["b"]}), store_schema=False)
    assert "\u00e9tiquette".encode() in data
    return data.replace("\u00e9tiquette".encode(), b"\xe9\xe9tiquette")


def not_utf8_strings() -> pa.Array:
    """A string column holding bytes that are not UTF-8: pyarrow writes what it is given, and so
    do other writers."""
    return pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())


def corpus() -> dict[str, bytes]:
    """Every file of the corpus by name."""
    many = lines([{"text": f"record {i}"} for i in range(400)])
    texts = pa.table({"text": [r["text"] for r in GOOD]})
    return {
        # --- JSON lines, one bad record each (or none: the accepted ones)
        "whitespace.jsonl": lines([{"text": "   "}, {"text": "\n\t \n"}, {"text": ""}]),
        "lone-surrogate.jsonl": lines(GOOD[:2]) + b'{"text": "a\\ud800b"}\n',
        "nul.jsonl": b'{"text": "before\\u0000after"}\n',
        "raw-nul.jsonl": b'{"text": "before\x00after"}\n',
        "invalid-json-line-3.jsonl": lines(GOOD[:2]) + b'{"text": not quoted}\n',
        "list-not-object.jsonl": lines(GOOD[:1]) + b'["a", "list"]\n',
        "no-text.jsonl": lines(GOOD[:1]) + b'{"title": "a title, no text"}\n',
        "id-array.jsonl": b'{"text": "a document", "id": [1, 2]}\n',
        "not-utf8.jsonl": lines(GOOD[:1]) + b'{"text": "caf\xe9"}\n',
        "empty.jsonl": b"",
        "blank-lines.jsonl": b"\n  \n\t\n",
        "notes.txt": b"a format no reader takes\n",
        # --- compressed: empty, cut short
        "empty.jsonl.gz": b"",
        "empty.json.gz": b"",
        "empty.jsonl.zst": b"",
        "empty-stream.jsonl.zst": zstandard.ZstdCompressor().compress(b""),
        "cut-mid-stream.jsonl.gz": gzip.compress(many, mtime=0)[:300],
        "cut-mid-frame.jsonl.zst": zstandard.ZstdCompressor().compress(many)[:300],
        # --- Parquet
        "empty.parquet": b"",
        "no-rows.parquet": parquet(texts.slice(0, 0)),
        "text-int64.parquet": parquet(pa.table({"text": [1, 2, 3]})),
        "id-list.parquet": parquet(pa.table({"text": ["a", "b"], "id": [[1, 2], [3]]})),
        "source-int64.parquet": parquet(pa.table({"text": ["a", "b"], "source": [1, 2]})),
        "null-text.parquet": parquet(pa.table({"text": ["a", None, "c"]})),
        "not-utf8.parquet": parquet(pa.table({"text": not_utf8_strings()})),
        "corrupt-page.parquet": corrupt_page(texts),
        "not-utf8-column-name.parquet": not_utf8_column_name(),
        # --- texts for the serving commands (`--file`)
        "texts-not-utf8.txt": b"a first text\ncaf\xe9 au lait\n",
        "texts-no-text-field.jsonl": b'{"text": "fine"}\n{"prompt": "no text field"}\n',
        "texts-blank.txt": b"\n   \n\t\n",
        "texts-nul.txt": b"a text with a NUL \x00 byte in it\n",
    }


def main() -> None:
    for name, data in corpus().items():
        (HERE / name).write_bytes(data)


if __name__ == "__main__":
    main()
