"""The config and the corpus (rules/data.smk): check a config, plan chunks, train the
tokenizer, tokenize a chunk, total the token counts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from smalltalk.cli.inputs import load_config
from smalltalk.cli.registry import CONFIG, THREADS, arg, command

log = logging.getLogger("smalltalk")


@command(
    "check-config",
    "validate a config file and report every problem",
    arg(
        "--config",
        type=Path,
        nargs="+",
        required=True,
        help="workflow config YAML, then overlays merged on top in order (as --configfile)",
    ),
    arg("--print", action="store_true", help="print the config with defaults"),
)
def check_config(args: argparse.Namespace) -> int:
    config = load_config(*args.config)
    if args.print:
        import yaml

        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    else:
        print(f"{' + '.join(map(str, args.config))}: valid")
    return 0


@command("chunks", "list the input chunks (JSON lines: chunk, files)", CONFIG)
def chunks(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig
    from smalltalk.data import plan_chunks

    data = DataConfig.from_config(load_config(args.config))
    for chunk in plan_chunks(data.inputs, data.files_per_chunk):
        print(json.dumps({"chunk": chunk.name, "files": list(chunk.files)}))
    return 0


@command(
    "train-tokenizer",
    "train the SentencePiece tokenizer",
    CONFIG,
    arg("--out", type=Path, required=True, help="the .model file to write"),
    arg("files", nargs="*", help="input files to sample (default: every file of the inputs)"),
    THREADS,
)
def train_tokenizer(args: argparse.Namespace) -> int:
    from smalltalk import tokenizer
    from smalltalk.config import DataConfig, TokenizerConfig
    from smalltalk.data import plan_chunks

    config = load_config(args.config)
    data = DataConfig.from_config(config)
    files = args.files or [
        f for c in plan_chunks(data.inputs, data.files_per_chunk) for f in c.files
    ]
    path = tokenizer.train_tokenizer(
        files=files,
        data=data,
        tokenizer=TokenizerConfig.from_config(config),
        out_model=args.out,
        threads=args.threads,
    )
    log.info("wrote %s", path)
    return 0


@command(
    "tokenize",
    "tokenize one chunk into tokens/{split}/{chunk}.parquet and a stats file",
    CONFIG,
    arg("--chunk", required=True, help="chunk name, e.g. c00003"),
    arg("--tokenizer", type=Path, required=True, help="SentencePiece .model"),
    arg("--out-dir", type=Path, required=True, help="the tokens/ directory"),
    arg("--stats", type=Path, help="stats JSON (default: OUT_DIR/stats/CHUNK.json)"),
    arg("files", nargs="*", type=Path, help="the chunk's files (default: from the input plan)"),
    THREADS,
)
def tokenize(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig
    from smalltalk.data import (
        Chunk,
        parse_chunk_name,
        plan_chunks,
        plan_grown_chunks,
        tokenize_chunk,
    )

    config = load_config(args.config)
    data = DataConfig.from_config(config)
    grown, index = parse_chunk_name(args.chunk)
    if grown is not None:  # a grown corpus: its documents are named after its own patterns
        if grown >= len(config["grow"]):
            raise SystemExit(f"smalltalk tokenize: no grow entry {grown} for chunk {args.chunk}")
        data = dataclasses.replace(data, inputs=tuple(config["grow"][grown]["inputs"]))
    if args.files:
        chunk = Chunk(index=index, name=args.chunk, files=tuple(str(f) for f in args.files))
    else:
        planned = (
            plan_chunks(data.inputs, data.files_per_chunk)
            if grown is None
            else plan_grown_chunks(grown, data.inputs, data.files_per_chunk)
        )
        plan = {c.name: c for c in planned}
        if args.chunk not in plan:
            raise SystemExit(f"smalltalk tokenize: no chunk '{args.chunk}' in the input plan")
        chunk = plan[args.chunk]
    stats = tokenize_chunk(
        chunk=chunk,
        data=data,
        tokenizer_model=args.tokenizer,
        out_dir=args.out_dir,
        stats_path=args.stats or Path(args.out_dir) / "stats" / f"{chunk.name}.json",
        threads=args.threads,
    )
    for split, split_stats in stats.splits.items():
        log.info(
            "%s %s: %d documents, %d sequences, %d tokens, %d dropped",
            chunk.name,
            split,
            split_stats.documents,
            split_stats.sequences,
            split_stats.tokens,
            split_stats.dropped_tokens,
        )
    if stats.bad_records:
        log.warning("%s: skipped %d bad records", chunk.name, stats.bad_records)
    return 0


@command(
    "summarize-tokens",
    "total the per-chunk stats per split",
    arg("--out", type=Path, required=True, help="the TSV to write"),
    arg("stats", nargs="+", type=Path, help="per-chunk stats JSON files"),
)
def summarize_tokens(args: argparse.Namespace) -> int:
    from smalltalk.data import summarize_stats

    summarize_stats(args.stats, args.out)
    sys.stdout.write(Path(args.out).read_text())
    return 0
