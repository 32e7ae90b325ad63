"""Every input format, and every kind of bad input, through `smalltalk.corpus.read_documents`."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest
import zstandard
from conftest import json_lines, make_records, write_jsonl, write_parquet

from smalltalk.corpus import BadRecordError, read_documents
from smalltalk.data import plan_chunks


def read_all(path, **kwargs):
    return list(read_documents(path, **kwargs))


# --------------------------------------------------------------------------- formats


def test_redpajama_v2_json_gz_reads_raw_content_and_doc_id(tmp_path):
    path = tmp_path / "en_head.json.gz"
    write_jsonl(
        path,
        [
            {"raw_content": "first page", "doc_id": "2023-06/0000/en_head.json.gz/0"},
            {"raw_content": "second page"},
        ],
    )
    docs = read_all(path, doc_key="2023-06/0000/en_head.json.gz")
    assert [d.text for d in docs] == ["first page", "second page"]
    assert docs[0].id == "2023-06/0000/en_head.json.gz/0"
    # Without doc_id the id is file + line, as RedPajama-V2's own loader builds it.
    assert docs[1].id == "2023-06/0000/en_head.json.gz/1"
    assert {d.source for d in docs} == {"en_head"}


def test_slimpajama_jsonl_zst_takes_source_from_meta(tmp_path):
    path = write_jsonl(tmp_path / "chunk.jsonl.zst", make_records(50, seed=1))
    docs = read_all(path)
    records = make_records(50, seed=1)
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert [d.source for d in docs] == [r["meta"]["redpajama_set_name"] for r in records]
    assert len({d.id for d in docs}) == 50


def test_redpajama_1t_meta_as_json_string(tmp_path):
    path = write_jsonl(
        tmp_path / "arxiv.jsonl.zst",
        [{"text": "x", "meta": json.dumps({"redpajama_set_name": "RedPajamaArXiv"})}],
    )
    assert read_all(path)[0].source == "RedPajamaArXiv"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_plain_json_lines_with_optional_id_and_source(tmp_path, suffix):
    path = write_jsonl(
        tmp_path / f"plain{suffix}",
        [{"text": "a", "id": 7, "source": "web"}, {"text": "b"}],
    )
    docs = read_all(path, doc_key="plain")
    assert [(d.id, d.text, d.source) for d in docs] == [
        ("7", "a", "web"),
        ("plain/1", "b", "unknown"),
    ]


def test_configured_field_names(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello", "key": "k1", "domain": "d"}])
    (doc,) = read_all(path, text_field="body", id_field="key", source_field="domain")
    assert (doc.id, doc.text, doc.source) == ("k1", "hello", "d")


def test_parquet_with_configurable_columns(tmp_path):
    path = write_parquet(
        tmp_path / "docs.parquet",
        {"content": ["one", "two", "three"], "uid": ["a", "b", "c"], "lang": ["en", "en", "de"]},
    )
    docs = read_all(path, text_field="content", id_field="uid", source_field="lang")
    assert [(d.id, d.text, d.source) for d in docs] == [
        ("a", "one", "en"),
        ("b", "two", "en"),
        ("c", "three", "de"),
    ]
    docs = read_all(path, text_field="content", doc_key="docs")
    assert [d.id for d in docs] == ["docs/0", "docs/1", "docs/2"]


def test_reading_is_streamed_in_constant_memory(tmp_path):
    # ~40 MB of text compresses to almost nothing; peak Python memory must stay far below.
    path = tmp_path / "big.jsonl.zst"
    record = json.dumps({"text": "the quick brown fox " * 500}).encode() + b"\n"
    compressor = zstandard.ZstdCompressor()
    with open(path, "wb") as out, compressor.stream_writer(out) as writer:
        for _ in range(4000):
            writer.write(record)
    tracemalloc.start()
    count = sum(1 for _ in read_documents(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 4000
    assert peak < 8 * 2**20


# --------------------------------------------------------------------------- bad input


def bad_input_cases(tmp_path: Path) -> dict[str, tuple[Path, int | None]]:
    """Each bad file, with the line an error must name (None: the whole file)."""
    good = json_lines([{"text": f"record {i}"} for i in range(2000)])
    cases = {}

    path = tmp_path / "truncated.jsonl.gz"
    path.write_bytes(gzip.compress(good)[:-200])
    cases["truncated gzip"] = (path, None)

    path = tmp_path / "truncated.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(good)[:-50])
    cases["truncated zstd"] = (path, None)

    path = tmp_path / "corrupt.jsonl.zst"
    data = bytearray(zstandard.ZstdCompressor().compress(good))
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    cases["corrupt zstd"] = (path, None)

    path = tmp_path / "corrupt.json.gz"
    data = bytearray(gzip.compress(good, mtime=0))
    data[len(data) // 2] ^= 0x55  # decodes to garbage lines long before the CRC fails
    path.write_bytes(bytes(data))
    cases["corrupt gzip"] = (path, None)

    path = tmp_path / "invalid.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": broken\n{"text": "ok"}\n')
    cases["invalid JSON"] = (path, 2)

    path = tmp_path / "notext.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"title": "no text here"}\n')
    cases["no text"] = (path, 2)

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    cases["not UTF-8"] = (path, 2)

    path = tmp_path / "surrogate.jsonl"  # valid JSON, but no UTF-8 encodes U+D800
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "a\\ud800b"}\n')
    cases["lone surrogate"] = (path, 3)

    path = tmp_path / "surrogate-id.jsonl"
    path.write_bytes(b'{"text": "ok", "id": "\\udc80"}\n')
    cases["lone surrogate in the id"] = (path, 1)

    path = tmp_path / "empty.jsonl.zst"
    path.write_bytes(b"")
    cases["empty file"] = (path, None)

    cases["missing path"] = (tmp_path / "missing.jsonl", None)
    return cases


CASES = [
    "truncated gzip",
    "truncated zstd",
    "corrupt zstd",
    "corrupt gzip",
    "invalid JSON",
    "no text",
    "not UTF-8",
    "lone surrogate",
    "lone surrogate in the id",
    "empty file",
    "missing path",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_with_file_and_line(tmp_path, case):
    path, line = bad_input_cases(tmp_path)[case]
    with pytest.raises(BadRecordError) as raised:
        read_all(path)
    assert str(path) in str(raised.value)
    assert raised.value.path == str(path)
    if line is not None:
        assert raised.value.line == line
        assert f"line {line}" in str(raised.value)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_skipped_and_counted(tmp_path, case):
    path, _ = bad_input_cases(tmp_path)[case]
    skipped = []
    docs = read_all(path, on_bad_record=skipped.append)
    assert len(skipped) == 1
    assert all(doc.text.startswith(("ok", "record")) for doc in docs)


# Not "corrupt zstd": without a checksum (the default) its garbage decodes, and `zstd -t`
# passes it too; what is left to report is the line that is not JSON.
@pytest.mark.parametrize("case", ["truncated gzip", "truncated zstd", "corrupt gzip"])
def test_broken_compression_is_reported_as_such_not_as_a_bad_line(tmp_path, case):
    path, _ = bad_input_cases(tmp_path)[case]
    with pytest.raises(BadRecordError, match="truncated or corrupt compressed data"):
        read_all(path)


def test_a_zstd_file_cut_at_a_block_boundary_at_a_line_end_is_truncated(tmp_path):
    # The decoder takes the end of input after a whole block for the end of the data.
    compressor = zstandard.ZstdCompressor().compressobj()
    data, line_ends = b"", []
    for record in make_records(20):
        data += compressor.compress(json.dumps(record).encode() + b"\n")
        data += compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        line_ends.append(len(data))
    data += compressor.flush()
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data)
    assert len(read_all(path)) == 20
    path.write_bytes(data[: line_ends[9]])
    with pytest.raises(BadRecordError, match="truncated") as raised:
        read_all(path)
    assert raised.value.path == str(path)
    skipped = []
    assert len(read_all(path, on_bad_record=skipped.append)) == 10
    assert len(skipped) == 1


def test_parquet_null_text_and_missing_column(tmp_path):
    path = write_parquet(tmp_path / "nulls.parquet", {"text": ["a", None, "c"]})
    with pytest.raises(BadRecordError, match="line 2"):
        read_all(path)
    skipped = []
    assert [d.text for d in read_all(path, on_bad_record=skipped.append)] == ["a", "c"]
    assert len(skipped) == 1
    path = write_parquet(tmp_path / "nocol.parquet", {"body": ["a"]})
    with pytest.raises(BadRecordError, match="no text column 'text'"):
        read_all(path)


def test_a_lone_surrogate_is_a_bad_record_naming_its_field_and_position(tmp_path):
    path, _ = bad_input_cases(tmp_path)["lone surrogate"]
    with pytest.raises(BadRecordError) as raised:
        read_all(path)
    assert str(raised.value) == (
        f"{path}, line 3: field 'text' is not valid Unicode (lone surrogate U+D800 at position 1)"
    )


def test_a_parquet_text_column_of_another_type_is_named_with_its_type(tmp_path):
    path = write_parquet(tmp_path / "numbers.parquet", {"text": [1, 2, 3]})
    with pytest.raises(BadRecordError) as raised:
        read_all(path)
    assert str(raised.value) == f"{path}: text column 'text' holds int64, not strings"
    skipped = []
    assert read_all(path, on_bad_record=skipped.append) == []
    assert [str(error) for error in skipped] == [str(raised.value)]
    path = write_parquet(
        tmp_path / "labels.parquet", {"text": pa.array(["a", "b"]).dictionary_encode()}
    )
    assert [d.text for d in read_all(path)] == ["a", "b"]  # a dictionary of strings reads as text


def test_unsupported_suffix_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(BadRecordError, match="unsupported format"):
        read_all(path)


# --------------------------------------------------------------------------- chunks


def test_plan_chunks_groups_sorted_files(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "sub/c.jsonl", "sub/d.jsonl", "e.jsonl"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    chunks = plan_chunks(["**/*.jsonl", "a.jsonl"], files_per_chunk=2, base_dir=tmp_path)
    assert [c.name for c in chunks] == ["c00000", "c00001", "c00002"]
    assert [list(c.files) for c in chunks] == [
        ["a.jsonl", "b.jsonl"],
        ["e.jsonl", "sub/c.jsonl"],
        ["sub/d.jsonl"],
    ]


def test_plan_chunks_rejects_a_pattern_without_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"inputs\[0\]: 'nothing/\*.jsonl' matches no file"):
        plan_chunks(["nothing/*.jsonl"], files_per_chunk=1, base_dir=tmp_path)
