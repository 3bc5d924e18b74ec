"""Artifacts in Supabase Storage, through the official `supabase` client.

Objects go to `bucket` under the key of the path convention (DESIGN.md rule
10), with content type `image/png`. The upload uses `x-upsert: true`, so a
retry after an upload whose answer was lost stores the same bytes again
instead of failing on "already exists". Failures raise `ArtifactError`; the
executor keeps the screenshot in its spool and retries within the step's
upload timeout.

Point a node at a real project with
`DOAI_ARTIFACT_STORE=supabase SUPABASE_URL=https://<project>.supabase.co
SUPABASE_SERVICE_KEY=<service-role key> DOAI_SUPABASE_BUCKET=<bucket>`;
the bucket must exist. The key is a secret: it is never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import structlog
from storage3.exceptions import StorageApiError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from services.node.artifacts import ArtifactError, StoredArtifact

log = structlog.get_logger(__name__)


class SupabaseArtifactStore:
    name = "supabase"

    def __init__(self, url: str, key: str, bucket: str, *, signed_url_ttl_s: int = 3600,
                 request_timeout_s: float = 20.0) -> None:
        if not url or not key or not bucket:
            raise ValueError("the Supabase store needs SUPABASE_URL, SUPABASE_SERVICE_KEY and a bucket")
        self.url = url.rstrip("/")
        self._key = key
        self.bucket = bucket
        self.signed_url_ttl_s = signed_url_ttl_s
        self.request_timeout_s = request_timeout_s
        self._client: AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def _bucket(self) -> Any:
        async with self._lock:
            if self._client is None:
                try:
                    # Our own HTTP client (with the request timeout) instead of supabase-py's deprecated
                    # per-service timeout arguments.
                    options = AsyncClientOptions(httpx_client=httpx.AsyncClient(timeout=self.request_timeout_s))
                    self._client = await acreate_client(self.url, self._key, options)
                except Exception as exc:  # the client validates URL and key shape
                    raise ArtifactError(f"cannot create the Supabase client for {self.url}: {exc}") from None
        return self._client.storage.from_(self.bucket)

    async def put(self, key: str, source: Path, content_type: str) -> StoredArtifact:
        data = await asyncio.to_thread(source.read_bytes)
        bucket = await self._bucket()
        try:
            await bucket.upload(key, data, {"content-type": content_type, "upsert": "true"})
        except StorageApiError as exc:
            raise ArtifactError(f"Supabase Storage refused {self.bucket}/{key}: {exc.message}") from None
        except (httpx.HTTPError, OSError) as exc:
            raise ArtifactError(f"Supabase Storage unreachable at {self.url}: {exc!r}") from None
        log.info("artifact uploaded", store=self.name, bucket=self.bucket, key=key, bytes=len(data))
        return StoredArtifact(self.name, key, f"supabase://{self.bucket}/{key}", len(data),
                              hashlib.sha256(data).hexdigest())

    async def signed_url(self, key: str, expires_in_s: int | None = None) -> str:
        """A time-limited download URL for an artifact (what the REST API hands to operators)."""
        bucket = await self._bucket()
        try:
            answer = await bucket.create_signed_url(key, expires_in_s or self.signed_url_ttl_s)
        except StorageApiError as exc:
            raise ArtifactError(f"cannot sign {self.bucket}/{key}: {exc.message}") from None
        url = answer.get("signedURL")
        if not url:
            raise ArtifactError(f"Supabase Storage returned no signed URL for {self.bucket}/{key}")
        return str(url)

    async def get(self, key: str) -> bytes:
        bucket = await self._bucket()
        try:
            data: bytes = await bucket.download(key)
        except StorageApiError as exc:
            raise ArtifactError(f"cannot download {self.bucket}/{key}: {exc.message}") from None
        return data
