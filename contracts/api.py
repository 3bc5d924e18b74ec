"""Bodies of the REST API (`/v1/...`): what operators and nodes send and receive.

Request bodies are decoded with msgspec from the raw bytes; the OpenAPI
document declares the same Structs (`msgspec.json.schema_components`), so the
schema a client (or a fuzzer) sees is the one the server enforces.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from msgspec import UNSET, Meta, Struct, UnsetType, field

from contracts.events import RecordedTaskState, StepState
from contracts.ids import NODE_ID_PATTERN, SERIAL_PATTERN, WORKFLOW_ID_PATTERN
from contracts.recipe_model import MAX_INT, MIN_INT, ParamName, StepId
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


RetryState = Literal["failed", "timed_out", "lost", "cancelled", "skipped", "interrupted"]
DEFAULT_RETRY_STATES: tuple[RetryState, ...] = ("failed", "timed_out", "lost")


class RunRetry(Struct, forbid_unknown_fields=True, kw_only=True):
    """Retry a finished run: a new run over exactly the devices of that run in `states`, with its workflow
    version, params and step timeouts, and `parent_run_id` set to it."""

    states: Annotated[list[RetryState], Meta(min_length=1, max_length=6)] = field(
        default_factory=lambda: list(DEFAULT_RETRY_STATES))


class RunCancelled(Struct, kw_only=True):
    run_id: str
    status: str
    nodes: int  # nodes a RunCancel was (or will be) sent to


class StepView(Struct, kw_only=True):
    """One recipe step of one device's task, as the node last reported it."""

    step_id: Annotated[str, Meta(description="The recipe step id")]
    index: Annotated[int, Meta(description="Position of the step in the recipe (0-based)")]
    action: Annotated[str, Meta(description="The step's action (open_url, tap, screenshot, ...)")]
    state: Annotated[StepState, Meta(description="started, ok, failed, timed_out or skipped")]
    started_at: Annotated[str | None, Meta(description="When the step (its last try) started")]
    finished_at: Annotated[str | None, Meta(description="When the step finished")]
    output: Annotated[str | None, Meta(description="What the step returned (clipped), e.g. a shell command's output")]
    error: Annotated[str | None, Meta(description="`code: message` when the step did not succeed")]


RunStatus = Literal["pending", "dispatched", "running", "completed", "cancelled"]
RUN_STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
FINISHED_RUN_STATUSES: frozenset[RunStatus] = frozenset({"completed", "cancelled"})
RunOutcome = Literal["succeeded", "failed", "cancelled"]
StateCounts = Annotated[dict[RecordedTaskState, int], Meta(description=(
    "Number of tasks per task state (queued, running, succeeded, failed, timed_out, cancelled, skipped,"
    " interrupted, lost); states with no task are left out"))]


class NodeCounts(Struct, kw_only=True):
    """The run's tasks on one node, counted per state."""

    node_id: Annotated[str, Meta(description="The node")]
    tasks: Annotated[int, Meta(description="Tasks of the run on this node")]
    counts: StateCounts


class FailingStep(Struct, kw_only=True):
    """A step at which tasks of the run stopped, with the error code they stopped on."""

    step_id: Annotated[str, Meta(description="The recipe step the tasks failed at (`failed_step`)")]
    error_code: Annotated[str | None, Meta(description=(
        "The code of the task's error: the text before the first `:` (e.g. `step_timeout`, `assert_failed`,"
        " `device_offline`); null when the task has no error text"))]
    tasks: Annotated[int, Meta(description="How many tasks stopped at this step with this code")]
    example: Annotated[str | None, Meta(description="The error text of one of these tasks")] = None


class RunTimings(Struct, kw_only=True):
    """When the run's tasks ran, and how long one took."""

    first_started_at: Annotated[str | None, Meta(description="Earliest task start (RFC 3339, UTC); null before any")]
    last_finished_at: Annotated[str | None, Meta(description="Latest task finish (RFC 3339, UTC); null before any")]
    p50_task_ms: Annotated[int | None, Meta(description=(
        "Median task duration in milliseconds, over tasks that started and finished, cancelled tasks excluded;"
        " null when there is none"))]
    p95_task_ms: Annotated[int | None, Meta(description="95th percentile of the same durations (ms)")]
    measured_tasks: Annotated[int, Meta(description="How many task durations the percentiles are computed over")]


