"""Text that is not valid Unicode: one check for every place text enters the package.

A Python string can hold a lone surrogate (U+D800..U+DFFF) that no UTF-8 byte sequence encodes:
JSON allows it ("\\ud800" is valid JSON), and Python turns the bytes of an argument that are not
UTF-8 into such code points. SentencePiece, pyarrow and the tokenizer's sample all fail on it
with messages that name no file and no line, so text is checked where it comes in: the corpus
readers (a bad record), the tokenizer's sample (through the readers), the texts of the serving
commands and the `Mixture`'s methods (a ValueError naming the text).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Every surrogate in a str is a lone one: a valid pair is decoded to one code point above U+FFFF
# (by json.loads and by the UTF-8 codec), so a match is exactly what UTF-8 cannot encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode ("lone surrogate U+D800 at position 3"), or None."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return f"lone surrogate U+{ord(found.group()):04X} at position {found.start()}"


def check_unicode(text: str, what: str = "text") -> None:
    """Raise ValueError "`what` is not valid Unicode (lone surrogate ...)" for a bad `text`."""
    problem = unicode_problem(text)
    if problem is not None:
        raise ValueError(f"{what} is not valid Unicode ({problem})")


def check_texts(texts: Sequence[str]) -> None:
    """`check_unicode` for each of `texts`, named "text N" counting from 1."""
    for number, text in enumerate(texts, 1):
        check_unicode(text, f"text {number}")
