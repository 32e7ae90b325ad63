"""The texts a serving command is given: arguments, then a file (`-`: stdin), else stdin."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Sequence


def read_texts(arguments: Sequence[str], file: str | None) -> list[str]:
    """Texts from `arguments`, then from `file` (`-`: stdin); from stdin when neither is given.
    A file holds one text per line, or JSON lines with a "text" field (texts with newlines).
    Every text must be UTF-8, and there must be at least one."""
    texts = list(arguments)
    for position, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
            raise ValueError(f"text argument {position}: not UTF-8 text") from None
    if file is not None and str(file) != "-":
        try:
            with open(file, encoding="utf-8") as lines:
                texts += _read(lines, file)
        except OSError as error:  # missing, a directory, no permission
            raise ValueError(f"{file}: cannot read it: {error.strerror}") from None
    elif file is not None or not texts:
        if sys.stdin.isatty() and not texts:
            raise ValueError("give texts as arguments, with --file, or on stdin")
        texts += _stdin()
    if not texts:
        raise ValueError(f"no texts in {file or 'stdin'}")
    return texts


def _stdin() -> list[str]:
    if hasattr(sys.stdin, "buffer"):  # as UTF-8, whatever the locale
        return _read(io.TextIOWrapper(io.BytesIO(sys.stdin.buffer.read()), "utf-8"), "stdin")
    return _read(sys.stdin, "stdin")


def _read(lines: Iterable[str], source: str) -> list[str]:
    try:
        return [_text_of(line) for line in lines if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 text ({error.reason})") from None


def _text_of(line: str) -> str:
    """A line's text: the "text" field of a JSON object, or the line itself."""
    line = line.rstrip("\n")
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return line
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            return record["text"]
    return line
