"""NATS least privilege, attacked against a real nats-server under a running doai.

Every test starts the whole system (backend, aggregator, two nodes that enrolled
through the API), then attacks NATS with one identity — anonymous, node-1's own
enrolled credentials, the operators' tap, the aggregator's — and asserts both the
refusal (the server's permissions violation, or no connection at all) and that
nothing changed: the messages stored for the targeted subjects, the streams'
configuration, the consumers, and PostgreSQL's runs, tasks and dead letters. A
positive control in each test shows the identity can still do its own job, so the
refusals are not just a broken connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from contracts.events import NodeHeartbeat, TaskEvent
from contracts.ids import new_id, utcnow
from contracts.subjects import AGGREGATOR_DURABLE, CMD_STREAM, EVT_STREAM, node_durable, node_inbox_prefix
from runtime.nats_auth import inbox_prefix
from tests.conftest import AuthNats
from tests.node_support import until

FORGED_TASK = "doai.evt.node-2.task"


async def snapshot(nats_server: AuthNats, database_url: str) -> dict[str, Any]:
    """What an attack must not change (read with the unrestricted test identity)."""
    nc = await nats_server.connect()
    try:
        js = nc.jetstream()
        state: dict[str, Any] = {}
        for stream in (CMD_STREAM, EVT_STREAM):
            info = await js.stream_info(stream)
            state[f"{stream}.config"] = (info.config.subjects, info.config.max_age, info.config.retention)
            state[f"{stream}.consumers"] = sorted(c.name for c in await js.consumers_info(stream))
        state["cmd.messages"] = (await js.stream_info(CMD_STREAM)).state.messages
        forged = await js.stream_info(EVT_STREAM, subjects_filter=FORGED_TASK)
        state["forged.messages"] = dict(forged.state.subjects or {})
        node2 = await js.consumer_info(CMD_STREAM, node_durable("node-2"))
        state["node-2.consumer"] = (node2.delivered.consumer_seq, node2.num_pending, node2.num_ack_pending)
    finally:
        await nc.close()
    conn = await asyncpg.connect(database_url)
    try:
        for table in ("runs", "run_tasks", "dead_letters", "node_identities", "nats_revocations"):
            state[f"pg.{table}"] = await conn.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await conn.close()
    return state


class Intruder:
    """One NATS connection under a given identity that records the server's refusals."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, url: str, **options: Any) -> NATS:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5,
                                     error_cb=on_error, **options)
        return self.nc

    async def refused(self, what: str) -> None:
        """Wait until the server reported a permissions violation naming `what`."""
        await until(lambda: any("permissions violation" in e and what.lower() in e for e in self.errors), 5,
                    f"a permissions violation for {what} (got {self.errors})")


@contextlib.asynccontextmanager
async def intruder(url: str, **options: Any) -> AsyncIterator[Intruder]:
    who = Intruder()
    await who.connect(url, **options)
    try:
        yield who
    finally:
        assert who.nc is not None
        await who.nc.close()


async def two_nodes(start_system: Any) -> Any:
    # Two nodes enrolled through the API, each with its own NATS identity.
    return await start_system(nodes=2, devices=1)


def node_creds(tmp_path: Path, node_id: str) -> dict[str, Any]:
    """The credentials node `node_id` got at enrollment (what a thief on that PC would have)."""
    return {"user_credentials": str(tmp_path / "home" / "node" / f"{node_id}.creds"),
            "inbox_prefix": node_inbox_prefix(node_id)}


def forged_task(node_id: str) -> bytes:
    return msgspec.json.encode(TaskEvent(event_id=new_id(), ts=utcnow(), node_id=node_id, run_id=new_id(),
                                         device_serial="SIM2X0000", seq=2**40, state="succeeded"))


async def test_an_anonymous_client_is_refused(start_system: Any, nats_server: AuthNats, database_url: str) -> None:
    await two_nodes(start_system)
    before = await snapshot(nats_server, database_url)
    with pytest.raises(Exception, match="(?i)authorization violation"):
        await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    # A token or user/password the server never configured is no way in either.
    with pytest.raises(Exception, match="(?i)authorization violation"):
        await nats.connect(nats_server.url, user="backend", password="backend", allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=5)
    assert await snapshot(nats_server, database_url) == before


