"""Poison messages: each is dead-lettered with its raw bytes and error, terminated, logged; the
rest of its batch is folded and the consumer keeps going (real NATS + PostgreSQL)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import msgspec
import pytest

from contracts.events import NodeHeartbeat, TaskEvent
from contracts.ids import new_id
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM, evt_subject
from doai.embedded import EmbeddedNats
from runtime.config import ConfigError, load_settings
from services.aggregator.main import AggregatorSettings
from tests.aggregator_support import aggregator_over, consumer_settled, migrate, poll, seed_run


async def test_poison_messages_are_dead_lettered_and_the_consumer_continues(
    nats_server: EmbeddedNats, database_url: str, log_file: Path
) -> None:
    run_id = str(uuid.uuid4())
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    await seed_run(conn, run_id, [("n1", "S1"), ("n1", "S2")])
    now = datetime.now(UTC)
    base = {"node_id": "n1", "run_id": run_id}
    good = [
        TaskEvent(event_id=new_id(), ts=now, seq=1, state="running", device_serial="S1", **base),
        TaskEvent(event_id=new_id(), ts=now, seq=2, state="succeeded", device_serial="S1", **base),
    ]
    nul = TaskEvent(event_id=new_id(), ts=now, seq=1, state="failed", error="bad \x00 byte", device_serial="S2",
                    **base)  # PostgreSQL text cannot hold NUL
    huge = TaskEvent(event_id=new_id(), ts=now, seq=2**63, state="running", device_serial="S2", **base)
    orphan = TaskEvent(event_id=new_id(), ts=now, seq=1, state="running", node_id="n1", run_id=new_id(),
                       device_serial="S9")
    bad_json = [b"{not json", b'{"kind": "task"}',
                b'{"kind": "teleport", "event_id": "e", "ts": "2026-01-01T00:00:00Z", "node_id": "n"}']
    payloads = [*bad_json, msgspec.json.encode(nul), msgspec.json.encode(huge), msgspec.json.encode(orphan),
                *(msgspec.json.encode(e) for e in good)]
    try:
        async with aggregator_over(nats_server.url, database_url, payloads) as running:
            agg, js = running.agg, running.js
            await poll(lambda: consumer_settled(js), what="batch settled")
            rows = await conn.fetch("SELECT subject, raw, error, event_id, reason FROM dead_letters"
                                    " ORDER BY stream_seq")
            assert [bytes(r["raw"]) for r in rows] == payloads[:6]
            assert [r["reason"] for r in rows] == ["undecodable"] * 3 + ["refused_by_database", "undecodable",
                                                                         "unknown_run"]
            assert all(r["subject"] == "doai.evt.n1.task" and r["error"] for r in rows)
            assert "unknown run" in rows[5]["error"]
            assert "refused by PostgreSQL" in rows[3]["error"]
            assert "$.seq" in rows[4]["error"]  # the contracts bound seq, so it never reaches PostgreSQL
            assert [r["event_id"] for r in rows[3:]] == [nul.event_id, None, orphan.event_id]
            assert await conn.fetchval("SELECT state FROM run_tasks WHERE device_serial = 'S1'") == "succeeded"
            assert await conn.fetchval("SELECT state FROM run_tasks WHERE device_serial = 'S2'") == "queued"
            assert await conn.fetchval("SELECT count(*) FROM step_results") == 0

            # Terminated, not redelivered; and the consumer goes on folding what comes next.
            beat = NodeHeartbeat(event_id=new_id(), ts=now, node_id="n1", slots=7, running=1, queued=0,
                                 vendor_connected=True, version="t")
            await js.publish(evt_subject("n1", "node"), msgspec.json.encode(beat))
            await poll(lambda: conn.fetchval("SELECT slots FROM nodes WHERE node_id = 'n1'"), what="heartbeat folded")
            await poll(lambda: consumer_settled(js), what="settled again")
            info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
            assert info.num_redelivered == 0
            assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 6
            assert agg.dead == 6 and agg.folded == 3
    finally:
        await conn.close()
    logged = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {d["event_id"] for d in logged if d["event"] == "event dead-lettered" and d.get("event_id")} >= {
        nul.event_id, orphan.event_id}


SERVERS = {"DATABASE_URL": "postgresql://x@127.0.0.1/x", "NATS_URL": "nats://127.0.0.1:4222",
           "DOAI_NATS_CREDS": "/etc/doai/aggregator.creds"}


@pytest.mark.parametrize("env, message", [
    ({"DOAI_AGG_BATCH": "lots"}, "DOAI_AGG_BATCH: expected an integer"),
    ({"DOAI_AGG_BATCH": "0"}, "DOAI_AGG_BATCH must be between 1 and 10000"),
    ({"DOAI_AGG_ACK_WAIT_S": "0.1"}, "DOAI_AGG_ACK_WAIT_S must be between 1 and 3600"),
    ({"DOAI_LIVENESS_WINDOW_S": "-5"}, "DOAI_LIVENESS_WINDOW_S must be > 0"),
    ({"DOAI_LIVENESS_WINDOW_S": "soon"}, "DOAI_LIVENESS_WINDOW_S: expected a number"),
    ({"DOAI_NATS_CREDS": ""}, "set DOAI_NATS_CREDS"),
    ({"DOAI_AGG_MAX_SKEW_S": "-1"}, "DOAI_AGG_MAX_SKEW_S must be between 0 and 3600"),
    ({"DOAI_AGG_MAX_SKEW_S": "soon"}, "DOAI_AGG_MAX_SKEW_S: expected a number"),
])
def test_bad_settings_are_refused_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(AggregatorSettings, {**SERVERS, **env})


def test_settings_from_env() -> None:
    s = load_settings(AggregatorSettings, {**SERVERS, "DOAI_AGG_BATCH": "250", "DOAI_AGG_ACK_WAIT_S": "12",
                                           "DOAI_LIVENESS_WINDOW_S": "90", "DOAI_AGG_MAX_SKEW_S": "5"})
    assert (s.batch_size, s.ack_wait_s, s.liveness_window_s, s.max_skew_s) == (250, 12.0, 90.0, 5.0)
    assert load_settings(AggregatorSettings, SERVERS).max_skew_s == 30.0
