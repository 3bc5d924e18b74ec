"""Node enrollment and revocation: each node gets its own NATS identity, and losing one is survivable.

* Enrollment (`POST /v1/node/enroll`, X-Node-Auth): a new node sends its id and
  the public key of a user key pair it made itself. The backend records the
  pair, signs a user JWT with the DOAI account's signing key (permissions: only
  that node's consumer and event subjects), declares the node's durable
  consumer (nodes cannot) and answers with the JWT and the command-signing
  public key. nats-server needs no change to accept the new user.
* A node id enrolls once. The same id with the same key is answered again (a
  lost answer can be retried); with another key it is refused (409) until an
  operator revokes the node: the shared secret lets you add nodes, not take
  over existing ones.
* At most `DOAI_MAX_NODES` identities are enrolled and not revoked at once; a
  new id beyond that is refused (409 `node_limit`), so a leaked shared secret
  cannot mint NATS identities without bound. New ids are counted under a
  transaction-scoped advisory lock, so racing enrollments cannot overshoot.
* Revocation (`POST /v1/nodes/{node_id}/revoke`, operator): the key is added to
  the DOAI account JWT's revocations, the JWT is re-signed with the operator
  signing key and pushed to nats-server's `full` resolver through the system
  account (`$SYS.REQ.CLAIMS.UPDATE`). The server drops the node's connections
  and refuses new ones at once, without a restart or reload. The account JWT
  with every revocation is also pushed at each backend start, so a server that
  lost its resolver folder gets the revocations back.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

import asyncpg
import nats
import structlog
from nats.js import JetStreamContext

from contracts import api
from contracts.ids import is_node_id
from runtime import jetstream
from runtime.aio import pause
from runtime.nats_auth import NatsTrust, is_user_public_key, push_account_jwt, revocation_time
from services.backend.errors import ApiError
from services.backend.runs import iso

log = structlog.get_logger(__name__)

# Serialises the count-then-insert of new node ids (pg_advisory_xact_lock key; the migrations use another).
_NEW_NODE_LOCK = 0x646F61_6E6F6465


def _already_enrolled(node_id: str) -> ApiError:
    return ApiError(409, "node_enrolled", f"node {node_id} is already enrolled with another key; an operator "
                    "must revoke it first (POST /v1/nodes/{node_id}/revoke)")


class Enrollment:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, trust: NatsTrust, *, nats_url: str,
                 ca_file: str | None, command_public_key: str, max_nodes: int = 1000) -> None:
        self._pool = pool
        self._js = js
        self._trust = trust
        self._nats_url = nats_url
        self._ca_file = ca_file
        self._command_public_key = command_public_key
        self._max_nodes = max_nodes

    async def enroll(self, request: api.NodeEnrollRequest) -> tuple[api.NodeEnrollment, bool]:
        """Record the node's key and sign its user JWT; (answer, whether it was new)."""
        node_id, key = request.node_id, request.public_key
        if not is_node_id(node_id):  # the pattern's `$` lets a trailing line feed through; is_node_id does not
            raise ApiError(422, "invalid", "request body is invalid",
                           [{"path": "$.node_id", "message": "not a node id (letters, digits, '_' and '-')"}])
        if not is_user_public_key(key):  # the pattern matched; the nkey checksum must hold too
            raise ApiError(422, "invalid", "request body is invalid",
                           [{"path": "$.public_key", "message": "not a NATS user public key (bad checksum)"}])
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM nats_revocations WHERE public_key = $1", key):
                raise ApiError(409, "key_revoked", "this public key was revoked: make a new key pair")
            row = await conn.fetchrow("SELECT * FROM node_identities WHERE node_id = $1 FOR UPDATE", node_id)
            if row is not None and row["revoked_at"] is not None:
                # A revoked node stays out: whoever holds its PC also holds the shared secret, so
                # re-enrolling must take an operator's decision (POST /v1/nodes/{id}/readmit).
                log.warning("enrollment refused: node revoked", node_id=node_id)
                raise ApiError(409, "node_revoked", f"node {node_id} was revoked: an operator must re-admit it"
                               f" (POST /v1/nodes/{node_id}/readmit) before it can enroll again")
            if row is not None and row["public_key"] != key:
                log.warning("enrollment refused: node already enrolled with another key", node_id=node_id)
                raise _already_enrolled(node_id)
            if await conn.fetchval("SELECT node_id FROM node_identities WHERE public_key = $1 AND node_id <> $2",
                                   key, node_id):
                raise ApiError(409, "key_in_use", "this public key belongs to another node")
            created = row is None
            if created:
                await self._check_room(conn, node_id)
            try:
                enrolled_at = await self._record(conn, node_id, key)
            except asyncpg.UniqueViolationError:  # the same key enrolled concurrently for another node id
                raise ApiError(409, "key_in_use", "this public key belongs to another node") from None
            if enrolled_at is None:
                log.warning("enrollment refused: node enrolled concurrently with another key", node_id=node_id)
                raise _already_enrolled(node_id)
            user_jwt = self._trust.user_jwt(key, "node", node_id)
            # Nodes cannot create consumers: the backend declares the node's durable one now. If NATS
            # cannot be reached the transaction rolls back: nothing is recorded, the node retries (503).
            try:
                await jetstream.ensure_node_consumer(self._js, node_id)
            except Exception as exc:
                raise ApiError(503, "nats_unavailable", f"cannot declare the node's consumer: {exc!r}") from None
        log.info("node enrolled" if created else "node enrollment answered again", node_id=node_id,
                 public_key=key)
        return api.NodeEnrollment(node_id=node_id, public_key=key, user_jwt=user_jwt,
                                  command_public_key=self._command_public_key,
                                  enrolled_at=iso(enrolled_at) or ""), created

    async def _check_room(self, conn: asyncpg.Connection, node_id: str) -> None:
        """Refuse a new node id when DOAI_MAX_NODES identities are enrolled (revoked ones do not count)."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _NEW_NODE_LOCK)
        enrolled = await conn.fetchval("SELECT count(*) FROM node_identities WHERE revoked_at IS NULL")
        if enrolled >= self._max_nodes:
            log.warning("enrollment refused: node limit reached", node_id=node_id, enrolled=enrolled,
                        max_nodes=self._max_nodes)
            raise ApiError(409, "node_limit", f"{enrolled} nodes are enrolled, the most this backend admits"
                           " (DOAI_MAX_NODES): revoke a node or raise the limit")

    @staticmethod
    async def _record(conn: asyncpg.Connection, node_id: str, key: str) -> Any:
        """Insert or re-enroll the node's row; None when another key holds it (not revoked)."""
        return await conn.fetchval(
            "INSERT INTO node_identities (node_id, public_key) VALUES ($1, $2)"
            " ON CONFLICT (node_id) DO UPDATE SET public_key = EXCLUDED.public_key,"
            " enrolled_at = CASE WHEN node_identities.revoked_at IS NULL THEN node_identities.enrolled_at"
            " ELSE now() END, revoked_at = NULL"
            # Two first enrollments of one id can both find no row in `enroll`; the one that inserts
            # second must not replace the first's key (its JWT is already out and would stay valid
            # but unrecorded, so unrevocable): it updates only a revoked row or its own key.
            " WHERE node_identities.revoked_at IS NOT NULL OR node_identities.public_key = EXCLUDED.public_key"
            " RETURNING enrolled_at", node_id, key)

    async def readmit(self, node_id: str) -> api.NodeReadmitted:
        """Let a revoked node id enroll again (with a new key pair: its revoked key stays revoked)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT revoked_at FROM node_identities WHERE node_id = $1 FOR UPDATE", node_id)
            if row is None:
                raise ApiError(404, "node_not_enrolled", f"node {node_id[:80]} is not enrolled")
            if row["revoked_at"] is None:
                raise ApiError(409, "node_not_revoked", f"node {node_id} is enrolled and not revoked")
            await conn.execute("DELETE FROM node_identities WHERE node_id = $1", node_id)
        log.warning("revoked node re-admitted: it may enroll again", node_id=node_id)
        return api.NodeReadmitted(node_id=node_id)

    async def revoke(self, node_id: str) -> api.NodeRevoked:
        """Revoke the node's key on nats-server now; the node id stays out until an operator re-admits it."""
        when = revocation_time()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM node_identities WHERE node_id = $1 FOR UPDATE", node_id)
            if row is None:
                raise ApiError(404, "node_not_enrolled", f"node {node_id[:80]} is not enrolled")
            key = row["public_key"]
            revoked_at = row["revoked_at"] or when
            await conn.execute("UPDATE node_identities SET revoked_at = $2 WHERE node_id = $1", node_id, revoked_at)
            await conn.execute("INSERT INTO nats_revocations (public_key, node_id, revoked_at) VALUES ($1, $2, $3)"
                               " ON CONFLICT (public_key) DO NOTHING", key, node_id, revoked_at)
            # Pushed before the commit: if nats-server cannot be told, nothing is recorded (503, retry).
            await self.push(conn)
        log.warning("node revoked", node_id=node_id, public_key=key)
        return api.NodeRevoked(node_id=node_id, public_key=key, revoked_at=iso(revoked_at) or "")

    async def run_repush(self, stop: asyncio.Event, every_s: float) -> None:
        """Push the account JWT again every `every_s` while any key is revoked (a supervised loop).

        A NATS server that was down when a node was revoked comes back with its old account JWT;
        the servers' own resolver sync reaches it only by chance (each sync request goes to one
        random server, itself included), so the backend tells every server again.
        """
        failing = False
        while not await pause(stop, every_s):
            if not await self._pool.fetchval("SELECT EXISTS (SELECT 1 FROM nats_revocations)"):
                continue
            try:
                await self.push()
            except ApiError as exc:
                if not failing:
                    log.warning("pushing the NATS account JWT again failed; retrying", error=exc.message)
                failing = True
            else:
                if failing:
                    log.info("pushing the NATS account JWT works again")
                failing = False

    async def push(self, conn: asyncpg.Connection | asyncpg.Pool | None = None) -> int:
        """Push the DOAI account JWT with every revoked key to nats-server; return how many keys."""
        source = conn or self._pool
        rows = await source.fetch("SELECT public_key, revoked_at FROM nats_revocations")
        revocations = {r["public_key"]: r["revoked_at"].astimezone(UTC) for r in rows}
        token = self._trust.account_jwt(revocations)
        options: dict[str, Any] = jetstream.tls_options(self._nats_url, self._ca_file)
        async def quiet(exc: Exception) -> None:  # the failure is raised below, once
            pass

        # On a cluster any one server will do: every server's `full` resolver answers the update, and a
        # server that was down then gets it from the others when it rejoins. So try each in turn.
        nc = None
        failures = []
        for url in jetstream.server_urls(self._nats_url):
            try:
                # nats-py keeps retrying an initial connect that is refused, whatever its options: bound it.
                nc = await asyncio.wait_for(nats.connect(
                    url, name="doai-backend-sys", allow_reconnect=False, connect_timeout=5,
                    max_reconnect_attempts=0, error_cb=quiet,
                    user_credentials=str(self._trust.creds_path("sys-user")), **options), timeout=10)
                break
            except Exception as exc:
                failures.append(f"{url}: {exc!r}")
        if nc is None:
            raise ApiError(503, "nats_unavailable",
                           f"cannot reach nats-server to update the account: {'; '.join(failures)}")
        try:
            await push_account_jwt(nc, token)
        except Exception as exc:
            raise ApiError(503, "nats_unavailable", f"nats-server did not take the account update: {exc}") \
                from None
        finally:
            await jetstream.close(nc)
        return len(revocations)
