"""`smalltalk <command>`: one subcommand per workflow stage, each usable without Snakemake, and
the commands that use a trained mixture.

Each command is a handler registered with its flags (`registry.command`) in the module of its
subject. Handlers import what they need, so that starting the command line stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from smalltalk import __version__
from smalltalk.allocator import keep_freed_memory
from smalltalk.cli import data, evaluation, reports, serving, training
from smalltalk.cli.registry import COMMANDS

# The modules whose handlers fill the command table, in the order `smalltalk --help` lists their
# commands: the workflow's stages as they run, then reports, then using a trained mixture.
SUBJECTS = (data, training, evaluation, reports, serving)

log = logging.getLogger("smalltalk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smalltalk",
        description="SmallTalk LM: train and use an asynchronous mixture of language models. "
        "Each command is one stage of the Snakemake workflow and runs on its own.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    order = [module.__name__ for module in SUBJECTS]
    for command in sorted(COMMANDS.values(), key=lambda c: order.index(c.handler.__module__)):
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        for argument in command.arguments:
            sub.add_argument(*argument.flags, **argument.options)
        sub.set_defaults(handler=command.handler)
    return parser


def _message(error: Exception) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"  # as ls and cp say it, with no [Errno 28]
    return str(error)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the records a command stamps
    keep_freed_memory()  # large buffers reused, not faulted in again: smalltalk.allocator
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from smalltalk.config import ConfigError
    from smalltalk.corpus import BadRecordError

    # Expected failures (a bad config, a bad record, a full disk, a wrong flag value) end in one
    # line on stderr and status 1; anything else is a bug and keeps its traceback.
    try:
        return args.handler(args)
    except (ConfigError, BadRecordError, OSError, ValueError) as error:
        log.debug("details", exc_info=True)
        print(f"smalltalk {args.command}: error: {_message(error)}", file=sys.stderr)
        return 1
