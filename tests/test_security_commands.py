"""Forged and hostile commands on `doai.cmd.<node_id>`: the node refuses them and nothing changes.

Each attack is published on a real nats-server to a real node agent driving the
vendor simulator over WebSocket. For every refusal the test checks the refusal
(reason counted by the consumer, the message terminated so it is not
redelivered) AND that nothing changed: the node journal holds no broadcast or
job for it, the simulator received no request other than the inventory's
`list`, no folder was created in the spool or the artifact store, and a victim
folder the test made outside the node's roots is still there, untouched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext

from contracts.commands import RunBroadcast, RunCancel
from contracts.ids import new_id
from contracts.signatures import SIG_HEADER, SIG_KEY_HEADER, decode_signature, signed_bytes
from contracts.subjects import CMD_STREAM, cmd_subject, node_durable
from doai.embedded import EmbeddedNats
from runtime.config import ConfigError
from runtime.signing import BadSignature, Signer, Verifier, generate_seed
from services.node.agent import NodeAgent
from services.node.journal import Journal
from services.node.settings import NodeSettings
from services.node.vendor_client import VendorClient
from services.simulator import Simulator
from tests.backend_support import publish_recipe, running_backend, seed_fleet
from tests.node_support import broadcast, connect, recipe, send, until
from tests.signing_support import TEST_PUBLIC_KEY, signed_headers
from tests.test_node_agent import agent_running, sim_config, wait_terminal

NODE = "node-T1"
SUBJECT = cmd_subject(NODE)
SHOT = recipe([
    {"id": "probe", "action": "adb_shell", "command": ["sh", "-c", "id; reboot"]},
    {"id": "shot", "action": "screenshot"},
    {"id": "upload", "action": "upload", "source": "shot"},
])


@dataclass
class Node:
    agent: NodeAgent
    sim: Simulator
    js: JetStreamContext
    victim: Path
    log_file: Path

    @property
    def spool(self) -> Path:
        return self.agent.settings.spool_dir

    @property
    def artifacts(self) -> Path:
        return self.agent.settings.artifact_dir

    def device_requests(self) -> list[tuple[str, str | None]]:
        """What the simulator was asked besides the inventory's `list`."""
        return [c for c in self.sim.calls if c[0] != "list"]

    def journal_rows(self, run_id: str) -> tuple[int, int]:
        db = self.agent.journal._db
        (b,) = db.execute("SELECT count(*) FROM broadcasts WHERE run_id = ?", (run_id,)).fetchone()
        (j,) = db.execute("SELECT count(*) FROM jobs WHERE run_id = ?", (run_id,)).fetchone()
        return b, j

    async def refused(self, code: str, n: int = 1) -> None:
        commands = self.agent.commands
        assert commands is not None
        await until(lambda: commands.refused[code] >= n, 15, f"the node to refuse ({code})")
        assert commands.refused[code] == n, commands.refused

        async def settled() -> bool:  # terminated, not left for redelivery
            info = await self.js.consumer_info(CMD_STREAM, node_durable(NODE))
            return info.num_ack_pending == 0 and info.num_pending == 0

        await until(settled, 15, "the command consumer to have nothing pending")

    def refusal_errors(self) -> list[str]:
        """The `error` of this node's refusal log lines (the session's JSON log)."""
        out = []
        for line in self.log_file.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event", "").startswith("command refused") and entry.get("node_id") == NODE:
                out.append(str(entry.get("error")))
        return out

    def assert_nothing_changed(self, run_id: str) -> None:
        assert self.journal_rows(run_id) == (0, 0), "the refused command reached the journal"
        assert self.device_requests() == [], "the refused command reached the simulator"
        assert _files(self.spool) == [] and _files(self.artifacts) == []
        assert sorted(p.name for p in self.victim.iterdir()) == ["keep.txt", "sub"]
        assert (self.victim / "keep.txt").read_text() == "do not delete"
        assert (self.victim / "sub").is_dir() and not any((self.victim / "sub").iterdir())


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*")) if root.exists() else []


@pytest.fixture
async def node(nats_server: EmbeddedNats, tmp_path: Path, log_file: Path) -> AsyncIterator[Node]:
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("do not delete")
    async with Simulator(sim_config(2)) as sim, agent_running(nats_server.url, sim, tmp_path / "node") as agent:
        await until(lambda: agent.commands is not None and agent.commands.subscriptions > 0, 15, "commands bound")
        nc, js = await connect(nats_server.url)
        try:
            yield Node(agent, sim, js, victim, log_file)
        finally:
            await nc.close()


