"""Benchmarks run with NATS auth on, as doai does: one trust folder per run, identities per role."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doai.embedded import EmbeddedNats
from runtime.nats_auth import NatsTrust, inbox_prefix
from runtime.nats_creds import write_secret


def embedded_nats(store_dir: Path) -> EmbeddedNats:
    """An embedded nats-server with its own new trust material beside its store."""
    return EmbeddedNats(store_dir, NatsTrust.ensure(store_dir.parent / "nats-auth"))


def creds(server: EmbeddedNats, role: str = "admin", node_id: str | None = None) -> Path:
    """A credentials file for `role` (`admin`: unrestricted, for setting streams up and reading back)."""
    path = server.trust.dir / "bench" / (f"node-{node_id}.creds" if role == "node" else f"{role}.creds")
    if not path.exists():
        write_secret(path, server.trust.new_user_creds(role, node_id))
    return path


def options(server: EmbeddedNats, role: str = "admin", node_id: str | None = None) -> dict[str, Any]:
    """`nats.connect` keyword arguments for that identity."""
    return {"user_credentials": str(creds(server, role, node_id)), "inbox_prefix": inbox_prefix(role, node_id)}
