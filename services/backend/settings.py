"""Backend configuration, from the environment (`doai backend --help` lists it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from contracts.recipe import DEFAULT_STEP_TIMEOUT_MS, DEFAULT_UPLOAD_TIMEOUT_MS

MIN_NODE_SECRET_BYTES = 32


class SettingsError(ValueError):
    """Configuration the backend refuses to start with (message says what to set)."""


def _node_slots(text: str) -> dict[str, int]:
    """`node-1=10,node-2=30` → {"node-1": 10, "node-2": 30}."""
    slots: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise SettingsError(f"DOAI_NODE_SLOTS: {item!r} is not node_id=slots")
        slots[node.strip()] = int(value)
    return slots


@dataclass
class BackendSettings:
    database_url: str
    nats_url: str
    api_tokens: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    # NODE_AGENT_SHARED_SECRET: what nodes send as X-Node-Auth (rule 8). Never logged or returned.
    node_secret: str = field(default="", repr=False)
    max_body_bytes: int = 1_048_576
    # Deepest JSON nesting a request body may have (a recipe needs about 5).
    max_json_depth: int = 32
    # How often the relay looks for unsent broadcasts when nothing woke it up.
    relay_poll_s: float = 1.0
    # How often missing streams and node command consumers are re-declared (services/backend/keeper.py).
    keeper_every_s: float = 3.0
    # Devices whose last inventory is older than this are not targeted.
    device_stale_s: float = 60.0
    # What `GET /v1/node/config` answers: slots per node (default and overrides) and step timeouts.
    default_node_slots: int = 20
    node_slots: dict[str, int] = field(default_factory=dict)
    step_timeout_ms: int = DEFAULT_STEP_TIMEOUT_MS
    upload_timeout_ms: int = DEFAULT_UPLOAD_TIMEOUT_MS
    # Local artifact store root (for `GET /v1/runs/{id}/artifacts` paths); None: use the stored URI only.
    artifact_dir: str | None = None
    # Supabase Storage, for signed artifact URLs (the service key is a secret: never logged).
    supabase_url: str | None = None
    supabase_key: str | None = field(default=None, repr=False)
    supabase_bucket: str = "artifacts"
    signed_url_ttl_s: int = 3600

    def check(self) -> None:
        """Raise `SettingsError` for a configuration the backend must not start with."""
        if not self.api_tokens:
            raise SettingsError("set DOAI_API_TOKEN (one or more comma-separated tokens)")
        if not 0.1 <= self.keeper_every_s <= 3600:
            raise SettingsError(f"DOAI_NATS_KEEPER_S must be between 0.1 and 3600, got {self.keeper_every_s}")
        if not self.node_secret:
            raise SettingsError("set NODE_AGENT_SHARED_SECRET (the X-Node-Auth secret, at least 32 bytes)")
        if len(self.node_secret.encode()) < MIN_NODE_SECRET_BYTES:
            raise SettingsError(f"NODE_AGENT_SHARED_SECRET is too short: use at least {MIN_NODE_SECRET_BYTES} bytes"
                                " (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")

    def slots_for(self, node_id: str) -> int:
        return self.node_slots.get(node_id, self.default_node_slots)

    @classmethod
    def from_env(cls, database_url: str, nats_url: str) -> BackendSettings:
        env = os.environ
        tokens = [t for t in env.get("DOAI_API_TOKEN", "").split(",") if t.strip()]
        return cls(
            database_url=database_url,
            nats_url=nats_url,
            api_tokens=[t.strip() for t in tokens],
            node_secret=env.get("NODE_AGENT_SHARED_SECRET", ""),
            host=env.get("DOAI_API_HOST", "127.0.0.1"),
            port=int(env.get("DOAI_API_PORT", "8000")),
            device_stale_s=float(env.get("DOAI_DEVICE_STALE_S", "60")),
            keeper_every_s=float(env.get("DOAI_NATS_KEEPER_S", "3")),
            default_node_slots=int(env.get("DOAI_DEFAULT_SLOTS", "20")),
            node_slots=_node_slots(env.get("DOAI_NODE_SLOTS", "")),
            artifact_dir=env.get("DOAI_ARTIFACT_DIR") or None,
            supabase_url=env.get("SUPABASE_URL") or None,
            supabase_key=env.get("SUPABASE_SERVICE_KEY") or env.get("SUPABASE_KEY") or None,
            supabase_bucket=env.get("DOAI_SUPABASE_BUCKET", "artifacts"),
        )