async def publish(js: JetStreamContext, payload: bytes, headers: dict[str, str] | None,
                  subject: str = SUBJECT) -> None:
    await js.publish(subject, payload, headers={"Nats-Msg-Id": new_id(), **(headers or {})})


def encode(command: RunBroadcast | RunCancel) -> bytes:
    return msgspec.json.encode(command)


# -- signature ---------------------------------------------------------------------------------------


async def test_an_unsigned_broadcast_is_refused_and_runs_nothing(node: Node) -> None:
    """The issue's first attack: anyone who can publish on the subject ran shell steps on the phones."""
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    await send(node.js, b, signer=None)
    await node.refused("unsigned")
    node.assert_nothing_changed(b.run_id)


async def test_a_broadcast_signed_with_another_key_is_refused(node: Node) -> None:
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    await send(node.js, b, signer=Signer(generate_seed()))
    await node.refused("wrong_key")
    node.assert_nothing_changed(b.run_id)


async def test_another_keys_signature_claiming_the_backends_key_is_refused(node: Node) -> None:
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    payload = encode(b)
    headers = Signer(generate_seed()).command_headers(SUBJECT, payload)
    headers[SIG_KEY_HEADER] = TEST_PUBLIC_KEY  # the key header is a label, never trusted
    await publish(node.js, payload, headers)
    await node.refused("bad_signature")
    node.assert_nothing_changed(b.run_id)


async def test_a_genuine_signature_for_another_nodes_subject_is_refused(node: Node) -> None:
    """Replay: a command the backend signed for node-B, re-published (re-addressed) onto node-A's subject."""
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    payload = encode(b)
    await publish(node.js, payload, signed_headers(cmd_subject("node-B"), payload))
    await node.refused("bad_signature")
    node.assert_nothing_changed(b.run_id)


async def test_a_payload_altered_after_signing_is_refused(node: Node) -> None:
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    payload = encode(b)
    headers = signed_headers(SUBJECT, payload)
    altered = payload.replace(b"id; reboot", b"id; wipe!!")
    assert altered != payload and len(altered) == len(payload)
    await publish(node.js, altered, headers)
    await node.refused("bad_signature")
    node.assert_nothing_changed(b.run_id)


async def test_garbage_in_the_signature_header_is_refused(node: Node) -> None:
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    for garbage in ("%%%not-base64%%%", "AAAA", "x" * 5000):
        await publish(node.js, encode(b), {SIG_HEADER: garbage})
    await node.refused("bad_signature", n=3)
    node.assert_nothing_changed(b.run_id)


async def test_a_forged_unsigned_cancel_is_refused_and_the_run_goes_on(node: Node) -> None:
    r = recipe([{"id": "work", "action": "wait", "ms": 1500}, {"id": "probe", "action": "adb_shell",
                                                              "command": ["echo", "ok"]}])
    devices = sorted(node.sim.devices)
    b = broadcast(NODE, r, devices)
    await send(node.js, b)
    await until(lambda: len(node.agent.scheduler.running) == 2, 15, "both devices running")
    await send(node.js, RunCancel(run_id=b.run_id, node_id=NODE), signer=None)
    await node.refused("unsigned")
    assert not node.agent.journal.is_cancelled(b.run_id)
    f = await wait_terminal(node.js, b.run_id, devices, 20)
    assert f.counts(b.run_id) == {"succeeded": 2}  # the forged cancel stopped nothing
    # A signed cancel, by contrast, is applied (on a run it can still affect).
    b2 = broadcast(NODE, recipe([{"id": "long", "action": "wait", "ms": 60_000}]), devices)
    await send(node.js, b2)
    await until(lambda: len(node.agent.scheduler.running) == 2, 15, "both devices running again")
    await send(node.js, RunCancel(run_id=b2.run_id, node_id=NODE))
    f = await wait_terminal(node.js, b2.run_id, devices, 20)
    assert f.counts(b2.run_id) == {"cancelled": 2}


# -- validation after a good signature (defence in depth) -------------------------------------------


@pytest.mark.parametrize("run_id", ["VICTIM", "../../victim", "VICTIM/sub", new_id().upper(), "not-a-uuid"])
async def test_a_path_like_run_id_is_refused_even_when_signed(node: Node, run_id: str) -> None:
    """The issue: run_id = "/tmp/x/victim" made the node delete that folder (spool = spool_dir / run_id / serial)."""
    run_id = run_id.replace("VICTIM", str(node.victim))
    b = broadcast(NODE, SHOT, sorted(node.sim.devices), run_id=run_id)
    await send(node.js, b)
    await node.refused("bad_run_id")
    node.assert_nothing_changed(run_id)


