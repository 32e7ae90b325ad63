"""Train the SentencePiece tokenizer on a sample of the train split (design stage 1)."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smalltalk.config import ConfigError, DataConfig, TokenizerConfig, load_schema
from smalltalk.corpus import BadRecordError
from smalltalk.data import read_corpus_file, split_of
from smalltalk.files import write_bytes_atomically

log = logging.getLogger(__name__)

# SentencePiece reads one sentence per line; longer lines are cut so none is dropped.
MAX_SENTENCE_BYTES = 8192
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# How SentencePiece says that the sample has fewer distinct merges than the vocabulary asks for.
VOCAB_TOO_HIGH = re.compile(
    r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)"
)


def sample_files(files: list[str], count: int) -> list[str]:
    """At most `count` files spread evenly over the sorted list (always the first and last)."""
    if len(files) <= count:
        return list(files)
    picks = np.unique(np.linspace(0, len(files) - 1, count).round().astype(int))
    return [files[i] for i in picks]


def sample_sentences(
    files: list[str], data: DataConfig, tokenizer: TokenizerConfig
) -> Iterator[str]:
    """Lines of train-split documents, an equal byte budget per sampled file."""
    chosen = sample_files(sorted(files), tokenizer.sample_files)
    if not chosen:  # else a division by zero below, or SentencePiece's "[!sentences_.empty()]"
        raise ValueError("the tokenizer has no files to sample: give it at least one input file")
    budget_per_file = max(1, tokenizer.sample_bytes // len(chosen))
    skipped: list[BadRecordError] = []
    handler = skipped.append if data.on_bad_record == "skip" else None
    for path in chosen:
        taken = 0
        for doc in read_corpus_file(path, data, handler):
            if split_of(doc.id, data.splits) != "train":
                continue
            for line in doc.text.splitlines():
                if not line.strip():
                    continue
                encoded = line.encode("utf-8")
                for start in range(0, len(encoded), MAX_SENTENCE_BYTES):
                    piece = encoded[start : start + MAX_SENTENCE_BYTES]
                    yield piece.decode("utf-8", errors="ignore")
                taken += len(encoded)
            if taken >= budget_per_file:
                break
    if skipped:
        log.warning("skipped %d bad records while sampling, first: %s", len(skipped), skipped[0])


def _train(spm, sentences, tokenizer, model, threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        model_type="bpe",
        vocab_size=tokenizer.vocab_size,
        byte_fallback=True,
        character_coverage=tokenizer.character_coverage,
        # Keep text as it is: code and man pages live on their indentation.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        max_sentence_length=MAX_SENTENCE_BYTES * 2,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=threads,
        minloglevel=1,
    )


def train_tokenizer(
    *,
    files: list[str],
    data: DataConfig,
    tokenizer: TokenizerConfig,
    out_model: str | os.PathLike,
    threads: int = 1,
) -> Path:
    """Train a byte-fallback BPE SentencePiece model and write it atomically to `out_model`."""
    import sentencepiece as spm

    model = io.BytesIO()
    # SentencePiece turns an error raised by the iterator into "INTERNAL: BadRecordError"
    # inside its own traceback; keep the error to raise it as the readers do.
    failures: list[Exception] = []
    given = 0  # sentences handed to SentencePiece

    def sentences() -> Iterator[str]:
        nonlocal given
        try:
            for sentence in sample_sentences(files, data, tokenizer):
                given += 1
                yield sentence
        except Exception as error:
            failures.append(error)
            raise

    try:
        _train(spm, sentences(), tokenizer, model, threads)
    except RuntimeError as error:
        if failures:
            raise failures[0] from None  # raised here, out of SentencePiece's error
        # SentencePiece's own words for these are an assertion in its C++ ("[!sentences_
        # .empty()]", "Vocabulary size too high"); say what is wrong with the config or the data.
        if given == 0:
            sampled = _names(sample_files(sorted(files), tokenizer.sample_files))
            raise ValueError(
                f"the tokenizer sample holds no text: the train-split documents of the files "
                f"sampled ({sampled}) are empty or whitespace only"
            ) from None
        if "Vocabulary size is smaller than required_chars" in str(error):
            raise ValueError(
                f"tokenizer.vocab_size={tokenizer.vocab_size} is too small for this corpus: "
                "it must hold 256 byte pieces, 3 specials and every character within "
                f"tokenizer.character_coverage={tokenizer.character_coverage} "
                f"(SentencePiece: {error})"
            ) from None
        too_high = VOCAB_TOO_HIGH.search(str(error))
        if too_high is not None:
            raise ConfigError(_vocab_too_high(int(too_high[2]), tokenizer)) from None
        raise
    if failures:
        raise failures[0]
    return write_bytes_atomically(model.getvalue(), out_model)


def _vocab_too_high(largest: int, tokenizer: TokenizerConfig) -> str:
    """What to do when the sample supports at most `largest` pieces, fewer than asked."""
    schema = load_schema()["properties"]["tokenizer"]["properties"]["vocab_size"]
    said = (
        f"tokenizer.vocab_size: {tokenizer.vocab_size} pieces are more than the tokenizer "
        f"sample supports: at most {largest} can be learned from it"
    )
    if largest < schema["minimum"]:
        return (
            f"{said}, fewer than the smallest vocabulary allowed ({schema['minimum']}); give "
            "the tokenizer more text (more inputs, tokenizer.sample_bytes, "
            "tokenizer.sample_files)"
        )
    return (
        f"{said}; set tokenizer.vocab_size to {largest} or less, or give the tokenizer more text "
        "(tokenizer.sample_bytes, tokenizer.sample_files)"
    )


def _names(paths: list[str], shown: int = 5) -> str:
    """The first `shown` paths, then how many more."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more
