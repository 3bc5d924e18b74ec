"""Paths built from data that came over the wire stay inside their root folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath


def _show(text: str) -> str:
    return repr(text[:200])  # untrusted: bounded in messages and logs


class PathEscape(ValueError):
    """A path that would leave its root (absolute part, `..`, a symlink pointing out, a NUL)."""

    code = "path_escape"


def contained(root: Path, *parts: str) -> Path:
    """`root / parts...`, resolved, or `PathEscape` if it is not strictly inside `root`.

    Every part must be relative on POSIX and on Windows (no `/x`, `C:x`, `\\\\host\\share`),
    non-empty and free of NUL; the joined path is resolved (symlinks followed, `..`
    collapsed) and must lie inside the resolved root. A symlink inside the root that
    points outside therefore counts as an escape.
    """
    base = root.resolve()
    for part in parts:
        if not part or "\0" in part:
            raise PathEscape(f"empty path segment or NUL under {base}")
        if PurePosixPath(part).is_absolute() or PureWindowsPath(part).anchor:
            raise PathEscape(f"absolute path {_show(part)} where a name under {base} was expected")
    target = base.joinpath(*parts).resolve()
    if target == base or not target.is_relative_to(base):
        raise PathEscape(f"path {_show('/'.join(parts))} leaves {base}")
    return target


def contained_below(base: Path, *parts: str) -> Path:
    """`contained(base, *parts)` for a `base` resolved once beforehand, with one `lstat` per part.

    For a hot path (the node's spool folder of every task): while each part is one plain name (no
    separator, `.`, `..`, drive or NUL) and no existing entry on the way is a symlink (or, on
    Windows, another reparse point such as a junction), `base / parts...` is already its own
    resolution and lies inside `base`; the first entry that does not exist ends the walk (nothing
    below it can be a link). Anything else is decided by `contained`, so the answer is the same.
    """
    for part in parts:
        if (part in ("", ".", "..") or "\0" in part or "/" in part or "\\" in part
                or PureWindowsPath(part).drive):
            return contained(base, *parts)
    path = base
    for part in parts:
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return base.joinpath(*parts)
        if stat.S_ISLNK(st.st_mode) or getattr(st, "st_reparse_tag", False):
            return contained(base, *parts)
    return path