class RunView(Struct, kw_only=True):
    """A run's summary: lifecycle, outcome, counts, where it failed and how long it took.

    The tasks themselves are paged at `GET /v1/runs/{run_id}/tasks`; one task with its steps,
    outputs and artifacts at `GET /v1/runs/{run_id}/tasks/{node_id}/{serial}`.
    """

    run_id: Annotated[str, Meta(description="The run id (UUID)")]
    workflow_id: Annotated[str, Meta(description="The workflow the run runs")]
    workflow_version: Annotated[int, Meta(description="The published version of the workflow the run runs")]
    status: Annotated[RunStatus, Meta(description=(
        "Lifecycle: pending (stored, not yet broadcast) → dispatched (broadcast to every node) → running (a"
        " task started) → completed (every task reached a final state), or cancelled (by an operator)"))]
    outcome: Annotated[RunOutcome | None, Meta(description=(
        "Null while the run is not finished. `succeeded`: completed and every targeted device succeeded;"
        " `failed`: completed and at least one device did not succeed (failed, timed_out, skipped,"
        " interrupted, lost ...); `cancelled`: the run was cancelled. A script tests this field instead of"
        " counting states"))]
    created_at: Annotated[str, Meta(description="When the run was created (RFC 3339, UTC)")]
    dispatched_at: Annotated[str | None, Meta(description="When every node's broadcast was published")] = None
    finished_at: Annotated[str | None, Meta(description="When the run completed or was cancelled")] = None
    params: Annotated[dict[str, Any], Meta(description="The params the run was created with")] = {}
    step_timeouts_ms: Annotated[dict[str, int], Meta(description=(
        "Per-step timeouts in milliseconds the run was created with (the overrides, within the workflow's bounds)"
    ))] = {}
    targets: Annotated[int, Meta(description="Devices the run targets (one task each)")] = 0
    succeeded: Annotated[int, Meta(description="Tasks that succeeded")] = 0
    not_succeeded: Annotated[int, Meta(description=(
        "Tasks in a final state other than succeeded (failed, timed_out, cancelled, skipped, lost)"))] = 0
    counts: StateCounts = {}
    nodes: Annotated[list[NodeCounts], Meta(description="Counts per node, ordered by node id")] = []
    failing_steps: Annotated[list[FailingStep], Meta(description=(
        "The steps most tasks failed at, with their error codes, most frequent first (at most 10)"))] = []
    timings: RunTimings | None = None
    parent_run_id: Annotated[str | None, Meta(description=(
        "The run this one retries (`POST /v1/runs/{run_id}/retry`); null for a run created directly"))] = None
    retry_run_ids: Annotated[list[str], Meta(description="Runs made by retrying this one, oldest first")] = []


class TaskRow(Struct, kw_only=True):
    """One device's task in a run, without its steps."""

    run_id: Annotated[str, Meta(description="The run")]
    node_id: Annotated[str, Meta(description="The node that runs the device")]
    device_serial: Annotated[str, Meta(description="The device")]
    state: Annotated[RecordedTaskState, Meta(description=(
        "queued, running, succeeded, failed, timed_out, cancelled, skipped, interrupted or lost (no heartbeat"
        " from its node within the grace period; the node's next report replaces it)"))]
    attempt: Annotated[int, Meta(description="Attempt number the node reported (0 before the node reported)")]
    started_at: Annotated[str | None, Meta(description="When the task started on the device")]
    finished_at: Annotated[str | None, Meta(description="When the task reached its final state")]
    duration_ms: Annotated[int | None, Meta(description="finished_at − started_at in milliseconds")]
    error: Annotated[str | None, Meta(description="`code: message` of what stopped the task")]
    failed_step: Annotated[str | None, Meta(description="The step the task stopped at")]
    workflow_id: Annotated[str | None, Meta(description="The run's workflow (device history only)")] = None
    workflow_version: Annotated[int | None, Meta(description="The run's workflow version (device history only)")] = None


