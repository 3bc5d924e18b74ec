"""Artifact stores and the artifact path convention (DESIGN.md rule 10).

The key of a screenshot is `path_template` rendered with the run's params and
`node_id`, `device_serial`, `run_id`, `timestamp` (epoch seconds); the default
is `{youtubeVideoId}/{node_id}/{device_serial}/{run_id}/{timestamp}.png`. The
template and the segment rule live in `contracts.artifact_path`, which the
backend also uses to check a run's params when the run is created.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from contracts.artifact_path import ArtifactPathError
from contracts.artifact_path import render_key as _render_key
from contracts.local_names import local_path
from runtime.paths import PathEscape, contained
from services.node.errors import NodeError


class ArtifactError(NodeError):
    """A store could not take or give an artifact (unreachable, refused): worth another try within the
    step's upload timeout."""

    code = "artifact_error"
    retryable = True


class ArtifactKeyEscape(ArtifactError):
    """A key that would leave the local store's root (`..`, absolute, a symlink out): never retried."""

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
    """Render the path template with the shared segment rule (`contracts.artifact_path.render_key`)."""
    try:
        return _render_key(template, values)
    except ArtifactPathError as exc:
        raise ArtifactError(str(exc)) from None


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

    def _path_of(self, key: str) -> Path:
        """Where `key` lives on this disk: each segment as a name every filesystem accepts (contracts.local_names)."""
        try:
            return contained(self.root, *local_path(key).parts)
        except (PathEscape, ValueError) as exc:
            raise ArtifactKeyEscape(f"artifact key escapes the store: {exc}") from None

    def _put(self, key: str, source: Path) -> StoredArtifact:
        final_key, final = key, self._path_of(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        stem, dot, suffix = key.rpartition("/")[2].rpartition(".")
        n = 1
        while final.exists():  # two screenshots in one second: keep both
            name = f"{stem}-{n}.{suffix}" if dot else f"{suffix}-{n}"
            final_key = f"{key.rpartition('/')[0]}/{name}" if "/" in key else name
            final = self._path_of(final_key)
            n += 1
        tmp = final.with_name(final.name + ".part")
        shutil.copyfile(source, tmp)
        tmp.replace(final)
        return StoredArtifact(self.name, final_key, final.as_uri(), final.stat().st_size, _sha256(final))

    async def put(self, key: str, source: Path, content_type: str) -> StoredArtifact:
        return await asyncio.to_thread(self._put, key, source)
