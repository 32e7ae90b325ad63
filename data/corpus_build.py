"""What the corpus build scripts share: text clean-up, splitting, sampling, chunk writing.

`build_demo_corpus.py`, `build_docs_corpus.py` and `build_general_corpus.py` each turn
Debian-packaged texts into SlimPajama-style chunks `<name>-000.jsonl.zst` ... whose lines are

    {"text": "...", "meta": {"redpajama_set_name": "<domain>"}}

A script supplies the domains (each a function yielding source units in source order)
and the Debian packages it reads; everything after that is here, so every corpus is
cleaned, split, sampled, shuffled, compressed and checked the same way.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

DEFAULT_NUM_SHARDS = 8
ZSTD_LEVEL = 19

MIN_DOCUMENT_CHARS = 200  # shorter texts are too small to be worth a record (Psalm 117)
LONG_DOCUMENT_CHARS = 16_000  # pages and modules above this are split ...
PIECE_TARGET_CHARS = 8_000  # ... into pieces of at most about this size
GROUP_TARGET_CHARS = 4_000  # size of documents built from many small entries


@dataclass(frozen=True)
class Document:
    domain: str
    text: str


# A domain's builder yields source units in source order: a unit is one chapter, page,
# module or group of entries, as the list of documents it was split into (usually one).
DomainBuilder = Callable[[], Iterable[list[str]]]


@dataclass(frozen=True)
class CorpusRecipe:
    """What makes one corpus: its file prefix, its domains and the packages it reads."""

    name: str  # chunk files are "<name>-000.jsonl.zst" ...
    builders: dict[str, DomainBuilder]  # domain -> builder, in the order the tables list them
    source_packages: tuple[str, ...]  # Debian packages whose versions fix the text
    library_versions: Callable[[], str] = lambda: ""  # Python readers beyond zstandard

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.builders)


# --------------------------------------------------------------------------- text helpers

# C0/C1 control characters other than tab and newline, the Unicode line and paragraph
# separators (readers that split lines on them would break records) and byte-order marks.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
_OVERSTRIKE = re.compile(r".\x08")  # bold/underline from terminal formatters
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


def decode_bytes(raw: bytes) -> str:
    """Decode text of unknown legacy encoding: UTF-8, else Windows-1252, else Latin-1."""
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def repair_double_encoding(text: str) -> str:
    """Undo UTF-8 that was decoded as Latin-1 and re-encoded (once or twice).

    A few fortunes ship as such mojibake: "don’t" stored as "donâ" followed by two C1
    control characters, or that encoded once more. Text that is not mojibake fails the
    Latin-1 round trip and is returned unchanged.
    """
    for _ in range(2):
        try:
            repaired = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
        if repaired == text:
            break
        text = repaired
    return text


def normalise_text(text: str) -> str:
    """Unix newlines, no control characters or trailing spaces, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = _OVERSTRIKE.sub("", text)
    text = _CONTROL_CHARS.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINE_RUNS.sub("\n\n", text)
    # Lone surrogates cannot be encoded as UTF-8; replace rather than fail.
    return text.strip("\n").encode("utf-8", "replace").decode("utf-8")


def _split_oversized(block: str) -> Iterator[str]:
    """Cut a block longer than the piece target at line ends (and very long lines hard)."""
    if len(block) <= PIECE_TARGET_CHARS:
        yield block
        return
    for line in block.splitlines(keepends=True):
        for start in range(0, len(line), PIECE_TARGET_CHARS):
            yield line[start : start + PIECE_TARGET_CHARS]


def split_long_text(text: str) -> list[str]:
    """Split text above LONG_DOCUMENT_CHARS into consecutive pieces of about a few KB.

    Pieces break before a line that starts in column 0 after a blank line (a section
    heading in rendered manuals, a top-level statement in Python, a paragraph in reST),
    so pieces read as whole sections rather than arbitrary cuts.
    """
    if len(text) <= LONG_DOCUMENT_CHARS:
        return [text]
    pieces: list[str] = []
    current = ""
    for block in re.split(r"(?<=\n\n)(?=\S)", text):
        for part in _split_oversized(block):
            if current and len(current) + len(part) > PIECE_TARGET_CHARS:
                pieces.append(current)
                current = part
            else:
                current += part
    if current:
        pieces.append(current)
    return [piece.strip("\n") for piece in pieces]