class TaskPage(Struct, kw_only=True):
    """A page of tasks in a stable order; pass `next_cursor` as `cursor` for the next page (null: last page)."""

    tasks: list[TaskRow]
    next_cursor: str | None


class TaskDetail(Struct, kw_only=True):
    """One device's task with every step (state, output, error) and its artifacts with download links."""

    task: TaskRow
    steps: list[StepView]
    artifacts: list[ArtifactLink]


class RunSummary(Struct, kw_only=True):
    run_id: str
    workflow_id: str
    workflow_version: int
    status: RunStatus
    created_at: str
    dispatched_at: str | None
    finished_at: str | None
    targets: int
    counts: StateCounts


class RunPage(Struct, kw_only=True):
    runs: list[RunSummary]
    next_cursor: str | None


class ArtifactLink(Struct, kw_only=True):
    """One stored artifact of a task, with a link an operator (or a browser, or Grafana) can open."""

    node_id: Annotated[str, Meta(description="The node that stored it")]
    device_serial: Annotated[str, Meta(description="The device it shows")]
    step_id: Annotated[str, Meta(description="The upload step that stored it, or the step that failed (`failure`)")]
    store: Annotated[str, Meta(description="`local` (the folder of `doai up`, served by this API) or `supabase`")]
    key: Annotated[str, Meta(description="Its path in the store, per the artifact path template")]
    bytes: Annotated[int, Meta(description="Size in bytes")]
    sha256: Annotated[str, Meta(description="SHA-256 of the content, hex")]
    content_type: Annotated[str, Meta(description="MIME type, e.g. image/png")]
    created_at: Annotated[str, Meta(description="When the node stored it (RFC 3339, UTC)")]
    url: Annotated[str | None, Meta(description=(
        "An HTTP URL that downloads it without further credentials, valid for DOAI_SIGNED_URL_TTL_S seconds:"
        " a Supabase Storage signed URL, or for the local store this API's"
        " /v1/artifacts/local/{key}?expires=&sig= link. Null when no link can be made (see `error`)"))]
    path: Annotated[str | None, Meta(description="Local store: the file on the backend's machine")] = None
    error: Annotated[str | None, Meta(description="Why there is no url")] = None
    kind: Annotated[Literal["screenshot", "failure"], Meta(description=(
        "`screenshot`: stored by an upload step; `failure`: the screen the node captured when the step failed"
    ))] = "screenshot"


class ArtifactList(Struct, kw_only=True):
    run_id: str
    artifacts: list[ArtifactLink]


class WorkflowView(Struct):
    workflow_id: str
    version: int
    created_at: str
    recipe: dict[str, Any]


class RecipeWarning(Struct):
    """Something in a published recipe that is allowed but probably a mistake."""

    path: Annotated[str, Meta(description="JSON path of what the warning is about, e.g. `$.params.unused`")]
    message: Annotated[str, Meta(description="What is odd about it")]


class WorkflowPublished(Struct):
    workflow_id: Annotated[str, Meta(description="The workflow")]
    version: Annotated[int, Meta(description="The version this publish stored")]
    warnings: Annotated[list[RecipeWarning], Meta(description=(
        "Accepted, but probably a mistake: e.g. a declared param nothing uses"))] = []


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
    # Events the node set aside as too large for NATS, as its last heartbeat said: missing here until an
    # operator puts them back on the node (`doai node-refused --requeue`).
    refused_events: int = 0


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


class NodeReadmitted(Struct, kw_only=True):
    """`POST /v1/nodes/{node_id}/readmit`: a revoked node id may enroll again, with a new key pair."""

    node_id: str


class Health(Struct):
    status: str


class ErrorBody(Struct):
    code: str
    message: str
    details: list[dict[str, str]] = []


class ErrorResponse(Struct):
    error: ErrorBody
