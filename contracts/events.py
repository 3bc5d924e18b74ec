"""Events a node publishes on `doai.evt.<node_id>.<kind>` (task, step, artifact: `...<kind>.<run_id>`).

Every event carries a unique `event_id` (sent as `Nats-Msg-Id`, so JetStream
drops re-published duplicates), the node's observation time `ts` and its
`node_id`. Events about one device task also carry `run_id`,
`device_serial` and `seq`, a counter per (run, device) that lets the fold
ignore anything older than what it already applied.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal, get_args

from msgspec import Meta, Struct

from contracts.ids import NODE_ID_PATTERN, SERIAL_PATTERN
from contracts.subjects import EventKind

# Task and step states are these Literals wherever they are held (node, backend, aggregator, CLI);
# a state is plain text only in SQL and on the wire.
TaskState = Literal[
    "queued", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped", "interrupted"
]
TASK_STATES: Final[tuple[TaskState, ...]] = get_args(TaskState)
TERMINAL_TASK_STATES: Final[frozenset[TaskState]] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "skipped"}
)
# What a task row can read (REST, views): a node's states, and `lost`, which the aggregator writes
# when the task's node sends no heartbeat within the grace period. A node never sends `lost` (an
# event claiming it does not decode and is dead-lettered); its next report on the task replaces it.
RecordedTaskState = Literal[
    "queued", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped", "interrupted", "lost"
]
RECORDED_TASK_STATES: Final[tuple[RecordedTaskState, ...]] = get_args(RecordedTaskState)
# `lost` counts as done for a run's status (and its outcome) though a node's next report may replace it.
DONE_TASK_STATES: Final[frozenset[RecordedTaskState]] = frozenset({*TERMINAL_TASK_STATES, "lost"})
StepState = Literal["started", "ok", "failed", "timed_out", "skipped"]
STEP_STATES: Final[tuple[StepState, ...]] = get_args(StepState)
TERMINAL_STEP_STATES: Final[frozenset[StepState]] = frozenset({"ok", "failed", "timed_out", "skipped"})


# Bounds on what ends up in indexed columns: a malformed event fails to decode
# (and is dead-lettered) instead of failing the fold's transaction.
EventId = Annotated[str, Meta(min_length=1, max_length=128)]
NodeId = Annotated[str, Meta(pattern=NODE_ID_PATTERN)]
RunId = Annotated[str, Meta(min_length=1, max_length=64)]
Serial = Annotated[str, Meta(pattern=SERIAL_PATTERN)]
StepId = Annotated[str, Meta(min_length=1, max_length=64)]
Seq = Annotated[int, Meta(ge=0, le=2**62)]
Timestamp = Annotated[datetime, Meta(tz=True)]  # always with its UTC offset


class EventBase(Struct, tag_field="kind", kw_only=True):
    event_id: EventId
    ts: Timestamp
    node_id: NodeId


class TaskEvent(EventBase, tag="task"):
    run_id: RunId
    device_serial: Serial
    seq: Seq
    state: TaskState
    attempt: int = 1
    error: str | None = None
    failed_step: str | None = None


class StepEvent(EventBase, tag="step"):
    run_id: RunId
    device_serial: Serial
    seq: Seq
    step_id: StepId
    index: int
    action: str
    state: StepState
    output: str | None = None
    error: str | None = None


class ArtifactEvent(EventBase, tag="artifact"):
    run_id: RunId
    device_serial: Serial
    seq: Seq
    step_id: StepId
    store: str  # "local" or "supabase"
    key: Annotated[str, Meta(min_length=1, max_length=1024)]  # the path under the store, per the path convention
    uri: Annotated[str, Meta(max_length=4096)]
    bytes: int
    sha256: str
    content_type: str = "image/png"
    # `screenshot`: stored by an upload step; `failure`: the screen captured when a step failed
    # (the `kind` column of `artifacts`; `kind` itself is the event's tag).
    purpose: Literal["screenshot", "failure"] = "screenshot"


class DeviceInfo(Struct, kw_only=True):
    serial: Serial
    status: str
    model: str = ""
    name: str = ""
    mode: int | None = None
    width: int | None = None
    height: int | None = None


class DeviceInventoryEvent(EventBase, tag="device"):
    """What the vendor program lists. `vendor_available=False` means the list is unusable."""

    vendor_available: bool
    devices: list[DeviceInfo]


class NodeHeartbeat(EventBase, tag="node"):
    slots: int
    running: int
    queued: int
    vendor_connected: bool
    version: str
    # Events the node set aside as too large for NATS (its journal's `outbox_refused`; `doai node-refused`).
    # Absent from older nodes: 0.
    refused_events: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0


Event = TaskEvent | StepEvent | ArtifactEvent | DeviceInventoryEvent | NodeHeartbeat
DeviceTaskEvent = TaskEvent | StepEvent | ArtifactEvent


def event_kind(event: EventBase) -> EventKind:
    kind: EventKind = type(event).__struct_config__.tag  # type: ignore[assignment]
    return kind
