"""A RunCancel handled in the same loop turn a job was dispatched must not leak its slot or its device.

Regression: the slot and device were given back in `_run_job`'s `finally`, which
never runs for a task cancelled before its first step; the device stayed locked
and the slot lost until a restart. Real simulator over WebSocket, real journal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from contracts.commands import RunCancel
from services.node.agent import NodeAgent
from services.node.journal import Journal
from services.node.settings import NodeSettings
from services.node.vendor_client import VendorClient
from services.simulator import Simulator, SimulatorConfig
from tests.node_support import broadcast, recipe


async def wait_for(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_cancel_of_a_job_dispatched_this_turn_frees_its_slot_and_device(tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(devices=2, seed=1)) as sim, VendorClient(sim.url, pool_size=2) as vendor:
        a, b = sorted(sim.devices)
        settings = NodeSettings(node_id="n1", nats_url="nats://127.0.0.1:1", slots=1, state_dir=tmp_path / "s",
                                artifact_dir=tmp_path / "a")
        journal = Journal(settings.journal_path)
        agent = NodeAgent(settings, journal, vendor)
        await agent.inventory.poll()  # the node knows its devices (a serial never listed would be skipped)
        r = recipe([{"id": "sh", "action": "adb_shell", "command": ["echo", "hi"]}])
        first = broadcast("n1", r, [a, b])

        dispatch = agent.dispatch

        def dispatch_then_cancel() -> None:  # the cancel arrives right after b's job is dispatched
            dispatch()
            if b in agent.tasks and not agent.tasks[b].done():
                agent.dispatch = dispatch
                agent.on_cancel(RunCancel(run_id=first.run_id, node_id="n1"))

        agent.dispatch = dispatch_then_cancel  # type: ignore[method-assign]
        agent.on_broadcast(first)  # a runs in the single slot, b waits
        await wait_for(lambda: not agent.scheduler.running and not agent.tasks)

        states = dict(journal._db.execute("SELECT serial, state FROM jobs WHERE run_id = ?", (first.run_id,)))
        assert states == {a: "succeeded", b: "cancelled"}

        # The device and the slot are free: a new run on b starts and finishes.
        second = broadcast("n1", r, [b])
        agent.on_broadcast(second)
        await wait_for(lambda: journal._db.execute(
            "SELECT state FROM jobs WHERE run_id = ?", (second.run_id,)).fetchone() == ("succeeded",))
        assert not agent.scheduler.running and not agent.tasks
        journal.close()


async def test_a_cancel_that_arrives_before_its_broadcast_wins(tmp_path: Path) -> None:
    """If a RunCancel is handled before its broadcast (say the broadcast is redelivered later), no job runs."""
    async with Simulator(SimulatorConfig(devices=1, seed=1)) as sim, VendorClient(sim.url, pool_size=1) as vendor:
        [serial] = list(sim.devices)
        settings = NodeSettings(node_id="n1", nats_url="nats://127.0.0.1:1", slots=1, state_dir=tmp_path / "s",
                                artifact_dir=tmp_path / "a")
        journal = Journal(settings.journal_path)
        agent = NodeAgent(settings, journal, vendor)
        await agent.inventory.poll()
        late = broadcast("n1", recipe([{"id": "sh", "action": "adb_shell", "command": ["echo", "hi"]}]), [serial])
        agent.on_cancel(RunCancel(run_id=late.run_id, node_id="n1"))
        agent.on_broadcast(late)
        assert journal.is_cancelled(late.run_id)
        assert journal._db.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert not agent.scheduler.running and not agent.tasks and sim.action_counts["adb_shell"] == 0
        journal.close()
