"""Device draining (issue 10 item 10): after an abandoned request the device's next job waits.

A step that times out (or is cancelled) abandons its vendor request, but the
vendor program may still be executing it on the phone. The device is then
`draining` until the old request answers or a grace period passes, and no new
job starts on it. Checked on the simulator's own timeline (when each request
arrived and when it ended), with a real NATS, a real journal and the simulator
over WebSocket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from doai.embedded import EmbeddedNats
from services.node.journal import Job
from services.node.scheduler import Scheduler
from services.simulator import Simulator
from services.simulator.server import TimedCall
from tests.node_support import broadcast, connect, recipe, send, until
from tests.test_node_agent import NODE, agent_running, sim_config, wait_terminal

SLOW_STEP: list[dict[str, Any]] = [
    {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"], "timeout_ms": 1000}]
NEXT_JOB: list[dict[str, Any]] = [{"id": "probe", "action": "adb_shell", "command": ["echo", "next"]}]


def shell_calls(sim: Simulator, serial: str) -> list[TimedCall]:
    return [c for c in sim.timeline if c.action == "adb_shell" and c.devices == serial]


async def two_runs_on_one_device(nats_url: str, sim: Simulator, tmp_path: Path, **options: Any) -> dict[str, int]:
    """Run 1 times out on the device's slow or hung request; run 2 is queued behind it on the same device."""
    [serial] = list(sim.devices)
    async with agent_running(nats_url, sim, tmp_path, slots=4, **options) as agent:
        nc, js = await connect(nats_url)
        try:
            first = broadcast(NODE, recipe(SLOW_STEP), [serial])
            second = broadcast(NODE, recipe(NEXT_JOB), [serial])
            await send(js, first)
            await send(js, second)
            f1 = await wait_terminal(js, first.run_id, [serial], 30)
            if sim.config.latency_ms.get("adb_shell", 0) < 1000:  # the hung case: let the device answer again
                await until(lambda: agent.driver.drains.is_draining(serial), 10, "the device draining")
                sim.hang_device(serial, on=False)
            f2 = await wait_terminal(js, second.run_id, [serial], 30)
        finally:
            await nc.close()
        assert f1.final[(first.run_id, serial)].state == "timed_out"
        assert f2.final[(second.run_id, serial)].state == "succeeded"
        assert not agent.driver.drains.is_draining(serial)
        return dict(agent.driver.drains.outcomes)


async def test_next_job_waits_until_the_abandoned_request_answered(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """The phone takes 2.5 s for the command whose step allows 1 s: the next job starts after it answered."""
    async with Simulator(sim_config(1, latency_ms={"adb_shell": 2500.0})) as sim:
        outcomes = await two_runs_on_one_device(nats_server.url, sim, tmp_path, drain_grace_s=30.0)
        [serial] = list(sim.devices)
        old, new = shell_calls(sim, serial)
    assert old.ended is not None and old.ended - old.started >= 2.4  # it really ran past the step's 1 s
    assert new.started >= old.ended, f"the next job's request came {old.ended - new.started:.2f} s too early"
    assert outcomes["answered"] == 1 and outcomes["grace_passed"] == 0


async def test_a_hung_request_drains_for_the_grace_period(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """The command never answers: the device drains for the grace period, then the next job runs."""
    async with Simulator(sim_config(1)) as sim:
        [serial] = list(sim.devices)
        sim.hang_device(serial)
        outcomes = await two_runs_on_one_device(nats_server.url, sim, tmp_path, drain_grace_s=2.0)
        old, new = shell_calls(sim, serial)
    # The hung request never answers: the node gives it the step's 1 s, then the 2 s grace, then drops it
    # (the simulator sees it end when its connection closes, which it learns a moment after the node).
    assert old.ended is not None and old.ended - old.started >= 1.0 + 2.0 - 0.05
    assert new.started - old.started >= 1.0 + 2.0 - 0.05, "the next job did not wait for the grace period"
    assert outcomes["grace_passed"] == 1 and outcomes["answered"] == 0


def test_a_draining_device_is_not_eligible() -> None:
    draining = {"A"}
    s = Scheduler(2, is_draining=lambda serial: serial in draining)
    for serial in ("A", "B"):
        s.submit(Job(run_id="r", serial=serial, ord=0))
    assert [j.serial for j in s.start_all()] == ["B"]
    draining.clear()
    assert [j.serial for j in s.start_all()] == ["A"]
