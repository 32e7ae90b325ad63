"""What handlers build from their flags: the config, the tokenizer's vocabulary size, the run's
routers or trained mixture, texts to serve, named runs. Heavy modules are imported on use."""

from __future__ import annotations

import argparse
from pathlib import Path


def load_config(*paths: Path) -> dict:
    """The validated config, overlays merged on top in order; defaults filled in."""
    from smalltalk import config

    return config.load_config(*paths)


def set_torch_threads(threads: int) -> None:
    """Use exactly the job's cores: on a busy machine, idle OpenMP threads spinning for work
    make small models many times slower."""
    import torch

    torch.set_num_threads(threads)


def vocab_size(tokenizer: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()


def load_routers(config: dict, args: argparse.Namespace, keep_loaded: bool = False):
    """The run's routing method (`routing.method`) from `--routers` and `--tokenizer`."""
    from smalltalk.config import model_config
    from smalltalk.routers import load_router

    method = config["routing"]["method"]
    return load_router(
        method=method,
        paths=args.routers,
        router_config=model_config(config, "router", vocab_size=vocab_size(args.tokenizer))
        if method == "smalltalk"
        else None,
        tokenizer_model=args.tokenizer,
        keep_loaded=keep_loaded,
    )


def load_mixture(args: argparse.Namespace):
    """The trained mixture of `--results`, served with `--experts`, `--max-experts` in memory;
    an export checked against its manifest unless `--no-verify`."""
    from smalltalk.serve import load

    set_torch_threads(args.threads)
    return load(
        args.results,
        experts=args.experts,
        verify=not args.no_verify,
        **({} if args.max_experts is None else {"max_experts": args.max_experts}),
    )


def read_texts(args: argparse.Namespace) -> list[str]:
    """The texts of `texts` and `--file` (`smalltalk.serve.texts.read_texts`)."""
    from smalltalk.serve.texts import read_texts as read

    return read(args.texts, args.file)


def named_runs(specs: list[str], command: str) -> dict[str, str]:
    """--run NAME=RESULTS_DIR arguments as {name: folder}."""
    runs = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"smalltalk {command}: --run wants NAME=RESULTS_DIR, got {spec!r}")
        runs[name] = folder
    return runs
