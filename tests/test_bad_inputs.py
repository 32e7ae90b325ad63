"""The bad-input corpus: every malformed input that the corpus readers, the tokenizer, the command
line and serving meet, each with the one-line outcome it must give (`BAD_INPUTS`).

The files are committed in tests/data/bad, written byte for byte by its make.py, so that each can
be fed to `smalltalk` by hand; the few too large to commit are written here (`GENERATED`).
"""

from __future__ import annotations

import gzip
import io
import json
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

import smalltalk
from smalltalk import cli
from smalltalk.corpus import BadRecordError, read_documents
from smalltalk.serve.mixture import Mixture
from smalltalk.unicode import unicode_problem

BAD = REPO / "tests" / "data" / "bad"
HUGE_LINE_CHARS = 5 << 20  # one line of 5 MB
DEEP_NESTING = 100_000  # past the interpreter's stack, whatever its recursion limit
LONG_INTEGER_DIGITS = 5000  # past the 4300 digits Python converts by default
LONGEST_OUTCOME = 400  # characters: an error quotes no more of its input than a word or two


def huge_line(path: Path) -> None:
    path.write_text(
        json.dumps({"text": "a short one"}) + "\n" + json.dumps({"text": "w" * HUGE_LINE_CHARS})
    )


def huge_line_not_json(path: Path) -> None:
    path.write_text(json.dumps({"text": "a short one"}) + "\n" + "w" * HUGE_LINE_CHARS + "\n")


def deep_nesting(path: Path) -> None:
    """Valid JSON that json.loads cannot read: a RecursionError, not a JSONDecodeError."""
    path.write_text('{"text": "t", "deep": ' + "[" * DEEP_NESTING + "]" * DEEP_NESTING + "}\n")


def long_integer(path: Path) -> None:
    """Valid JSON that json.loads refuses with a bare ValueError (int_max_str_digits)."""
    path.write_text('{"text": "t", "id": ' + "7" * LONG_INTEGER_DIGITS + "}\n")


# Inputs too large to commit, written into the test's tmp_path; None: a path with no file there.
GENERATED: dict[str, Callable[[Path], None] | None] = {
    "huge-line.jsonl": huge_line,
    "huge-line-not-json.jsonl": huge_line_not_json,
    "deep-nesting.jsonl": deep_nesting,
    "long-integer.jsonl": long_integer,
    "missing.jsonl": None,
}
NO_MATCH = "*.nothing"  # an `inputs` glob that matches no file of tests/data/bad


@dataclass(frozen=True)
class Bad:
    file: str  # in tests/data/bad, in GENERATED, or the glob NO_MATCH
    reader: str  # a method of `Readers`: the entry point that meets it
    outcome: str  # what the one-line outcome must hold; {path} stands for the file's path


