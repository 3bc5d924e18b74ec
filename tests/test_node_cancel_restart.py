"""Cancel before restart (issue 10 item 2): a cancel sent while the node was down wins over its recovered jobs.

The node runs as a real child process and is killed with SIGKILL mid-run; the
run is cancelled (a signed `RunCancel`) while it is down; then it restarts.
Before this was fixed the restarted node re-queued the interrupted jobs and
started them on the phones before it read the cancel waiting for it. Checked on
the simulator's own request log: after the restart, no request of any kind
addressed to a device of that run reaches the vendor program.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contracts.commands import RunCancel
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
from tests.test_node_agent import wait_terminal

NODE = "node-CR"
STEPS: list[dict[str, Any]] = [
    {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
    {"id": "work", "action": "wait", "ms": 60000},
    {"id": "home", "action": "keyevent", "key": "home"},
]


def device_calls(sim: Simulator, serials: set[str], since: int = 0) -> list[tuple[str, str | None]]:
    """The simulator's requests after index `since` that name one of `serials`."""
    return [(action, devices) for action, devices in sim.calls[since:]
            if devices is not None and serials & {s.strip() for s in devices.split(",")}]


async def test_cancel_sent_while_the_node_is_down_wins_over_its_recovered_jobs(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(devices=4, seed=7, default_latency_ms=2.0)) as sim:
        devices = sorted(sim.devices)
        node = NodeProcess(node_id=NODE, nats_url=nats_server.url, vendor_url=sim.url, state_dir=tmp_path / "state",
                           artifact_dir=tmp_path / "artifacts", log_path=tmp_path / "node.jsonl", slots=2)
        await provision_node(nats_server.url, NODE)
        nc, js = await connect(nats_server.url)
        try:
            node.start()
            b = broadcast(NODE, recipe(STEPS), devices)
            await send(js, b)

            async def two_running() -> bool:
                f = fold(await read_events(js, "doai.evt.*.task.*"))
                return sum(1 for e in f.final.values() if e.state == "running") == 2

            await until(two_running, 60, "two tasks running (two slots), two queued", interval_s=0.05)
            # Both running jobs reached the phone (their first step), the queued ones did not.
            await until(lambda: len({d for _, d in device_calls(sim, set(devices))}) == 2, 30,
                        "the first step of the two running jobs")
            node.kill9()
            await send(js, RunCancel(run_id=b.run_id, node_id=NODE))
            before_restart = len(sim.calls)

            node.start()
            f = await wait_terminal(js, b.run_id, devices, 60)
            after = device_calls(sim, set(devices), before_restart)

            # The node works on after the catch-up: a new run on the same devices runs to the end.
            b2 = broadcast(NODE, recipe([STEPS[0]]), devices)
            await send(js, b2)
            f2 = await wait_terminal(js, b2.run_id, devices, 60)
        finally:
            node.stop()
            await nc.close()

    assert after == [], f"steps of the cancelled run reached a phone after the restart: {after}"
    assert_complete_and_exact(f, b.run_id, devices)
    assert f.counts(b.run_id) == {"cancelled": 4}
    for serial in devices:
        states = f.states[(b.run_id, serial)]
        assert states.count("running") <= 1, (serial, states)  # never started again after the restart
    assert f2.counts(b2.run_id) == {"succeeded": 4}
    events = [x.get("event") for x in node.log_lines()]
    assert "commands caught up" in events
