"""Build the third benchmark corpus under `data/general/`: general text, weakly labelled.

The demo and docs corpora have domains a router can tell apart from a few tokens, and
their `source` label names the domain. Here the text is a mixed bag, the
documentation that Debian packages install under /usr/share/doc (changelogs, READMEs,
NEWS files, release notes, copyright files), and the label says next to nothing about
it: a package's documents are labelled `bucket_0` ... `bucket_7` by a hash of the
package's name. Every bucket holds every kind of text, so routing by `source` is close
to random, while the field still exists for the per-source tables of the evaluation.

It writes SlimPajama-style chunks `general-000.jsonl.zst` ... where every line is

    {"text": "...", "meta": {"redpajama_set_name": "bucket_<n>"}}

The packages read are listed in `data/general/packages.txt` (see data/general/README.md
for provenance and licences). Prerequisites (Debian 12):

    apt-get install $(cat data/general/packages.txt)
    pip install zstandard

Usage:

    python data/build_general_corpus.py --out data/general

Same package versions and the same `zstandard` (libzstd) version give byte-identical
output, for the reasons given in `build_demo_corpus.py`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import corpus_build
from corpus_build import (
    CorpusRecipe,
    decode_bytes,
    files_of_packages,
    normalise_text,
    split_long_text,
)

NUM_BUCKETS = 8
# Eight buckets of at most 3.4 MB give about 27 MB of text, near the demo's 29 MB.
DOMAIN_CAP_BYTES = 3_400_000
DEFAULT_SEED = 20240503

# Changelogs and NEWS files put the newest entries first and can run to megabytes; the
# head of each file (copyright files excepted) keeps one package from filling a bucket
# and keeps the newest text.
FILE_CHARS_CAP = 40_000

DOC_ROOT = Path("/usr/share/doc")
PACKAGE_LIST = Path(__file__).resolve().parent / "general" / "packages.txt"

# Markup, data, logs and images: not running text, or text mostly made of markup.
SKIPPED_SUFFIXES = frozenset(
    ".html .htm .css .js .json .xml .svg .png .jpg .jpeg .gif .ico .pdf .ps .eps .dvi "
    ".log .devhelp2 .bz2 .xz .zip .tar".split()
)


def read_package_list(path: Path = PACKAGE_LIST) -> tuple[str, ...]:
    """Package names, one a line; blank lines and `#` comments are ignored."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return tuple(line for line in lines if line)


def bucket_of(package: str) -> str:
    """A label that depends on the package's name only, evenly spread and stable.

    sha256 rather than hash(): Python salts str hashes per process.
    """
    digest = hashlib.sha256(package.encode("utf-8")).digest()
    return f"bucket_{int.from_bytes(digest[:8], 'big') % NUM_BUCKETS}"


def is_running_text(path: Path) -> bool:
    """Whether a file under /usr/share/doc is prose or plain text worth reading."""
    name = path.name.removesuffix(".gz")
    return Path(name).suffix.lower() not in SKIPPED_SUFFIXES


def head_of_text(text: str, max_chars: int = FILE_CHARS_CAP) -> str:
    """The text's first max_chars characters, cut back to the last whole line."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    return head[: head.rfind("\n")] if "\n" in head else head


def read_doc_file(path: Path) -> str | None:
    """The cleaned text of one documentation file, or None if it is binary."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if b"\0" in raw:
        return None
    text = decode_bytes(raw)
    # A copyright file is kept whole: its notices are what lets the rest be redistributed.
    return normalise_text(text if path.name == "copyright" else head_of_text(text))


def package_documents(package: str) -> list[str]:
    """A package's documentation files, each file one document (long files split).

    A package is one unit for sampling, so its copyright file stays with its other text.
    Some packages put their files in another package's directory (gcc-12 in
    gcc-12-base's); that directory's copyright file covers them and joins the unit.
    """
    paths = [
        path
        for path in files_of_packages(package)
        if path.is_relative_to(DOC_ROOT) and is_running_text(path)
    ]
    directories = {DOC_ROOT / path.relative_to(DOC_ROOT).parts[0] for path in paths}
    copyrights = {directory / "copyright" for directory in directories}
    documents: list[str] = []
    for path in sorted(set(paths) | {path for path in copyrights if path.is_file()}):
        text = read_doc_file(path)
        if text:
            documents += split_long_text(text)
    return documents


def bucket_documents(bucket: str, packages: tuple[str, ...]) -> Iterator[list[str]]:
    for package in packages:
        if bucket_of(package) == bucket:
            yield package_documents(package)


def licence_names(copyright_text: str) -> str:
    """The licences a Debian copyright file names, if it is machine-readable (DEP-5)."""
    if not copyright_text.startswith("Format:"):
        return "(free-form copyright file)"
    names = re.findall(r"^License:[ \t]*(\S.*)$", copyright_text, flags=re.MULTILINE)
    return ", ".join(dict.fromkeys(name.strip() for name in names)) or "(none named)"


def print_licence_table(packages: tuple[str, ...]) -> None:
    """Print, for data/general/README.md, each package's bucket and licences."""
    print("\n| package | bucket | licences (DEP-5 `License:` fields) |\n| --- | --- | --- |")
    for package in packages:
        copyright_file = DOC_ROOT / package / "copyright"
        if copyright_file.is_file():
            licences = licence_names(decode_bytes(copyright_file.read_bytes()))
        else:
            licences = "(no copyright file of its own)"
        print(f"| `{package}` | {bucket_of(package)} | {licences.replace('|', '/')} |")


def recipe(packages: tuple[str, ...]) -> CorpusRecipe:
    buckets = [f"bucket_{index}" for index in range(NUM_BUCKETS)]
    return CorpusRecipe(
        name="general",
        builders={
            bucket: functools.partial(bucket_documents, bucket, packages) for bucket in buckets
        },
        source_packages=packages,
    )


if __name__ == "__main__":
    corpus_build.main(
        recipe(read_package_list()),
        description=__doc__.split("\n\n")[0],
        default_out=PACKAGE_LIST.parent,
        default_seed=DEFAULT_SEED,
        default_cap_bytes=DOMAIN_CAP_BYTES,
    )
    print_licence_table(read_package_list())