# The outcome is the error's message (the whole stderr line for a command), or, where the input is
# accepted, what was made of it: "read 2 documents", "routed 1 text", "tokenized ...", and
# "skipped and counted: N (the first error)" under `on_bad_record: skip`.
#
# Decisions for inputs that are accepted rather than named:
# - Whitespace-only documents are documents to the readers (the text is what the file says);
#   `tokenize` counts them as empty and packs no token of them; the tokenizer's sample takes no
#   line of them, and a corpus of nothing else is named by `train-tokenizer`.
# - A NUL character is text: JSON spells it "\u0000", SentencePiece encodes it as the byte piece
#   <0x00> and decodes it back (test_a_nul_is_text_the_tokenizer_keeps), so it is read, tokenized
#   and routed. A raw NUL byte inside a JSON string is a control character JSON forbids: invalid
#   JSON, named by its line.
# - A 5 MB line is read as one document (the tokenizer's sample cuts it into 8 KB sentences,
#   `tokenize` encodes it in pieces); a 5 MB line that is not JSON is named without quoting it.
# - JSON lines (`texts --file`) whose line is not JSON at all are texts as they stand (code that
#   starts with "{"); JSON that Python cannot read (nested too deep) is named.
BAD_INPUTS = [
    # ---- whitespace, NUL, lone surrogates
    Bad("whitespace.jsonl", "read", "read 3 documents"),
    Bad("whitespace.jsonl", "tokenize", "tokenized 0 documents, 3 empty"),
    Bad(
        "whitespace.jsonl",
        "train_tokenizer",
        "smalltalk train-tokenizer: error: the tokenizer sample holds no text: the train-split "
        "documents of the files sampled ({path}) are empty or whitespace only",
    ),
    Bad(
        "lone-surrogate.jsonl",
        "read",
        "{path}, line 3: field 'text' is not valid Unicode (lone surrogate U+D800 at position 1)",
    ),
    Bad(
        "lone-surrogate.jsonl",
        "tokenize",
        "smalltalk tokenize: error: {path}, line 3: field 'text' is not valid Unicode",
    ),
    Bad(
        "lone-surrogate.jsonl",
        "tokenize_skipping",
        "tokenized 2 documents, 0 empty; skipped and counted: 1 ({path}, line 3: field 'text'",
    ),
    Bad(
        "lone-surrogate.jsonl",
        "train_tokenizer",
        "smalltalk train-tokenizer: error: {path}, line 3: field 'text' is not valid Unicode",
    ),
    Bad(
        "lone-surrogate.jsonl",
        "route_file",
        "smalltalk route: error: {path}, line 3: not valid Unicode (lone surrogate U+D800 at "
        "position 1)",
    ),
    Bad(
        "lone-surrogate.jsonl",
        "mixture_route",
        "text 3 is not valid Unicode (lone surrogate U+D800 at position 1)",
    ),
    Bad("nul.jsonl", "read", "read 1 document"),
    Bad("nul.jsonl", "tokenize", "tokenized 1 document, 0 empty"),
    Bad("nul.jsonl", "route_file", "routed 1 text"),
    Bad("nul.jsonl", "mixture_route", "routed 1 text"),
    Bad(
        "raw-nul.jsonl",
        "read",
        "{path}, line 1: invalid JSON (Invalid control character at: line 1 column 17",
    ),
    # ---- JSON lines
    Bad(
        "invalid-json-line-3.jsonl",
        "read",
        "{path}, line 3: invalid JSON (Expecting value: line 1 column 10 (char 9))",
    ),
    Bad(
        "invalid-json-line-3.jsonl",
        "read_skipping",
        "read 2 documents; skipped and counted: 1 ({path}, line 3: invalid JSON",
    ),
    Bad(
        "invalid-json-line-3.jsonl",
        "tokenize",
        "smalltalk tokenize: error: {path}, line 3: invalid JSON (Expecting value",
    ),
    Bad(
        "invalid-json-line-3.jsonl",
        "train_tokenizer",
        "smalltalk train-tokenizer: error: {path}, line 3: invalid JSON (Expecting value",
    ),
    Bad("list-not-object.jsonl", "read", "{path}, line 2: not a JSON object"),
    Bad(
        "list-not-object.jsonl",
        "tokenize_skipping",
        "tokenized 1 document, 0 empty; skipped and counted: 1 ({path}, line 2: not a JSON object)",
    ),
    Bad("no-text.jsonl", "read", "{path}, line 2: no text (field 'text')"),
    Bad("id-array.jsonl", "read", "{path}, line 1: field 'id' is an array, not a string or number"),
    Bad(
        "not-utf8.jsonl",
        "read",
        "{path}, line 2: not UTF-8 ('utf-8' codec can't decode byte 0xe9 in position 13",
    ),
    Bad(
        "not-utf8.jsonl",
        "route_file",
        "smalltalk route: error: {path}: not UTF-8 text at line 2 (byte 0xE9 at position 13)",
    ),
    Bad("huge-line.jsonl", "read", "read 2 documents"),
    Bad(
        "huge-line-not-json.jsonl",
        "read",
        "{path}, line 2: invalid JSON (Expecting value: line 1 column 1 (char 0))",
    ),
    Bad(
        "deep-nesting.jsonl",
        "read",
        "{path}, line 1: invalid JSON (maximum recursion depth exceeded",
    ),
    Bad(
        "deep-nesting.jsonl",
        "route_file",
        "smalltalk route: error: {path}, line 1: JSON that Python cannot read (maximum recursion",
    ),
    Bad(
        "long-integer.jsonl",
        "read",
        "{path}, line 1: invalid JSON (Exceeds the limit (4300 digits) for integer string",
    ),
    Bad("notes.txt", "read", "{path}: unsupported format (expected .parquet, .json.gz, .jsonl"),
    Bad("missing.jsonl", "read", "{path}: no such file"),
    # ---- empty files of each format
    Bad("empty.jsonl", "read", "{path}: file is empty (no records)"),
    Bad("blank-lines.jsonl", "read", "{path}: file is empty (no records)"),
    Bad("empty.jsonl.gz", "read", "{path}: file is empty (no records)"),
    Bad("empty.json.gz", "read", "{path}: file is empty (no records)"),
    Bad("empty.jsonl.zst", "read", "{path}: file is empty (no records)"),
    Bad("empty-stream.jsonl.zst", "read", "{path}: file is empty (no records)"),
    Bad("empty.parquet", "read", "{path}: not a readable Parquet file (Parquet file size is 0"),
    Bad("no-rows.parquet", "read", "{path}: file is empty (no records)"),
    Bad(
        "empty.jsonl.zst",
        "tokenize_skipping",
        "tokenized 0 documents, 0 empty; skipped and counted: 1 ({path}: file is empty",
    ),
    # ---- compressed files cut short
    Bad(
        "cut-mid-frame.jsonl.zst",
        "read",
        "{path}, line 1: truncated or corrupt compressed data (the file ends inside a zstd frame)",
    ),
    Bad(
        "cut-mid-frame.jsonl.zst",
        "tokenize",
        "smalltalk tokenize: error: {path}, line 1: truncated or corrupt compressed data",
    ),
    Bad(
        "cut-mid-stream.jsonl.gz",
        "read",
        "{path}, line 108: truncated or corrupt compressed data (Compressed file ended before the "
        "end-of-stream marker was reached)",
    ),
    Bad(
        "cut-mid-stream.jsonl.gz",
        "read_skipping",
        "read 107 documents; skipped and counted: 1 ({path}, line 108: truncated",
    ),
    # ---- Parquet: columns of other types, nulls, bytes that are not UTF-8, a corrupt page
    Bad("text-int64.parquet", "read", "{path}: text column 'text' holds int64, not strings"),
    Bad(
        "text-int64.parquet",
        "tokenize",
        "smalltalk tokenize: error: {path}: text column 'text' holds int64, not strings",
    ),
    Bad(
        "id-list.parquet",
        "read",
        "{path}: id column 'id' holds list<element: int64>, not strings or integers",
    ),
    Bad("source-int64.parquet", "read", "{path}: source column 'source' holds int64, not strings"),
    Bad("null-text.parquet", "read", "{path}, line 2: no text (column 'text' is null)"),
    Bad(
        "null-text.parquet",
        "read_skipping",
        "read 2 documents; skipped and counted: 1 ({path}, line 2: no text (column 'text' is "
        "null))",
    ),
    Bad(
        "not-utf8.parquet",
        "read",
        "{path}, line 2: field 'text' is not UTF-8 ('utf-8' codec can't decode byte 0xe9",
    ),
    Bad("corrupt-page.parquet", "read", "{path}, line 1: unreadable Parquet data ("),
    Bad(
        "not-utf8-column-name.parquet",
        "read",
        "{path}: not a readable Parquet file ('utf-8' codec can't decode byte 0xe9",
    ),
    Bad(
        "corrupt-page.parquet",
        "tokenize_skipping",
        "tokenized 0 documents, 0 empty; skipped and counted: 1 ({path}, line 1: unreadable "
        "Parquet data (",
    ),
    # ---- the config's inputs
    Bad(NO_MATCH, "chunks", "smalltalk chunks: error: inputs[0]: '{path}' matches no file"),
    Bad(
        NO_MATCH,
        "tokenize",
        "smalltalk tokenize: error: inputs[0]: '{path}' matches no file",
    ),
    # ---- texts for the serving commands
    Bad(
        "texts-not-utf8.txt",
        "route_file",
        "smalltalk route: error: {path}: not UTF-8 text at line 2 (byte 0xE9 at position 3)",
    ),
    Bad(
        "texts-no-text-field.jsonl",
        "route_file",
        'smalltalk route: error: {path}, line 2: a JSON object without a "text" field (its '
        "keys: 'prompt')",
    ),
    Bad("texts-blank.txt", "route_file", "smalltalk route: error: no texts in {path}"),
    Bad("texts-nul.txt", "route_file", "routed 1 text"),
    Bad("empty.jsonl", "route_file", "smalltalk route: error: no texts in {path}"),
]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


