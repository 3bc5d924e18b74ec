"""The one place a node agent's device driver and artifact store are built from its settings.

This is the seam for the plain-adb driver and the Supabase store: `build_driver`
and `build_store` pick the implementation by config; `run_node` (agent.py) calls
them once at start-up and everything else sees only the `DeviceDriver` and
`ArtifactStore` protocols.
"""

from __future__ import annotations

from services.node.artifacts import ArtifactStore, LocalArtifactStore
from services.node.driver import DeviceDriver
from services.node.settings import NodeSettings
from services.node.vendor_client import VendorClient


def build_driver(settings: NodeSettings) -> DeviceDriver:
    """The vendor program's WebSocket API (default; requests wait for it with backoff), or plain adb."""
    if settings.driver == "adb":
        from services.node.adb_driver import AdbDriver  # the `adb` extra: not every node PC installs it

        return AdbDriver(settings.adb_host, settings.adb_port, max_concurrency=settings.slots,
                         request_timeout_s=settings.vendor_request_timeout_s,
                         drain_grace_s=settings.drain_grace_s)
    return VendorClient(
        settings.vendor_url,
        pool_size=settings.vendor_pool_size or settings.slots,
        request_timeout_s=settings.vendor_request_timeout_s,
        backoff_base_s=settings.vendor_backoff_base_s,
        backoff_max_s=settings.vendor_backoff_max_s,
        ping_interval_s=settings.vendor_ping_interval_s,
        screenshot_wait_s=settings.vendor_screenshot_wait_s,
        connect_retry=True,
        drain_grace_s=settings.drain_grace_s,
    )


def build_store(settings: NodeSettings) -> ArtifactStore:
    """The local filesystem store under `artifact_dir` (the embedded default), or Supabase Storage."""
    if settings.store == "supabase":
        from services.node.supabase_store import SupabaseArtifactStore  # the `supabase` extra

        return SupabaseArtifactStore(settings.supabase_url, settings.supabase_key, settings.supabase_bucket)
    return LocalArtifactStore(settings.artifact_dir)
