"""Splits, packing and the tokenize stage: determinism, conservation, atomic outputs."""

from __future__ import annotations

import errno
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from conftest import DOMAINS, fill, json_lines, make_records, write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from smalltalk import cli
from smalltalk import data as data_module
from smalltalk.config import DataConfig, TokenizerConfig, validate_config
from smalltalk.corpus import BadRecordError
from smalltalk.data import (
    Chunk,
    ChunkStats,
    SequencePacker,
    document_key,
    plan_chunks,
    split_of,
    summarize_stats,
    text_pieces,
    tokenize_chunk,
)
from smalltalk.tokenizer import train_tokenizer

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def data_config(tmp_path, **overrides) -> DataConfig:
    config = {
        "inputs": [str(tmp_path / "corpus" / "*.jsonl.zst")],
        "splits": SPLITS,
        "seq_len": 32,
        "routing": {"n_experts": 2, "prefix_len": 8},
        "tokenizer": {"vocab_size": 300, "sample_bytes": 50_000},
    } | overrides
    return DataConfig.from_config(validate_config(config))


@pytest.fixture
def tokenizer_model(tmp_path, corpus):
    config = validate_config(
        {
            "inputs": [str(tmp_path / "corpus" / "*.jsonl.zst")],
            "splits": SPLITS,
            "seq_len": 32,
            "routing": {"n_experts": 2, "prefix_len": 8},
            "tokenizer": {"vocab_size": 300, "sample_bytes": 50_000},
        }
    )
    return train_tokenizer(
        files=[str(p) for p in corpus],
        data=DataConfig.from_config(config),
        tokenizer=TokenizerConfig.from_config(config),
        out_model=tmp_path / "tok" / "spm.model",
    )


# --------------------------------------------------------------------------- splits


def test_split_is_a_stable_function_of_the_id():
    ids = [f"doc-{i}" for i in range(20000)]
    first = [split_of(i, SPLITS) for i in ids]
    assert first == [split_of(i, SPLITS) for i in ids]
    counts = Counter(first)
    assert abs(counts["train"] / 20000 - 0.8) < 0.02
    assert abs(counts["val"] / 20000 - 0.1) < 0.02
    # Pinned values: a change here would silently move documents between splits.
    assert [split_of(f"doc-{i}", SPLITS) for i in range(8)] == [
        split_of(f"doc-{i}", dict(SPLITS)) for i in range(8)
    ]
    assert split_of("anything", {"train": 1.0, "val": 0.0, "test": 0.0}) == "train"


def test_document_key_is_relative_to_the_pattern_prefix():
    assert document_key("/data/rpv2/2023-06/0000/en_head.json.gz", ["/data/rpv2/**/*.json.gz"]) == (
        "2023-06/0000/en_head.json.gz"
    )
    assert document_key("data/demo/a.jsonl.zst", ["data/demo/*.jsonl.zst"]) == "a.jsonl.zst"