def group_entries(entries: Iterable[str], separator: str) -> Iterator[str]:
    """Join consecutive small entries into documents of about GROUP_TARGET_CHARS."""
    group: list[str] = []
    size = 0
    for entry in entries:
        if group and size + len(entry) > GROUP_TARGET_CHARS:
            yield separator.join(group)
            group, size = [], 0
        group.append(entry)
        size += len(entry) + len(separator)
    if group:
        yield separator.join(group)


def files_of_packages(*packages: str) -> list[Path]:
    """Regular files installed by the given Debian packages, sorted by path."""
    listing = subprocess.run(
        ["dpkg-query", "--listfiles", *packages], check=True, capture_output=True, text=True
    ).stdout
    paths = {Path(line) for line in listing.splitlines() if line.startswith("/")}
    return sorted(path for path in paths if path.is_file() and not path.is_symlink())


def package_version(package: str) -> str:
    result = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Version}", package],
        capture_output=True,
        text=True,
    )
    # A removed package whose configuration files remain has an empty version.
    return result.stdout if result.returncode == 0 and result.stdout else "not installed"


_DICTD_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(encoded: str) -> int:
    value = 0
    for char in encoded:
        value = value * 64 + _DICTD_BASE64.index(char)
    return value


def dictd_entries(index: Path, data: Path) -> Iterator[str]:
    """The entries of a dictd database once each, in file (usually alphabetical) order.

    Several headwords can share one entry; dictd's own database description entries
    (headwords "00-database-...") are skipped.
    """
    spans: set[tuple[int, int]] = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        headword, offset, length = line.split("\t")
        if headword.startswith("00-"):
            continue
        spans.add((_dictd_number(offset), _dictd_number(length)))
    with gzip.open(data, "rb") as stream:  # dictzip is gzip-compatible
        content = stream.read()
    for offset, length in sorted(spans):
        yield normalise_text(decode_bytes(content[offset : offset + length]))


# --------------------------------------------------------------------------- corpus


def spread_to_cap(units: list[list[str]], cap_bytes: int) -> list[list[str]]:
    """Keep at most cap_bytes of text, spread evenly over the whole source.

    A unit is one source item (a chapter, a page, a module, a group of entries) with the
    pieces it was split into; units are kept or dropped whole. Taking a prefix would
    keep only the start of long sources (the letter A of the dictionary, the first
    modules of the standard library). Instead a unit is kept whenever the kept total
    stays within the cap's share of what has been seen so far, which is deterministic
    and samples the source uniformly, in order.
    """
    sizes = [sum(len(piece.encode("utf-8")) for piece in unit) for unit in units]
    total = sum(sizes)
    if total <= cap_bytes:
        return units
    kept: list[list[str]] = []
    kept_bytes = seen_bytes = 0
    for unit, size in zip(units, sizes, strict=True):
        seen_bytes += size
        if (kept_bytes + size) * total <= seen_bytes * cap_bytes:
            kept.append(unit)
            kept_bytes += size
    return kept


def build_documents(recipe: CorpusRecipe, cap_bytes: int) -> list[Document]:
    documents: list[Document] = []
    for domain, builder in recipe.builders.items():
        units = []
        for unit in builder():
            pieces = [piece for piece in unit if len(piece) >= MIN_DOCUMENT_CHARS]
            if pieces:
                units.append(pieces)
        kept = spread_to_cap(units, cap_bytes)
        documents += [Document(domain, text) for unit in kept for text in unit]
        print(f"  {domain}: kept {len(kept)} of {len(units)} source units", file=sys.stderr)
    return documents


def shard_documents(documents: list[Document], num_shards: int, seed: int) -> list[list[Document]]:
    """Shuffle all domains together with a fixed seed and deal documents round-robin."""
    shuffled = list(documents)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[shard::num_shards] for shard in range(num_shards)]


