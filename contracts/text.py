"""Which characters a string from the wire may hold, and the limits on its length.

Two rules, each a regular expression that the JSON Schema of every request
field carries (so the OpenAPI document states it) and that the backend checks:

* `PLAIN`: no control character at all (Unicode category Cc: U+0000–U+001F,
  U+007F–U+009F). Identifiers, parameter values, commands, URLs, patterns:
  everything that ends up in a command line, a path, a URL, a NATS subject or a
  log line.
* `FREE_TEXT`: tab, line feed and carriage return are allowed, no other control
  character. Only human prose: recipe, parameter and step titles and descriptions.

NUL in particular can never reach PostgreSQL (which cannot store it in `text` or
`jsonb`). `control_faults` walks a decoded JSON document (keys included) and
reports every string that breaks the looser rule with its JSON path, so even a
field whose type forgets its pattern cannot carry a NUL into the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, Final

from msgspec import Meta

# Longest value of a run parameter (and of a recipe's string fields such as a command element).
MAX_TEXT_CHARS: Final = 4096
# Longest title or description in a recipe.
MAX_PROSE_CHARS: Final = 16_384

PLAIN_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]*$"
FREE_TEXT_PATTERN: Final = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
_PLAIN_BAD: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ANY_BAD: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

PLAIN_MESSAGE: Final = "must not contain control characters (U+0000–U+001F, U+007F–U+009F)"
FREE_TEXT_MESSAGE: Final = "must not contain control characters other than tab, line feed and carriage return"

# A string field of a request: bounded, no control characters.
PlainText = Annotated[str, Meta(max_length=MAX_TEXT_CHARS, pattern=PLAIN_PATTERN)]
# Human prose: tab, line feed and carriage return allowed.
FreeText = Annotated[str, Meta(max_length=MAX_PROSE_CHARS, pattern=FREE_TEXT_PATTERN)]

# msgspec reports a pattern mismatch as "Expected `str` matching regex '…'"; say what it means instead.
_MESSAGES: Final = {PLAIN_PATTERN: PLAIN_MESSAGE, FREE_TEXT_PATTERN: FREE_TEXT_MESSAGE}


def has_control(text: str) -> bool:
    """True when `text` breaks the PLAIN rule."""
    return _PLAIN_BAD.search(text) is not None


def explain(message: str) -> str:
    """A msgspec error message, with the two text patterns said in words."""
    for pattern, words in _MESSAGES.items():
        if repr(pattern) in message or pattern in message:
            return words
    return message


def _walk(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, str):
        if _ANY_BAD.search(value):
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _ANY_BAD.search(key):
                yield f"{path} (a key)"
                continue
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")


def control_faults(doc: Any, root: str = "$", limit: int = 50) -> list[tuple[str, str]]:
    """(path, message) for every string (or key) holding a control character other than tab/LF/CR."""
    out: list[tuple[str, str]] = []
    for path in _walk(doc, root):
        out.append((path, "contains a control character (only tab, line feed and carriage return are"
                          " allowed, and only in titles and descriptions)"))
        if len(out) >= limit:
            break
    return out


def whole_numbers(value: Any) -> Any:
    """The document with every float that is a whole number (`1.0`, `-0.0`, `1e3`) made an int.

    JSON Schema counts `1.0` as an integer; so does the server, which therefore
    accepts exactly what its schema says. Other floats are left as they are.
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def clip(text: str, limit: int = 64) -> str:
    """`text` cut to `limit` characters (with '…' and the full length) for echoing in an error or a log."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"