@dataclass
class Readers:
    """The entry points that meet a bad input, each giving its one-line outcome: the error's
    message, or what it made of the input. A command's error is its one stderr line."""

    tmp_path: Path
    capsys: pytest.CaptureFixture
    request: pytest.FixtureRequest
    printed: str = ""

    # -- the corpus readers

    def read(self, path: Path) -> str:
        try:
            count = sum(1 for _ in read_documents(path))
        except BadRecordError as error:
            return str(error)
        return f"read {plural(count, 'document')}"

    def read_skipping(self, path: Path) -> str:
        skipped: list[BadRecordError] = []
        count = sum(1 for _ in read_documents(path, on_bad_record=skipped.append))
        return f"read {plural(count, 'document')}{skipped_and_counted(len(skipped), skipped)}"

    # -- the workflow's commands that read the corpus

    def tokenize(self, path: Path, on_bad_record: str = "error") -> str:
        out_dir = self.tmp_path / "tokens"
        error = self.command(
            "tokenize",
            "--config",
            str(self.config(path, on_bad_record)),
            "--chunk",
            "c00000",
            "--tokenizer",
            str(self.results() / "tokenizer" / "spm.model"),
            "--out-dir",
            str(out_dir),
        )
        if error is not None:
            return error
        stats = json.loads((out_dir / "stats" / "c00000.json").read_text())
        documents = sum(split["documents"] for split in stats["splits"].values())
        empty = sum(split["empty_documents"] for split in stats["splits"].values())
        skipped = skipped_and_counted(stats["bad_records"], stats["bad_record_examples"])
        return f"tokenized {plural(documents, 'document')}, {empty} empty{skipped}"

    def tokenize_skipping(self, path: Path) -> str:
        return self.tokenize(path, on_bad_record="skip")

    def train_tokenizer(self, path: Path) -> str:
        out = self.tmp_path / "tokenizer" / "spm.model"
        config = self.config(path, "error")
        error = self.command("train-tokenizer", "--config", str(config), "--out", str(out))
        return error if error is not None else f"trained {out.name}"

    def chunks(self, path: Path) -> str:
        error = self.command("chunks", "--config", str(self.config(path, "error")))
        return error if error is not None else "planned"

    # -- serving

    def route_file(self, path: Path) -> str:
        results = str(self.results())
        error = self.command("route", "--results", results, "--json", "--file", str(path))
        if error is not None:
            return error
        routed = [json.loads(line) for line in self.printed.splitlines()]
        return f"routed {plural(len(routed), 'text')}"

    def mixture_route(self, path: Path) -> str:
        """The "text" of each JSON line, as a caller of the library would pass it."""
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        mixture: Mixture = self.request.getfixturevalue("mixture")
        try:
            routings = mixture.route(texts)
        except ValueError as error:
            return str(error)
        return f"routed {plural(len(routings), 'text')}"

    # -- helpers

    def results(self) -> Path:
        """The tiny trained mixture of conftest.py, built once a session and only when asked."""
        return self.request.getfixturevalue("results")

    def config(self, path: Path, on_bad_record: str) -> Path:
        config = self.tmp_path / f"config-{on_bad_record}.yaml"
        values = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
        values |= {
            "inputs": [str(path)],
            "on_bad_record": on_bad_record,
            "results": str(self.tmp_path / "results"),
        }
        config.write_text(yaml.safe_dump(values))
        return config

    def command(self, *argv: str) -> str | None:
        """Run `smalltalk ARGV`: None when it succeeds (its stdout in `self.printed`), else its
        one error line."""
        status = cli.main(list(argv))
        printed = self.capsys.readouterr()
        assert "Traceback" not in printed.err
        self.printed = printed.out
        if status == 0:
            return None
        assert status == 1
        errors = [line for line in printed.err.splitlines() if line.startswith("smalltalk ")]
        assert len(errors) == 1, printed.err
        return errors[0]


