"""The node agent in process, against a real nats-server and the vendor simulator over real WebSockets.

Broadcasts are published on `doai.cmd.<node_id>` as the backend's relay does;
everything is checked on the events the agent stored in JetStream (and on the
session's JSON log lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from contracts.commands import RunCancel
from contracts.events import StepEvent, TaskEvent
from doai.embedded import EmbeddedNats
from services.node.agent import NodeAgent
from services.node.artifacts import ArtifactStore, LocalArtifactStore, StoredArtifact
from services.node.factory import build_driver, build_store
from services.node.journal import Journal
from services.node.settings import NodeSettings
from services.simulator import Simulator, SimulatorConfig
from tests.node_support import (
    TEST_PUBLIC_KEY,
    assert_complete_and_exact,
    broadcast,
    connect,
    fold,
    logged_since,
    provision_node,
    read_events,
    recipe,
    send,
    until,
)
from tests.test_e2e import max_overlap

NODE = "node-T1"


@contextlib.asynccontextmanager
async def agent_running(nats_url: str, sim: Simulator, tmp_path: Path, store: ArtifactStore | None = None,
                        **options: Any) -> AsyncIterator[NodeAgent]:
    node_id = options.pop("node_id", NODE)
    creds = await provision_node(nats_url, node_id)  # the node's own identity, as a backend would set it up
    settings = NodeSettings(node_id=node_id, nats_url=nats_url, vendor_url=sim.url, creds_file=creds,
                            state_dir=tmp_path / "state", artifact_dir=tmp_path / "artifacts",
                            inventory_interval_s=options.pop("inventory_interval_s", 0.3),
                            command_public_key=options.pop("command_public_key", TEST_PUBLIC_KEY), **options)
    journal = Journal(settings.journal_path)
    driver = build_driver(settings)
    agent = NodeAgent(settings, journal, driver, store or build_store(settings))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        await until(lambda: (agent.outbox is not None and agent.inventory.polls > 0 and agent.commands is not None
                             and not agent.commands.behind) or task.done(), 30, "agent ready (commands caught up)")
        assert not task.done(), task.exception()
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await driver.close()
        journal.close()


def sim_config(devices: int, **kw: Any) -> SimulatorConfig:
    return SimulatorConfig(devices=devices, seed=11, default_latency_ms=kw.pop("latency", 2.0),
                           latency_ms=kw.pop("latency_ms", {"screen": 10.0}), **kw)


async def wait_terminal(js: Any, run_id: str, devices: list[str], timeout_s: float = 60.0) -> Any:
    async def done() -> Any:
        f = fold(await read_events(js, "doai.evt.*.task.*"))
        ended = [d for d in devices if (run_id, d) in f.final and f.final[(run_id, d)].state in
                 {"succeeded", "failed", "timed_out", "cancelled", "skipped"}]
        return len(ended) == len(devices)
    await until(done, timeout_s, f"every task of {run_id} terminal", interval_s=0.25)
    return fold(await read_events(js))


SMOKE = [
    {"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"], "retries": 3},
    {"id": "home", "action": "keyevent", "key": "home", "retries": 3},
    {"id": "settle", "action": "wait", "ms": 200},
    {"id": "shot", "action": "screenshot", "retries": 3},
    {"id": "upload", "action": "upload", "source": "shot"},
    {"id": "report", "action": "report"},
]


async def test_hanging_device_times_out_within_a_second_while_the_others_finish(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    r = recipe([{"id": "warm", "action": "adb_shell", "command": ["echo", "hi"]},
                {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
                {"id": "report", "action": "report"}])
    async with Simulator(sim_config(4)) as sim, agent_running(nats_server.url, sim, tmp_path) as agent:
        nc, js = await connect(nats_server.url)
        try:
            sim.hang_device("SIM0002")  # the vendor never answers anything about this phone
            b = broadcast(NODE, r, list(sim.devices), overrides={"warm": 1500, "probe": 2000})
            await send(js, b)
            f = await wait_terminal(js, b.run_id, list(sim.devices), 30)
            events = await read_events(js)
        finally:
            await nc.close()
        assert agent.scheduler.running == {}
    assert_complete_and_exact(f, b.run_id, list(sim.devices))
    hung = f.final[(b.run_id, "SIM0002")]
    assert hung.state == "timed_out" and hung.failed_step == "warm" and "1.5 s" in (hung.error or "")
    assert {f.final[(b.run_id, d)].state for d in sim.devices if d != "SIM0002"} == {"succeeded"}
    steps = [e for e in events if isinstance(e, StepEvent) and e.device_serial == "SIM0002" and e.step_id == "warm"]
    started = next(e.ts for e in steps if e.state == "started")
    ended = next(e.ts for e in steps if e.state == "timed_out")
    assert 1.5 <= (ended - started).total_seconds() < 2.5, "timed_out must come within a second of the limit"
    later = [e.state for e in events if isinstance(e, StepEvent) and e.device_serial == "SIM0002"
             and e.step_id in ("probe", "report")]
    assert later == ["skipped", "skipped"]


async def test_vendor_restart_mid_run_and_a_hanging_device(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """The vendor program restarts (connections cut, refused, then an empty list): the agent waits it out."""
    devices = 12
    steps = [{"id": "hang-probe", "action": "adb_shell", "command": ["echo", "x"], "timeout_ms": 2000},
             *SMOKE[:3], {"id": "settle2", "action": "wait", "ms": 400}, *SMOKE[3:]]
    r = recipe(steps)
    async with Simulator(sim_config(devices, latency=20.0)) as sim, \
            agent_running(nats_server.url, sim, tmp_path, slots=4, vendor_backoff_base_s=0.2,
                          vendor_backoff_max_s=1.0) as agent:
        nc, js = await connect(nats_server.url)
        try:
            sim.hang_device("SIM0005")
            b = broadcast(NODE, r, sorted(sim.devices))
            await send(js, b)
            await until(lambda: len(agent.scheduler.running) == 4, 20, "slots busy")
            await asyncio.sleep(0.3)
            await sim.restart(1.0, empty_list_s=1.0)
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 60)
        finally:
            await nc.close()
        assert sim.restarts == 1 and agent.inventory.vendor_available
    assert_complete_and_exact(f, b.run_id, sorted(sim.devices))
    final = {d: f.final[(b.run_id, d)] for d in sim.devices}
    assert final["SIM0005"].state == "timed_out" and final["SIM0005"].failed_step == "hang-probe"
    others = {d: (e.state, e.error) for d, e in final.items() if d != "SIM0005"}
    assert all(state == "succeeded" for state, _ in others.values()), others


async def test_cancel_drops_queued_jobs_and_stops_running_ones_at_once(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    r = recipe([{"id": "long", "action": "wait", "ms": 60_000}, {"id": "report", "action": "report"}])
    async with Simulator(sim_config(5)) as sim, agent_running(nats_server.url, sim, tmp_path, slots=2) as agent:
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, r, sorted(sim.devices))
            await send(js, b)
            await until(lambda: len(agent.scheduler.running) == 2, 20, "two running")
            await send(js, RunCancel(run_id=b.run_id, node_id=NODE))
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 10)
        finally:
            await nc.close()
        assert agent.scheduler.running == {} and agent.scheduler.queued == 0
    assert_complete_and_exact(f, b.run_id, sorted(sim.devices))
    assert f.counts(b.run_id) == {"cancelled": 5}
    ran = [d for d in sim.devices if "running" in f.states[(b.run_id, d)]]
    assert len(ran) == 2  # the queued three never started


async def test_offline_device_waits_then_is_skipped_after_the_grace_period(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    r = recipe([{"id": "probe", "action": "adb_shell", "command": ["echo", "ok"]}])
    async with Simulator(sim_config(3)) as sim, \
            agent_running(nats_server.url, sim, tmp_path, offline_grace_s=5.0) as agent:
        sim.set_device_status("SIM0002", "offline")  # comes back within the grace period
        sim.set_device_status("SIM0003", "offline")  # stays away
        await until(lambda: not agent.scheduler.is_online("SIM0003"), 10, "inventory saw SIM0003 offline")
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, r, sorted(sim.devices))
            await send(js, b)
            await until(lambda: agent.scheduler.queued == 2 and not agent.scheduler.running, 10, "two paused")
            sim.set_device_status("SIM0002", "online")
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 20)
        finally:
            await nc.close()
    assert_complete_and_exact(f, b.run_id, sorted(sim.devices))
    assert f.final[(b.run_id, "SIM0001")].state == "succeeded"
    assert f.final[(b.run_id, "SIM0002")].state == "succeeded"
    skipped = f.final[(b.run_id, "SIM0003")]
    assert skipped.state == "skipped" and (skipped.error or "").startswith("device_offline")
    assert "running" not in f.states[(b.run_id, "SIM0003")]


async def test_an_empty_vendor_list_pauses_and_loses_nothing(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    r = recipe([{"id": "probe", "action": "adb_shell", "command": ["echo", "ok"]}])
    async with Simulator(sim_config(3)) as sim, \
            agent_running(nats_server.url, sim, tmp_path, offline_grace_s=0.5) as agent:
        sim._empty_list_until = asyncio.get_running_loop().time() + 3600  # as right after a restart
        await until(lambda: not agent.inventory.vendor_available, 10, "vendor seen unavailable")
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, r, sorted(sim.devices))
            await send(js, b)
            await until(lambda: agent.scheduler.queued == 3, 10, "jobs queued")
            assert not agent.scheduler.running  # paused: not started, not failed, not skipped
            sim._empty_list_until = 0.0  # the vendor program lists its devices again
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 20)
            inventory = [e for e in await read_events(js, "doai.evt.*.device")]
        finally:
            await nc.close()
    assert f.counts(b.run_id) == {"succeeded": 3}
    assert any(not e.vendor_available for e in inventory)  # type: ignore[union-attr]


class FlakyStore:
    """The local store, failing its first `failures` uploads (as a remote store might)."""

    def __init__(self, inner: LocalArtifactStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.name = "flaky"
        self.tries = 0

    async def put(self, key: str, source: Path, content_type: str) -> StoredArtifact:
        self.tries += 1
        assert source.exists()
        if self.tries <= self.failures:
            raise ConnectionError(f"storage unreachable (try {self.tries})")
        return await self.inner.put(key, source, content_type)


async def test_failed_uploads_are_retried_within_the_upload_timeout_and_the_spool_keeps_the_png(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    r = recipe([{"id": "shot", "action": "screenshot"}, {"id": "upload", "action": "upload", "source": "shot"}],
               min_ms=1000)
    inner = LocalArtifactStore(tmp_path / "artifacts")
    store = FlakyStore(inner, failures=2)
    async with Simulator(sim_config(1)) as sim, agent_running(nats_server.url, sim, tmp_path, store=store) as agent:
        nc, js = await connect(nats_server.url)
        try:
            ok = broadcast(NODE, r, ["SIM0001"], overrides={"upload": 5000})
            await send(js, ok)
            f = await wait_terminal(js, ok.run_id, ["SIM0001"], 20)
            assert f.final[(ok.run_id, "SIM0001")].state == "succeeded" and store.tries == 3
            store.failures, store.tries = 1_000, 0
            bad = broadcast(NODE, r, ["SIM0001"], overrides={"upload": 2000})
            await send(js, bad)
            f = await wait_terminal(js, bad.run_id, ["SIM0001"], 20)
        finally:
            await nc.close()
        spool = agent.settings.spool_dir / bad.run_id / "SIM0001" / "shot"
    failed = f.final[(bad.run_id, "SIM0001")]
    assert failed.state == "failed" and failed.failed_step == "upload", failed
    assert (failed.error or "").startswith("upload_failed") and "spool" in (failed.error or "")
    assert store.tries >= 2
    kept = list(spool.glob("*.png"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"\x89PNG")
    assert not (agent.settings.spool_dir / ok.run_id).exists()  # a succeeded task leaves no spool behind


async def test_commands_still_arrive_after_a_nats_server_restart(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    r = recipe([{"id": "probe", "action": "adb_shell", "command": ["echo", "ok"]}])
    async with Simulator(sim_config(2)) as sim, agent_running(nats_server.url, sim, tmp_path) as agent:
        nats_server.stop()
        await asyncio.sleep(1.0)
        nats_server.start()
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, r, sorted(sim.devices))
            await send(js, b)
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 30)
        finally:
            await nc.close()
        assert agent.scheduler.queued == 0
    assert f.counts(b.run_id) == {"succeeded": 2}


async def test_100_devices_20_slots_keeps_the_lock_and_the_slots_and_fills_them(
    nats_server: EmbeddedNats, tmp_path: Path, log_file: Path
) -> None:
    """Two runs on 100 phones with 20 slots: from the event log, never two on a phone, never more than 20."""
    r = recipe([{"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
                {"id": "work", "action": "wait", "ms": 150}, {"id": "report", "action": "report"}])
    async with Simulator(sim_config(100)) as sim, agent_running(nats_server.url, sim, tmp_path, slots=20):
        nc, js = await connect(nats_server.url)
        try:
            runs = [broadcast(NODE, r, sorted(sim.devices)) for _ in range(2)]
            for b in runs:
                await send(js, b)
            for b in runs:
                f = await wait_terminal(js, b.run_id, sorted(sim.devices), 90)
        finally:
            await nc.close()
    spans: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for b in runs:
        assert_complete_and_exact(f, b.run_id, sorted(sim.devices))
        assert f.counts(b.run_id) == {"succeeded": 100}
    events = [e for e in await _task_events(nats_server)]
    starts = {(e.run_id, e.device_serial): e.ts for e in events if e.state == "running"}
    for e in events:
        if e.state == "succeeded":
            spans[e.device_serial].append((starts[(e.run_id, e.device_serial)], e.ts))
    assert max_overlap([s for v in spans.values() for s in v]) == 20
    for serial, device_spans in spans.items():
        assert len(device_spans) == 2 and max_overlap(device_spans) == 1, serial
    # Rule 9 over the captured JSON logs: every line of these device tasks carries the three fields.
    ids = {b.run_id for b in runs}
    lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    task_lines = [x for x in lines if x.get("run_id") in ids and x.get("event") != "Run received"]
    assert len([x for x in task_lines if x["event"] == "Task started"]) == 200
    for line in task_lines:
        assert line.get("node_id") == NODE and line.get("device_serial") in sim.devices, line


async def _task_events(nats_server: EmbeddedNats) -> list[TaskEvent]:
    nc, js = await connect(nats_server.url)
    try:
        return [e for e in await read_events(js, "doai.evt.*.task.*") if isinstance(e, TaskEvent)]
    finally:
        await nc.close()


async def test_a_stop_while_nats_is_down_keeps_the_unacked_events_and_says_so(
    nats_server: EmbeddedNats, tmp_path: Path, log_file: Path
) -> None:
    """The agent stops while NATS is unreachable: the events JetStream never acked stay in the journal, the
    stop logs how many, and the next start publishes each of them once."""
    logged_before = log_file.stat().st_size if log_file.exists() else 0  # the log is shared by the session
    async with Simulator(sim_config(1)) as sim:
        async with agent_running(nats_server.url, sim, tmp_path) as agent:
            nats_server.stop()
            await until(lambda: agent.journal.outbox_size() >= 3, 10, "heartbeats journaled while NATS is down")
            journal_path = agent.settings.journal_path
        journal = Journal(journal_path)
        try:
            kept = [r.event_id for r in journal.outbox_batch(100_000)]
        finally:
            journal.close()
        assert len(kept) >= 3
        lines = logged_since(log_file, logged_before)
        said = [x for x in lines if x.get("event", "").startswith("events not acked by JetStream kept")
                and x.get("node_id") == NODE]
        assert len(said) == 1 and said[0]["events"] == len(kept) and said[0]["node_id"] == NODE, said
        nats_server.start()
        async with agent_running(nats_server.url, sim, tmp_path):
            nc, js = await connect(nats_server.url)
            try:
                async def all_stored() -> bool:
                    stored = {e.event_id for e in await read_events(js)}
                    return stored >= set(kept)
                await until(all_stored, 30, "the kept events published after the restart")
                stored = [e.event_id for e in await read_events(js)]
            finally:
                await nc.close()
    assert all(stored.count(i) == 1 for i in kept)
    order = [stored.index(i) for i in kept]
    assert order == sorted(order)  # in journal order
