"""Connecting to NATS and declaring doai's streams and consumers (infrastructure as code).

`ensure_streams` is idempotent: it creates a missing stream and (with
`update=True`, at start-up) updates one whose config drifted. Consumers are
created or updated explicitly (`add_consumer`): nats-py's
`pull_subscribe(durable=..., config=...)` silently ignores the config of an
existing consumer.

Both streams have byte, message and message-size limits and discard **new**
messages when full: a full stream refuses a publish, and the sender keeps the
message in its durable outbox (the node's journal, the backend's `outbox`
table) and retries it with backoff, so nothing a sender was told is stored is
ever dropped before `max_age`. The backend owns the limits
(`BackendSettings.stream_limits()`, from `DOAI_{CMD,EVT}_MAX_*`; see
docs/architecture.md "Streams"); other parts only create a missing stream.

On a NATS cluster the backend declares both streams with `DOAI_NATS_REPLICAS`
replicas (3 on a 3-server cluster, docs/scaling.md); durable consumers take
their stream's replica count. Every client takes a comma-separated list of
server URLs (`NATS_URL=nats://a:4222,nats://b:4222,nats://c:4222`) and
reconnects to another server when the one it uses goes away.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from contracts.subjects import (
    AGGREGATOR_DURABLE,
    CMD_STREAM,
    CMD_SUBJECTS,
    EVT_STREAM,
    EVT_SUBJECTS,
    cmd_subject,
    node_durable,
)
from runtime.aio import unless_stopped

log = structlog.get_logger(__name__)

T = TypeVar("T")

DAY_S = 86_400.0
# A re-published message (same Nats-Msg-Id) within this window is dropped by JetStream.
DUPLICATE_WINDOW_S = 15 * 60.0


KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


# Both streams drop a message after this age (and the aggregator keeps `processed_events` longer).
STREAM_MAX_AGE_S = 7 * DAY_S


@dataclass(frozen=True)
class StreamLimits:
    """A stream's limits, and how many servers of a cluster keep a copy (`replicas`, 1 on one server)."""

    max_bytes: int
    max_msgs: int
    max_msg_size: int
    replicas: int = 1


# The server's `max_file_store` (infra/nats/nats-server.conf: 8 GB) must hold both streams' max_bytes.
DEFAULT_LIMITS: dict[str, StreamLimits] = {
    # RunBroadcast / RunCancel: one per (run, node). A broadcast carries the recipe (the API takes
    # bodies up to 1 MiB), so its size limit is the server's max_payload.
    CMD_STREAM: StreamLimits(max_bytes=1 * GIB, max_msgs=1_000_000, max_msg_size=4 * MIB),
    # Node events: a step event holds at most ~4,000 characters of output; an inventory of 100
    # devices is ~15 KB.
    EVT_STREAM: StreamLimits(max_bytes=4 * GIB, max_msgs=20_000_000, max_msg_size=1 * MIB),
}
def stream_configs(limits: dict[str, StreamLimits] | None = None) -> list[StreamConfig]:
    limits = DEFAULT_LIMITS if limits is None else limits
    return [
        StreamConfig(
            name=name,
            subjects=[subjects],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=STREAM_MAX_AGE_S,
            max_bytes=limits[name].max_bytes,
            max_msgs=limits[name].max_msgs,
            max_msg_size=limits[name].max_msg_size,
            duplicate_window=DUPLICATE_WINDOW_S,
            discard=DiscardPolicy.NEW,
            num_replicas=limits[name].replicas,
        )
        for name, subjects in ((CMD_STREAM, CMD_SUBJECTS), (EVT_STREAM, EVT_SUBJECTS))
    ]