def skipped_and_counted(count: int, errors: list) -> str:
    return f"; skipped and counted: {count} ({errors[0]})" if count else ""


@pytest.fixture(scope="module")
def mixture(results) -> Mixture:
    return smalltalk.load(results)


def bad_input(file: str, tmp_path: Path) -> Path:
    """The path of a corpus file: committed, or written now, or the NO_MATCH glob."""
    if file == NO_MATCH:
        return BAD / NO_MATCH
    if file in GENERATED:
        path = tmp_path / "bad" / file
        path.parent.mkdir(exist_ok=True)
        write = GENERATED[file]
        if write is not None:
            write(path)
        return path
    path = BAD / file
    assert path.is_file(), f"{file}: not in tests/data/bad (run tests/data/bad/make.py)"
    return path


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[f"{bad.file}-{bad.reader}" for bad in BAD_INPUTS])
def test_every_bad_input_gives_its_one_line_outcome(bad, tmp_path, capsys, request):
    path = bad_input(bad.file, tmp_path)
    outcome = getattr(Readers(tmp_path, capsys, request), bad.reader)(path)
    assert "\n" not in outcome and len(outcome) <= LONGEST_OUTCOME, outcome[:LONGEST_OUTCOME]
    assert bad.outcome.replace("{path}", str(path)) in outcome


