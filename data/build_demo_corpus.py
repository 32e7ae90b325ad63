"""Rebuild the embedded demo corpus under `data/demo/` from Debian-packaged texts.

The corpus is committed, so nothing needs this script to run the workflow; it exists
so that the demo data can be regenerated and audited. It writes SlimPajama-style
chunks `demo-000.jsonl.zst` ... where every line is

    {"text": "...", "meta": {"redpajama_set_name": "<domain>"}}

Seven domains, each from a Debian package (see data/demo/README.md for provenance
and licences):

    bible          bible-kjv            one document per chapter
    dictionary     dict-gcide           groups of consecutive entries (~4 KB)
    python_docs    python3.11-doc       one document per reST page (long pages split)
    manpages       manpages(-dev)       one document per rendered page (long pages split)
    fortunes       fortunes(-min)       groups of consecutive fortunes (~4 KB)
    austen         r-cran-janeaustenr   one document per chapter
    python_source  libpython3.11-*      one document per module (long modules split)

Prerequisites (Debian 12):

    apt-get install bible-kjv dict-gcide python3.11-doc manpages manpages-dev \\
        fortunes r-cran-janeaustenr man-db
    pip install rdata zstandard

Usage:

    python data/build_demo_corpus.py --out data/demo

Same package versions and the same `zstandard` (libzstd) version give byte-identical
output: sources are read in sorted order, the shuffle uses a fixed seed and zstd
frames carry no timestamps.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import rdata
import zstandard

DOMAINS = (
    "bible",
    "dictionary",
    "python_docs",
    "manpages",
    "fortunes",
    "austen",
    "python_source",
)

# Each domain is capped so that the domains stay balanced and the whole corpus stays
# near 29 MB of text, which compresses to well under the 12 MB budget for git.
DOMAIN_CAP_BYTES = 4_500_000
DEFAULT_NUM_SHARDS = 8
DEFAULT_SEED = 20240501
ZSTD_LEVEL = 19

MIN_DOCUMENT_CHARS = 200  # shorter texts are too small to be worth a record (Psalm 117)
LONG_DOCUMENT_CHARS = 16_000  # pages and modules above this are split ...
PIECE_TARGET_CHARS = 8_000  # ... into pieces of at most about this size
GROUP_TARGET_CHARS = 4_000  # size of documents built from many small entries

PYTHON_DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_STDLIB = Path("/usr/lib/python3.11")
GCIDE_DATA = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JANEAUSTENR_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")

SOURCE_PACKAGES = (
    "bible-kjv",
    "dict-gcide",
    "python3.11-doc",
    "manpages",
    "manpages-dev",
    "man-db",
    "groff-base",
    "fortunes",
    "fortunes-min",
    "r-cran-janeaustenr",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
)

AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


@dataclass(frozen=True)
class Document:
    domain: str
    text: str


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


# --------------------------------------------------------------------------- domains


def bible_documents() -> Iterator[list[str]]:
    """One document per chapter of the King James Version, headed "Book N"."""
    # -l with a wide line keeps each verse on one line; headings like "Genesis 1" start
    # in column 0, verses are indented and numbered.
    listing = subprocess.run(
        ["bible", "-l10000", "gen1:1-rev22:21"], check=True, capture_output=True
    ).stdout.decode("utf-8")
    chapter: list[str] = []
    for line in listing.splitlines():
        if re.fullmatch(r"\S.* \d+", line):
            if chapter:
                yield ["\n".join(chapter)]
            chapter = [line, ""]
        elif line.strip():
            chapter.append(line.strip())
    if chapter:
        yield ["\n".join(chapter)]


_DICTD_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(encoded: str) -> int:
    value = 0
    for char in encoded:
        value = value * 64 + _DICTD_BASE64.index(char)
    return value


def dictionary_documents() -> Iterator[list[str]]:
    """Groups of consecutive GCIDE entries, in the dictionary's own (alphabetical) order."""
    spans: set[tuple[int, int]] = set()
    for line in GCIDE_INDEX.read_text(encoding="utf-8", errors="replace").splitlines():
        headword, offset, length = line.split("\t")
        if headword.startswith("00-"):  # dictd's database description entries
            continue
        spans.add((_dictd_number(offset), _dictd_number(length)))
    with gzip.open(GCIDE_DATA, "rb") as stream:  # dictzip is gzip-compatible
        data = stream.read()
    # Several headwords can share one entry; entries are emitted once, in file order.
    entries = (
        normalise_text(decode_bytes(data[offset : offset + length]))
        for offset, length in sorted(spans)
    )
    for group in group_entries(entries, "\n\n"):
        yield [group]


def python_docs_documents() -> Iterator[list[str]]:
    """One document per reST source page of the Python documentation."""
    for path in sorted(PYTHON_DOCS_SOURCES.rglob("*.rst.txt")):
        yield split_long_text(normalise_text(decode_bytes(path.read_bytes())))


