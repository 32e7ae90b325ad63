"""Build the second benchmark corpus under `data/docs/` from Debian-packaged texts.

A multi-domain corpus like the demo (`build_demo_corpus.py`) but from packages the demo
does not use, so a result that holds on both is less likely to hinge on one set of
domains. It writes SlimPajama-style chunks `docs-000.jsonl.zst` ... where every line is

    {"text": "...", "meta": {"redpajama_set_name": "<domain>"}}

Eight domains, each from Debian packages (see data/docs/README.md for provenance and
licences):

    perl_source         perl-modules-5.36        one document per module (long ones split)
    perl_docs           perl-doc                 one document per POD page (long ones split)
    ruby_source         libruby3.1               one document per library file (tests excluded)
    c_headers           libc6-dev, linux-libc-dev  one document per header
    vim_help            vim-runtime              one document per help file (long ones split)
    gnu_info            coreutils, grep, sed ...  groups of consecutive Info nodes (~4 KB)
    computing_glossary  dict-jargon, dict-foldoc  groups of consecutive entries (~4 KB)
    devils_dictionary   dict-devil               groups of consecutive entries (~4 KB)

Prerequisites (Debian 12):

    apt-get install perl-modules-5.36 perl-doc libruby3.1 libc6-dev linux-libc-dev \\
        vim-runtime coreutils diffutils ed findutils gettext grep gzip libtasn1-doc \\
        readline-common sed time wget dict-jargon dict-foldoc dict-devil
    pip install zstandard

Usage:

    python data/build_docs_corpus.py --out data/docs

Same package versions and the same `zstandard` (libzstd) version give byte-identical
output, for the reasons given in `build_demo_corpus.py`.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import corpus_build
from corpus_build import (
    CorpusRecipe,
    decode_bytes,
    dictd_entries,
    files_of_packages,
    group_entries,
    normalise_text,
    split_long_text,
)

# Eight domains of at most 3.8 MB give about 26 MB of text, near the demo's 29 MB, and
# compress to under 8 MB, small enough to commit.
DOMAIN_CAP_BYTES = 3_800_000
DEFAULT_SEED = 20240502

DICTD = Path("/usr/share/dictd")
RUBY_LIBRARY = Path("/usr/lib/ruby/3.1.0")
VIM_HELP = Path("/usr/share/vim/vim90/doc")
PERL_POD = Path("/usr/share/perl/5.36.0/pod")

# The GNU manuals whose Info files are under the GFDL with no invariant sections; each
# manual carries the licence's full text as an appendix node, so a manual is kept or
# dropped whole (see gnu_info_documents).
INFO_PACKAGES = (
    "coreutils",
    "diffutils",
    "ed",
    "findutils",
    "gettext",
    "grep",
    "gzip",
    "libtasn1-doc",
    "readline-common",
    "sed",
    "time",
    "wget",
)

SOURCE_PACKAGES = (
    "perl-modules-5.36",
    "perl-doc",
    "libruby3.1",
    "libc6-dev",
    "linux-libc-dev",
    "vim-runtime",
    *INFO_PACKAGES,
    "dict-jargon",
    "dict-foldoc",
    "dict-devil",
)


def _one_document_per_file(paths: list[Path]) -> Iterator[list[str]]:
    for path in paths:
        yield split_long_text(normalise_text(decode_bytes(path.read_bytes())))


def perl_source_documents() -> Iterator[list[str]]:
    """One document per module of Perl's core library (long modules split)."""
    modules = [path for path in files_of_packages("perl-modules-5.36") if path.suffix == ".pm"]
    yield from _one_document_per_file(modules)


def perl_docs_documents() -> Iterator[list[str]]:
    """One document per POD page of the Perl documentation (long pages split)."""
    pages = [path for path in files_of_packages("perl-doc") if path.parent == PERL_POD]
    yield from _one_document_per_file([path for path in pages if path.suffix == ".pod"])


def is_ruby_library_file(path: Path) -> bool:
    """Ruby's standard library proper: no test suites of bundled gems, no other versions."""
    if path.suffix != ".rb" or not path.is_relative_to(RUBY_LIBRARY):
        return False
    return not {"test", "tests", "spec"} & set(path.relative_to(RUBY_LIBRARY).parts[:-1])


