"""The Supabase artifact store, through the official `supabase` client.

A mock at a boundary nothing here can run: a hosted Supabase project. The
Storage REST endpoint is a small local HTTP server (tests/supabase_support.py)
answering the calls the client makes; the client and the store are real.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.node.artifacts import ArtifactError, render_key
from services.node.settings import DEFAULT_PATH_TEMPLATE
from services.node.supabase_store import SupabaseArtifactStore
from services.simulator.png import make_png
from tests.supabase_support import FakeStorage, serving

SERVICE_KEY = "service-role-key-for-tests"


def screenshot(tmp_path: Path) -> Path:
    path = tmp_path / "shot.png"
    path.write_bytes(make_png(40, 80, seed=3))
    return path


async def test_upload_download_and_signed_url(tmp_path: Path) -> None:
    storage = FakeStorage(SERVICE_KEY)
    source = screenshot(tmp_path)
    key = render_key(DEFAULT_PATH_TEMPLATE, {"youtubeVideoId": "dQw4w9WgXcQ", "node_id": "node-A1",
                                             "device_serial": "ABC123", "run_id": "r-1", "timestamp": "1739012345"})
    async with serving(storage) as url:
        store = SupabaseArtifactStore(url, SERVICE_KEY, "artifacts")
        stored = await store.put(key, source, "image/png")
        data = source.read_bytes()
        assert stored.store == "supabase" and stored.key == "dQw4w9WgXcQ/node-A1/ABC123/r-1/1739012345.png"
        assert stored.uri == f"supabase://artifacts/{key}"
        assert stored.bytes == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
        assert storage.objects[f"artifacts/{key}"] == (data, "image/png")
        assert await store.get(key) == data
        signed = await store.signed_url(key, 600)
        assert signed.startswith(f"{url}/storage/v1/object/sign/artifacts/{key}?token=t-600")
        # A retry of the same upload (its first answer lost) stores the same bytes again.
        again = await store.put(key, source, "image/png")
        assert again.sha256 == stored.sha256 and storage.uploads == 2


async def test_failures_are_artifact_errors(tmp_path: Path) -> None:
    storage = FakeStorage(SERVICE_KEY, fail_uploads=1)
    source = screenshot(tmp_path)
    async with serving(storage) as url:
        store = SupabaseArtifactStore(url, SERVICE_KEY, "artifacts")
        with pytest.raises(ArtifactError, match="storage is overloaded"):
            await store.put("a/b.png", source, "image/png")
        assert (await store.put("a/b.png", source, "image/png")).bytes == source.stat().st_size
        with pytest.raises(ArtifactError, match="Object not found"):
            await store.signed_url("a/missing.png")
        wrong = SupabaseArtifactStore(url, "wrong-key", "artifacts")
        with pytest.raises(ArtifactError, match="invalid signature"):
            await wrong.put("a/c.png", source, "image/png")
    unreachable = SupabaseArtifactStore(url, SERVICE_KEY, "artifacts")
    with pytest.raises(ArtifactError, match="unreachable"):
        await unreachable.put("a/d.png", source, "image/png")
    with pytest.raises(ValueError, match="SUPABASE_URL"):
        SupabaseArtifactStore("", SERVICE_KEY, "artifacts")