def _man_source_header(page: Path) -> str:
    """The text of the comment block that opens a man page's source.

    That block holds the page's copyright and licence. Rendering drops roff comments,
    but the man-pages licences ask for the copyright and permission notices (some for
    the whole header, verbatim) to travel with every copy, so it is kept as a trailer.
    """
    with gzip.open(page, "rt", encoding="utf-8", errors="replace") as stream:
        source_lines = stream.read().splitlines()
    if source_lines and re.fullmatch(r"""'\\" [a-z]+""", source_lines[0]):
        source_lines = source_lines[1:]  # a preprocessor hint such as '\" t, not a comment
    header = []
    for line in source_lines:
        comment = re.match(r"""^[.']\\"(.*)$""", line)
        if comment is None:
            break
        header.append(comment.group(1).removeprefix(" "))
    return normalise_text("\n".join(header))


def _is_link_page(page: Path) -> bool:
    """Pages whose source is only `.so other-page` duplicate the page they point to."""
    with gzip.open(page, "rt", encoding="utf-8", errors="replace") as stream:
        lines = [line for line in stream.read().splitlines() if not line.startswith('.\\"')]
    return any(line.startswith(".so ") for line in lines[:2])


def _render_man_page(page: Path) -> str:
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "MANWIDTH": "80",
    }
    # --nh/--nj: no hyphenation or justification, so words and spacing stay intact.
    rendered = subprocess.run(
        ["man", "--nh", "--nj", "-P", "cat", "-l", str(page)],
        check=True,
        capture_output=True,
        env=environment,
    ).stdout
    return normalise_text(decode_bytes(rendered))