def server_urls(url: str) -> list[str]:
    """The server URLs of a `NATS_URL`: one URL, or several separated by commas (a cluster)."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError("no NATS server URL given")
    return urls


def tls_context(url: str, ca_file: str | Path | None) -> ssl.SSLContext | None:
    """The TLS context for `url`: verify the server against `ca_file` (or the system's CAs for tls://)."""
    if ca_file:
        return ssl.create_default_context(cafile=str(ca_file))
    if any(u.startswith("tls://") for u in server_urls(url)):
        return ssl.create_default_context()
    return None


def tls_options(url: str, ca_file: str | Path | None) -> dict[str, Any]:
    """nats-py options for `url`: TLS (`tls_context`) and the TLS handshake before anything else.

    Without `tls_handshake_first`, nats-py reads the server's INFO in clear and upgrades only when
    that INFO says `tls_required`: anyone between the client and the server (the fleet network, or
    a local process on the port of a server that is down) could answer an INFO without it and get
    the CONNECT in clear (the user JWT and a signature of a nonce it may have relayed from the real
    server, then all the traffic). The servers must allow it (`handshake_first` in their `tls` block:
    the embedded ones and infra/nats/compose-tls.conf do).
    """
    tls = tls_context(url, ca_file)
    if tls is None:
        return {}
    return {"tls": tls, "tls_handshake_first": True}


async def connect(url: str, name: str, stop: asyncio.Event | None = None, *,
                  creds: str | Path | None = None, inbox_prefix: str | None = None,
                  ca_file: str | Path | None = None) -> NATS:
    """Connect with reconnects that never give up (nats-py stops after ~2 minutes by default).

    `url`: one server, or a comma-separated list of a cluster's servers (nats-py tries them in a
    random order, and on a disconnect reconnects to another one);
    `creds`: the identity's `.creds` file (user JWT + nkey seed); `inbox_prefix`: the
    prefix the identity may receive replies on (its permissions allow nothing else);
    `ca_file`: verify the server's TLS certificate against this CA (use a `tls://` URL).

    While the server cannot be reached, each failed attempt is logged and retried
    every second; `stop` abandons the wait (raises `Stopped`). Refused credentials
    are logged as such (they will not start working by retrying, unless an operator acts).
    """

    async def on_error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower() or "authentication" in str(exc).lower():
            log.error("NATS refused this identity's credentials (revoked, or issued by another operator?)",
                      url=url, identity=name, creds=str(creds) if creds else None)
        elif isinstance(exc, OSError | TimeoutError):
            log.warning("cannot reach NATS; retrying", url=url, error=str(exc) or type(exc).__name__)
        else:
            log.warning("nats error", error=str(exc))

    async def on_disconnected() -> None:
        log.info("nats disconnected", url=url)

    async def on_reconnected() -> None:
        log.info("nats reconnected", url=url)

    options: dict[str, Any] = {}
    if creds:
        options["user_credentials"] = str(creds)
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    options.update(tls_options(url, ca_file))
    nc: NATS = await unless_stopped(nats.connect(
        server_urls(url),
        name=name,
        **options,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    ), stop)
    return nc


async def close(nc: NATS) -> None:
    """Flush what is buffered (acks are plain publishes) and close.

    `drain()` is avoided: with a pull subscription it waits out its whole
    timeout at shutdown.
    """
    if nc.is_connected:
        try:
            await nc.flush(timeout=1)  # a round trip: milliseconds when the server answers at all
        except Exception as exc:
            log.warning("nats flush at close failed", error=repr(exc))
    try:
        # Bounded: a hung (not closed) server must not hold up a stop.
        await asyncio.wait_for(nc.close(), 2.0)
    except TimeoutError:
        log.warning("nats connection did not close in time; left behind", timeout_s=2.0)
    except OSError as exc:  # the connection dropped while closing (a server restart): closed all the same
        log.info("nats connection lost while closing", error=repr(exc))


async def ensure_streams(js: JetStreamContext, limits: dict[str, StreamLimits] | None = None, *,
                         update: bool = True) -> list[str]:
    """Create the streams that are missing (and with `update`, bring the others to this config).

    Returns the names of the streams it created. `limits` None: `DEFAULT_LIMITS`.
    """
    created: list[str] = []
    for config in stream_configs(limits):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            try:
                await js.add_stream(config)
            except Exception:
                # Another part created it at the same moment (JetStream may then refuse the second
                # create, e.g. for storage it counts twice): fine if it exists now.
                try:
                    await js.stream_info(config.name)  # type: ignore[arg-type]
                except NotFoundError:
                    pass
                else:
                    continue
                raise
            created.append(config.name)  # type: ignore[arg-type]
            log.info("stream created", stream=config.name)
        else:
            if update:
                await js.update_stream(config)
    return created


# JetStream API errors that pass once a cluster has formed: "no suitable peers for placement" (a replica
# server not yet known to the meta leader) and "JetStream system temporarily unavailable" (no meta leader).
_NOT_READY_CODES = frozenset({10005, 10008})


def jetstream_not_ready(exc: BaseException) -> bool:
    """Whether `exc` says JetStream is not ready yet (a cluster forming, a leader being elected)."""
    if isinstance(exc, ServiceUnavailableError | NoRespondersError | NatsTimeoutError | TimeoutError):
        return True
    return isinstance(exc, APIError) and exc.err_code in _NOT_READY_CODES


async def when_ready(what: str, call: Callable[[], Awaitable[T]], stop: asyncio.Event | None,
                     interval_s: float = 1.0) -> T:
    """`call()`, again every `interval_s` (until `stop`) while JetStream is not ready, as when a NATS
    cluster is still forming or electing a leader; any other error is raised."""
    logged = False
    while True:
        try:
            return await call()
        except Exception as exc:
            if not jetstream_not_ready(exc):
                raise
            if not logged:
                log.info("waiting for JetStream to be ready (a NATS cluster forming?)", what=what,
                         error=str(exc) or repr(exc))
                logged = True
        await unless_stopped(asyncio.sleep(interval_s), stop)


async def declare_streams(js: JetStreamContext, limits: dict[str, StreamLimits] | None, stop: asyncio.Event,
                          interval_s: float = 1.0) -> list[str]:
    """`ensure_streams` at start-up, waiting while JetStream is not ready; any other refusal is raised
    with JetStream's own words."""
    try:
        return await when_ready("declaring the streams", lambda: ensure_streams(js, limits), stop, interval_s)
    except APIError as exc:
        raise RuntimeError(f"JetStream refused doai's streams: {exc}") from exc


async def wait_for_stream(js: JetStreamContext, stream: str, stop: asyncio.Event | None = None,
                          interval_s: float = 0.5) -> None:
    """Wait until `stream` exists. Only the backend declares streams; other parts wait for it."""
    logged = False
    while True:
        try:
            await js.stream_info(stream)
            return
        except NotFoundError:
            if not logged:
                log.info("waiting for the backend to declare the stream", stream=stream)
                logged = True
        except Exception as exc:  # a NATS cluster forming or electing the stream's leader: wait too
            if not jetstream_not_ready(exc):
                raise
            if not logged:
                log.info("waiting for JetStream to be ready", stream=stream, error=str(exc) or repr(exc))
                logged = True
        await unless_stopped(asyncio.sleep(interval_s), stop)


async def _ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    info: Any = await js.add_consumer(stream, config)  # creates, or updates when it exists
    if info.config.durable_name != config.durable_name:
        raise RuntimeError(f"consumer {config.durable_name} on {stream} was not created")


async def ensure_aggregator_consumer(js: JetStreamContext, ack_wait_s: float = 30.0) -> None:
    await _ensure_consumer(
        js,
        EVT_STREAM,
        ConsumerConfig(
            durable_name=AGGREGATOR_DURABLE,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_ack_pending=20_000,
            filter_subject=EVT_SUBJECTS,
        ),
    )


async def ensure_node_consumer(js: JetStreamContext, node_id: str, ack_wait_s: float = 60.0) -> None:
    await _ensure_consumer(
        js,
        CMD_STREAM,
        ConsumerConfig(
            durable_name=node_durable(node_id),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_ack_pending=1_000,
            filter_subject=cmd_subject(node_id),
        ),
    )


async def consumer_names(js: JetStreamContext, stream: str) -> set[str]:
    """The durable names of every consumer on `stream` (paged: JetStream lists 256 at a time)."""
    names: set[str] = set()
    offset = 0
    while True:
        page = await js.consumers_info(stream, offset=offset)
        names.update(c.name for c in page)
        if len(page) < 256:
            return names
        offset += len(page)


async def ensure_node_consumers(js: JetStreamContext, node_ids: list[str]) -> list[str]:
    """Create the durable consumer of each node in `node_ids` that lacks one; return those nodes."""
    existing = await consumer_names(js, CMD_STREAM)
    created = []
    for node_id in node_ids:
        if node_durable(node_id) not in existing:
            await ensure_node_consumer(js, node_id)
            created.append(node_id)
    return created
