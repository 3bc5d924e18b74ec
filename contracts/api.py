"""Bodies of the operator REST API (`/v1/...`)."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct

from contracts.ids import NODE_ID_PATTERN, SERIAL_PATTERN, WORKFLOW_ID_PATTERN

NodeId = Annotated[str, Meta(pattern=NODE_ID_PATTERN)]
Serial = Annotated[str, Meta(pattern=SERIAL_PATTERN)]


class DeviceRef(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    serial: Serial


class Targets(Struct, forbid_unknown_fields=True, kw_only=True):
    """Exactly one of: explicit devices, every online device of some nodes, or every online device."""

    devices: Annotated[list[DeviceRef], Meta(min_length=1, max_length=10_000)] | None = None
    nodes: Annotated[list[NodeId], Meta(min_length=1, max_length=1_000)] | None = None
    all_online: bool | None = None

    def chosen(self) -> list[str]:
        return [
            name
            for name, value in (
                ("devices", self.devices),
                ("nodes", self.nodes),
                ("all_online", self.all_online),
            )
            if value is not None and value is not False
        ]


class RunCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    workflow_id: Annotated[str, Meta(pattern=WORKFLOW_ID_PATTERN)]
    workflow_version: Annotated[int, Meta(ge=1)] | None = None
    params: dict[str, Any] = {}
    targets: Targets
    step_timeouts_ms: dict[str, int] = {}


class RunCreated(Struct):
    run_id: str
    status: str
    targets: int


class ArtifactView(Struct):
    step_id: str
    store: str
    key: str
    uri: str
    bytes: int


class TaskView(Struct):
    node_id: str
    device_serial: str
    state: str
    attempt: int
    started_at: str | None
    finished_at: str | None
    error: str | None
    artifacts: list[ArtifactView]


class RunView(Struct):
    run_id: str
    workflow_id: str
    workflow_version: int
    status: str
    created_at: str
    counts: dict[str, int]
    tasks: list[TaskView]


class WorkflowView(Struct):
    workflow_id: str
    version: int
    created_at: str
    recipe: dict[str, Any]


class ErrorBody(Struct):
    code: str
    message: str
    details: list[dict[str, str]] = []


class ErrorResponse(Struct):
    error: ErrorBody