def encode_shard(documents: list[Document]) -> bytes:
    lines = (
        # ensure_ascii=False keeps the text readable with zstdcat; normalise_text has
        # removed every character other than "\n" that a reader could take as a line end.
        json.dumps(
            {"text": doc.text, "meta": {"redpajama_set_name": doc.domain}}, ensure_ascii=False
        )
        + "\n"
        for doc in documents
    )
    raw = "".join(lines).encode("utf-8")
    # One single-threaded frame with content size and checksum: zstd frames carry no
    # timestamps, and single-threaded output depends only on the input and the level.
    compressor = zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_checksum=True, write_content_size=True, threads=0
    )
    return compressor.compress(raw)


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:03d}.jsonl.zst"


def read_shard(path: Path) -> Iterator[dict]:
    """Read a shard the way consumers do: zstandard's streaming reader, line by line."""
    with path.open("rb") as compressed:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed)
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            yield json.loads(line)


def verify_shards(
    paths: list[Path], expected: list[list[Document]], domains: Iterable[str]
) -> None:
    """Re-read every written shard and check it holds exactly what was meant, all domains."""
    for path, documents in zip(paths, expected, strict=True):
        records = list(read_shard(path))
        if [(r["meta"]["redpajama_set_name"], r["text"]) for r in records] != [
            (doc.domain, doc.text) for doc in documents
        ]:
            raise SystemExit(f"{path}: read-back differs from what was written")
        missing = set(domains) - {record["meta"]["redpajama_set_name"] for record in records}
        if missing:
            raise SystemExit(f"{path}: no documents of {sorted(missing)}")


def check_source_packages(packages: Iterable[str]) -> None:
    missing = [pkg for pkg in packages if package_version(pkg) == "not installed"]
    if missing:
        raise SystemExit(f"missing Debian packages; run: apt-get install {' '.join(missing)}")


def write_corpus(
    recipe: CorpusRecipe, out_dir: Path, num_shards: int, seed: int, cap_bytes: int
) -> None:
    check_source_packages(recipe.source_packages)
    print("Reading sources:", file=sys.stderr)
    documents = build_documents(recipe, cap_bytes)
    shards = shard_documents(documents, num_shards, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{recipe.name}-*.jsonl.zst"):
        stale.unlink()  # a previous build with more shards must not leave extra files
    paths = [out_dir / shard_name(recipe.name, index) for index in range(num_shards)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for path, blob in zip(paths, pool.map(encode_shard, shards), strict=True):
            path.write_bytes(blob)
    verify_shards(paths, shards, recipe.domains)
    print_summary(recipe, documents, paths)


def print_summary(recipe: CorpusRecipe, documents: list[Document], paths: list[Path]) -> None:
    """Print the statistics that the corpus README records, as Markdown tables."""
    counts = Counter(doc.domain for doc in documents)
    text_bytes = Counter()
    for doc in documents:
        text_bytes[doc.domain] += len(doc.text.encode("utf-8"))
    print("| domain | documents | text MB |\n| --- | ---: | ---: |")
    for domain in recipe.domains:
        print(f"| {domain} | {counts[domain]} | {text_bytes[domain] / 1e6:.2f} |")
    print(f"| total | {len(documents)} | {sum(text_bytes.values()) / 1e6:.2f} |\n")
    print("| file | bytes | documents | sha256 |\n| --- | ---: | ---: | --- |")
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        records = sum(1 for _ in read_shard(path))
        print(f"| {path.name} | {path.stat().st_size} | {records} | {digest} |")
    print(f"| total | {sum(path.stat().st_size for path in paths)} | {len(documents)} | |\n")
    print("| Debian package | version |\n| --- | --- |")
    for package in recipe.source_packages:
        print(f"| {package} | {package_version(package)} |")
    libzstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    print(f"\nzstandard {zstandard.__version__} (libzstd {libzstd}){recipe.library_versions()}")


def main(
    recipe: CorpusRecipe,
    description: str,
    default_out: Path,
    default_seed: int,
    default_cap_bytes: int,
    argv: list[str] | None = None,
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--out", type=Path, default=default_out, help=f"output directory (default: {default_out})"
    )
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS)
    parser.add_argument("--seed", type=int, default=default_seed, help="shuffle seed")
    parser.add_argument(
        "--domain-cap-bytes",
        type=int,
        default=default_cap_bytes,
        help="most UTF-8 bytes of text kept per domain",
    )
    args = parser.parse_args(argv)
    write_corpus(recipe, args.out, args.num_shards, args.seed, args.domain_cap_bytes)
