"""The texts a serving command is given: arguments, then a file (`-`: stdin), else stdin."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterable, Sequence

from smalltalk.unicode import unicode_problem

# Bytes that are not UTF-8 are read as lone surrogates (U+DC80..U+DCFF), to be named with their
# line; a text file's own characters never are, since UTF-8 cannot encode a surrogate.
NOT_UTF8 = "surrogateescape"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# What json.loads raises on a line that is JSON but too much for Python: an integer of more than
# sys.get_int_max_str_digits() digits (ValueError), arrays nested past the stack (RecursionError).
JSON_LIMITS = (ValueError, RecursionError)


def read_texts(arguments: Sequence[str], file: str | None) -> list[str]:
    """Texts from `arguments`, then from `file` (`-`: stdin); from stdin when neither is given.

    A file holds one text per line; a line that parses as a JSON object is a record whose "text"
    field (a string) is the text, so texts may hold newlines. A record without a string "text"
    is an error naming the file and line, not a text. Any other line, one that starts with "{"
    but is not valid JSON included, is a text as it stands; JSON that Python cannot read (nested
    too deep, an integer too long) is an error naming the line. Blank lines are skipped. Every
    text must be UTF-8 (valid Unicode: JSON's "\\ud800" is not), and there must be at least
    one; a line that is not is named by its number."""
    texts = list(arguments)
    for position, text in enumerate(texts, 1):
        if unicode_problem(text) is not None:  # bytes that are not UTF-8 arrive as surrogates
            raise ValueError(f"text argument {position}: not UTF-8 text")
    if file is not None and str(file) != "-":
        try:
            with open(file, encoding="utf-8", errors=NOT_UTF8) as lines:
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
        stdin = io.BytesIO(sys.stdin.buffer.read())
        return _read(io.TextIOWrapper(stdin, "utf-8", errors=NOT_UTF8), "stdin")
    return _read(sys.stdin, "stdin")


def _read(lines: Iterable[str], source: str) -> list[str]:
    return [_text_of(line, source, number) for number, line in enumerate(lines, 1) if line.strip()]


def _text_of(line: str, source: str, number: int) -> str:
    """A line's text: the "text" field of a JSON object, or the line itself."""
    line = line.rstrip("\n")
    escaped = _ESCAPED_BYTE.search(line)  # before JSON, whose "\\udc80" is valid UTF-8
    if escaped is not None:
        byte, position = ord(escaped.group()) - 0xDC00, escaped.start()
        raise ValueError(
            f"{source}: not UTF-8 text at line {number} (byte 0x{byte:02X} at position {position})"
        )
    text = line
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None  # a text that starts with "{", such as code
        except JSON_LIMITS as error:
            raise ValueError(
                f"{source}, line {number}: JSON that Python cannot read ({error})"
            ) from None
        if isinstance(record, dict):
            if "text" not in record:
                keys = ", ".join(map(repr, record)) or "none"
                raise ValueError(
                    f'{source}, line {number}: a JSON object without a "text" field (its keys: '
                    f"{keys})"
                )
            text = record["text"]
            if not isinstance(text, str):
                raise ValueError(
                    f'{source}, line {number}: "text" is {json.dumps(text)[:40]}, not a string'
                )
    problem = unicode_problem(text)  # JSON's escapes can spell a lone surrogate
    if problem is not None:
        raise ValueError(f"{source}, line {number}: not valid Unicode ({problem})")
    return text