async def test_a_node_cannot_touch_another_nodes_subjects_or_consumer(
    start_system: Any, nats_server: AuthNats, database_url: str, tmp_path: Path
) -> None:
    await two_nodes(start_system)
    before = await snapshot(nats_server, database_url)
    async with intruder(nats_server.url, **node_creds(tmp_path, "node-1")) as node1:
        assert node1.nc is not None
        nc = node1.nc
        # Publishing node-2's events (core and JetStream publish alike).
        await nc.publish(FORGED_TASK, forged_task("node-2"))
        await nc.flush()
        await node1.refused(f'publish to "{FORGED_TASK}"')
        # Reading node-2's commands: subscribing to its subject, to every command, to every event.
        for subject in ("doai.cmd.node-2", "doai.cmd.>", "doai.evt.>"):
            await nc.subscribe(subject)
            await nc.flush()
            await node1.refused(f'subscription to "{subject}"')
        # Reading other clients' replies (the commands node-2 fetched arrive on its inbox).
        for subject in (f"{node_inbox_prefix('node-2')}.>", "_INBOX.>", "_INBOX_backend.>", ">"):
            await nc.subscribe(subject)
            await nc.flush()
            await node1.refused(f'subscription to "{subject}"')
        # Fetching from node-2's durable consumer.
        next_b = f"$JS.API.CONSUMER.MSG.NEXT.{CMD_STREAM}.{node_durable('node-2')}"
        await nc.publish(next_b, b'{"batch": 1, "expires": 1000000000}', reply=f"{node_inbox_prefix('node-1')}.x")
        await nc.flush()
        await node1.refused(f'publish to "{next_b}"')
        # Positive control: node-1 may still publish its own events and read its own consumer's info.
        js = nc.jetstream(timeout=5)
        beat = NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id="node-1", slots=20, running=0, queued=0,
                             vendor_connected=True, version="probe")
        ack = await js.publish("doai.evt.node-1.node", msgspec.json.encode(beat))
        assert ack.stream == EVT_STREAM
        own = await js.consumer_info(CMD_STREAM, node_durable("node-1"))
        assert own.name == node_durable("node-1")
    assert await snapshot(nats_server, database_url) == before


async def test_a_node_can_neither_create_delete_nor_purge_streams_and_consumers(
    start_system: Any, nats_server: AuthNats, database_url: str, tmp_path: Path
) -> None:
    await two_nodes(start_system)
    before = await snapshot(nats_server, database_url)
    async with intruder(nats_server.url, **node_creds(tmp_path, "node-1")) as node1:
        assert node1.nc is not None
        js = node1.nc.jetstream(timeout=1)
        attacks: list[tuple[str, Any]] = [
            (f"$JS.API.STREAM.DELETE.{CMD_STREAM}", js.delete_stream(CMD_STREAM)),
            (f"$JS.API.STREAM.PURGE.{EVT_STREAM}", js.purge_stream(EVT_STREAM)),
            ("$JS.API.STREAM.CREATE.EVIL", js.add_stream(StreamConfig(name="EVIL", subjects=["evil.>"]))),
            (f"$JS.API.STREAM.UPDATE.{EVT_STREAM}",
             js.update_stream(StreamConfig(name=EVT_STREAM, subjects=["doai.evt.>"], max_msgs=1))),
            (f"$JS.API.CONSUMER.DELETE.{EVT_STREAM}.{AGGREGATOR_DURABLE}",
             js.delete_consumer(EVT_STREAM, AGGREGATOR_DURABLE)),
            (f"$JS.API.CONSUMER.DELETE.{CMD_STREAM}.{node_durable('node-2')}",
             js.delete_consumer(CMD_STREAM, node_durable("node-2"))),
            (f"$JS.API.CONSUMER.DURABLE.CREATE.{CMD_STREAM}.spy",
             js.add_consumer(CMD_STREAM, ConsumerConfig(durable_name="spy", ack_policy=AckPolicy.NONE))),
            # Even its own consumer: a node cannot widen its filter to every node's commands.
            (f"$JS.API.CONSUMER.DURABLE.CREATE.{CMD_STREAM}.{node_durable('node-1')}",
             js.add_consumer(CMD_STREAM, ConsumerConfig(durable_name=node_durable("node-1"),
                                                        filter_subject="doai.cmd.*"))),
            (f"$JS.API.STREAM.MSG.GET.{CMD_STREAM}", js.get_msg(CMD_STREAM, 1)),
        ]
        for subject, attempt in attacks:
            with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
                await attempt
            await node1.refused(f'publish to "{subject}"')
    assert await snapshot(nats_server, database_url) == before