def test_every_file_of_the_corpus_has_a_row_and_make_py_writes_them_all():
    committed = {path.name for path in BAD.iterdir() if path.name != "make.py"}
    tabled = {bad.file for bad in BAD_INPUTS} - set(GENERATED) - {NO_MATCH}
    assert committed == tabled
    written = runpy.run_path(str(BAD / "make.py"))["corpus"]()
    assert set(written) == committed
    for name, data in written.items():  # zstd and Parquet bytes may differ by library version
        if not name.endswith((".zst", ".parquet")):
            assert (BAD / name).read_bytes() == data, f"{name}: run tests/data/bad/make.py"


def test_a_nul_is_text_the_tokenizer_keeps(mixture):
    text = "before\x00after"
    ids = mixture.encode(text)
    assert "<0x00>" in [mixture.tokenizer.id_to_piece(i) for i in ids]
    assert mixture.decode(ids) == text


def test_a_tokenizer_without_files_to_sample_says_so(tmp_path, capsys):
    from smalltalk.config import DataConfig, TokenizerConfig, validate_config
    from smalltalk.tokenizer import train_tokenizer

    values = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config = validate_config(values)
    with pytest.raises(ValueError, match="^the tokenizer has no files to sample"):
        train_tokenizer(
            files=[],
            data=DataConfig.from_config(config),
            tokenizer=TokenizerConfig.from_config(config),
            out_model=tmp_path / "spm.model",
        )


# ---- property tests: random input through every reader and through `Mixture.route` -------------

FORMATS = [".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".parquet"]
JSON_FORMATS = [".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst"]
# Every code point, lone surrogates included: JSON spells them as "\ud800" escapes. Hypothesis
# draws few of the 2048 surrogates among 1.1 million code points, so `any_text` puts one in half
# of its texts.
ANY_CHARACTER = st.characters(exclude_categories=())
LONE_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=())


