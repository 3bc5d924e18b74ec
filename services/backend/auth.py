"""Who may call: operators with `Authorization: Bearer <token>`, nodes with `X-Node-Auth: <secret>`.

Both are kept only as SHA-256 digests and compared in constant time (digests
have one length, so a comparison leaks neither content nor length). Neither
credential is ever logged or echoed in a response.

Failed attempts are logged in aggregate (`AuthFailureLog`): the first failure
of a quiet period is logged at once, the ones after it are counted and logged
as one line per interval (`failures`, `clients`), so a probe of thousands of
guesses writes a handful of lines, not thousands.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import Counter

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


class AuthFailureLog:
    """One warning line per `interval_s` for failed authentications, with their count.

    The first failure after a quiet interval is logged at once (`failures=1`); later
    ones within the interval are counted, and a line with their count (and up to 5
    client addresses) follows when the interval is over: at the next failure, or
    from a timer on the running event loop, so the last burst is not lost.
    """

    MAX_CLIENTS = 5

    def __init__(self, event: str, interval_s: float = 60.0) -> None:
        self.event = event
        self.interval_s = interval_s
        self._next_line = 0.0  # monotonic time before which failures are only counted
        self._count = 0
        self._reasons: Counter[str] = Counter()
        self._clients: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def record(self, reason: str, client: str | None = None) -> None:
        self._count += 1
        self._reasons[reason] += 1
        if client:
            self._clients[client] += 1
        now = time.monotonic()
        if now >= self._next_line:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a thread): the next failure after the interval writes the line
            self._timer = loop.call_later(self._next_line - now, self.flush)

    def flush(self) -> None:
        """Write the pending count, if any, and start a new interval."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._count == 0:
            return
        log.warning(self.event, failures=self._count, reasons=dict(self._reasons), interval_s=self.interval_s,
                    clients=[c for c, _ in self._clients.most_common(self.MAX_CLIENTS)],
                    distinct_clients=len(self._clients))
        self._count = 0
        self._reasons.clear()
        self._clients.clear()
        self._next_line = time.monotonic() + self.interval_s


class TokenCheck:
    """Operator bearer tokens (`DOAI_API_TOKEN`, comma-separated)."""

    def __init__(self, tokens: list[str], failures: AuthFailureLog | None = None) -> None:
        if not tokens:
            raise ValueError("no operator API token configured (set DOAI_API_TOKEN)")
        self._digests = [_digest(t) for t in tokens]
        self.failures = failures or AuthFailureLog("operator authentication failed")

    def __call__(self, authorization: str | None, client: str | None = None) -> None:
        if not authorization:
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.failures.record("malformed", client)
            raise ApiError(401, "unauthorized", "Authorization header must be 'Bearer <token>'")
        if not _matches(token.strip(), self._digests):
            self.failures.record("invalid_token", client)
            raise ApiError(401, "unauthorized", "invalid API token")


class NodeSecretCheck:
    """The node shared secret (`NODE_AGENT_SHARED_SECRET`), sent by nodes as `X-Node-Auth`."""

    def __init__(self, secret: str, failures: AuthFailureLog | None = None) -> None:
        if not secret:
            raise ValueError("no node secret configured (set NODE_AGENT_SHARED_SECRET)")
        self._digests = [_digest(secret)]
        self.failures = failures or AuthFailureLog("node authentication failed")

    def __call__(self, header: str | None, client: str | None = None) -> None:
        if not header:
            raise ApiError(401, "unauthorized", "node endpoints need the X-Node-Auth header")
        if not _matches(header, self._digests):
            self.failures.record("invalid_secret", client)
            raise ApiError(401, "unauthorized", "invalid X-Node-Auth")