async def test_the_tap_reads_events_and_publishes_nothing(
    start_system: Any, nats_server: AuthNats, database_url: str
) -> None:
    await two_nodes(start_system)
    before = await snapshot(nats_server, database_url)
    async with intruder(nats_server.url, **nats_server.options("tap")) as tap:
        assert tap.nc is not None
        nc = tap.nc
        # What a tap is for: watching events live, and stream / consumer info.
        sub = await nc.subscribe("doai.evt.>")
        beat = await sub.next_msg(timeout=10)
        assert beat.subject.startswith("doai.evt.node-")
        js = nc.jetstream(timeout=5)
        assert (await js.stream_info(EVT_STREAM)).config.name == EVT_STREAM
        assert (await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)).name == AGGREGATOR_DURABLE
        # Publishing anything: a command, an event, a JetStream change, a system request.
        for subject in ("doai.cmd.node-1", FORGED_TASK, f"$JS.API.STREAM.PURGE.{EVT_STREAM}",
                        f"$JS.API.CONSUMER.DELETE.{EVT_STREAM}.{AGGREGATOR_DURABLE}", "$SYS.REQ.CLAIMS.UPDATE",
                        "anything.at.all"):
            await nc.publish(subject, forged_task("node-2"))
            await nc.flush()
            await tap.refused(f'publish to "{subject}"')
        # And it cannot pull stored commands through a consumer of its own.
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await nc.jetstream(timeout=1).add_consumer(CMD_STREAM, ConsumerConfig(ack_policy=AckPolicy.NONE))
    assert await snapshot(nats_server, database_url) == before


async def test_the_aggregator_identity_cannot_send_commands_or_drop_streams(
    start_system: Any, nats_server: AuthNats, database_url: str
) -> None:
    await two_nodes(start_system)
    before = await snapshot(nats_server, database_url)
    async with intruder(nats_server.url, **nats_server.options("aggregator")) as agg:
        assert agg.nc is not None
        nc = agg.nc
        await nc.publish("doai.cmd.node-2", b"{}")
        await nc.flush()
        await agg.refused('publish to "doai.cmd.node-2"')
        js = nc.jetstream(timeout=1)
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.delete_stream(CMD_STREAM)
        await agg.refused(f'publish to "$JS.API.STREAM.DELETE.{CMD_STREAM}"')
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            await js.purge_stream(EVT_STREAM)
        await agg.refused(f'publish to "$JS.API.STREAM.PURGE.{EVT_STREAM}"')
        # Positive control: its own consumer's info.
        assert (await nc.jetstream(timeout=5).consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)).name == \
            AGGREGATOR_DURABLE
    assert await snapshot(nats_server, database_url) == before


def test_every_role_has_its_own_inbox() -> None:
    """Replies never cross identities: no two roles (or nodes) share an inbox prefix."""
    prefixes = [inbox_prefix(role) for role in ("backend", "aggregator", "tap")]
    prefixes += [inbox_prefix("node", n) for n in ("backend", "node-1", "node-2", "aggregator")]
    assert len(set(prefixes)) == len(prefixes)
    assert not any(a != b and b.startswith(a + ".") for a in prefixes for b in prefixes)
