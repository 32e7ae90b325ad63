"""Tokenize-chunk throughput against bare SentencePiece encoding of the same text.

    python benchmarks/bench_tokenize.py [--file data/demo/demo-000.jsonl.zst] [--repeats 5]

Both sides run in this one process on one thread, interleaved, so machine noise hits
both alike; the figure that matters is the ratio (goal: >= 0.8). The baseline encodes
texts already in memory; the stage also decompresses, parses JSON, hashes ids into
splits, packs sequences and writes zstd Parquet.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from smalltalk.config import DataConfig, TokenizerConfig, validate_config
from smalltalk.corpus import read_documents
from smalltalk.data import ENCODE_BATCH_BYTES, Chunk, tokenize_chunk
from smalltalk.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=REPO / "data/demo/demo-000.jsonl.zst")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    config = validate_config(
        {
            "inputs": [str(args.file)],
            "splits": {"train": 0.9, "val": 0.05, "test": 0.05},
            "seq_len": args.seq_len,
            "routing": {"n_experts": 4, "prefix_len": 8},
            "tokenizer": {"vocab_size": args.vocab_size, "sample_bytes": 5_000_000},
        }
    )
    data = DataConfig.from_config(config)
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    model = train_tokenizer(
        files=[str(args.file)],
        data=data,
        tokenizer=TokenizerConfig.from_config(config),
        out_model=work / "spm.model",
    )
    processor = spm.SentencePieceProcessor(model_file=str(model))
    texts = [doc.text for doc in read_documents(args.file)]
    megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6

    def bare_encode() -> None:
        # The same batching as the stage: about ENCODE_BATCH_BYTES of text per call.
        batch, size = [], 0
        for text in texts:
            batch.append(text)
            size += len(text)
            if size >= ENCODE_BATCH_BYTES:
                processor.encode(batch, num_threads=1)
                batch, size = [], 0
        processor.encode(batch, num_threads=1)

    def stage() -> None:
        tokenize_chunk(
            chunk=Chunk(index=0, name="c00000", files=(str(args.file),)),
            data=data,
            tokenizer_model=model,
            out_dir=work / "tokens",
            stats_path=work / "tokens" / "stats.json",
            threads=1,
        )

    timings: dict[str, list[float]] = {"sentencepiece": [], "tokenize_chunk": []}
    for _ in range(args.repeats):
        for name, run in (("sentencepiece", bare_encode), ("tokenize_chunk", stage)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    print(f"file: {args.file} ({megabytes:.1f} MB of text), V={args.vocab_size}, 1 thread")
    print(f"{'':16} {'min s':>7} {'median s':>9} {'max s':>7} {'MB/s':>7}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(
            f"{name:16} {min(values):7.2f} {median:9.2f} {max(values):7.2f} "
            f"{megabytes / median:7.2f}"
        )
    ratios = [
        b / s for b, s in zip(timings["sentencepiece"], timings["tokenize_chunk"], strict=True)
    ]
    print(
        f"throughput ratio tokenize_chunk / sentencepiece: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}; goal >= 0.8)"
    )


if __name__ == "__main__":
    main()