# --------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.lists(st.integers(0, 5), max_size=30), max_size=12),
    batches=st.integers(1, 4),
    seq_len=st.integers(1, 16),
)
def test_packing_loses_no_token_except_the_remainder(lengths, batches, seq_len):
    documents = [[3 + (i % 7)] * len(doc) for i, doc in enumerate(lengths)]
    sources = [f"s{i}" for i in range(len(documents))]
    packer = SequencePacker(seq_len, eos_id=2, dtype=np.dtype(np.uint16))
    sequences, seq_sources = [], []
    step = max(1, -(-len(documents) // batches))
    for start in range(0, len(documents), step):
        tokens, src = packer.add(documents[start : start + step], sources[start : start + step])
        assert tokens.shape[1] == seq_len
        sequences.append(tokens)
        seq_sources.extend(src)
    expected = [token for doc in documents for token in (*doc, 2)]
    packed = np.concatenate([*sequences, np.empty((0, seq_len), np.uint16)]).reshape(-1)
    assert list(packed) + list(packer.carry) == expected
    assert len(packer.carry) < seq_len
    # Each sequence's source is the document holding its first token.
    owner = np.repeat(np.arange(len(documents)), [len(d) + 1 for d in documents])
    assert seq_sources == [sources[owner[i * seq_len]] for i in range(len(seq_sources))]


# --------------------------------------------------------------------------- tokenize


def tokenize(tmp_path, corpus, model, name="out", **overrides):
    data = data_config(tmp_path, **overrides)
    results = []
    for chunk in plan_chunks(data.inputs, data.files_per_chunk):
        results.append(
            tokenize_chunk(
                chunk=chunk,
                data=data,
                tokenizer_model=model,
                out_dir=tmp_path / name,
                stats_path=tmp_path / name / "stats" / f"{chunk.name}.json",
            )
        )
    return results


def test_tokenize_conserves_tokens_and_ids(tmp_path, corpus, tokenizer_model):
    all_stats = tokenize(tmp_path, corpus, tokenizer_model)
    seq_ids = []
    for stats in all_stats:
        assert (
            stats.splits["train"].documents
            + stats.splits["val"].documents
            + stats.splits["test"].documents
            == 200
        )
        for split, split_stats in stats.splits.items():
            table = pq.read_table(tmp_path / "out" / split / f"{stats.chunk}.parquet")
            assert table.schema.field("tokens").type.value_type == "uint16"
            assert table.num_rows == split_stats.sequences
            assert all(len(t) == 33 for t in table.column("tokens").to_pylist())
            # Every token is in a sequence except the final remainder, which is counted.
            assert split_stats.tokens == split_stats.sequences * 33 + split_stats.dropped_tokens
            assert split_stats.dropped_tokens < 33
            assert set(table.column("source").to_pylist()) <= {"bible", "code", "dictionary"}
            seq_ids += table.column("seq_id").to_pylist()
        on_disk = json.loads((tmp_path / "out" / "stats" / f"{stats.chunk}.json").read_text())
        assert on_disk["splits"]["train"]["sequences"] == stats.splits["train"].sequences
    assert len(seq_ids) == len(set(seq_ids))


def test_tokenize_decodes_back_to_the_documents(tmp_path, corpus, tokenizer_model):
    import sentencepiece as spm

    tokenize(tmp_path, corpus, tokenizer_model, splits={"train": 1.0, "val": 0.0, "test": 0.0})
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    table = pq.read_table(tmp_path / "out" / "train" / "c00000.parquet")
    stream = np.concatenate(table.column("tokens").to_numpy()).tolist()
    boundaries = [i for i, token in enumerate(stream) if token == processor.eos_id()]
    starts = [0] + [b + 1 for b in boundaries[:-1]]
    documents = [processor.decode(stream[a:b]) for a, b in zip(starts, boundaries, strict=True)]
    texts = [record["text"] for record in make_records(200, seed=0)]
    # All but the documents in the dropped remainder come back exactly, in order.
    assert documents == texts[: len(documents)]
    assert len(documents) >= 195


def test_tokenize_is_deterministic(tmp_path, corpus, tokenizer_model):
    tokenize(tmp_path, corpus, tokenizer_model, name="a")
    tokenize(tmp_path, corpus, tokenizer_model, name="b")
    for split in ("train", "val", "test"):
        for chunk in ("c00000", "c00001", "c00002"):
            a = (tmp_path / "a" / split / f"{chunk}.parquet").read_bytes()
            b = (tmp_path / "b" / split / f"{chunk}.parquet").read_bytes()
            assert a == b


def test_long_documents_encoded_in_pieces_give_the_tokens_of_the_whole(
    tmp_path, corpus, tokenizer_model, monkeypatch
):
    tokenize(tmp_path, corpus, tokenizer_model, name="whole")
    monkeypatch.setattr(data_module, "LONG_DOCUMENT_CHARS", 40)  # every document, in pieces
    tokenize(tmp_path, corpus, tokenizer_model, name="pieces")
    for split in ("train", "val", "test"):
        for chunk in ("c00000", "c00001", "c00002"):
            whole = (tmp_path / "whole" / split / f"{chunk}.parquet").read_bytes()
            assert (tmp_path / "pieces" / split / f"{chunk}.parquet").read_bytes() == whole


@pytest.mark.parametrize(
    "text",
    [
        "the lord  spake unto   moses\n saying\tthou shalt   ",
        "  def return self\n\n    import class for in if else none while yield  x",
        "déjà vu 東京 タワー ünïcödé naïve café 123456 7 8 9",
    ],
)
def test_text_pieces_encode_to_the_tokens_of_the_whole_text(tokenizer_model, text):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    cut_at_spaces = 0
    for size in range(8, len(text)):
        pieces = list(text_pieces(text, size))
        assert all(len(piece) <= size for piece in pieces)
        if " ".join(pieces) != text:
            continue  # `size` characters without a space between words: cut anywhere
        cut_at_spaces += 1
        assert sum((processor.encode(piece) for piece in pieces), []) == processor.encode(text)
    assert cut_at_spaces > len(text) // 2


def peak_memory_growth(data: DataConfig, model, warm_up: str, document: str) -> int:
    """Bytes the peak RSS of this process grows by to tokenize `document` after `warm_up`."""
    import resource

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    for index, path in enumerate([warm_up, document]):
        if index == 1:
            before = peak()
        out = Path(path).parent / f"out-{index}"
        chunk = Chunk(index=index, name=f"c{index:05d}", files=(str(path),))
        tokenize_chunk(
            chunk=chunk, data=data, tokenizer_model=model, out_dir=out, stats_path=out / "stats"
        )
    return peak() - before


def test_a_long_single_line_document_tokenizes_in_bounded_memory(tmp_path, corpus, tokenizer_model):
    import multiprocessing
    import random
    from concurrent.futures import ProcessPoolExecutor

    rng = random.Random(0)
    words = [word for words in DOMAINS.values() for word in words]
    length = 4_000_000
    document = write_jsonl(
        tmp_path / "long.jsonl", [{"text": " ".join(rng.choices(words, k=length // 5))}]
    )
    warm_up = write_jsonl(tmp_path / "short.jsonl", make_records(10))
    # A fresh process, so that the peak is this document's.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        growth = pool.submit(
            peak_memory_growth, data_config(tmp_path), tokenizer_model, warm_up, document
        ).result()
    # Encoded whole, SentencePiece alone takes ~50 bytes a character.
    assert growth < 25 * length


def test_a_failed_chunk_leaves_nothing_and_spares_the_others(tmp_path, corpus, tokenizer_model):
    tokenize(tmp_path, corpus, tokenizer_model)
    before = {path: path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()}
    bad = tmp_path / "corpus" / "part-1.jsonl.zst"
    records = make_records(200, seed=1)
    write_jsonl(bad, records[:150])
    with open(bad, "ab") as handle:  # a second zstd frame holding an invalid line
        import zstandard

        handle.write(zstandard.ZstdCompressor().compress(b'{"text": "fine"}\n{"text": \n'))
    data = data_config(tmp_path)
    chunk = plan_chunks(data.inputs, 1)[1]
    for path in (tmp_path / "out").rglob("c00001*"):
        path.unlink()
    with pytest.raises(BadRecordError, match=r"part-1.jsonl.zst, line 152: invalid JSON"):
        tokenize_chunk(
            chunk=chunk,
            data=data,
            tokenizer_model=tokenizer_model,
            out_dir=tmp_path / "out",
            stats_path=tmp_path / "out" / "stats" / "c00001.json",
        )
    left = {path for path in (tmp_path / "out").rglob("*") if path.is_file()}
    assert not [path for path in left if "c00001" in path.name]
    for path, content in before.items():
        if "c00001" not in path.name:
            assert path.read_bytes() == content

    # With on_bad_record: skip the same chunk succeeds and counts the bad line.
    data = data_config(tmp_path, on_bad_record="skip")
    stats = tokenize_chunk(
        chunk=chunk,
        data=data,
        tokenizer_model=tokenizer_model,
        out_dir=tmp_path / "out",
        stats_path=tmp_path / "out" / "stats" / "c00001.json",
    )
    assert stats.bad_records == 1
    assert "line 152" in stats.bad_record_examples[0]
    assert sum(s.documents for s in stats.splits.values()) == 151


def write_config(tmp_path) -> Path:
    """The config of `data_config`, as a file for the command line."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "inputs": [str(tmp_path / "corpus" / "*.jsonl.zst")],
                "splits": SPLITS,
                "seq_len": 32,
                "routing": {"n_experts": 2, "prefix_len": 8},
                "tokenizer": {"vocab_size": 300, "sample_bytes": 50_000},
            }
        )
    )
    return config


def tokenize_command(tmp_path, model, out_dir) -> list[str]:
    """`smalltalk tokenize` of the first corpus file."""
    config = write_config(tmp_path)
    corpus_file = tmp_path / "corpus" / "part-0.jsonl.zst"
    return [
        "tokenize",
        *("--config", str(config), "--chunk", "c00000"),
        *("--tokenizer", str(model), "--out-dir", str(out_dir), str(corpus_file)),
    ]


def assert_failed_cleanly_on_a_full_disk(status, stderr, out_dir):
    assert status == 1
    assert "Traceback" not in stderr
    assert f"smalltalk tokenize: error: {out_dir}: No space left on device" in stderr
    assert not out_dir.exists()  # nothing new: no file, and no split folder made for one


def test_a_full_disk_at_the_stats_file_leaves_no_token_file_either(
    tmp_path, corpus, tokenizer_model, monkeypatch, capsys
):
    real_write = data_module.write_text_atomically

    def write_text_atomically(text, path):
        if Path(path).name == "c00000.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(text, path)

    monkeypatch.setattr(data_module, "write_text_atomically", write_text_atomically)
    out_dir = tmp_path / "tokens"
    status = cli.main(tokenize_command(tmp_path, tokenizer_model, out_dir))
    stderr = capsys.readouterr().err
    assert status == 1
    assert f"{out_dir / 'stats' / 'c00000.json'}: No space left on device" in stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("fails", ["mid-write and on close", "on close"])
def test_a_full_disk_fails_cleanly_naming_the_path_and_leaves_no_temporary_file(
    tmp_path, corpus, tokenizer_model, monkeypatch, capsys, fails
):
    real_write, real_close = pq.ParquetWriter.write_table, pq.ParquetWriter.close
    writes = []

    def disk_full():
        # What pyarrow raises: errno set, no file name.
        return OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space")

    def write_table(self, *args, **kwargs):
        writes.append(1)
        if fails.startswith("mid-write") and len(writes) == 2:
            raise disk_full()
        real_write(self, *args, **kwargs)

    def close(self):
        real_close(self)
        raise disk_full()

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    monkeypatch.setattr(pq.ParquetWriter, "close", close)
    out_dir = tmp_path / "tokens"
    status = cli.main(tokenize_command(tmp_path, tokenizer_model, out_dir))
    assert_failed_cleanly_on_a_full_disk(status, capsys.readouterr().err, out_dir)


def test_a_full_disk_removes_the_folders_tokenize_made_and_keeps_those_it_found(
    tmp_path, corpus, tokenizer_model, monkeypatch, capsys
):
    out_dir = tmp_path / "tokens"
    (out_dir / "train").mkdir(parents=True)
    (out_dir / "train" / "c00001.parquet").write_bytes(b"another chunk's tokens")
    before = sorted(out_dir.rglob("*"))
    real_write = pq.ParquetWriter.write_table
    writes = []

    def write_table(self, *args, **kwargs):
        writes.append(1)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28]")
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    assert cli.main(tokenize_command(tmp_path, tokenizer_model, out_dir)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(out_dir.rglob("*")) == before  # no val/, test/ or stats/ left empty


def test_a_really_full_disk_fails_cleanly(tmp_path, corpus, tokenizer_model, small_disk, capsys):
    fill(small_disk, leave=8192)  # a few pages: less than the chunk's tokens
    out_dir = small_disk / "tokens"
    status = cli.main(tokenize_command(tmp_path, tokenizer_model, out_dir))
    assert_failed_cleanly_on_a_full_disk(status, capsys.readouterr().err, out_dir)


def test_a_bad_record_stops_tokenizer_training_with_its_file_and_line(tmp_path, corpus, capsys):
    bad = corpus[1]
    bad.write_bytes(
        zstandard.ZstdCompressor().compress(b'{"text": \n' + json_lines(make_records(200)))
    )
    out = tmp_path / "tok" / "spm.model"
    status = cli.main(
        ["train-tokenizer", "--config", str(write_config(tmp_path)), "--out", str(out)]
    )
    stderr = capsys.readouterr().err
    assert status == 1
    assert f"smalltalk train-tokenizer: error: {bad}, line 1: invalid JSON" in stderr
    assert "Traceback" not in stderr and "INTERNAL" not in stderr
    assert not out.parent.exists()


def train_tokenizer_command(tmp_path, capsys, **tokenizer) -> tuple[int, str, Path]:
    """`smalltalk train-tokenizer` on tmp_path/corpus with `write_config`'s config, the
    tokenizer section updated: its status, stderr and the model it was to write."""
    config = write_config(tmp_path)
    values = yaml.safe_load(config.read_text())
    values["tokenizer"] |= tokenizer
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "trained" / "spm.model"
    status = cli.main(["train-tokenizer", "--config", str(config), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "INTERNAL" not in stderr
    return status, stderr, out


def test_a_corpus_of_whitespace_only_documents_is_said_to_hold_no_text(tmp_path, capsys):
    files = [tmp_path / "corpus" / f"part-{i}.jsonl.zst" for i in range(2)]
    files[0].parent.mkdir()
    for path in files:
        write_jsonl(path, [{"text": " \n\t  \n"}] * 40 + [{"text": ""}])
    status, stderr, out = train_tokenizer_command(tmp_path, capsys)
    assert status == 1
    assert (
        "smalltalk train-tokenizer: error: the tokenizer sample holds no text: the train-split "
        f"documents of the files sampled ({files[0]}, {files[1]}) are empty or whitespace only"
    ) in stderr
    assert not out.parent.exists()


def test_a_vocabulary_the_sample_cannot_fill_names_the_key_and_the_largest_that_works(
    tmp_path, capsys
):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "small.jsonl.zst", make_records(20, max_words=10))
    status, stderr, out = train_tokenizer_command(tmp_path, capsys, vocab_size=1000)
    assert status == 1
    said = re.search(
        r"smalltalk train-tokenizer: error: tokenizer\.vocab_size: 1000 pieces are more than the "
        r"tokenizer sample supports: at most (\d+) can be learned from it; set "
        r"tokenizer\.vocab_size to \1 or less",
        stderr,
    )
    assert said, stderr
    assert not out.parent.exists()
    status, stderr, out = train_tokenizer_command(tmp_path, capsys, vocab_size=int(said[1]))
    assert status == 0 and out.is_file()  # the size it names works


def test_a_lone_surrogate_is_a_bad_record_to_the_tokenizer_and_to_tokenize(
    tmp_path, corpus, tokenizer_model, capsys
):
    bad = corpus[0]
    records = make_records(200)
    records[4]["text"] = "caf\udce9 au lait"  # json.dumps writes it as the valid JSON "\\udce9"
    write_jsonl(bad, records)
    message = (
        f"{bad}, line 5: field 'text' is not valid Unicode (lone surrogate U+DCE9 at position 3)"
    )
    status, stderr, out = train_tokenizer_command(tmp_path, capsys)
    assert status == 1
    assert f"smalltalk train-tokenizer: error: {message}" in stderr
    assert not out.parent.exists()
    out_dir = tmp_path / "tokens"
    assert cli.main(tokenize_command(tmp_path, tokenizer_model, out_dir)) == 1
    stderr = capsys.readouterr().err
    assert f"smalltalk tokenize: error: {message}" in stderr and "Traceback" not in stderr
    assert not [path for path in out_dir.rglob("*") if path.is_file()]


def test_the_token_summary_counts_bad_records_once_not_on_every_split(tmp_path):
    paths = []
    for chunk, bad_records in (("c00000", 2), ("c00001", 3)):
        stats = ChunkStats(chunk=chunk, files=[], bad_records=bad_records)
        stats.splits["train"].documents = 10
        paths.append(tmp_path / f"{chunk}.json")
        paths[-1].write_text(json.dumps(stats.as_dict()))
    summary = pd.read_csv(summarize_stats(paths, tmp_path / "summary.tsv"), sep="\t")
    assert list(summary["split"]) == ["train", "val", "test", "all"]
    assert summary["bad_records"].sum() == 5
    assert summary.set_index("split").loc["all", "bad_records"] == 5
    assert list(summary["documents"]) == [20, 0, 0, 20]


def test_tokenizer_training_is_deterministic(tmp_path, corpus, tokenizer_model):
    config = validate_config(
        {
            "inputs": [str(tmp_path / "corpus" / "*.jsonl.zst")],
            "splits": SPLITS,
            "seq_len": 32,
            "routing": {"n_experts": 2, "prefix_len": 8},
            "tokenizer": {"vocab_size": 300, "sample_bytes": 50_000},
        }
    )
    again = train_tokenizer(
        files=[str(p) for p in corpus],
        data=DataConfig.from_config(config),
        tokenizer=TokenizerConfig.from_config(config),
        out_model=tmp_path / "tok2" / "spm.model",
        threads=2,
    )
    import sentencepiece as spm

    # The file records the thread count; the vocabulary itself must not depend on it.
    first, second = (
        spm.SentencePieceProcessor(model_file=str(p)) for p in (tokenizer_model, again)
    )
    pieces = [(first.id_to_piece(i), first.get_score(i)) for i in range(first.get_piece_size())]
    assert pieces == [(second.id_to_piece(i), second.get_score(i)) for i in range(300)]
