"""Names every filesystem accepts, for artifact keys and ids used as local folder and file names.

Node PCs are usually Windows machines. A Wi-Fi serial such as
`192.168.0.5:5555` is a fine artifact key segment (rule 10, remote stores keep
it as is) but not a Windows file name: `:` and `<>"|?*\\`, control
characters, trailing dots or spaces and the reserved device names (`CON`,
`NUL`, `COM1`, …) are not allowed there. `local_segment` maps one segment to a
name that every filesystem accepts by percent-encoding exactly what would be
refused (and `%` itself, so the mapping is one-to-one and reversible);
`local_path` applies it to each segment of a `/`-separated key.

Ordinary keys (letters, digits, `-`, `_`, `.`) are unchanged, so a Linux
deployment's folders look as the path convention says.
"""

from __future__ import annotations

from pathlib import PurePath

# Refused in Windows file names, plus '%' (the escape character itself).
_ESCAPED = frozenset('<>:"/\\|?*%')
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                       *(f"LPT{i}" for i in range(1, 10))})


def _escape(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8"))


def local_segment(segment: str) -> str:
    """One path segment as a name Windows, macOS and Linux all accept (reversible with `unquote`)."""
    if segment in ("", ".", ".."):
        raise ValueError(f"not a file name: {segment!r}")
    name = "".join(_escape(c) if c in _ESCAPED or ord(c) < 32 or ord(c) == 127 else c for c in segment)
    # Windows drops trailing dots and spaces, which would merge two different names.
    stripped = name.rstrip(". ")
    if stripped != name:
        name = stripped + "".join(_escape(c) for c in name[len(stripped):])
    # `NUL`, `nul.png`, `COM1.txt`: the part before the first dot must not be a device name.
    stem, dot, rest = name.partition(".")
    if stem.upper() in _RESERVED:
        name = _escape(stem[0]) + stem[1:] + dot + rest
    return name


def local_path(key: str) -> PurePath:
    """A `/`-separated artifact key as a relative path of local names, one segment each."""
    return PurePath(*(local_segment(part) for part in key.split("/")))
