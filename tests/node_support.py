"""Helpers for the node agent's integration tests: broadcasts in, events out, agents in or out of process.

The node tests talk to a node agent the way the rest of doai does: they
publish `RunBroadcast` / `RunCancel` on `doai.cmd.<node_id>` (as the backend's
relay would) and read every event back from the `DOAI_EVT` stream. Folding the
events here (highest `seq` per (run, device) wins, like the aggregator) lets a
test check "terminal exactly once, nothing missing" without a backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.commands import RunBroadcast, RunCancel
from contracts.events import TERMINAL_TASK_STATES, Event, TaskEvent
from contracts.ids import new_id, utcnow
from contracts.recipe_check import resolve_step_timeouts, validate_recipe
from contracts.recipe_model import Recipe
from contracts.subjects import CMD_STREAM, EVT_STREAM, cmd_subject
from runtime import jetstream
from runtime.signing import Signer
from tests.conftest import creds_file, nats_options
from tests.signing_support import TEST_PUBLIC_KEY, TEST_SIGNER, signed_headers

ROOT = Path(__file__).resolve().parent.parent
_event_decoder = msgspec.json.Decoder(Event)


def recipe(steps: list[dict[str, Any]], workflow_id: str = "node-test", **timeouts: int) -> Recipe:
    doc: dict[str, Any] = {"dsl": 1, "workflow_id": workflow_id, "params": {
        "youtubeVideoId": {"type": "string", "required": False, "default": "vid"}}, "steps": steps}
    if timeouts:
        doc["timeouts"] = timeouts
    return validate_recipe(doc)


def broadcast(node_id: str, r: Recipe, devices: list[str], *, run_id: str | None = None,
              params: dict[str, str] | None = None, overrides: dict[str, int] | None = None) -> RunBroadcast:
    return RunBroadcast(
        run_id=run_id or new_id(), node_id=node_id, workflow_id=r.workflow_id, workflow_version=1, recipe=r,
        params={"youtubeVideoId": "vid", **(params or {})},
        step_timeouts_ms=resolve_step_timeouts(r, overrides or {}), devices=devices, created_at=utcnow(),
    )


async def connect(url: str) -> tuple[NATS, JetStreamContext]:
    """An unrestricted test connection (the `admin` identity) with the streams declared."""
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, **nats_options(url))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    return nc, js


async def provision_node(url: str, node_id: str) -> Path:
    """What the backend does for a node (streams, its durable consumer); return the node's creds file."""
    nc, js = await connect(url)
    try:
        await jetstream.ensure_node_consumer(js, node_id)
    finally:
        await nc.close()
    return creds_file("node", node_id)


async def send(js: JetStreamContext, command: RunBroadcast | RunCancel, *, signer: Signer | None = TEST_SIGNER,
               subject: str | None = None) -> None:
    """Publish `command` as the backend's relay does: signed with the session's key (`signer=None`: unsigned)."""
    msg_id = f"{type(command).__name__}-{command.run_id}-{command.node_id}"
    subject = subject or cmd_subject(command.node_id)
    payload = msgspec.json.encode(command)
    headers = {"Nats-Msg-Id": msg_id, **(signed_headers(subject, payload, signer) if signer else {})}
    await js.publish(subject, payload, headers=headers)


async def read_events(js: JetStreamContext, subject: str = "doai.evt.>") -> list[Event]:
    """Every event stored in DOAI_EVT on `subject`, in stream order (an ephemeral consumer).

    Counts the subject's messages first and reads at least that many, so a slow fetch on a loaded machine
    waits instead of returning part of the stream; what arrives meanwhile is read too (until none pending).
    """
    info = await js.stream_info(EVT_STREAM, subjects_filter=subject)
    expected = sum((info.state.subjects or {}).values())
    if expected == 0:
        return []
    sub = await js.pull_subscribe(subject, stream=EVT_STREAM, config=ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0))
    events: list[Event] = []
    pending = expected
    try:
        while pending > 0:  # a fetch of exactly what is pending returns as soon as it has it
            msgs = await sub.fetch(min(1000, pending), timeout=5)
            events.extend(_event_decoder.decode(m.data) for m in msgs)
            pending = max(expected - len(events), msgs[-1].metadata.num_pending)
        return events
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


