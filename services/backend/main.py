"""`doai backend`: migrate, connect, relay broadcasts and serve the API until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator

import asyncpg
import structlog
import uvicorn
from nats.js import JetStreamContext

from contracts.subjects import role_inbox_prefix
from runtime import db, jetstream
from runtime.aio import Stopped, unless_stopped
from runtime.nats_auth import NatsTrust
from runtime.supervisor import Supervisor
from services.backend import artifact_links
from services.backend.app import create_app
from services.backend.enrollment import Enrollment
from services.backend.errors import ApiError
from services.backend.keeper import StreamKeeper
from services.backend.relay import OutboxRelay
from services.backend.retention import Retention
from services.backend.settings import BackendSettings

log = structlog.get_logger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the caller's `stop` event decides."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def run_backend(settings: BackendSettings, stop: asyncio.Event,
                      on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until `stop` is set; `on_ready` gets the API base URL once it listens."""
    pool = await db.create_pool(settings.database_url)
    try:
        await db.migrate(pool)
        nc = await jetstream.connect(settings.nats_url, name="doai-backend", stop=stop, creds=settings.nats_creds,
                                     inbox_prefix=role_inbox_prefix("backend"), ca_file=settings.nats_ca)
        try:
            await _serve(settings, pool, nc.jetstream(), stop, on_ready)
        finally:
            await jetstream.close(nc)
    finally:
        await db.close_pool(pool)


async def _serve(settings: BackendSettings, pool: asyncpg.Pool, js: JetStreamContext, stop: asyncio.Event,
                 on_ready: Callable[[str], None] | None) -> None:
    await jetstream.ensure_streams(js, settings.stream_limits())  # creates, or applies changed limits
    settings.artifact_url_key = await artifact_links.shared_url_key(pool, settings.artifact_url_key)
    signer = settings.command_signer()
    log.info("commands are signed", command_public_key=signer.public_key)
    relay = OutboxRelay(pool, js, signer=signer, poll_s=settings.relay_poll_s)
    assert settings.nats_auth_dir is not None  # checked when the settings were built
    enrollment = Enrollment(pool, js, NatsTrust(settings.nats_auth_dir), nats_url=settings.nats_url,
                            ca_file=str(settings.nats_ca) if settings.nats_ca else None,
                            command_public_key=settings.command_public_key, max_nodes=settings.max_nodes)
    try:  # a server that lost its resolver folder gets every revocation back
        revoked = await enrollment.push()
        log.info("NATS account pushed", revoked_keys=revoked)
    except ApiError as exc:
        log.error("could not push the NATS account JWT (revocations) at start", error=exc.message)
    app = create_app(pool, relay, settings, enrollment)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="off")
    server = _Server(config)
    async with Supervisor(stop, "backend") as loops:
        loops.start("relay", lambda: relay.run(stop))
        keeper = StreamKeeper(pool, js, every_s=settings.keeper_every_s, limits=settings.stream_limits())
        loops.start("stream-keeper", lambda: keeper.run(stop))
        retention = Retention(pool, outbox_keep_s=settings.outbox_keep_s,
                              idempotency_ttl_s=settings.idempotency_ttl_s, every_s=settings.retention_every_s)
        loops.start("retention", lambda: retention.run(stop))
        serve_task = asyncio.create_task(server.serve(), name="uvicorn")
        try:
            while not server.started:
                if serve_task.done():
                    raise RuntimeError(f"the API could not listen on {settings.host}:{settings.port}")
                await asyncio.sleep(0.02)
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://{settings.host}:{port}"
            log.info("backend listening", url=url)
            await artifact_links.publish_link_settings(pool, settings.public_url or url, settings.signed_url_ttl_s)
            if on_ready is not None:
                on_ready(url)
            await unless_stopped(asyncio.shield(serve_task), stop)
        except Stopped:
            pass
        finally:
            stop.set()  # the API stopped or failed: the relay stops with it
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await serve_task
