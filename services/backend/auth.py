"""Operator authentication: `Authorization: Bearer <token>`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from services.backend.errors import ApiError


class TokenCheck:
    def __init__(self, tokens: list[str]) -> None:
        if not tokens:
            raise ValueError("no operator API token configured (set DOAI_API_TOKEN)")
        # Keep only digests in memory; compare digests so length leaks nothing.
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def __call__(self, authorization: str | None) -> None:
        if not authorization:
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "Authorization header must be 'Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        if not ok:
            raise ApiError(401, "unauthorized", "invalid API token")
