"""The command table: `@command` puts a handler in it with its flags, `arg` spells one flag as
`argparse.add_argument` would, and the groups below are the flags several commands share.

Flags carry only a job's identity and files; every tunable lives in the config file, so a rule,
a test and a user run the same code path.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arg:
    """The arguments of one `add_argument` call."""

    flags: tuple[str, ...]
    options: dict


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line: the command list's entry and the command's own description
    arguments: tuple[Arg, ...]  # in the order its --help shows them
    handler: Callable[[argparse.Namespace], int]  # returns the exit status


COMMANDS: dict[str, Command] = {}  # filled as the command modules are imported


def arg(*flags: str, **options) -> Arg:
    return Arg(flags, options)


def command(name: str, help: str, *arguments: Arg | tuple[Arg, ...]):
    """Register the decorated handler as `smalltalk NAME`; a tuple stands for its flags in turn."""
    flat = tuple(a for item in arguments for a in (item if isinstance(item, tuple) else (item,)))

    def register(handler: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"two commands named {name!r}")
        COMMANDS[name] = Command(name, help, flat, handler)
        return handler

    return register


# ---- argparse types: a bad value is a usage error (exit status 2) before any work starts ----


def int_at_least(low: int):
    """An integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def seed(text: str) -> int:
    """An integer in [0, 2**64 - 1], the seeds torch.Generator takes (`serve.MAX_SEED`)."""
    value = int_at_least(0)(text)
    if value > 2**64 - 1:
        raise argparse.ArgumentTypeError(f"must be at most 2**64 - 1, got {value}")
    return value


def expert_list(text: str) -> list[int]:
    """Expert indices separated by commas, e.g. 0,2 (checked on loading)."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of expert indices: {text!r} (write them as 0,2)"
        ) from None


def named_path(text: str) -> tuple[str, str]:
    """NAME=PATH, e.g. dense_compute=results/dense_compute/summary.json."""
    name, equals, path = text.partition("=")
    if not (equals and name and path):
        raise argparse.ArgumentTypeError(f"not NAME=PATH: {text!r}")
    return name, path


def temperature(text: str) -> float:
    """A finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# ---- flags shared by several commands ----

CONFIG = arg("--config", type=Path, required=True, help="workflow config YAML (e.g. config.yaml)")
THREADS = arg("--threads", type=int_at_least(1), default=1, help="CPU threads (default: 1)")
TOKENIZER = arg("--tokenizer", type=Path, required=True, help="SentencePiece .model (V)")
ROUTERS = arg(
    "--routers",
    nargs="+",
    required=True,
    help="the final router weights in e order, or the baseline router's .npz",
)
RESULTS = arg("--results", default="results", help="the trained results directory, or an export")
EXPERTS = arg(
    "--experts",
    type=expert_list,
    help="serve only these experts, e.g. 0,2, retiring the others (default: all)",
)
NO_VERIFY = arg(
    "--no-verify",
    action="store_true",
    help="read an export without checking its files against export.json's sha256 first",
)


def serving_flags(texts: str = "texts") -> tuple[Arg, ...]:
    """The flags of every command that loads a trained mixture and reads texts (or prompts)."""
    return (
        arg("texts", nargs="*", help=f"{texts} (default: --file, else stdin)"),
        arg(
            "--file",
            help=f"{texts}, one per line, or JSON objects with a string 'text' field, one per "
            "line (-: stdin)",
        ),
        RESULTS,
        EXPERTS,
        NO_VERIFY,
        arg(
            "--max-experts",
            type=int_at_least(1),
            help="experts kept in memory, the least recently used dropped first (default: 2)",
        ),
        arg("--prefix-tokens", type=int, help="route on this many tokens, M-hat (default: M)"),
        arg("--json", action="store_true", help="one JSON object per line"),
        THREADS,
    )


SERVING = serving_flags()
TOPK = (
    arg(
        "--topk",
        type=int_at_least(1),
        default=1,
        help="mix the top k experts by router score (c-BTM)",
    ),
    arg("--dense", action="store_true", help="the dense baseline instead, for comparison"),
)
