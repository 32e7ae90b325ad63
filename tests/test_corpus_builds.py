"""The corpus build scripts under data/ (their pure parts) and the corpora committed there."""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))  # the build scripts import their shared module as a sibling

import build_docs_corpus  # noqa: E402
import build_general_corpus  # noqa: E402
import corpus_build  # noqa: E402
from corpus_build import Document  # noqa: E402

from smalltalk.corpus import read_documents  # noqa: E402

DEMO_DOMAINS = (
    "bible",
    "dictionary",
    "python_docs",
    "manpages",
    "fortunes",
    "austen",
    "python_source",
)
COMMITTED_CORPORA = {
    "demo": DEMO_DOMAINS,
    "docs": build_docs_corpus.RECIPE.domains,
    "general": build_general_corpus.recipe(()).domains,
}


# --------------------------------------------------------------------------- shared helpers


def test_long_text_is_split_before_unindented_paragraphs_into_bounded_pieces():
    sections = [f"Section {index}\n\n" + "    body line\n" * 400 for index in range(12)]
    text = "\n".join(sections).strip("\n")
    pieces = corpus_build.split_long_text(text)
    assert len(pieces) > 1
    assert all(len(piece) <= corpus_build.PIECE_TARGET_CHARS for piece in pieces)
    assert all(piece.startswith("Section ") for piece in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


def test_short_text_stays_one_document():
    assert corpus_build.split_long_text("short page") == ["short page"]


def test_small_entries_are_grouped_up_to_the_target_size_in_order():
    entries = [f"entry {index:04d} " + "x" * 969 for index in range(20)]  # 980 chars each
    groups = list(corpus_build.group_entries(entries, "\n\n"))
    assert len(groups) == 5  # four entries of ~1 KB fit the 4 KB target
    assert "\n\n".join(groups) == "\n\n".join(entries)


def test_sampling_to_a_cap_keeps_whole_units_spread_over_the_whole_source():
    units = [[f"unit {index:03d}" + "x" * 92] for index in range(100)]  # 100 bytes each
    kept = corpus_build.spread_to_cap(units, cap_bytes=2_500)
    kept_indices = [units.index(unit) for unit in kept]
    assert len(kept) == 25
    assert kept_indices[0] < 10 and kept_indices[-1] >= 90


def _dictd_number(value: int) -> str:
    digits = corpus_build._DICTD_BASE64
    encoded = ""
    while True:
        encoded = digits[value % 64] + encoded
        value //= 64
        if value == 0:
            return encoded


def test_dictd_entries_come_once_each_in_file_order_without_the_database_entries(tmp_path):
    entries = [b"00-database-info\nabout this dictionary", b"apple\n  a fruit", b"pear\n  another"]
    offsets = [sum(len(entry) for entry in entries[:index]) for index in range(len(entries))]
    (tmp_path / "t.dict.dz").write_bytes(gzip.compress(b"".join(entries)))
    index_lines = [
        f"{headword}\t{_dictd_number(offsets[i])}\t{_dictd_number(len(entries[i]))}"
        for headword, i in [("pear", 2), ("00-database-info", 0), ("apple", 1), ("Apple", 1)]
    ]
    (tmp_path / "t.index").write_text("\n".join(index_lines) + "\n")
    read = list(corpus_build.dictd_entries(tmp_path / "t.index", tmp_path / "t.dict.dz"))
    assert read == ["apple\n  a fruit", "pear\n  another"]


def test_shuffled_shards_each_hold_every_domain_and_together_every_document():
    documents = [Document(domain, f"{domain} {index}") for domain in "abc" for index in range(40)]
    shards = corpus_build.shard_documents(documents, num_shards=8, seed=1)
    assert all({doc.domain for doc in shard} == set("abc") for shard in shards)
    assert sorted(doc.text for shard in shards for doc in shard) == sorted(
        doc.text for doc in documents
    )
    assert shards == corpus_build.shard_documents(documents, num_shards=8, seed=1)


def test_the_shared_chunk_writer_reproduces_a_committed_demo_chunk_byte_for_byte():
    path = DATA / "demo" / "demo-007.jsonl.zst"
    documents = [
        Document(record["meta"]["redpajama_set_name"], record["text"])
        for record in corpus_build.read_shard(path)
    ]
    rewritten = corpus_build.encode_shard(documents)
    assert hashlib.sha256(rewritten).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- docs corpus


def test_info_nodes_keep_the_licence_preamble_once_and_drop_the_offset_tables():
    preamble = "This is find.info, produced by makeinfo.\n\nCopyright and licence notice."
    main_file = f"{preamble}\n\x1f\nIndirect:\nfind.info-1: 100\n\x1f\nTag Table:\n(Indirect)\n"
    part_1 = f"{preamble}\n\x1f\nFile: find.info,  Node: Top\n\nFinding files.\n"
    part_2 = f"{preamble}\n\x1f\nFile: find.info,  Node: Invoking find\n\nfind PATH\n\x1f\n"
    nodes = build_docs_corpus.info_nodes([main_file, part_1, part_2])
    assert nodes == [
        preamble,
        "File: find.info,  Node: Top\n\nFinding files.",
        "File: find.info,  Node: Invoking find\n\nfind PATH",
    ]


def test_a_split_info_manual_is_read_in_part_order():
    names = ["find.info-10.gz", "find.info-2.gz", "find.info.gz", "find.info-1.gz"]
    ordered = sorted((Path(name) for name in names), key=build_docs_corpus.info_part_number)
    assert [path.name for path in ordered] == [
        "find.info.gz",
        "find.info-1.gz",
        "find.info-2.gz",
        "find.info-10.gz",
    ]


def test_ruby_library_files_exclude_bundled_test_suites_and_other_files():
    library = build_docs_corpus.RUBY_LIBRARY
    assert build_docs_corpus.is_ruby_library_file(library / "rdoc" / "parser.rb")
    assert not build_docs_corpus.is_ruby_library_file(library / "rss" / "test" / "test_1.rb")
    assert not build_docs_corpus.is_ruby_library_file(library / "rdoc" / "README.md")
    assert not build_docs_corpus.is_ruby_library_file(Path("/usr/lib/ruby/vendor_ruby/x.rb"))


# --------------------------------------------------------------------------- general corpus


def test_package_buckets_depend_on_the_name_alone_and_use_every_bucket():
    names = [f"package-{index}" for index in range(400)]
    counts = Counter(build_general_corpus.bucket_of(name) for name in names)
    assert set(counts) == {f"bucket_{index}" for index in range(8)}
    assert max(counts.values()) < 2 * min(counts.values())
    # A fixed value: Python's own str hash is salted per process and would not be.
    assert build_general_corpus.bucket_of("coreutils") == "bucket_2"


def test_markup_images_and_archives_are_not_read_as_running_text():
    is_running_text = build_general_corpus.is_running_text
    readable = ["changelog.Debian.gz", "README", "NEWS.gz", "README.md", "TODO.txt.gz"]
    assert all(is_running_text(Path(name)) for name in readable)
    skipped = ["index.html", "logo.png", "manual.pdf.gz", "test-suite.log.gz", "data.json"]
    assert not any(is_running_text(Path(name)) for name in skipped)


def test_a_long_changelog_keeps_its_newest_whole_lines(tmp_path):
    entries = [f"version {index}: fixed bug number {index}" for index in range(5000, 0, -1)]
    path = tmp_path / "changelog.gz"
    path.write_bytes(gzip.compress("\n".join(entries).encode()))
    text = build_general_corpus.read_doc_file(path)
    assert len(text) <= build_general_corpus.FILE_CHARS_CAP
    assert text.startswith("version 5000:")
    assert set(text.splitlines()) <= set(entries)


def test_a_long_copyright_file_is_read_whole(tmp_path):
    notices = [f"Files: part{index}\nLicense: GPL-2+" for index in range(5000)]
    path = tmp_path / "copyright"
    path.write_text("\n\n".join(notices))
    assert build_general_corpus.read_doc_file(path) == "\n\n".join(notices)


def test_a_package_documented_in_another_packages_directory_carries_its_copyright(
    tmp_path, monkeypatch
):
    (tmp_path / "gcc-12-base").mkdir()
    (tmp_path / "gcc-12-base" / "copyright").write_text("GCC is free software. " * 20)
    (tmp_path / "gcc-12-base" / "NEWS").write_text("GCC 12.2 fixes many bugs. " * 20)
    monkeypatch.setattr(build_general_corpus, "DOC_ROOT", tmp_path)
    monkeypatch.setattr(
        build_general_corpus, "files_of_packages", lambda package: [tmp_path / "gcc-12-base/NEWS"]
    )
    documents = build_general_corpus.package_documents("gcc-12")
    assert [document[:12] for document in documents] == ["GCC 12.2 fix", "GCC is free "]


def test_binary_files_are_not_read(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"\x7fELF\x00\x01")
    assert build_general_corpus.read_doc_file(path) is None


def test_machine_readable_copyright_files_name_each_licence_once():
    copyright_text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nLicense: GPL-2+\n text\n\nFiles: debian/*\nLicense: GPL-2+\n\n"
        "Files: lib/*\nLicense: BSD-3-clause\n"
    )
    assert build_general_corpus.licence_names(copyright_text) == "GPL-2+, BSD-3-clause"
    assert build_general_corpus.licence_names("This package was debianized by ...") == (
        "(free-form copyright file)"
    )


# --------------------------------------------------------------------------- committed corpora


@pytest.mark.parametrize("corpus", sorted(COMMITTED_CORPORA))
def test_every_committed_chunk_reads_and_holds_every_domain(corpus):
    chunks = sorted((DATA / corpus).glob(f"{corpus}-*.jsonl.zst"))
    assert len(chunks) == 8
    for chunk in chunks:
        sources = Counter(document.source for document in read_documents(chunk))
        assert set(sources) == set(COMMITTED_CORPORA[corpus]), chunk.name


@pytest.mark.parametrize("corpus", sorted(COMMITTED_CORPORA))
def test_every_committed_chunk_matches_the_sha256_its_readme_records(corpus):
    readme = (DATA / corpus / "README.md").read_text()
    recorded = dict(
        re.findall(r"^\| `([\w-]+\.jsonl\.zst)` \| .* \| `([0-9a-f]{64})` \|$", readme, re.M)
    )
    chunks = sorted((DATA / corpus).glob(f"{corpus}-*.jsonl.zst"))
    assert sorted(recorded) == [chunk.name for chunk in chunks]
    for chunk in chunks:
        assert hashlib.sha256(chunk.read_bytes()).hexdigest() == recorded[chunk.name]
