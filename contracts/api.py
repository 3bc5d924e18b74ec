"""Bodies of the REST API (`/v1/...`): what operators and nodes send and receive.

Request bodies are decoded with msgspec from the raw bytes; the OpenAPI
document declares the same Structs (`msgspec.json.schema_components`), so the
schema a client (or a fuzzer) sees is the one the server enforces.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from contracts.events import RecordedTaskState
from contracts.ids import NODE_ID_PATTERN, SERIAL_PATTERN, WORKFLOW_ID_PATTERN
from contracts.recipe import MAX_INT, MIN_INT, ParamName, StepId
from contracts.text import MAX_TEXT_CHARS, PLAIN_PATTERN

NodeId = Annotated[str, Meta(pattern=NODE_ID_PATTERN)]
Serial = Annotated[str, Meta(pattern=SERIAL_PATTERN)]
WorkflowId = Annotated[str, Meta(pattern=WORKFLOW_ID_PATTERN)]
# A run id as this API returns it (a UUID, lower or upper case hex).
RUN_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# Parameter values are scalars, checked against the recipe's declarations (type, required, pattern).
# Decoded as Any so a wrong value is reported at its own path (`$.params.url`) by that check, which
# enforces exactly this schema (length, characters, 64-bit integers).
PARAM_VALUE_SCHEMA = {"anyOf": [
    {"type": "string", "maxLength": MAX_TEXT_CHARS, "pattern": PLAIN_PATTERN},
    {"type": "integer", "minimum": MIN_INT, "maximum": MAX_INT},
    {"type": "boolean"},
]}
Params = Annotated[
    dict[ParamName, Any],
    Meta(max_length=100, extra_json_schema={"additionalProperties": PARAM_VALUE_SCHEMA},
         description="Values for the workflow's declared params: each of the declared type (strings at most"
                     f" {MAX_TEXT_CHARS} characters without control characters, 64-bit integers, booleans) and"
                     " matching the param's pattern; required params without a default must be given; params that"
                     " fill the artifact path template (`youtubeVideoId`) must be plain path segments when the"
                     " workflow uploads a screenshot."),
]
# `Idempotency-Key` header: printable ASCII without spaces, at most 200 characters.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
MAX_PAGE_SIZE = 200
DEFAULT_PAGE_SIZE = 50


class DeviceRef(Struct, forbid_unknown_fields=True):
    node_id: NodeId
    serial: Serial


DeviceList_ = Annotated[list[DeviceRef], Meta(min_length=1, max_length=10_000)]
NodeIdList = Annotated[list[NodeId], Meta(min_length=1, max_length=1_000)]


class Targets(Struct, forbid_unknown_fields=True, kw_only=True):
    """Exactly one of: explicit devices, every online device of some nodes, or every online device.

    The OpenAPI document states it as a `oneOf` (see `TARGETS_SCHEMA`).
    """

    devices: DeviceList_ | UnsetType = UNSET
    nodes: NodeIdList | UnsetType = UNSET
    all_online: Literal[True] | UnsetType = UNSET

    def chosen(self) -> list[str]:
        return [name for name in ("devices", "nodes", "all_online") if getattr(self, name) is not UNSET]


def _one_target(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {name: schema}, "required": [name], "additionalProperties": False}


# The schema of `Targets` in the OpenAPI document: what `RunCreate` decoding plus `chosen()` enforce.
TARGETS_SCHEMA: dict[str, Any] = {
    "description": Targets.__doc__.splitlines()[0] if Targets.__doc__ else "",
    "oneOf": [
        _one_target("devices", {"type": "array", "minItems": 1, "maxItems": 10_000,
                                "items": {"$ref": "#/components/schemas/DeviceRef"}}),
        _one_target("nodes", {"type": "array", "minItems": 1, "maxItems": 1_000,
                              "items": {"type": "string", "pattern": NODE_ID_PATTERN}}),
        _one_target("all_online", {"type": "boolean", "enum": [True]}),
    ],
}


class RunCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """A run of one workflow version on explicit targets.

    Checked against the workflow (422 with the path of each fault): `params` against its declared
    params; each `step_timeouts_ms` key must be a step id of the workflow and its value within that
    step's bounds; `targets` names exactly one of `devices`, `nodes`, `all_online` and must resolve
    to at least one online device. Integers may be written as whole-number floats (`1.0`).
    """

    workflow_id: WorkflowId
    workflow_version: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    params: Params = {}
    targets: Targets
    step_timeouts_ms: Annotated[
        dict[StepId, Annotated[int, Meta(ge=0, le=2**31 - 1)]], Meta(max_length=200)
    ] = {}


class Rejection(Struct):
    """A requested target that was left out, and why."""

    node_id: str
    serial: str
    reason: str


class RunCreated(Struct, kw_only=True):
    run_id: str
    status: str
    targets: int
    rejected: list[Rejection] = []


class RunCancelled(Struct, kw_only=True):
    run_id: str
    status: str
    nodes: int  # nodes a RunCancel was (or will be) sent to


class ArtifactView(Struct):
    step_id: str
    store: str
    key: str
    uri: str
    bytes: int


class StepView(Struct, kw_only=True):
    step_id: str
    index: int
    action: str
    state: str
    started_at: str | None
    finished_at: str | None
    output: str | None
    error: str | None


class TaskView(Struct, kw_only=True):
    """`state`: a node-reported state, or `lost` (no heartbeat from its node within the grace period;
    the node's next report replaces it). See docs/architecture.md "States"."""

    node_id: str
    device_serial: str
    state: RecordedTaskState
    attempt: int
    started_at: str | None
    finished_at: str | None
    error: str | None
    artifacts: list[ArtifactView]
    failed_step: str | None = None
    steps: list[StepView] = []


class RunView(Struct, kw_only=True):
    run_id: str
    workflow_id: str
    workflow_version: int
    status: str
    created_at: str
    counts: dict[str, int]
    tasks: list[TaskView]
    dispatched_at: str | None = None
    finished_at: str | None = None
    params: dict[str, str] = {}


class RunSummary(Struct, kw_only=True):
    run_id: str
    workflow_id: str
    workflow_version: int
    status: str
    created_at: str
    dispatched_at: str | None
    finished_at: str | None
    targets: int
    counts: dict[str, int]


class RunPage(Struct, kw_only=True):
    runs: list[RunSummary]
    next_cursor: str | None


class ArtifactLink(Struct, kw_only=True):
    node_id: str
    device_serial: str
    step_id: str
    store: str
    key: str
    bytes: int
    sha256: str
    content_type: str
    created_at: str
    url: str | None  # signed URL (Supabase) or file:// URI (local store); None when it cannot be made
    path: str | None = None  # local store: the file on the backend's machine
    error: str | None = None  # why there is no url


class ArtifactList(Struct, kw_only=True):
    run_id: str
    artifacts: list[ArtifactLink]


class WorkflowView(Struct):
    workflow_id: str
    version: int
    created_at: str
    recipe: dict[str, Any]


class WorkflowPublished(Struct):
    workflow_id: str
    version: int


class WorkflowSummary(Struct, kw_only=True):
    workflow_id: str
    latest_version: int
    title: str
    created_at: str


class WorkflowList(Struct):
    workflows: list[WorkflowSummary]


class DeviceView(Struct, kw_only=True):
    """`status` is what the node's newest inventory listed; `online` / `liveness` add the liveness rule
    (listed online within the window, on a node whose heartbeat is within it): `liveness` is
    online | stale | the listed status. The same values as the `device_liveness` view."""

    node_id: str
    serial: str
    status: str
    model: str
    last_seen: str | None
    online: bool = False
    liveness: str = "stale"


class DeviceList(Struct):
    devices: list[DeviceView]


class NodeView(Struct, kw_only=True):
    node_id: str
    slots: int
    running: int
    queued: int
    vendor_connected: bool  # only while the node is alive (`online`)
    version: str
    last_seen: str | None
    online: bool = False  # a heartbeat within the liveness window (the `node_liveness` view)


class NodeList(Struct):
    nodes: list[NodeView]


class NodeTimeouts(Struct, kw_only=True):
    step_ms: int
    upload_ms: int


class NodeConfig(Struct, kw_only=True):
    """What `GET /v1/node/config` tells a node agent (authenticated by `X-Node-Auth`)."""

    node_id: str
    slots: int
    timeouts: NodeTimeouts


# A NATS user public key (nkey): "U" and 55 base32 characters.
USER_PUBLIC_KEY_PATTERN = r"^U[A-Z2-7]{55}$"


class NodeEnrollRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/node/enroll` (X-Node-Auth): a new node asks for its NATS identity.

    The node made its own user key pair; only the public key travels. The seed never leaves the node.
    """

    node_id: NodeId
    public_key: Annotated[str, Meta(pattern=USER_PUBLIC_KEY_PATTERN)]


class NodeEnrollment(Struct, kw_only=True):
    """The answer to an enrollment: the node's user JWT and what it must trust."""

    node_id: str
    public_key: str
    # The user JWT for `public_key`, signed by the DOAI account's signing key; with the node's
    # own seed it makes the node's `.creds` file.
    user_jwt: str
    # The backend's command-signing public key: the node refuses commands not signed by it.
    command_public_key: str
    enrolled_at: str


class NodeRevoked(Struct, kw_only=True):
    """`POST /v1/nodes/{node_id}/revoke`: the node's NATS identity no longer connects."""

    node_id: str
    public_key: str
    revoked_at: str


class Health(Struct):
    status: str


class ErrorBody(Struct):
    code: str
    message: str
    details: list[dict[str, str]] = []


class ErrorResponse(Struct):
    error: ErrorBody
