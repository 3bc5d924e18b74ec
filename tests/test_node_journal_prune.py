"""Node journal retention (issue 10 item 6): finished runs are pruned by age, nothing undelivered is.

A real SQLite journal driven past its limits with small ages and an explicit
clock. Checks that a pruned run's id is still recognised (a redelivered
broadcast adds nothing), that a run with an unfinished job and the unsent
outbox are never touched, and that the "seen" age must outlast the stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from contracts.events import NodeHeartbeat
from contracts.ids import new_id, utcnow
from runtime.config import ConfigError
from services.node.journal import Journal
from services.node.settings import NodeSettings
from tests.node_support import TEST_PUBLIC_KEY, broadcast, recipe

R = recipe([{"id": "sh", "action": "adb_shell", "command": ["echo", "hi"]}])


def heartbeat() -> NodeHeartbeat:
    return NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id="n1", slots=1, running=0, queued=0,
                         vendor_connected=True, version="t")


def test_prune_drops_finished_runs_keeps_their_ids_and_never_undelivered_work(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    done, busy = broadcast("n1", R, ["A", "B"]), broadcast("n1", R, ["A", "C"])
    journal.add_broadcast(done)
    journal.add_broadcast(busy)
    journal.mark_cancelled(cancelled := new_id())  # a cancel whose broadcast never came
    journal._db.execute("UPDATE jobs SET state = 'succeeded' WHERE run_id = ?", (done.run_id,))
    journal._db.execute("UPDATE jobs SET state = 'failed' WHERE run_id = ? AND serial = 'A'", (busy.run_id,))
    for _ in range(3):
        journal.add_event(heartbeat())  # unsent events
    outbox = [r.event_id for r in journal.outbox_batch(100)]
    t0 = time.time()

    nothing = journal.prune(max_age_s=10, seen_max_age_s=100, now=t0 + 5)  # younger than the limit
    assert (nothing.broadcasts, nothing.jobs, nothing.seen) == (0, 0, 0)

    pruned = journal.prune(max_age_s=10, seen_max_age_s=100, now=t0 + 11)
    assert (pruned.broadcasts, pruned.jobs, pruned.seen) == (1, 2, 0)
    assert journal._db.execute("SELECT count(*) FROM jobs WHERE run_id = ?", (done.run_id,)).fetchone() == (0,)
    # The run with an unfinished job keeps everything; the outbox is untouched.
    assert [(j.run_id, j.serial) for j in journal.unfinished_jobs()] == [(busy.run_id, "C")]
    assert journal.broadcast(busy.run_id) == busy
    assert [r.event_id for r in journal.outbox_batch(100)] == outbox
    # The pruned run is still "seen": its broadcast, redelivered by a recreated consumer, adds nothing.
    assert journal.add_broadcast(done) == []
    assert journal.is_cancelled(cancelled)

    forgotten = journal.prune(max_age_s=10, seen_max_age_s=100, now=t0 + 101)
    assert forgotten.seen == 2  # the pruned run and the cancel placeholder
    assert not journal.is_cancelled(cancelled)
    assert [(j.run_id, j.serial) for j in journal.unfinished_jobs()] == [(busy.run_id, "C")]
    assert journal.broadcast(busy.run_id) == busy
    assert [r.event_id for r in journal.outbox_batch(100)] == outbox
    journal.close()

    reopened = Journal(tmp_path / "j.sqlite")  # the schema change is idempotent across restarts
    assert [(j.run_id, j.serial) for j in reopened.unfinished_jobs()] == [(busy.run_id, "C")]
    reopened.close()


def test_a_journal_from_before_pruning_gets_its_ages(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE broadcasts (run_id TEXT PRIMARY KEY, payload BLOB NOT NULL,"
                     " cancelled INTEGER NOT NULL DEFAULT 0);"
                     "INSERT INTO broadcasts VALUES ('r1', x'', 1);")
    db.commit()
    db.close()
    journal = Journal(path)
    assert journal.is_cancelled("r1")
    assert journal.prune(max_age_s=10, seen_max_age_s=100).seen == 0  # counted as received now, not at 1970
    journal.close()


def test_the_seen_age_must_outlast_the_command_stream(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DOAI_JOURNAL_SEEN_MAX_AGE_S must be longer"):
        NodeSettings(node_id="n1", nats_url="nats://127.0.0.1:1", command_public_key=TEST_PUBLIC_KEY,
                     journal_seen_max_age_s=6 * 86400.0)
