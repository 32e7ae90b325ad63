"""The command line is the workflow's interface: every command and flag the rules use exists, and
starting it imports none of the heavy libraries its handlers need."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smalltalk import cli
from smalltalk.cli.reports import PLOT_FLAGS

REPO = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def rule_calls() -> list[tuple[str, str, list[str]]]:
    """(rule file, command, flags) of every `python -m smalltalk` call in rules/*.smk."""
    calls = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        text = path.read_text()
        for match in re.finditer(r"-m smalltalk ([a-z][a-z-]*)(.*?)> \{log", text, re.DOTALL):
            shell = re.sub(r"\{[^}]*\}", "", match.group(2))  # not the flags inside {params}
            calls.append((path.name, match.group(1), re.findall(r"--[a-z][a-z-]*", shell)))
    return calls


def test_every_rule_calls_a_command_with_flags_it_has():
    commands = subcommands()
    calls = rule_calls()
    assert len(calls) > 30  # the pattern finds the rules' calls
    for rule_file, name, flags in calls:
        assert name in commands, f"{rule_file}: no command {name}"
        known = commands[name]._option_string_actions
        assert not set(flags) - set(known), f"{rule_file}: {name} has no {set(flags) - set(known)}"


def test_plot_draws_every_figure_the_report_asks_for():
    report = (REPO / "rules" / "report.smk").read_text()
    asked = set(re.findall(r"-m smalltalk plot ([a-z_]+)", report))
    assert asked and asked <= set(PLOT_FLAGS)


def test_the_command_line_starts_without_the_heavy_libraries():
    heavy = ["torch", "numpy", "pyarrow", "duckdb", "matplotlib", "sentencepiece", "yaml"]
    probe = (
        "import sys\nfrom smalltalk import cli\ncli.build_parser().parse_args(['chunks', "
        "'--config', 'c.yaml'])\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert loaded.stdout.strip() == ""


def test_a_missing_flag_of_an_em_stage_is_a_usage_error_that_names_it(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["score-router", "--weights", "router.safetensors", "--tokens", "t.parquet"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "--config" in error and "--tokenizer" in error and "--out" in error
