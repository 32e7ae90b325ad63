"""Where a measurement record comes from: the commit, the processor, the precision and the date
that every file under benchmarks/ is stamped with, so a figure is never read without them."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def commit(repo: Path = REPO) -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it; "unknown"
    outside a git checkout (an installed package)."""
    try:
        head = _git(repo, "rev-parse", "--short=10", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def processor() -> str:
    """The CPU's model name and the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def precisions(runs: Iterable[str | os.PathLike]) -> str:
    """The training precisions and devices of the runs' experts (their summary.json files)."""
    seen = set()
    for run in runs:
        for summary in sorted(Path(run).glob("experts/e*/summary.json")):
            data = json.loads(summary.read_text())
            seen.add(f"{data.get('precision', '?')} on {data.get('device', '?')}")
    return ", ".join(sorted(seen)) or "unknown"


def stamp(runs: Iterable[str | os.PathLike] = ()) -> str:
    """One line for a record's head: commit, processor, precision, date (UTC)."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"Commit {commit()}; processor {processor()}; precision {precisions(runs)}; {today}."
