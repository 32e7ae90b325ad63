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

import gzip
import os
import re
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import corpus_build
import rdata
from corpus_build import (
    CorpusRecipe,
    decode_bytes,
    dictd_entries,
    files_of_packages,
    group_entries,
    normalise_text,
    repair_double_encoding,
    split_long_text,
)

# Each domain is capped so that the domains stay balanced and the whole corpus stays
# near 29 MB of text, which compresses to well under the 12 MB budget for git.
DOMAIN_CAP_BYTES = 4_500_000
DEFAULT_SEED = 20240501

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


def dictionary_documents() -> Iterator[list[str]]:
    """Groups of consecutive GCIDE entries, in the dictionary's own (alphabetical) order."""
    for group in group_entries(dictd_entries(GCIDE_INDEX, GCIDE_DATA), "\n\n"):
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
RECIPE = CorpusRecipe(
    name="demo",
    builders={
        "bible": bible_documents,
        "dictionary": dictionary_documents,
        "python_docs": python_docs_documents,
        "manpages": manpages_documents,
        "fortunes": fortunes_documents,
        "austen": austen_documents,
        "python_source": python_source_documents,
    },
    source_packages=SOURCE_PACKAGES,
    library_versions=lambda: f", rdata {getattr(rdata, '__version__', 'unknown')}",
)


if __name__ == "__main__":
    corpus_build.main(
        RECIPE,
        description=__doc__.split("\n\n")[0],
        default_out=Path(__file__).resolve().parent / "demo",
        default_seed=DEFAULT_SEED,
        default_cap_bytes=DOMAIN_CAP_BYTES,
    )