async def test_a_signed_cancel_with_a_path_like_run_id_leaves_no_placeholder(node: Node) -> None:
    run_id = str(node.victim)
    await send(node.js, RunCancel(run_id=run_id, node_id=NODE))
    await node.refused("bad_run_id")
    node.assert_nothing_changed(run_id)  # not even the cancelled placeholder a real early cancel leaves


@pytest.mark.parametrize("steps, fault", [
    ([{"id": "a", "action": "adb_shell", "command": ["x"]}, {"id": "a", "action": "report"}], "duplicate step id"),
    ([{"id": "up", "action": "upload"}], "upload needs an earlier screenshot step"),
    ([{"id": "sh", "action": "adb_shell", "command": ["echo", "{{secret}}"]}], "names no declared param"),
])
async def test_a_recipe_the_backend_would_refuse_is_refused(node: Node, steps: list[dict[str, Any]],
                                                            fault: str) -> None:
    """The snapshot decodes (msgspec checks fields) but fails the backend's semantic validator."""
    good = recipe([{"id": "sh", "action": "adb_shell", "command": ["echo", "hi"]}])
    b = broadcast(NODE, good, sorted(node.sim.devices))
    doc = msgspec.to_builtins(b)
    doc["recipe"]["steps"] = steps
    doc["step_timeouts_ms"] = {s["id"]: 90_000 for s in steps}
    payload = json.dumps(doc).encode()
    await publish(node.js, payload, signed_headers(SUBJECT, payload))
    await node.refused("invalid_recipe")
    node.assert_nothing_changed(b.run_id)
    assert any(fault in error for error in node.refusal_errors()), node.refusal_errors()


@pytest.mark.parametrize("change, code", [
    ({"params": {"youtubeVideoId": "vid", "extra": "x"}}, "invalid_params"),
    ({"params": {}}, "invalid_params"),  # the backend always sends the defaults filled in
    ({"step_timeouts_ms": {"probe": 50, "shot": 90_000, "upload": 30_000}}, "invalid_timeouts"),
    ({"step_timeouts_ms": {"probe": 90_000}}, "invalid_timeouts"),  # a step without its timeout
    ({"devices": ["all"]}, "bad_devices"),
    ({"devices": ["SIM0001,SIM0002"]}, "bad_devices"),
    ({"devices": ["SIM0001", "SIM0001"]}, "bad_devices"),
    ({"devices": ["../SIM0001"]}, "bad_devices"),
    ({"devices": []}, "bad_devices"),
    ({"workflow_id": "other-flow"}, "invalid_workflow"),
])
async def test_broadcast_fields_that_do_not_fit_are_refused(node: Node, change: dict[str, Any], code: str) -> None:
    b = broadcast(NODE, SHOT, sorted(node.sim.devices))
    doc = {**msgspec.to_builtins(b), **change}
    payload = json.dumps(doc).encode()
    await publish(node.js, payload, signed_headers(SUBJECT, payload))
    await node.refused(code)
    node.assert_nothing_changed(b.run_id)


async def test_a_device_this_node_never_listed_is_skipped_without_reaching_the_driver(node: Node) -> None:
    b = broadcast(NODE, SHOT, ["SIM0001", "FOREIGN01"])
    await send(node.js, b)
    f = await wait_terminal(node.js, b.run_id, ["SIM0001", "FOREIGN01"], 20)
    foreign = f.final[(b.run_id, "FOREIGN01")]
    assert foreign.state == "skipped" and (foreign.error or "").startswith("unknown_device")
    assert f.final[(b.run_id, "SIM0001")].state == "succeeded"
    assert all("FOREIGN01" not in (devices or "") for _, devices in node.sim.calls)
    assert not (node.spool / b.run_id / "FOREIGN01").exists()
    assert [p.name for p in node.artifacts.rglob("*.png")] and not list(node.artifacts.rglob("FOREIGN01"))


async def test_a_symlink_planted_in_the_spool_is_not_followed(node: Node) -> None:
    """The spool folder of a (valid) run is a symlink to a victim folder: the task fails, nothing is written there."""
    b = broadcast(NODE, SHOT, ["SIM0001"])
    node.spool.mkdir(parents=True, exist_ok=True)
    (node.spool / b.run_id).symlink_to(node.victim, target_is_directory=True)
    await send(node.js, b)
    f = await wait_terminal(node.js, b.run_id, ["SIM0001"], 20)
    failed = f.final[(b.run_id, "SIM0001")]
    assert failed.state == "failed" and (failed.error or "").startswith("path_escape"), failed
    assert node.device_requests() == []
    assert sorted(p.name for p in node.victim.iterdir()) == ["keep.txt", "sub"]
    assert not any((node.victim / "sub").iterdir())


