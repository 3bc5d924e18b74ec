"""Where an operator can fetch a run's artifacts over HTTP: Supabase signed URLs, or the backend itself.

The node records each artifact with its store name (`local` or `supabase`),
key and URI. For `supabase` the backend asks Supabase Storage (official
client) for a signed URL valid `signed_url_ttl_s`. For `local` (the store of
`doai up`, a folder the backend can read: `DOAI_ARTIFACT_DIR`) the backend
serves the file itself at `GET /v1/artifacts/local/{key}`: with the operator's
bearer token, or with the `expires` and `sig` query parameters of the link
answered here (an HMAC-SHA256 of the key and expiry under a key only the
backend holds, valid `signed_url_ttl_s`), so a browser or a Grafana image cell
can open it without the token. `path` is the file on the backend's machine.
A link that cannot be made leaves `url` empty and says why in `error`; the rest
of the list is still answered.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import structlog

from contracts.api import ArtifactLink
from contracts.local_names import local_path
from runtime.paths import PathEscape, contained
from services.backend.runs import iso

log = structlog.get_logger(__name__)


ARTIFACT_ROUTE = "/v1/artifacts/"


async def shared_url_key(pool: asyncpg.Pool, configured: str | None) -> str:
    """The key that signs download links, kept in `fleet_settings` so every backend (and `artifact_url()` in
    SQL, for Grafana) signs alike and links outlive a restart: DOAI_ARTIFACT_URL_KEY when set, else the one
    stored, else a new random one."""
    if configured:
        await pool.execute("INSERT INTO fleet_settings (name, value) VALUES ('artifact_url_key', $1)"
                           " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", configured)
        return configured
    await pool.execute("INSERT INTO fleet_settings (name, value) VALUES ('artifact_url_key', $1)"
                       " ON CONFLICT (name) DO NOTHING", secrets.token_hex(32))
    key: str = await pool.fetchval("SELECT value FROM fleet_settings WHERE name = 'artifact_url_key'")
    return key


async def publish_link_settings(pool: asyncpg.Pool, public_url: str, ttl_s: int) -> None:
    """Where `artifact_url()` points links, and for how long they are valid."""
    await pool.executemany(
        "INSERT INTO fleet_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = $2",
        [("api_public_url", public_url.rstrip("/")), ("artifact_url_ttl_s", str(ttl_s))])


class ArtifactLinker:
    def __init__(self, *, artifact_dir: str | None = None, supabase_url: str | None = None,
                 supabase_key: str | None = None, bucket: str = "artifacts", ttl_s: int = 3600,
                 url_key: bytes | None = None) -> None:
        self._root = Path(artifact_dir).resolve() if artifact_dir else None
        # Signs local download links; a fresh one per process unless configured (links then end at a restart).
        self._url_key = url_key or secrets.token_bytes(32)
        self._supabase_url = supabase_url
        self._supabase_key = supabase_key
        self._bucket = bucket
        self._ttl_s = ttl_s
        self._client: Any = None

    @property
    def root(self) -> Path | None:
        return self._root

    def signature(self, store: str, key: str, expires: int) -> str:
        return hmac.new(self._url_key, f"{store}\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def signature_ok(self, store: str, key: str, expires: int, sig: str) -> bool:
        """A link made for this store and key (here or by `artifact_url()` in SQL), not yet expired."""
        return expires >= int(time.time()) and hmac.compare_digest(self.signature(store, key, expires), sig)

    def contained(self, key: str) -> Path | None:
        """The file of a local key, as the node's local store names it on disk (each segment mapped by
        `contracts.local_names`), symlinks resolved, when it lies inside the store's root; else None."""
        if self._root is None:
            return None
        try:
            return contained(self._root, *local_path(key).parts)
        except (PathEscape, ValueError):
            return None

    def link(self, store: str, key: str, base_url: str) -> str:
        """This API's signed, expiring download link for an artifact."""
        expires = int(time.time()) + self._ttl_s
        return (f"{base_url.rstrip('/')}{ARTIFACT_ROUTE}{store}/{quote(key, safe='/')}"
                f"?expires={expires}&sig={self.signature(store, key, expires)}")

    async def signed_storage_url(self, key: str) -> tuple[str | None, str | None]:
        """A fresh Supabase signed URL for one key: (url, error)."""
        return (await self._signed([key]))[key]

    def _local(self, row: asyncpg.Record, base_url: str | None) -> tuple[str | None, str | None, str | None]:
        if self._root is not None:
            path = self.contained(row["key"])
            if path is None:
                return None, None, "artifact key escapes the local store"
            if base_url is None:
                return path.as_uri(), str(path), None
            return self.link("local", row["key"], base_url), str(path), None
        uri = row["uri"]
        parts = urlsplit(uri)
        if parts.scheme == "file":
            return uri, unquote(parts.path), None
        return None, None, "local artifact has no file URI and DOAI_ARTIFACT_DIR is not set"

    async def _storage(self) -> Any:
        if self._client is None:
            from supabase import acreate_client

            assert self._supabase_url is not None and self._supabase_key is not None
            self._client = await acreate_client(self._supabase_url, self._supabase_key)
        return self._client.storage.from_(self._bucket)

    async def _signed(self, keys: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """key → (signed url, error)."""
        if not keys:
            return {}
        if not (self._supabase_url and self._supabase_key):
            return {k: (None, "Supabase is not configured on the backend (SUPABASE_URL, SUPABASE_SERVICE_KEY)")
                    for k in keys}
        try:
            bucket = await self._storage()
            answers = await bucket.create_signed_urls(keys, self._ttl_s)
        except Exception as exc:  # the listing still answers; each link says what failed
            log.warning("signing artifact URLs failed", error_type=type(exc).__name__, count=len(keys))
            return {k: (None, f"Supabase Storage did not sign the URL: {type(exc).__name__}") for k in keys}
        signed: dict[str, tuple[str | None, str | None]] = {}
        for answer in answers:
            url = answer.get("signedURL") or answer.get("signedUrl")
            signed[answer.get("path") or ""] = (url or None, answer.get("error") or (None if url else "not signed"))
        return {k: signed.get(k, (None, "Supabase Storage returned no URL for this key")) for k in keys}

    async def links(self, rows: Sequence[asyncpg.Record], base_url: str | None = None) -> list[ArtifactLink]:
        """Links for artifact rows; `base_url` (the API's own address) makes local links HTTP URLs."""
        signed = await self._signed([r["key"] for r in rows if r["store"] == "supabase"])
        out = []
        for r in rows:
            path: str | None = None
            if r["store"] == "local":
                url, path, error = self._local(r, base_url)
            elif r["store"] == "supabase":
                url, error = signed[r["key"]]
            else:
                url, error = None, f"unknown artifact store {r['store']!r}"
            out.append(ArtifactLink(
                node_id=r["node_id"], device_serial=r["device_serial"], step_id=r["step_id"], store=r["store"],
                key=r["key"], bytes=r["bytes"], sha256=r["sha256"], content_type=r["content_type"],
                created_at=iso(r["created_at"]) or "", url=url, path=path, error=error,
                kind=r["kind"],
            ))
        return out