def any_text(max_size: int) -> st.SearchStrategy[str]:
    text = st.text(ANY_CHARACTER, max_size=max_size)
    return text | st.builds(
        lambda before, lone, after: before + lone + after, text, LONE_SURROGATE, text
    )


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: json.dumps writes them and json.loads reads them
    | any_text(20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text(8), inner, max_size=4),
    max_leaves=12,
)
# Objects with the fields the readers look for, so that random values reach every check; a
# string, valid or not, in half of them, so that some files are read to the end.
records = st.fixed_dictionaries(
    {"text": any_text(20) | json_values},
    optional={
        "raw_content": json_values,
        "id": json_values,
        "doc_id": json_values,
        "source": json_values,
        "meta": json_values | st.builds(json.dumps, json_values),
    },
)
json_lines = st.lists(records, min_size=1, max_size=6) | st.lists(
    records | json_values, min_size=1, max_size=6
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for a property test's examples (hypothesis runs them one after the other, and
    takes no function-scoped fixture)."""
    return tmp_path_factory.mktemp("random-input")


def compressed(data: bytes, suffix: str) -> bytes:
    if suffix.endswith(".gz"):
        return gzip.compress(data, mtime=0)
    if suffix.endswith(".zst"):
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    return data


def a_valid_file(suffix: str) -> bytes:
    """A small good corpus file of the format, for the edits of `test_damaged_files_...`."""
    rows = [{"text": f"document {i}", "id": f"d{i}", "source": "web"} for i in range(20)]
    if suffix == ".parquet":
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer, compression="snappy")
        return buffer.getvalue()
    return compressed(b"".join(json.dumps(row).encode() + b"\n" for row in rows), suffix)


def read_or_named_error(path: Path) -> None:
    """What every reader must do with any input: give documents of valid text, or raise a
    BadRecordError of one line naming the file. Any other exception (a UnicodeDecodeError, a
    pyarrow or zstd error, a RecursionError) fails the test where it is raised. Skipping bad
    records, it must never raise at all."""
    try:
        documents = list(read_documents(path))
    except BadRecordError as error:
        assert str(path) in str(error) and "\n" not in str(error), str(error)
        documents = None
    skipped: list[BadRecordError] = []
    kept = list(read_documents(path, on_bad_record=skipped.append))
    for document in kept:
        assert isinstance(document.text, str) and unicode_problem(document.text) is None
        assert isinstance(document.id, str) and unicode_problem(document.id) is None
        assert isinstance(document.source, str) and document.source
    assert all(error.path == str(path) and "\n" not in str(error) for error in skipped)
    if documents is not None:  # nothing bad: skipping changes nothing
        assert kept == documents and not skipped


@pytest.mark.parametrize("suffix", FORMATS)
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_are_read_or_named(scratch, suffix, data):
    path = scratch / f"random-bytes{suffix}"
    path.write_bytes(data)
    read_or_named_error(path)


@pytest.mark.parametrize("suffix", FORMATS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_damaged_files_are_read_or_named(scratch, suffix, data):
    """Random bytes seldom get past a format's magic number; a good file with a few bytes changed,
    and at times its end cut off, reaches the decoders, the Parquet pages and each record's JSON.
    (Cut every time, a Parquet file would lose its footer and never be read further.)"""
    damaged = bytearray(a_valid_file(suffix))
    places = st.integers(0, len(damaged) - 1)
    for place, byte in data.draw(st.lists(st.tuples(places, st.integers(0, 255)), max_size=4)):
        damaged[place] = byte
    cut = data.draw(st.none() | st.integers(0, len(damaged)), label="cut")
    path = scratch / f"damaged{suffix}"
    path.write_bytes(bytes(damaged[:cut]))
    read_or_named_error(path)


@pytest.mark.parametrize("suffix", JSON_FORMATS)
@settings(max_examples=100, deadline=None)
@given(lines=json_lines, ascii_only=st.booleans())
def test_random_json_lines_are_read_or_named(scratch, suffix, lines, ascii_only):
    """Any JSON value as a line, escaped ASCII or raw UTF-8 (a lone surrogate written raw, as
    "surrogatepass" writes it, is bytes that are not UTF-8)."""
    text = "".join(json.dumps(value, ensure_ascii=ascii_only) + "\n" for value in lines)
    path = scratch / f"random-json{suffix}"
    path.write_bytes(compressed(text.encode("utf-8", "surrogatepass"), suffix))
    read_or_named_error(path)


@st.composite
def parquet_columns(draw, rows: int, kinds: list[str]) -> pa.Array:
    """A column of `rows` values, of one of `kinds` of PARQUET_COLUMN_TYPES, with nulls among
    them or not."""
    nulls = draw(st.booleans())

    def values(strategy):
        return draw(
            st.lists(st.none() | strategy if nulls else strategy, min_size=rows, max_size=rows)
        )

    kind = draw(st.sampled_from(kinds))
    if kind == "null":
        return pa.nulls(rows)
    if kind == "not UTF-8":
        return pa.array(values(st.binary(max_size=8)), pa.binary()).view(pa.string())
    if kind == "dictionary":
        return pa.array(values(st.text(max_size=8)), pa.string()).dictionary_encode()
    strategy, arrow_type = PARQUET_COLUMN_TYPES[kind]
    return pa.array(values(strategy), arrow_type)


# The types a Parquet column may hold, strings that are not UTF-8 included (pyarrow writes them
# unchecked, as other writers may).
PARQUET_COLUMN_TYPES = {
    "string": (st.text(max_size=20), pa.string()),
    "large string": (st.text(max_size=20), pa.large_string()),
    "int64": (st.integers(-(2**63), 2**63 - 1), pa.int64()),
    "uint8": (st.integers(0, 255), pa.uint8()),
    "float64": (st.floats(), pa.float64()),
    "bool": (st.booleans(), pa.bool_()),
    "binary": (st.binary(max_size=8), pa.binary()),
    "list": (st.lists(st.integers(-5, 5), max_size=3), pa.list_(pa.int64())),
    "struct": (st.fixed_dictionaries({"a": st.text(max_size=3)}), pa.struct([("a", pa.string())])),
    "null": None,
    "not UTF-8": None,
    "dictionary": None,
}


STRING_COLUMNS = ["string", "large string", "dictionary", "not UTF-8"]


@st.composite
def parquet_tables(draw) -> pa.Table:
    """0 to 6 rows: a text column (of strings in half the tables, else of any type; under
    another name at times), and some of the other columns the reader looks for, and one it
    does not, each of any type."""
    rows = draw(st.integers(0, 6))
    any_kind = sorted(PARQUET_COLUMN_TYPES)
    text_kinds = draw(st.sampled_from([STRING_COLUMNS, any_kind]))
    text_name = draw(st.sampled_from(["text", "text", "text", "body"]))
    columns = {text_name: draw(parquet_columns(rows, text_kinds))}
    for name in draw(st.lists(st.sampled_from(["id", "source", "other"]), unique=True)):
        columns[name] = draw(parquet_columns(rows, any_kind))
    return pa.table(columns)


@settings(max_examples=100, deadline=None)
@given(table=parquet_tables())
def test_random_parquet_columns_are_read_or_named(scratch, table):
    path = scratch / "random-columns.parquet"
    pq.write_table(table, path)
    read_or_named_error(path)


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(any_text(40), min_size=1, max_size=3),
    single=st.booleans(),
)
def test_random_text_is_routed_or_named(mixture, texts, single):
    """Any text, lone surrogates included: routed, or a ValueError naming the text (by its place
    in the list) and what is wrong with it."""
    asked = texts[0] if single else texts
    problems = [(number, unicode_problem(text)) for number, text in enumerate(texts, 1)]
    first_bad = next(((n, p) for n, p in problems if p is not None), None)
    if single and first_bad is not None and first_bad[0] != 1:
        first_bad = None  # only the first text was asked
    if first_bad is None:
        routed = mixture.route(asked)
        for routing in [routed] if single else routed:
            assert routing.expert in mixture.experts
        return
    with pytest.raises(ValueError) as raised:
        mixture.route(asked)
    number, problem = first_bad
    named = "text" if single else f"text {number}"
    assert str(raised.value) == f"{named} is not valid Unicode ({problem})"
