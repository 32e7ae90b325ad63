"""How the serving commands print their answers: one line per text, or one JSON object per line.

Every function returns the text to print; `smalltalk.cli` prints it.
"""

from __future__ import annotations

import json
from typing import Any

from smalltalk.serve.results import Routing, Score


def json_line(record: dict) -> str:
    """One JSON line; NaN (a router with nothing to score) becomes null, as JSON has no NaN."""

    def finite(value):
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(record), ensure_ascii=False)


def preview(text: str, width: int = 60) -> str:
    shown = json.dumps(text, ensure_ascii=False)[1:-1]  # newlines as \n: one line per text
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def router_column(routing: Routing) -> str:
    """Every router's prefix NLL, the routed expert's starred."""
    values = " ".join(
        f"{nll:6.3f}{'*' if e == routing.expert else ' '}"
        for e, nll in zip(routing.routers, routing.router_nll, strict=True)
    )
    return f"{routing.prefix_tokens:>3} tokens  router NLL {values}"


def routing_line(text: str, routing: Routing) -> str:
    return f"expert {routing.expert:<3} {router_column(routing)}  {preview(text)}"


def score_line(text: str, score: Score) -> str:
    experts = ",".join(map(str, score.experts)) or "dense"
    return (
        f"expert {experts:<5} NLL {score.nll:9.2f} over {score.tokens:>5} tokens  "
        f"perplexity {score.perplexity:8.2f}  {preview(text)}"
    )


def explanation_lines(text: str, explanation: dict[str, Any], prefix_len: int) -> str:
    """The routing of `text` and, per segment, its router's NLL, train share, main sources and
    typical tokens (`smalltalk.serve.analysis.explain`); the routed segment starred."""
    routing = explanation["routing"]
    lines = [
        f"{preview(text)}\n  routed to expert {routing['expert']} by its first "
        f"{routing['prefix_tokens']} tokens (M = {prefix_len})\n"
        f"  {'expert':>7} {'router NLL':>10} {'train share':>11}  sources, typical tokens"
    ]
    for segment in explanation["segments"]:
        star = "*" if segment["expert"] == routing["expert"] else " "
        sources = ", ".join(
            f"{source} {share:.0%}" for source, share in list(segment["sources"].items())[:4]
        )
        lines.append(
            f"  {star}{segment['expert']:>6} {segment['router_nll']:>10.3f} "
            f"{segment['share']:>11.1%}  {sources}\n"
            f"  {'':>32}{' '.join(segment['tokens'])}"
        )
    return "\n".join(lines)


def lm_eval_line(row: dict[str, Any]) -> str:
    """A row of `smalltalk.harness.run_lm_eval`'s table: model, task, metric, value ± stderr."""
    stderr = f" ± {row['stderr']:.3f}" if row["stderr"] is not None else ""
    return (
        f"{row['model']:<8} {row['task']:<24} {row['metric']:<10} "
        f"{row['value']:.4f}{stderr}  ({row['examples']} examples)"
    )
