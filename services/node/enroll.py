"""The node's NATS identity: enroll once at the backend, then reuse the credentials file.

* `--creds FILE` (DOAI_NATS_CREDS): a pre-provisioned identity (`doai nats-auth creds
  --role node`); the node never enrolls.
* Otherwise `<state_dir>/<node_id>.creds` from an earlier enrollment is reused.
* Otherwise the node enrolls: it makes its own NATS user key pair (the seed never
  leaves this machine), sends `{node_id, public_key}` to `POST /v1/node/enroll`
  with `X-Node-Auth: <NODE_AGENT_SHARED_SECRET>` (rule 8), and writes the user JWT
  with its seed to `<state_dir>/<node_id>.creds` (0600) and the rest of the answer
  (the backend's command public key) to `<state_dir>/<node_id>.enrollment.json`.

The shared secret goes only to the backend's HTTP API: never to NATS, never into a
log line or a file. Plain HTTP (stdlib `urllib`) keeps the node extra small.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nkeys
import structlog

from contracts import api
from runtime.aio import Stopped, pause
from runtime.nats_creds import format_creds, write_secret
from services.node.errors import NodeError
from services.node.settings import NodeSettings

log = structlog.get_logger(__name__)


class EnrollmentRefused(NodeError):
    """The backend refused this node's enrollment; retrying the same request cannot help."""

    code = "enrollment_refused"


@dataclass(frozen=True)
class NodeIdentity:
    creds: Path
    # The backend's command-signing public key as enrollment answered it ("" for a pre-provisioned node).
    command_public_key: str


def new_user_seed() -> str:
    """A fresh NATS user nkey seed (`SU...`), made on this machine."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def user_public_key_of(seed: str) -> str:
    """The NATS user public key (`U…`) of a user seed (`runtime.signing.public_key_of` is the command key)."""
    key: bytes = nkeys.from_seed(seed.encode()).public_key
    return key.decode()


def _post(url: str, body: bytes, secret: str, timeout_s: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Node-Auth": secret})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310 (URL from configuration)
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def _error_text(data: bytes) -> str:
    try:
        error: dict[str, Any] = json.loads(data)["error"]
        return f"{error.get('code')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")


async def enroll(settings: NodeSettings, stop: asyncio.Event | None = None, *,
                 timeout_s: float = 10.0) -> NodeIdentity:
    """Enroll at the backend; retry while it cannot be reached; raise `EnrollmentRefused` on a refusal."""
    if not settings.api_url or not settings.node_secret:
        raise EnrollmentRefused(
            f"node {settings.node_id} has no NATS credentials yet: set DOAI_API_URL and NODE_AGENT_SHARED_SECRET "
            "to enroll it, or give a credentials file with --creds (DOAI_NATS_CREDS)")
    seed = new_user_seed()
    request = api.NodeEnrollRequest(node_id=settings.node_id, public_key=user_public_key_of(seed))
    url = settings.api_url.rstrip("/") + "/v1/node/enroll"
    delay = 0.5
    while True:
        try:
            status, data = await asyncio.to_thread(_post, url, msgspec.json.encode(request), settings.node_secret,
                                                   timeout_s)
        except (OSError, urllib.error.URLError) as exc:
            status, data = 0, str(exc).encode()
        if status == 201:
            break
        if status in (0, 502, 503, 504):
            log.warning("cannot enroll yet; retrying", node_id=settings.node_id, url=url,
                        error=_error_text(data) if status else data.decode(errors="replace"))
            if await pause(stop or asyncio.Event(), delay):
                raise Stopped()
            delay = min(delay * 2, 10.0)
            continue
        raise EnrollmentRefused(f"enrollment of node {settings.node_id} refused: {status} {_error_text(data)}")
    answer = msgspec.json.decode(data, type=api.NodeEnrollment)
    if answer.node_id != settings.node_id or answer.public_key != request.public_key:
        raise EnrollmentRefused("the enrollment answer is for another node or key")
    write_secret(settings.enrolled_creds_path, format_creds(answer.user_jwt, seed))
    record = {"node_id": answer.node_id, "public_key": answer.public_key, "enrolled_at": answer.enrolled_at,
              "command_public_key": answer.command_public_key, "api_url": settings.api_url}
    write_secret(settings.enrollment_path, json.dumps(record, indent=2) + "\n")
    log.info("node enrolled", node_id=settings.node_id, public_key=answer.public_key,
             creds=str(settings.enrolled_creds_path))
    return NodeIdentity(settings.enrolled_creds_path, answer.command_public_key)


async def node_identity(settings: NodeSettings, stop: asyncio.Event | None = None) -> NodeIdentity:
    """The credentials this node connects with: given, kept from an earlier enrollment, or enrolled now."""
    if settings.creds_file is not None:
        if not settings.creds_file.is_file():
            raise EnrollmentRefused(f"the NATS credentials file {settings.creds_file} does not exist")
        return NodeIdentity(settings.creds_file, "")
    if settings.enrolled_creds_path.is_file():
        command_key = ""
        if settings.enrollment_path.is_file():
            try:
                command_key = str(json.loads(settings.enrollment_path.read_text())["command_public_key"])
            except (ValueError, KeyError, TypeError):
                log.warning("enrollment record unreadable; keeping the credentials",
                            path=str(settings.enrollment_path))
        return NodeIdentity(settings.enrolled_creds_path, command_key)
    return await enroll(settings, stop)
