"""Who may call: operators with `Authorization: Bearer <token>`, nodes with `X-Node-Auth: <secret>`.

Both are kept only as SHA-256 digests and compared in constant time (digests
have one length, so a comparison leaks neither content nor length). Neither
credential is ever logged or echoed in a response.
"""

from __future__ import annotations

import hashlib
import hmac

import structlog

from services.backend.errors import ApiError

log = structlog.get_logger(__name__)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _matches(value: str, digests: list[bytes]) -> bool:
    digest = _digest(value)
    ok = False
    for known in digests:  # no early exit: the time does not say which one matched
        ok |= hmac.compare_digest(digest, known)
    return ok


class TokenCheck:
    """Operator bearer tokens (`DOAI_API_TOKEN`, comma-separated)."""

    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("no operator API token configured (set DOAI_API_TOKEN)")
        self._digests = [_digest(t) for t in tokens]

    def __call__(self, authorization: str | None) -> None:
        if not authorization:
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "Authorization header must be 'Bearer <token>'")
        if not _matches(token.strip(), self._digests):
            log.warning("operator authentication failed")
            raise ApiError(401, "unauthorized", "invalid API token")


class NodeSecretCheck:
    """The node shared secret (`NODE_AGENT_SHARED_SECRET`), sent by nodes as `X-Node-Auth`."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("no node secret configured (set NODE_AGENT_SHARED_SECRET)")
        self._digests = [_digest(secret)]

    def __call__(self, header: str | None) -> None:
        if not header:
            raise ApiError(401, "unauthorized", "node endpoints need the X-Node-Auth header")
        if not _matches(header, self._digests):
            log.warning("node authentication failed")
            raise ApiError(401, "unauthorized", "invalid X-Node-Auth")
