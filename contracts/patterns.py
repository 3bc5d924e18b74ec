"""Recipe regular expressions, matched in linear time (RE2).

Param `pattern`s (checked by the backend when a run is created) and `assert`
step patterns (evaluated on the node against a step's output) come from recipe
authors and meet values from operators and devices. A backtracking engine
(Python's `re`) takes exponential time on patterns such as `(a+)+$`; RE2 matches
in time linear in the input, whatever the pattern, and refuses what would need
backtracking (backreferences `\\1`, lookaround `(?=`, `(?<!`, possessive or atomic
groups) at compile time, so a recipe using them is refused when it is published.

The syntax is RE2's (close to Python's for everything else: classes, anchors,
`(?P<name>...)`, `(?i)`, repetition `{n,m}` up to 1000).
"""

from __future__ import annotations

import functools
from typing import Any, Final

import re2

MAX_PATTERN_CHARS: Final = 1024
# Memory RE2 may use for one compiled pattern: bounds the compile time and size too.
_MAX_MEM: Final = 8 << 20


class PatternError(ValueError):
    """A pattern RE2 does not accept (invalid, too big, or needing backtracking)."""


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    options.max_mem = _MAX_MEM
    return options


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> Any:
    """The compiled pattern, or `PatternError` saying why RE2 refuses it."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"patterns are at most {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise PatternError(f"not a valid RE2 pattern (no backreferences or lookaround): {text}") from None


def fullmatch(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).fullmatch(text) is not None


def search(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).search(text) is not None
