"""The node agent under the faults the issue names: `kill -9` mid-run, and nats-server gone for 30 s.

The agent runs as a real child process (`python -m doai.cli node ...`) for
the crash test, so SIGKILL leaves its SQLite journal exactly as a crash would.
Everything is checked on the events stored in JetStream: per (run, device)
the `seq` numbers must be 1..n without a gap or a repeat (nothing lost, nothing
stored twice), and exactly one terminal task event must exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

from contracts.events import TaskEvent
from doai.embedded import EmbeddedNats
from services.simulator import Simulator, SimulatorConfig
from tests.node_support import (
    NodeProcess,
    assert_complete_and_exact,
    broadcast,
    connect,
    fold,
    provision_node,
    read_events,
    recipe,
    send,
    until,
)
from tests.test_node_agent import agent_running, wait_terminal

NODE = "node-K9"
STEPS = [
    {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
    {"id": "work", "action": "wait", "ms": 1500},
    {"id": "shot", "action": "screenshot"},
    {"id": "upload", "action": "upload", "source": "shot"},
    {"id": "report", "action": "report"},
]


async def test_kill_9_mid_run_then_restart_every_task_ends_exactly_once(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    devices = 12
    async with Simulator(SimulatorConfig(devices=devices, seed=5, default_latency_ms=2.0)) as sim:
        node = NodeProcess(node_id=NODE, nats_url=nats_server.url, vendor_url=sim.url, state_dir=tmp_path / "state",
                           artifact_dir=tmp_path / "artifacts", log_path=tmp_path / "node.jsonl", slots=4)
        nc, js = await connect(nats_server.url)
        await provision_node(nats_server.url, NODE)
        try:
            node.start()
            b = broadcast(NODE, recipe(STEPS), sorted(sim.devices))
            await send(js, b)

            async def mid_run() -> bool:
                f = fold(await read_events(js, "doai.evt.*.task.*"))
                succeeded = [k for k, e in f.final.items() if e.state == "succeeded"]
                running = [k for k, e in f.final.items() if e.state == "running"]
                return len(succeeded) >= 4 and len(running) >= 2

            await until(mid_run, 60, "a run in the middle: some succeeded, some running", interval_s=0.05)
            node.kill9()
            # What the node's journal committed as running is what recovery finds interrupted (the stream
            # can lag the journal by the outbox: a task's last events may not have gone out yet).
            with contextlib.closing(sqlite3.connect(tmp_path / "state" / f"{NODE}.journal.sqlite")) as db:
                cut = sorted(serial for (serial,) in db.execute(
                    "SELECT serial FROM jobs WHERE run_id = ? AND state = 'running'", (b.run_id,)))
            assert cut, "the kill should have caught tasks running"

            node.start()
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 90)
            await asyncio.sleep(0.5)
            f = fold(await read_events(js))
        finally:
            node.stop()
            await nc.close()

    assert_complete_and_exact(f, b.run_id, sorted(sim.devices))
    assert f.counts(b.run_id) == {"succeeded": devices}
    for serial in sim.devices:
        states = f.states[(b.run_id, serial)]
        final = f.final[(b.run_id, serial)]
        if serial in cut:
            # Interrupted, said so, queued again with attempt 2, then ran to the end once.
            assert states.count("interrupted") == 1 and final.attempt == 2, (serial, states)
            assert states[-3:] == ["queued", "running", "succeeded"], states
        else:
            assert "interrupted" not in states and final.attempt == 1, (serial, states)
    # Each device task ran its workflow at most twice (once per attempt), never twice in one attempt.
    runs = f.states
    for serial in sim.devices:
        assert runs[(b.run_id, serial)].count("running") == (2 if serial in cut else 1)
    # Rule 9 in the child's JSON log: every line about a device task carries the three fields.
    lines = [x for x in node.log_lines() if x.get("run_id") == b.run_id and x.get("event") != "Run received"]
    assert any(x.get("event") == "Task interrupted; queued again" for x in lines)
    for line in lines:
        assert line.get("node_id") == NODE and line.get("device_serial") in sim.devices, line
    assert [x for x in node.log_lines() if x.get("event") == "journal recovered"]


async def test_nats_down_for_30_s_mid_run_loses_and_duplicates_nothing(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    devices = 10
    steps = [
        {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
        {"id": "work", "action": "wait", "ms": 2000},
        {"id": "report", "action": "report"},
    ]
    async with Simulator(SimulatorConfig(devices=devices, seed=9, default_latency_ms=2.0)) as sim, \
            agent_running(nats_server.url, sim, tmp_path, node_id=NODE, slots=3, inventory_interval_s=1.0) as agent:
        nc, js = await connect(nats_server.url)
        b = broadcast(NODE, recipe(steps), sorted(sim.devices))
        await send(js, b)
        await until(lambda: len(agent.scheduler.running) == 3, 20, "slots busy")
        await nc.close()

        nats_server.stop()
        down_at = time.monotonic()
        # The run goes on without the broker: events pile up in the journal's outbox.
        await until(lambda: agent.journal.outbox_size() > 30 and agent.scheduler.queued < devices - 3, 25,
                    "work continuing while NATS is down")
        await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - down_at)))
        assert agent.journal.outbox_size() > 0
        nats_server.start()

        nc, js = await connect(nats_server.url)
        try:
            f = await wait_terminal(js, b.run_id, sorted(sim.devices), 90)
            await until(lambda: agent.journal.outbox_size() == 0, 30, "outbox drained")
            f = fold(await read_events(js))
        finally:
            await nc.close()
    assert_complete_and_exact(f, b.run_id, sorted(sim.devices))
    assert f.counts(b.run_id) == {"succeeded": devices}
    for serial in sim.devices:
        task_events = f.states[(b.run_id, serial)]
        assert task_events == ["running", "succeeded"], task_events
        assert len(f.seqs[(b.run_id, serial)]) == 2 + 2 * len(steps)  # task + started/ok per step
    assert all(isinstance(e, TaskEvent) for e in f.final.values())
