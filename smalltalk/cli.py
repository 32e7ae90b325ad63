"""`smalltalk <command>`: one subcommand per workflow stage, each usable without Snakemake.

Flags carry only a job's identity and files; every tunable lives in the config file,
so a rule, a test and a user run the same code path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from smalltalk import __version__

log = logging.getLogger("smalltalk")


def _config(path: Path) -> dict:
    from smalltalk.config import load_config

    return load_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args.config)
    if args.print:
        import yaml

        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    else:
        print(f"{args.config}: valid")
    return 0


def cmd_chunks(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig
    from smalltalk.data import plan_chunks

    data = DataConfig.from_config(_config(args.config))
    for chunk in plan_chunks(data.inputs, data.files_per_chunk):
        print(json.dumps({"chunk": chunk.name, "files": list(chunk.files)}))
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig, TokenizerConfig
    from smalltalk.data import plan_chunks
    from smalltalk.tokenizer import train_tokenizer

    config = _config(args.config)
    data = DataConfig.from_config(config)
    files = args.files or [
        f for c in plan_chunks(data.inputs, data.files_per_chunk) for f in c.files
    ]
    path = train_tokenizer(
        files=files,
        data=data,
        tokenizer=TokenizerConfig.from_config(config),
        out_model=args.out,
        threads=args.threads,
    )
    log.info("wrote %s", path)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from smalltalk.config import DataConfig
    from smalltalk.data import Chunk, plan_chunks, tokenize_chunk

    data = DataConfig.from_config(_config(args.config))
    if args.files:
        index = int(args.chunk.lstrip("c"))
        chunk = Chunk(index=index, name=args.chunk, files=tuple(str(f) for f in args.files))
    else:
        plan = {c.name: c for c in plan_chunks(data.inputs, data.files_per_chunk)}
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


def cmd_summarize_tokens(args: argparse.Namespace) -> int:
    from smalltalk.data import summarize_stats

    summarize_stats(args.stats, args.out)
    sys.stdout.write(Path(args.out).read_text())
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    import torch

    from smalltalk import flops
    from smalltalk.model import LM, PRESETS, ModelConfig

    if args.paper:
        print(flops.format_paper_table3())
        return 0
    for name in args.presets or sorted(PRESETS):
        config = ModelConfig.from_preset(name)
        with torch.device("meta"):  # counts parameters without allocating them
            parameters = LM(config).num_parameters()
        per_sequence = flops.inference_flops(config, config.seq_len)
        print(
            f"{name:12} {parameters / 1e6:9.2f}M params  L={config.n_layer:<3} d={config.n_embd:<5}"
            f" V={config.vocab_size:<6} S={config.seq_len:<5}"
            f" {per_sequence / 1e9:10.3f} GFLOPs inference per sequence"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smalltalk",
        description="SmallTalk LM: train and use an asynchronous mixture of language models. "
        "Each command is one stage of the Snakemake workflow and runs on its own.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def add_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config", type=Path, required=True, help="workflow config YAML (e.g. config.yaml)"
        )

    def add_threads(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")

    sub = add("check-config", cmd_check_config, "validate a config file and report every problem")
    add_config(sub)
    sub.add_argument("--print", action="store_true", help="print the config with defaults")

    sub = add("chunks", cmd_chunks, "list the input chunks (JSON lines: chunk, files)")
    add_config(sub)

    sub = add("train-tokenizer", cmd_train_tokenizer, "train the SentencePiece tokenizer")
    add_config(sub)
    sub.add_argument("--out", type=Path, required=True, help="the .model file to write")
    sub.add_argument(
        "files", nargs="*", help="input files to sample (default: every file of the inputs)"
    )
    add_threads(sub)

    sub = add(
        "tokenize",
        cmd_tokenize,
        "tokenize one chunk into tokens/{split}/{chunk}.parquet and a stats file",
    )
    add_config(sub)
    sub.add_argument("--chunk", required=True, help="chunk name, e.g. c00003")
    sub.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model")
    sub.add_argument("--out-dir", type=Path, required=True, help="the tokens/ directory")
    sub.add_argument("--stats", type=Path, help="stats JSON (default: OUT_DIR/stats/CHUNK.json)")
    sub.add_argument(
        "files", nargs="*", type=Path, help="the chunk's files (default: from the input plan)"
    )
    add_threads(sub)

    sub = add("flops", cmd_flops, "FLOPs of the model presets, or the paper's Table 3")
    sub.add_argument(
        "--paper", action="store_true", help="recompute the paper's Table 3 from Tables 1-2"
    )
    sub.add_argument("presets", nargs="*", help="preset names (default: all)")

    sub = add("summarize-tokens", cmd_summarize_tokens, "total the per-chunk stats per split")
    sub.add_argument("--out", type=Path, required=True, help="the TSV to write")
    sub.add_argument("stats", nargs="+", type=Path, help="per-chunk stats JSON files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from smalltalk.config import ConfigError
    from smalltalk.data import BadRecordError

    try:
        return args.handler(args)
    except (ConfigError, BadRecordError, FileNotFoundError, ValueError) as error:
        log.debug("details", exc_info=True)
        print(f"smalltalk {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