@dataclass
class Folded:
    """Task events folded per (run, device), as the aggregator would (highest seq wins)."""

    final: dict[tuple[str, str], TaskEvent] = field(default_factory=dict)
    terminal_events: dict[tuple[str, str], list[TaskEvent]] = field(default_factory=lambda: defaultdict(list))
    states: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    seqs: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    event_ids: list[str] = field(default_factory=list)

    def counts(self, run_id: str) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (run, _), ev in self.final.items():
            if run == run_id:
                out[ev.state] += 1
        return dict(out)


def fold(events: list[Event]) -> Folded:
    f = Folded()
    for ev in events:
        f.event_ids.append(ev.event_id)
        seq = getattr(ev, "seq", None)
        if seq is None:
            continue
        key = (ev.run_id, ev.device_serial)  # type: ignore[union-attr]
        f.seqs[key].append(seq)
        if isinstance(ev, TaskEvent):
            f.states[key].append(ev.state)
            if ev.state in TERMINAL_TASK_STATES:
                f.terminal_events[key].append(ev)
            if key not in f.final or f.final[key].seq < ev.seq:
                f.final[key] = ev
    return f


def assert_complete_and_exact(f: Folded, run_id: str, devices: list[str]) -> None:
    """Every device task of the run ended terminal exactly once; no event lost or stored twice."""
    assert len(f.event_ids) == len(set(f.event_ids)), "an event was stored twice"
    for serial in devices:
        key = (run_id, serial)
        assert key in f.final, f"{serial}: no task event at all"
        assert f.final[key].state in TERMINAL_TASK_STATES, f"{serial}: ended {f.final[key].state}"
        assert len(f.terminal_events[key]) == 1, f"{serial}: terminal {len(f.terminal_events[key])} times"
        seqs = sorted(f.seqs[key])
        assert seqs == list(range(1, len(seqs) + 1)), f"{serial}: seqs {seqs} have a gap or a duplicate"


async def until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(interval_s)


class NodeProcess:
    """`python -m doai.cli node ...` as a child process (so it can be killed with SIGKILL)."""

    def __init__(self, *, node_id: str, nats_url: str, vendor_url: str, state_dir: Path, artifact_dir: Path,
                 log_path: Path, slots: int = 20) -> None:
        """A node with its own pre-provisioned identity (`--creds`); call `provision_node` first."""
        self.args = [sys.executable, "-m", "doai.cli", "node", "--node-id", node_id, "--vendor-url", vendor_url,
                     "--state-dir", str(state_dir), "--artifact-dir", str(artifact_dir), "--slots", str(slots),
                     "--creds", str(creds_file("node", node_id))]
        self.env = {**os.environ, "NATS_URL": nats_url, "DOAI_LOG_FORMAT": "json", "DOAI_LOG_FILE": str(log_path),
                    "PYTHONPATH": str(ROOT), "DOAI_COMMAND_PUBLIC_KEY": TEST_PUBLIC_KEY}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = log_path.with_suffix(".stderr")

    def start(self) -> None:
        stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        stderr.close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def log_lines(self) -> Iterator[dict[str, Any]]:
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


__all__ = ["CMD_STREAM", "TEST_PUBLIC_KEY", "NodeProcess", "assert_complete_and_exact", "broadcast", "connect",
           "fold", "provision_node", "read_events", "recipe", "send", "until"]


async def probe_until_seen(url: str, subject: str, seen: Callable[[], bool]) -> None:
    """As admin, publish probes (no reply subject, `{}`) on `subject` until `seen()`: a subscription someone
    just flushed delivers. Publish them before a stream holds `subject`, or they are stored.

    Attack tests whose tap must see a node's first publish wait for this: under load, a tap's flushed
    subscription was now and then not yet in effect for another connection's first publishes.
    """
    admin = await nats.connect(url, user_credentials=str(creds_file("admin")))
    try:
        async def delivered() -> bool:
            await admin.publish(subject, b"{}")
            await admin.flush()
            return seen()

        await until(delivered, 10, f"a probe on {subject} delivered", interval_s=0.1)
    finally:
        await admin.close()


def logged_since(log_file: Path, offset: int) -> list[dict[str, Any]]:
    """The JSON log lines written to the session's `log_file` after byte `offset` (its size when a test began)."""
    with log_file.open("rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().decode().splitlines()]
