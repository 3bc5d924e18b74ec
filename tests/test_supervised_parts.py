"""A part whose background loop dies keeps working: the supervisor restarts the loop (issue: supervised agent).

Each long-running loop of the node agent (outbox, inventory, commands) is
killed once while the agent runs; the agent logs it, restarts the loop, and a
run sent afterwards completes on every device. The same for the whole system
under `doai up`'s composition: the backend's relay and the aggregator's fold
are killed, and a run created through the REST API afterwards completes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from doai.embedded import EmbeddedNats
from doai.up import System
from runtime.supervisor import Supervisor
from services.simulator.server import Simulator
from tests.node_support import assert_complete_and_exact, broadcast, connect, recipe, send, until
from tests.test_node_agent import NODE, agent_running, sim_config, wait_terminal

STEPS = [{"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
         {"id": "report", "action": "report"}]


async def kill_and_wait_for_restart(loops: Supervisor, name: str) -> None:
    before = loops.restarts[name]
    loops.running[name].cancel()
    await until(lambda: loops.restarts[name] == before + 1 and not loops.running[name].done(), 15,
                f"the {name} loop restarted")


@pytest.mark.parametrize("loop", ["outbox", "inventory", "commands", "journal"])
async def test_the_node_recovers_when_a_background_loop_dies(
    nats_server: EmbeddedNats, tmp_path: Path, loop: str
) -> None:
    async with Simulator(sim_config(3)) as sim, agent_running(nats_server.url, sim, tmp_path) as agent:
        assert agent.loops is not None
        await kill_and_wait_for_restart(agent.loops, loop)
        polls = agent.inventory.polls
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, recipe(STEPS), list(sim.devices))
            await send(js, b)
            f = await wait_terminal(js, b.run_id, list(sim.devices), 60)
        finally:
            await nc.close()
        await until(lambda: agent.inventory.polls > polls, 15, "inventory polls again")
    assert_complete_and_exact(f, b.run_id, list(sim.devices))
    assert {f.final[(b.run_id, d)].state for d in sim.devices} == {"succeeded"}


async def run_to_completion(system: System) -> dict[str, int]:
    async with system.client() as client:
        r = await client.post("/v1/runs", json={
            "workflow_id": "device-smoke", "params": {"url": "https://example.org/", "youtubeVideoId": "vid"},
            "targets": {"all_online": True}})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]

        async def finished() -> dict[str, int] | None:
            run = (await client.get(f"/v1/runs/{run_id}")).json()
            return run["counts"] if run["status"] == "completed" else None
        counts: dict[str, int] | None = None
        deadline = asyncio.get_running_loop().time() + 90
        while counts is None:
            assert asyncio.get_running_loop().time() < deadline, "the run did not complete"
            counts = await finished()
            await asyncio.sleep(0.2)
        return counts


@pytest.mark.parametrize("part, loop", [("backend", "relay"), ("aggregator", "fold")])
async def test_the_backend_and_aggregator_recover_when_their_loop_dies(
    start_system: Callable[..., Awaitable[System]], part: str, loop: str
) -> None:
    system = await start_system(nodes=1, devices=2)
    loops = next(s for s in Supervisor.live if s.part == part)
    await kill_and_wait_for_restart(loops, loop)
    counts = await run_to_completion(system)
    assert counts.get("succeeded") == 2 and sum(counts.values()) == 2