async def test_a_properly_signed_broadcast_runs(node: Node) -> None:
    devices = sorted(node.sim.devices)
    b = broadcast(NODE, SHOT, devices)
    await send(node.js, b)
    f = await wait_terminal(node.js, b.run_id, devices, 30)
    assert f.counts(b.run_id) == {"succeeded": 2}
    assert node.agent.commands is not None and sum(node.agent.commands.refused.values()) == 0
    assert {d for a, d in node.sim.calls if a == "adb_shell"} == set(devices)
    pngs = list(node.artifacts.rglob("*.png"))
    assert len(pngs) == 2 and all(b.run_id in p.parts for p in pngs)
    # The spool is cleaned after success, in a thread just after the task's final event.
    await until(lambda: not (node.spool / b.run_id).exists(), 10, "the run's spool folder removed")
    assert (node.victim / "keep.txt").read_text() == "do not delete"


# -- the node without a key, and the backend's relay -------------------------------------------------


async def test_a_node_without_the_backends_public_key_refuses_to_start(nats_server: EmbeddedNats,
                                                                      tmp_path: Path) -> None:
    settings = NodeSettings(node_id=NODE, nats_url=nats_server.url, state_dir=tmp_path / "s",
                            artifact_dir=tmp_path / "a")
    journal = Journal(tmp_path / "j.sqlite")
    agent = NodeAgent(settings, journal, driver=VendorClient("ws://127.0.0.1:1/"))  # never connected
    with pytest.raises(ConfigError, match="no command public key"):
        await agent.run(asyncio.Event())
    assert agent.commands is None
    journal.close()
    # The subscription was never made: nothing consumes this node's commands.
    nc, js = await connect(nats_server.url)
    try:
        names = [c.name for c in await js.consumers_info(CMD_STREAM)]
    finally:
        await nc.close()
    assert node_durable(NODE) not in names
    with pytest.raises(ConfigError, match="DOAI_COMMAND_PUBLIC_KEY is unusable"):
        NodeSettings(node_id=NODE, nats_url=nats_server.url, command_public_key=generate_seed())


async def test_the_relay_signs_every_broadcast_and_cancel_over_subject_and_payload(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await seed_fleet(database_url, {"node-1": ["S1", "S2"], "node-2": ["S3"]})
        assert backend.settings.command_public_key == TEST_PUBLIC_KEY
        assert backend.settings.command_signing_seed not in repr(backend.settings)
        await publish_recipe(client)
        r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "targets": {"all_online": True},
                                                "params": {"url": "https://example.org/", "youtubeVideoId": "abc"}})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        nc, js = await connect(nats_server.url)
        try:
            await until(lambda: _count(js, 2), 15, "two broadcasts relayed")
            assert (await client.post(f"/v1/runs/{run_id}/cancel")).status_code == 202
            await until(lambda: _count(js, 4), 15, "two cancels relayed")
            msgs = [await js.get_msg(CMD_STREAM, seq) for seq in range(1, 5)]
        finally:
            await nc.close()
    verifier = Verifier(TEST_PUBLIC_KEY)
    kinds = []
    for m in msgs:
        assert m.subject in (cmd_subject("node-1"), cmd_subject("node-2")) and m.headers
        verifier.verify_command(m.subject, m.data or b"", m.headers)  # raises if wrong
        assert m.headers[SIG_KEY_HEADER] == TEST_PUBLIC_KEY
        command = json.loads(m.data or b"")  # the body stays plain, readable JSON
        assert command["run_id"] == run_id and m.subject == cmd_subject(command["node_id"])
        kinds.append(command["type"])
        other = cmd_subject("node-2" if m.subject.endswith("node-1") else "node-1")
        with pytest.raises(BadSignature, match="does not verify"):
            verifier.verify(signed_bytes(other, m.data or b""), _sig(m.headers))
    assert sorted(kinds) == ["cancel", "cancel", "run", "run"]


async def _count(js: JetStreamContext, n: int) -> bool:
    return bool((await js.stream_info(CMD_STREAM)).state.messages >= n)


def _sig(headers: dict[str, str]) -> bytes:
    return decode_signature(headers[SIG_HEADER])
