"""The node's error root: its own errors carry their code, anything else is `internal_error`.

Real parts: a real nats-server, the vendor simulator over a real WebSocket,
the node's SQLite journal and local artifact store. The one thing planted is
the bug itself: a `VendorClient` whose `shell` raises a plain `ValueError`
for one device, as a parsing slip in a driver would. Before the error root,
the executor labelled every `ValueError` `invalid_request`, so such a bug read
as the operator's fault.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec

from contracts.events import Event, StepEvent, TaskEvent
from doai.embedded import EmbeddedNats
from services.node.agent import NodeAgent
from services.node.artifacts import LocalArtifactStore
from services.node.errors import InvalidRequest, NodeError
from services.node.executor import Executor
from services.node.journal import Journal
from services.node.settings import NodeSettings
from services.node.vendor_client import VendorClient
from services.simulator import Simulator
from tests.node_support import TEST_PUBLIC_KEY, broadcast, connect, provision_node, read_events, recipe, send, until
from tests.test_node_agent import sim_config, wait_terminal

NODE = "node-E1"
BUGGY = "SIM0001"

STEPS = [
    {"id": "warm", "action": "adb_shell", "command": ["echo", "hi"]},
    {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
    {"id": "report", "action": "report"},
]


class VendorClientWithABug(VendorClient):
    """The real client, with a bug in `shell` for one device once it is warm: a plain `ValueError`."""

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str:
        if serial == BUGGY and "getprop" in command:
            int("OK\r\n")  # ValueError: invalid literal for int() — a bug, not a refused request
        return await super().shell(serial, command, timeout_s=timeout_s)


def test_the_node_errors_derive_from_one_root() -> None:
    from services.node.adb_driver import AdbDriver  # noqa: F401  (the adb driver raises the vendor errors)
    from services.node.admission import Refused
    from services.node.artifacts import ArtifactError, ArtifactKeyEscape
    from services.node.driver import DeviceBusy
    from services.node.enroll import EnrollmentRefused
    from services.node.steps import StepError, is_retryable
    from services.node.vendor_client import (
        VendorFailure,
        VendorProtocolError,
        VendorTimeout,
        VendorUnavailable,
    )
    from services.node.vendor_decode import ShapeError

    for cls in (InvalidRequest, StepError, VendorFailure, VendorProtocolError, VendorTimeout, VendorUnavailable,
                ShapeError, DeviceBusy, ArtifactError, ArtifactKeyEscape, Refused, EnrollmentRefused):
        assert issubclass(cls, NodeError), cls
    assert issubclass(InvalidRequest, ValueError)  # callers that caught ValueError still do
    assert StepError("assert_failed", "no match").code == "assert_failed"
    assert Refused("wrong_node", "x" * 1000).code == "wrong_node" and len(str(Refused("c", "x" * 1000))) == 600
    assert VendorFailure("refused", vendor_code=10002).code == "vendor_10002"
    # Retrying an upload: a store's error yes, a key escaping the store no, a non-node exception yes.
    assert is_retryable(ArtifactError("unreachable")) and not is_retryable(ArtifactKeyEscape("../x"))
    assert not is_retryable(ArtifactError("bucket does not exist", retryable=False))
    assert is_retryable(ConnectionResetError("reset"))
    assert VendorTimeout("slow").retryable and not VendorFailure("no").retryable


async def test_an_unexpected_exception_in_a_step_is_internal_error_and_logged_with_its_traceback(
    nats_server: EmbeddedNats, tmp_path: Path, log_file: Path
) -> None:
    r = recipe(STEPS)
    async with Simulator(sim_config(2)) as sim:
        creds = await provision_node(nats_server.url, NODE)
        settings = NodeSettings(node_id=NODE, nats_url=nats_server.url, vendor_url=sim.url, creds_file=creds,
                                state_dir=tmp_path / "state", artifact_dir=tmp_path / "artifacts",
                                inventory_interval_s=0.3, command_public_key=TEST_PUBLIC_KEY)
        journal = Journal(settings.journal_path)
        driver = VendorClientWithABug(sim.url, pool_size=4, request_timeout_s=10, connect_retry=True)
        agent = NodeAgent(settings, journal, driver, LocalArtifactStore(settings.artifact_dir))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop), name="agent")
        nc, js = await connect(nats_server.url)
        try:
            await until(lambda: (agent.commands is not None and not agent.commands.behind
                                 and agent.inventory.polls > 0) or task.done(), 30, "agent ready")
            assert not task.done(), task.exception()
            b = broadcast(NODE, r, list(sim.devices))
            await send(js, b)
            f = await wait_terminal(js, b.run_id, list(sim.devices), 30)
            events = await read_events(js)
        finally:
            await nc.close()
            stop.set()
            await asyncio.wait_for(task, 30)
            await driver.close()
            journal.close()

    broken = f.final[(b.run_id, BUGGY)]
    assert broken.state == "failed" and broken.failed_step == "probe", broken
    assert (broken.error or "").startswith("internal_error: ValueError("), broken.error
    assert "invalid_request" not in (broken.error or "")
    steps = [(e.step_id, e.state, e.error) for e in events
             if isinstance(e, StepEvent) and e.run_id == b.run_id and e.device_serial == BUGGY]
    assert ("warm", "ok", None) in steps
    failed = [s for s in steps if s[0] == "probe" and s[1] == "failed"]
    assert len(failed) == 1 and (failed[0][2] or "").startswith("internal_error: ValueError(")
    assert ("report", "skipped", None) in steps
    # The other device is not touched by the bug.
    assert f.final[(b.run_id, "SIM0002")].state == "succeeded"
    # The log line carries the traceback and the run, node and device (rule 9).
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    logged = [x for x in lines if x.get("event") == "Step raised an unexpected error" and x.get("run_id") == b.run_id]
    assert len(logged) == 1, logged
    line = logged[0]
    assert line["node_id"] == NODE and line["device_serial"] == BUGGY and line["step_id"] == "probe"
    assert line["level"] == "error" and line["action"] == "adb_shell"
    assert "Traceback (most recent call last)" in line["exception"] and "ValueError" in line["exception"]
    assert "in shell" in line["exception"]  # the frame of the planted bug


async def test_a_genuine_invalid_request_is_still_invalid_request_and_reaches_no_device(tmp_path: Path) -> None:
    """A job for the vendor's `all` target (admission refuses such a broadcast; a journal written by an older
    node could still hold one): the driver refuses it before anything is sent, and says so as `invalid_request`."""
    r = recipe(STEPS)
    target = "all"  # a valid serial by its characters; to the vendor program it means every phone
    async with Simulator(sim_config(2)) as sim, VendorClient(sim.url, pool_size=2, request_timeout_s=10) as driver:
        journal = Journal(tmp_path / "journal.sqlite")
        try:
            b = broadcast(NODE, r, [target])
            [job] = journal.add_broadcast(b)
            executor = Executor(node_id=NODE, journal=journal, driver=driver,
                                store=LocalArtifactStore(tmp_path / "artifacts"), spool_dir=tmp_path / "spool",
                                path_template="{node_id}/{run_id}/{timestamp}.png", on_event=lambda: None)
            state = await executor.run(job, b)
            decoder = msgspec.json.Decoder(Event)
            events = [decoder.decode(row.payload) for row in journal.outbox_batch(100)]
        finally:
            journal.close()
        assert sim.requests_total == 0 and sim.calls == []  # nothing reached the vendor program
    assert state == "failed"
    [final] = [e for e in events if isinstance(e, TaskEvent) and e.state == "failed"]
    assert final.failed_step == "warm"
    assert (final.error or "").startswith("invalid_request: refusing to address 'all' devices"), final.error
    step_states = [(e.step_id, e.state) for e in events if isinstance(e, StepEvent)]
    assert step_states == [("warm", "started"), ("warm", "failed"), ("probe", "skipped"), ("report", "skipped")]