def ruby_source_documents() -> Iterator[list[str]]:
    """One document per file of the Ruby 3.1 standard library (long files split)."""
    files = [path for path in files_of_packages("libruby3.1") if is_ruby_library_file(path)]
    yield from _one_document_per_file(files)


def c_headers_documents() -> Iterator[list[str]]:
    """One document per C header of the GNU C library and the Linux user-space API."""
    headers = [
        path for path in files_of_packages("libc6-dev", "linux-libc-dev") if path.suffix == ".h"
    ]
    yield from _one_document_per_file(headers)


def vim_help_documents() -> Iterator[list[str]]:
    """One document per Vim help file (long files split)."""
    help_files = [path for path in files_of_packages("vim-runtime") if path.parent == VIM_HELP]
    yield from _one_document_per_file([path for path in help_files if path.suffix == ".txt"])


def info_part_number(path: Path) -> int:
    """0 for `grep.info.gz`, n for a split manual's part `find.info-n.gz`."""
    part = re.search(r"\.info-(\d+)\.gz$", path.name)
    return int(part.group(1)) if part else 0


def info_nodes(parts: list[str]) -> list[str]:
    """The nodes of one Info manual, given its files' texts in part order.

    Info separates nodes with a unit separator (0x1F). Every file of a split manual
    repeats the preamble (the copyright and licence notice), which is kept once; the
    indirect table and tag table only index byte offsets and are dropped.
    """
    nodes: list[str] = []
    for part in parts:
        for node in part.split("\x1f"):
            node = normalise_text(node)
            if not node or node.startswith(("Indirect:", "Tag Table:", "End Tag Table")):
                continue
            if node.startswith("This is ") and any(n.startswith("This is ") for n in nodes):
                continue
            nodes.append(node)
    return nodes


def gnu_info_documents() -> Iterator[list[str]]:
    """Each GNU manual as one unit: its Info nodes grouped into documents of ~4 KB."""
    info_files = [
        path
        for path in files_of_packages(*INFO_PACKAGES)
        if path.parent == Path("/usr/share/info") and re.search(r"\.info(-\d+)?\.gz$", path.name)
    ]
    manuals: dict[str, list[Path]] = {}
    for path in info_files:
        manuals.setdefault(re.sub(r"\.info(-\d+)?\.gz$", "", path.name), []).append(path)
    for name in sorted(manuals):
        parts = sorted(manuals[name], key=info_part_number)
        texts = [decode_bytes(gzip.decompress(path.read_bytes())) for path in parts]
        preamble = " ".join(texts[0].split("\x1f", 1)[0].split())
        if "GNU Free Documentation License" not in preamble:
            raise SystemExit(f"{parts[0]}: its preamble no longer names the GFDL")
        pieces = [piece for node in info_nodes(texts) for piece in split_long_text(node)]
        yield list(group_entries(pieces, "\n\n"))


def computing_glossary_documents() -> Iterator[list[str]]:
    """Groups of consecutive entries of the Jargon File, then of FOLDOC."""
    for name in ("jargon", "foldoc"):
        entries = dictd_entries(DICTD / f"{name}.index", DICTD / f"{name}.dict.dz")
        for group in group_entries(entries, "\n\n"):
            yield [group]


def devils_dictionary_documents() -> Iterator[list[str]]:
    """Groups of consecutive entries of Ambrose Bierce's The Devil's Dictionary."""
    entries = dictd_entries(DICTD / "devil.index", DICTD / "devil.dict.dz")
    for group in group_entries(entries, "\n\n"):
        yield [group]


RECIPE = CorpusRecipe(
    name="docs",
    builders={
        "perl_source": perl_source_documents,
        "perl_docs": perl_docs_documents,
        "ruby_source": ruby_source_documents,
        "c_headers": c_headers_documents,
        "vim_help": vim_help_documents,
        "gnu_info": gnu_info_documents,
        "computing_glossary": computing_glossary_documents,
        "devils_dictionary": devils_dictionary_documents,
    },
    source_packages=SOURCE_PACKAGES,
)


if __name__ == "__main__":
    corpus_build.main(
        RECIPE,
        description=__doc__.split("\n\n")[0],
        default_out=Path(__file__).resolve().parent / "docs",
        default_seed=DEFAULT_SEED,
        default_cap_bytes=DOMAIN_CAP_BYTES,
    )
