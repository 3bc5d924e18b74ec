"""Events that decode but would fail inside the fold must not block the aggregator.

Found in review: a timestamp without a UTC offset made the fold's comparisons
raise TypeError, and an event id of several KB made PostgreSQL refuse the
index row (SQLSTATE 54000); both were retried forever and stalled the stream.
Now the contracts refuse them at decode (dead-lettered), and any error that is
not PostgreSQL being unreachable or busy sends the batch event by event.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest
from asyncpg import exceptions as pgerr

from contracts.events import NodeHeartbeat, TaskEvent
from contracts.ids import new_id
from doai.embedded import EmbeddedNats
from services.aggregator.consumer import is_data_error
from services.aggregator.validate import DEAD_LETTER_KEEP_BYTES
from tests.aggregator_support import aggregator_over, migrate, poll, seed_run


async def test_naive_timestamps_and_huge_ids_are_dead_lettered_and_the_stream_moves_on(
    nats_server: EmbeddedNats, database_url: str
) -> None:
    run_id = str(uuid.uuid4())
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    await seed_run(conn, run_id, [("n1", "S1"), ("n1", "S2")])
    now = datetime.now(UTC)
    base = {"node_id": "n1", "run_id": run_id}
    good = TaskEvent(event_id=new_id(), ts=now, seq=1, state="running", device_serial="S1", **base)
    naive = msgspec.json.encode(TaskEvent(event_id=new_id(), ts=now, seq=2, state="succeeded", device_serial="S1",
                                          **base)).replace(b'Z"', b'"')
    huge = msgspec.json.encode(NodeHeartbeat(event_id=secrets.token_hex(5000), ts=now, node_id="n1", slots=8,
                                             running=0, queued=0, vendor_connected=True, version="t"))
    later = TaskEvent(event_id=new_id(), ts=now, seq=1, state="running", device_serial="S2", **base)
    payloads = [msgspec.json.encode(good), naive, huge, msgspec.json.encode(later)]
    try:
        async with aggregator_over(nats_server.url, database_url, payloads) as running:

            async def both_running() -> bool:
                rows = await conn.fetch("SELECT state FROM run_tasks WHERE run_id = $1", uuid.UUID(run_id))
                return [r["state"] for r in rows] == ["running", "running"]

            await poll(both_running, timeout_s=30, what="the good events folded")
            dead = [(bytes(r["raw"]), r["raw_size"])
                    for r in await conn.fetch("SELECT raw, raw_size FROM dead_letters ORDER BY id")]
            assert dead == [(naive, len(naive)), (huge[:DEAD_LETTER_KEEP_BYTES], len(huge))]  # only the head kept
            assert running.agg.retries == 0
    finally:
        await conn.close()


@pytest.mark.parametrize(("exc", "data"), [
    (TypeError("can't compare offset-naive and offset-aware datetimes"), True),
    (pgerr.ProgramLimitExceededError("index row size exceeds maximum"), True),
    (pgerr.NumericValueOutOfRangeError("out of range"), True),
    (pgerr.UniqueViolationError("duplicate key"), True),
    (pgerr.DeadlockDetectedError("deadlock"), False),
    (pgerr.CannotConnectNowError("the database system is starting up"), False),
    (pgerr.AdminShutdownError("terminating connection"), False),
    (pgerr.ConnectionDoesNotExistError("connection was closed"), False),
    (ConnectionRefusedError(111, "refused"), False),
    (TimeoutError(), False),
])
def test_which_errors_are_the_data_s_fault(exc: BaseException, data: bool) -> None:
    assert is_data_error(exc) is data
