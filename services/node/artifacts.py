"""Artifact stores and the artifact path convention (DESIGN.md rule 10).

The key of a screenshot is `path_template` rendered with the run's params and
`node_id`, `device_serial`, `run_id`, `timestamp` (epoch seconds); the default
is `{youtubeVideoId}/{node_id}/{device_serial}/{run_id}/{timestamp}.png`.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from runtime.paths import PathEscape, contained


class ArtifactError(Exception):
    code = "artifact_error"


class ArtifactPathError(ArtifactError):
    """A key that would leave the store's root: never retried."""

    code = "artifact_path"
    retryable = False


@dataclass(frozen=True)
class StoredArtifact:
    store: str
    key: str
    uri: str
    bytes: int
    sha256: str


def render_key(template: str, values: dict[str, str]) -> str:
    """Render the path template; every segment must be a plain name (no '..', no '/', no '%').

    '%' is refused too: a store that percent-decodes keys (Supabase Storage's client
    does) would otherwise turn `%2F` into extra folders.
    """
    fields: dict[str, str] = {}
    for name, value in values.items():
        if any(c in value for c in "/\\%") or value in ("", ".", "..") or not value.isprintable():
            fields[name] = "\0"  # caught below if the template uses it
        else:
            fields[name] = value
    try:
        key = template.format_map(fields)
    except KeyError as exc:
        raise ArtifactError(f"artifact path template needs the run param {exc.args[0]!r}") from None
    if "\0" in key or key.startswith("/"):
        raise ArtifactError("artifact path would contain an empty or '..' segment, or a '/', '\\' or '%'")
    return key


class ArtifactStore(Protocol):
    name: str

    async def put(self, key: str, source: Path, content_type: str) -> StoredArtifact: ...


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalArtifactStore:
    """Files under a root folder: the embedded default."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _put(self, key: str, source: Path) -> StoredArtifact:
        try:
            target = contained(self.root, key)
        except PathEscape as exc:
            raise ArtifactPathError(f"artifact key escapes the store: {exc}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        final_key, final = key, target
        while final.exists():  # two screenshots in one second: keep both
            final = target.with_name(f"{target.stem}-{n}{target.suffix}")
            final_key = str(final.relative_to(self.root))
            n += 1
        tmp = final.with_name(final.name + ".part")
        shutil.copyfile(source, tmp)
        tmp.replace(final)
        return StoredArtifact(self.name, final_key, final.as_uri(), final.stat().st_size, _sha256(final))

    async def put(self, key: str, source: Path, content_type: str) -> StoredArtifact:
        return await asyncio.to_thread(self._put, key, source)
