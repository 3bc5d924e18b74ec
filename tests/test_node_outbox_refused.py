"""An event NATS will never take (over the stream's max_msg_size, or over the server's max_payload) leaves the
outbox for the journal's `outbox_refused`, said in the log, and no longer holds up the events behind it.

Real nats-server; a stream whose max_msg_size is 64 KiB stands in for an event too large for DOAI_EVT.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path, PureWindowsPath

import msgspec
import pytest
from nats.js import JetStreamContext

from contracts.events import NodeHeartbeat, StepEvent
from contracts.ids import new_id, utcnow
from contracts.subjects import EVT_STREAM
from doai.cli import build_parser, cmd_node_refused, readonly_sqlite_uri
from doai.embedded import EmbeddedNats
from doai.up import System
from runtime import jetstream
from runtime.jetstream import DEFAULT_LIMITS, StreamLimits
from services.node.journal import Journal
from services.node.outbox import Outbox
from tests.backend_support import fetchval
from tests.conftest import creds_file
from tests.node_support import logged_since, until

ROOT = Path(__file__).resolve().parent.parent


def beat(version: str = "t") -> NodeHeartbeat:
    return NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id="n1", slots=20, running=0, queued=0,
                         vendor_connected=True, version=version)


SMALL = {**DEFAULT_LIMITS, EVT_STREAM: StreamLimits(max_bytes=DEFAULT_LIMITS[EVT_STREAM].max_bytes,
                                                    max_msgs=1000, max_msg_size=64 * 1024)}


async def stored(js: JetStreamContext) -> list[str]:
    info = await js.stream_info(EVT_STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        data = (await js.get_msg(EVT_STREAM, seq)).data
        assert data is not None
        ids.append(msgspec.json.decode(data, type=NodeHeartbeat).event_id)
    return ids


async def test_an_event_over_the_stream_limit_is_set_aside_and_the_rest_goes_out(
    nats_server: EmbeddedNats, tmp_path: Path, log_file: Path
) -> None:
    logged_before = log_file.stat().st_size
    nc = await jetstream.connect(nats_server.url, "outbox-refused", creds=creds_file("admin"))
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, SMALL)
        big = beat("x" * 100_000)
        events = [beat(), beat(), big, beat(), beat()]
        for e in events:
            journal.add_event(e)
        outbox = Outbox(journal, js, publish_timeout_s=5.0)
        assert await outbox.publish_once() == 4  # no error: the big one is not retried
        assert outbox.published == 4 and outbox.refused == 1
        assert journal.outbox_size() == 0
        assert await stored(js) == [e.event_id for e in events if e is not big]  # in order, each once
        [row] = journal.outbox_refused()
        assert row.event_id == big.event_id and row.subject == "doai.evt.n1.node"
        assert msgspec.json.decode(row.payload, type=NodeHeartbeat) == big  # kept whole
        assert "message size exceeds maximum" in row.reason
        # The events after it are not held up.
        later = beat()
        journal.add_event(later)
        assert await outbox.publish_once() == 1
        assert (await stored(js))[-1] == later.event_id
    finally:
        journal.close()
        await jetstream.close(nc)
    said = logged_since(log_file, logged_before)
    [line] = [x for x in said if x.get("event", "").startswith("event refused by NATS for good")]
    assert line["node_id"] == "n1" and line["event_id"] == big.event_id and line["level"] == "error", line
    # Durable: the set-aside row is still there after a restart, and goes only with the journal's pruning.
    journal = Journal(path)
    try:
        assert [r.event_id for r in journal.outbox_refused()] == [big.event_id]
        assert journal.prune(3600, 7200).refused == 0
        assert journal.prune(3600, 7200, now=time.time() + 7201).refused == 1
        assert journal.outbox_refused() == []
    finally:
        journal.close()


async def test_an_event_over_the_servers_max_payload_is_set_aside_without_being_sent(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    nc = await jetstream.connect(nats_server.url, "outbox-refused", creds=creds_file("admin"))
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js)
        huge = beat("x" * (nc.max_payload + 1))
        # Under max_payload by itself, over it with its Nats-Msg-Id header: nats-py would send it and the
        # server would close the connection, again after every reconnect.
        base = beat()
        edge = msgspec.structs.replace(base, version="x" * (nc.max_payload - 10 - len(msgspec.json.encode(base))
                                                            + len(base.version)))
        assert len(msgspec.json.encode(edge)) == nc.max_payload - 10
        events = [beat(), huge, beat(), edge, beat()]
        for e in events:
            journal.add_event(e)
        outbox = Outbox(journal, js, publish_timeout_s=5.0)
        assert await asyncio.wait_for(outbox.publish_once(), 30) == 3
        assert journal.outbox_size() == 0 and outbox.refused == 2
        assert await stored(js) == [events[0].event_id, events[2].event_id, events[4].event_id]
        assert [(r.event_id, "max_payload" in r.reason) for r in journal.outbox_refused()] == [
            (huge.event_id, True), (edge.event_id, True)]
        # Refused before sending: the connection was never cut.
        assert nc.is_connected and nc.stats["reconnects"] == 0
    finally:
        journal.close()
        await asyncio.wait_for(jetstream.close(nc), 30)


async def test_a_full_stream_is_not_a_refusal_for_good(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """Only "too large" sets a row aside: a full stream (or no stream) keeps the rows for a later try."""
    full = {**DEFAULT_LIMITS, EVT_STREAM: StreamLimits(max_bytes=DEFAULT_LIMITS[EVT_STREAM].max_bytes, max_msgs=2,
                                                       max_msg_size=64 * 1024)}
    nc = await jetstream.connect(nats_server.url, "outbox-refused", creds=creds_file("admin"))
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, full)
        for _ in range(3):
            journal.add_event(beat())
        outbox = Outbox(journal, js, publish_timeout_s=5.0)
        with pytest.raises(RuntimeError, match="1 of 3 events not acked.*maximum messages exceeded"):
            await outbox.publish_once()
        assert journal.outbox_size() == 1 and journal.outbox_refused() == [] and outbox.refused == 0
    finally:
        journal.close()
        await jetstream.close(nc)


async def test_the_log_line_of_a_refused_step_event_names_its_run_and_device(
    nats_server: EmbeddedNats, tmp_path: Path, log_file: Path
) -> None:
    """Rule 9: a refused event that belongs to a device says which run and device (from the row itself)."""
    logged_before = log_file.stat().st_size
    nc = await jetstream.connect(nats_server.url, "outbox-refused", creds=creds_file("admin"))
    journal = Journal(tmp_path / "journal.sqlite")
    run_id = new_id()
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, SMALL)
        step = StepEvent(event_id=new_id(), ts=utcnow(), node_id="n1", run_id=run_id, device_serial="R58M123",
                         seq=3, step_id="s1", index=0, action="shell", state="ok", output="y" * 100_000)
        journal.add_event(step)
        outbox = Outbox(journal, js, publish_timeout_s=5.0)
        assert await outbox.publish_once() == 0 and outbox.refused == 1
        assert [r.event_id for r in journal.outbox_refused()] == [step.event_id]
    finally:
        journal.close()
        await jetstream.close(nc)
    said = logged_since(log_file, logged_before)
    [line] = [x for x in said if x.get("event", "").startswith("event refused by NATS for good")]
    assert (line["node_id"], line["run_id"], line["device_serial"], line["event_id"]) == (
        "n1", run_id, "R58M123", step.event_id), line


def node_refused(*args: str) -> subprocess.CompletedProcess[str]:
    """`doai node-refused` as an operator runs it on the node PC."""
    return subprocess.run([sys.executable, "-m", "doai.cli", "node-refused", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


async def test_rows_set_aside_under_a_too_low_limit_go_out_once_after_a_requeue_while_the_agent_runs(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """A stream limit set too low sets real events aside; `doai node-refused` lists them, and once the limit
    is raised, `--requeue` (run while the agent's journal is open and its outbox publishing) puts them back
    at the end of the outbox: each is stored once, after the rows that were waiting."""
    path = tmp_path / "journal.sqlite"
    nc = await jetstream.connect(nats_server.url, "outbox-refused", creds=creds_file("admin"))
    journal = Journal(path)  # the running agent's
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, SMALL)
        events = [beat(), beat("x" * 70_000), beat("y" * 80_000), beat()]
        for e in events:
            journal.add_event(e)
        outbox = Outbox(journal, js, publish_timeout_s=5.0)
        assert await outbox.publish_once() == 2 and outbox.refused == 2
        later = beat()
        journal.add_event(later)  # waiting in the outbox (not published yet)
        journal.flush()

        listed = node_refused("--journal", str(path))
        assert listed.returncode == 0, listed.stderr
        lines = [line.split("\t") for line in listed.stdout.splitlines()]
        assert [(fields[1], fields[2]) for fields in lines] == [(events[1].event_id, "doai.evt.n1.node"),
                                                                (events[2].event_id, "doai.evt.n1.node")]
        assert all("message size exceeds maximum" in fields[4] for fields in lines)
        assert "2 events set aside" in listed.stderr and "--requeue" in listed.stderr

        await jetstream.ensure_streams(js)  # the limit put right (1 MiB)
        requeued = node_refused("--journal", str(path), "--requeue")
        assert requeued.returncode == 0 and "2 events put back" in requeued.stderr, requeued.stderr
        assert journal.outbox_refused() == [] and journal.outbox_size() == 3
        assert await outbox.publish_once() == 3 and outbox.refused == 2  # none set aside again
        assert journal.outbox_size() == 0
        assert await stored(js) == [events[0].event_id, events[3].event_id, later.event_id, events[1].event_id,
                                    events[2].event_id]
        assert node_refused("--journal", str(path)).stderr.startswith("0 events set aside")
    finally:
        journal.close()
        await jetstream.close(nc)


def test_node_refused_refuses_what_is_not_a_node_journal_and_changes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "n1.journal.sqlite"
    out = node_refused("--journal", str(missing))
    assert out.returncode == 1 and "no journal at" in out.stderr and not out.stdout
    assert not missing.exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    other = tmp_path / "other.sqlite"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
        db.commit()
    # Another program's database with a table called outbox (a common name) is not a journal either: opened as
    # one, it would have been switched to WAL and given the journal's tables.
    app = tmp_path / "app.sqlite"
    with contextlib.closing(sqlite3.connect(app)) as db:
        db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, topic TEXT, body BLOB)")
        db.execute("INSERT INTO outbox (topic, body) VALUES ('t', x'00')")
        db.commit()
    for path in (junk, other, app):
        before = path.read_bytes()
        for args in ((), ("--requeue",)):
            out = node_refused("--journal", str(path), *args)
            assert out.returncode == 1 and "is not a node journal" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr and not out.stdout
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite", "junk.sqlite", "other.sqlite"]


def test_node_refused_on_a_journal_of_an_older_node_lists_nothing_and_changes_nothing(tmp_path: Path) -> None:
    """A journal from before `outbox_refused` (the node not upgraded yet): nothing set aside, the file untouched
    (listing never writes; the command does not migrate a journal an older agent may have open)."""
    path = tmp_path / "n1.journal.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript("CREATE TABLE broadcasts (run_id TEXT PRIMARY KEY, payload BLOB NOT NULL);"
                         "CREATE TABLE jobs (run_id TEXT, serial TEXT, PRIMARY KEY (run_id, serial));"
                         "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL,"
                         " event_id TEXT NOT NULL, payload BLOB NOT NULL);"
                         "INSERT INTO outbox (subject, event_id, payload) VALUES ('doai.evt.n1.node', 'e1', x'00');")
    before = path.read_bytes()
    listed = node_refused("--journal", str(path))
    assert listed.returncode == 0 and listed.stderr.startswith("0 events set aside") and not listed.stdout
    requeued = node_refused("--journal", str(path), "--requeue")
    assert requeued.returncode == 0 and requeued.stderr.startswith("0 events put back"), requeued.stderr
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_requeue_between_the_agents_read_and_its_delete_of_that_window_keeps_the_rows(tmp_path: Path) -> None:
    """The agent deletes a published window by id range (`first..last`) in its next commit: rows put back by
    `--requeue` (another process) in between get ids above `last` (AUTOINCREMENT), so that delete spares them.
    While the agent holds the write lock, `--requeue` waits SQLite's busy timeout and then says so, moving
    nothing."""
    path = tmp_path / "n1.journal.sqlite"
    journal = Journal(path)  # the running agent's
    try:
        sent = [beat(), beat()]
        for e in sent:
            journal.add_event(e)
        journal.add_event(aside := beat("x" * 1000))
        journal.outbox_refuse({journal.outbox_batch(10)[-1].id: "test: too large"})
        window = journal.outbox_batch(10)  # the agent's window, published ...
        assert [r.event_id for r in window] == [e.event_id for e in sent]
        journal.outbox_delete_through(window[0].id, window[-1].id)  # ... and its delete staged, not committed

        journal._db.execute("BEGIN IMMEDIATE")  # the agent in the middle of a commit
        try:
            locked = node_refused("--journal", str(path), "--requeue")
        finally:
            journal._db.execute("ROLLBACK")
        assert locked.returncode == 1 and "database is locked" in locked.stderr, locked.stderr
        assert "Traceback" not in locked.stderr and [r.event_id for r in journal.outbox_refused()] == [aside.event_id]

        requeued = node_refused("--journal", str(path), "--requeue")
        assert requeued.returncode == 0 and "1 events put back" in requeued.stderr, requeued.stderr
        journal.flush()  # the agent's staged delete of its window
        [row] = journal.outbox_batch(10)
        assert row.event_id == aside.event_id and row.id > window[-1].id and journal.outbox_refused() == []
    finally:
        journal.close()


def test_a_large_requeue_moves_its_rows_in_order_in_short_transactions(tmp_path: Path) -> None:
    """Set-aside rows are large by nature: `--requeue` moves them in transactions of about `batch_bytes` each
    (at least one row), so a running agent never waits on the write lock for the whole move; the order and
    every row are kept, and each commit leaves every row in exactly one of the two tables."""
    journal = Journal(tmp_path / "n1.journal.sqlite")
    try:
        aside = [beat("x" * 3000) for _ in range(5)]
        for e in aside:
            journal.add_event(e)
        journal.outbox_refuse({row.id: "test: too large" for row in journal.outbox_batch(10)})
        statements: list[str] = []
        totals: list[int] = []
        journal._db.set_trace_callback(statements.append)
        assert journal.outbox_requeue_refused(batch_bytes=7000, moved_so_far=totals.append) == 5
        journal._db.set_trace_callback(None)
        assert totals == [2, 4, 5]
        moves = [i for i, sql in enumerate(statements) if sql.startswith("INSERT INTO outbox ")]
        assert len(moves) == 3  # 2 + 2 + 1 rows of ~3 kB under a 7 kB batch, each move committed on its own
        assert all("COMMIT" in statements[a:b] for a, b in zip(moves, moves[1:], strict=False))
        assert [r.event_id for r in journal.outbox_batch(10)] == [e.event_id for e in aside]
        assert journal.outbox_refused() == []
        assert journal.outbox_requeue_refused(batch_bytes=1) == 0  # nothing left: nothing moves
    finally:
        journal.close()


def test_a_requeue_cut_short_keeps_what_it_moved_says_so_and_moves_the_rest_when_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch that fails (the agent held the write lock past the busy timeout) ends the requeue: the batches
    committed before it stay moved, `doai node-refused` says how many and to run it again, and a second run moves
    the rest, each row once."""
    path = tmp_path / "n1.journal.sqlite"
    journal = Journal(path)
    aside = [beat("x" * 3000) for _ in range(3)]
    for e in aside:
        journal.add_event(e)
    journal.outbox_refuse({row.id: "test: too large" for row in journal.outbox_batch(10)})
    journal.close()
    requeue = Journal.outbox_requeue_refused

    def cut_short(self: Journal, batch_bytes: int = 3500, moved_so_far: Callable[[int], None] | None = None) -> int:
        def then_fail(n: int) -> None:
            assert moved_so_far is not None
            moved_so_far(n)
            raise sqlite3.OperationalError("database is locked")
        return requeue(self, 3500, then_fail)  # one row per batch; fails after the first commit

    monkeypatch.setattr(Journal, "outbox_requeue_refused", cut_short)
    assert cmd_node_refused(build_parser().parse_args(["node-refused", "--journal", str(path), "--requeue"])) == 1
    err = capsys.readouterr().err
    assert "database is locked (1 events were put back before it; run it again for the rest)" in err, err
    monkeypatch.setattr(Journal, "outbox_requeue_refused", requeue)
    assert cmd_node_refused(build_parser().parse_args(["node-refused", "--journal", str(path), "--requeue"])) == 0
    assert "2 events put back" in capsys.readouterr().err
    journal = Journal(path)
    try:
        assert [r.event_id for r in journal.outbox_batch(10)] == [e.event_id for e in aside]
        assert journal.outbox_refused() == []
    finally:
        journal.close()


async def test_a_window_all_set_aside_does_not_end_the_drain_at_stop(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """At stop the outbox drains what it can: a first window whose rows were all set aside (nothing acked)
    is not "the outbox is empty", and the event behind it still goes out."""
    nc = await jetstream.connect(nats_server.url, "outbox-refused", creds=creds_file("admin"))
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, SMALL)
        small = beat()
        for e in (beat("x" * 70_000), beat("y" * 70_000), small):
            journal.add_event(e)
        outbox = Outbox(journal, js, window=2, publish_timeout_s=5.0)
        assert await outbox.drain(timeout_s=10.0)
        assert journal.outbox_size() == 0 and outbox.refused == 2 and outbox.published == 1
        assert await stored(js) == [small.event_id]
    finally:
        journal.close()
        await jetstream.close(nc)


async def test_the_api_shows_a_nodes_set_aside_events_until_they_are_requeued(
    start_system: Callable[..., Awaitable[System]], database_url: str
) -> None:
    """The whole system: the node's heartbeat reports how many events its journal set aside, `GET /v1/nodes`
    (and `node_liveness`, Grafana's view) shows it; `doai node-refused --requeue` beside the running agent puts
    them back, they are published and folded, and the count returns to 0."""
    system = await start_system(nodes=1, devices=1)
    [path] = list(system.artifact_dir.parent.rglob("node-1.journal.sqlite"))
    set_aside = [msgspec.structs.replace(beat(), node_id="node-1") for _ in range(2)]
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:  # as the node's outbox does (real rows)
        db.executemany("INSERT INTO outbox_refused (subject, event_id, payload, reason, refused_at)"
                       " VALUES ('doai.evt.node-1.node', ?, ?, 'the stream refused it: test', ?)",
                       [(e.event_id, msgspec.json.encode(e), time.time()) for e in set_aside])
        db.commit()

    async def shown(count: int) -> bool:
        async with system.client() as client:
            [node] = (await client.get("/v1/nodes")).json()["nodes"]
        return bool(node["refused_events"] == count)

    await until(lambda: shown(2), 15, "the API showing the node's 2 set-aside events")
    requeued = await asyncio.to_thread(node_refused, "--journal", str(path), "--requeue")
    assert requeued.returncode == 0 and "2 events put back" in requeued.stderr, requeued.stderr
    await until(lambda: shown(0), 15, "the count back to 0 after the requeue")
    ids = [e.event_id for e in set_aside]

    async def folded() -> bool:
        return bool(await fetchval(database_url, "SELECT count(*) = 2 FROM processed_events"
                                                 " WHERE event_id = ANY($1::text[])", ids))

    await until(folded, 15, "the requeued events folded")


def test_journal_paths_become_read_only_sqlite_uris_on_windows_shares_too(tmp_path: Path) -> None:
    """SQLite refuses a URI with an authority other than localhost, and `as_uri()` of a Windows share path puts
    the host there: the host moves into the path. (Windows itself is not available here: the URI is checked as
    text; on this machine a path with URI-special characters is opened read-only for real.)"""
    assert (readonly_sqlite_uri(PureWindowsPath(r"\\pc-07\doai\state\node-7.journal.sqlite"))
            == "file:////pc-07/doai/state/node-7.journal.sqlite?mode=ro")
    assert (readonly_sqlite_uri(PureWindowsPath(r"C:\ProgramData\doai\node 7#1.journal.sqlite"))
            == "file:///C:/ProgramData/doai/node%207%231.journal.sqlite?mode=ro")
    path = tmp_path / "node ?7#.journal.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE outbox (id INTEGER)")
        db.commit()
    with contextlib.closing(sqlite3.connect(readonly_sqlite_uri(path), uri=True)) as db:
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("INSERT INTO outbox VALUES (1)")