def manpages_documents() -> Iterator[list[str]]:
    """One document per rendered manual page (long pages split), with its source header."""
    pages = [
        path
        for path in files_of_packages("manpages", "manpages-dev")
        if re.fullmatch(r"/usr/share/man/man[^/]+/[^/]+\.gz", str(path)) and not _is_link_page(path)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rendered_pages = pool.map(_render_man_page, pages)  # map keeps page order
        for page, rendered in zip(pages, rendered_pages, strict=True):
            header = _man_source_header(page)
            yield [
                f"{piece}\n\n{header}" if header else piece for piece in split_long_text(rendered)
            ]


def fortunes_documents() -> Iterator[list[str]]:
    """Groups of consecutive fortunes, each group from one fortune file."""
    fortune_files = [
        path
        for path in files_of_packages("fortunes", "fortunes-min")
        if path.parent == FORTUNES_DIR and not path.name.endswith((".dat", ".u8"))
    ]
    for path in fortune_files:
        text = decode_bytes(path.read_bytes()).replace("\r\n", "\n")
        fortunes = (
            normalise_text(repair_double_encoding(fortune))
            for fortune in re.split(r"^%$", text, flags=re.M)
        )
        for group in group_entries((fortune for fortune in fortunes if fortune), "\n%\n"):
            yield [group]


def _janeaustenr_books() -> Iterator[tuple[str, list[str]]]:
    """(title, lines) for each novel in janeaustenr's lazy-load R data base.

    R packages store data as `Rdata.rdx` (an RDS index of name -> (offset, length))
    plus `Rdata.rdb`, where each object is a 4-byte length followed by a zlib stream
    of the serialised object; `rdata` parses both the index and each object.
    """
    with warnings.catch_warnings():
        # rdata warns that the headerless serialisation is "assumed RDS"; it is.
        warnings.simplefilter("ignore", UserWarning)
        index = rdata.read_rds(JANEAUSTENR_DATA / "Rdata.rdx")
        database = (JANEAUSTENR_DATA / "Rdata.rdb").read_bytes()
        for name in AUSTEN_TITLES:
            offset, length = (int(value) for value in index["variables"][name])
            serialised = zlib.decompress(database[offset + 4 : offset + length])
            lines = rdata.conversion.convert(rdata.parser.parse_data(serialised))
            yield AUSTEN_TITLES[name], [str(line) for line in lines]


def austen_documents() -> Iterator[list[str]]:
    """One document per chapter of Jane Austen's six novels, headed by the title."""
    for title, lines in _janeaustenr_books():
        chapter: list[str] | None = None  # front matter before chapter 1 is dropped
        for line in lines:
            if re.fullmatch(r"chapter [0-9ivxlc]+\.?", line.strip(), flags=re.I):
                if chapter:
                    yield [normalise_text("\n".join(chapter))]
                chapter = [title, "", line.strip()]
            elif re.fullmatch(r"VOLUME [IVX]+", line.strip()):
                continue  # volume headings would otherwise end the previous chapter
            elif chapter is not None:
                chapter.append(line)
        if chapter:
            yield [normalise_text("\n".join(chapter))]


def _is_stdlib_module_worth_keeping(path: Path) -> bool:
    relative = path.relative_to(PYTHON_STDLIB)
    if path.suffix != ".py" or relative.parts[0] in ("site-packages", "dist-packages"):
        return False
    if any(part in ("test", "tests", "idle_test") for part in relative.parts[:-1]):
        return False
    if path.name.startswith("test_"):
        return False
    # pydoc_data/topics.py duplicates the reference manual (already in python_docs);
    # _sysconfigdata* is build configuration generated for one machine.
    return relative.parts[0] != "pydoc_data" and not path.name.startswith("_sysconfigdata")


def python_source_documents() -> Iterator[list[str]]:
    """One document per standard-library module (long modules split), tests excluded."""
    for path in files_of_packages("libpython3.11-minimal", "libpython3.11-stdlib"):
        if path.is_relative_to(PYTHON_STDLIB) and _is_stdlib_module_worth_keeping(path):
            yield split_long_text(normalise_text(decode_bytes(path.read_bytes())))


# Each builder yields source units in source order: a unit is one chapter, page, module
# or group of entries, as the list of documents it was split into (usually just one).
DOMAIN_BUILDERS = {
    "bible": bible_documents,
    "dictionary": dictionary_documents,
    "python_docs": python_docs_documents,
    "manpages": manpages_documents,
    "fortunes": fortunes_documents,
    "austen": austen_documents,
    "python_source": python_source_documents,
}


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


def build_documents(cap_bytes: int) -> list[Document]:
    documents: list[Document] = []
    for domain in DOMAINS:
        units = []
        for unit in DOMAIN_BUILDERS[domain]():
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


def shard_name(index: int) -> str:
    return f"demo-{index:03d}.jsonl.zst"


def read_shard(path: Path) -> Iterator[dict]:
    """Read a shard the way consumers do: zstandard's streaming reader, line by line."""
    with path.open("rb") as compressed:
        reader = zstandard.ZstdDecompressor().stream_reader(compressed)
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            yield json.loads(line)


def verify_shards(paths: list[Path], expected: list[list[Document]]) -> None:
    """Re-read every written shard and check it holds exactly what was meant, all domains."""
    for path, documents in zip(paths, expected, strict=True):
        records = list(read_shard(path))
        if [(r["meta"]["redpajama_set_name"], r["text"]) for r in records] != [
            (doc.domain, doc.text) for doc in documents
        ]:
            raise SystemExit(f"{path}: read-back differs from what was written")
        missing = set(DOMAINS) - {record["meta"]["redpajama_set_name"] for record in records}
        if missing:
            raise SystemExit(f"{path}: no documents of {sorted(missing)}")


def check_source_packages() -> None:
    missing = [pkg for pkg in SOURCE_PACKAGES if package_version(pkg) == "not installed"]
    if missing:
        raise SystemExit(f"missing Debian packages; run: apt-get install {' '.join(missing)}")


def write_corpus(out_dir: Path, num_shards: int, seed: int, cap_bytes: int) -> None:
    check_source_packages()
    print("Reading sources:", file=sys.stderr)
    documents = build_documents(cap_bytes)
    shards = shard_documents(documents, num_shards, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("demo-*.jsonl.zst"):
        stale.unlink()  # a previous build with more shards must not leave extra files
    paths = [out_dir / shard_name(index) for index in range(num_shards)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for path, blob in zip(paths, pool.map(encode_shard, shards), strict=True):
            path.write_bytes(blob)
    verify_shards(paths, shards)
    print_summary(documents, paths)


def print_summary(documents: list[Document], paths: list[Path]) -> None:
    """Print the statistics that data/demo/README.md records, as Markdown tables."""
    counts = Counter(doc.domain for doc in documents)
    text_bytes = Counter()
    for doc in documents:
        text_bytes[doc.domain] += len(doc.text.encode("utf-8"))
    print("| domain | documents | text MB |\n| --- | ---: | ---: |")
    for domain in DOMAINS:
        print(f"| {domain} | {counts[domain]} | {text_bytes[domain] / 1e6:.2f} |")
    print(f"| total | {len(documents)} | {sum(text_bytes.values()) / 1e6:.2f} |\n")
    print("| file | bytes |\n| --- | ---: |")
    for path in paths:
        print(f"| {path.name} | {path.stat().st_size} |")
    print(f"| total | {sum(path.stat().st_size for path in paths)} |\n")
    print("| Debian package | version |\n| --- | --- |")
    for package in SOURCE_PACKAGES:
        print(f"| {package} | {package_version(package)} |")
    print(
        f"\nzstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION}), "
        f"rdata {getattr(rdata, '__version__', 'unknown')}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "demo",
        help="output directory (default: data/demo next to this script)",
    )
    parser.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="shuffle seed")
    parser.add_argument(
        "--domain-cap-bytes",
        type=int,
        default=DOMAIN_CAP_BYTES,
        help="most UTF-8 bytes of text kept per domain",
    )
    args = parser.parse_args(argv)
    write_corpus(args.out, args.num_shards, args.seed, args.domain_cap_bytes)


if __name__ == "__main__":
    main()
