"""Workflow DSL v1: what a recipe is — the msgspec Structs of a recipe document and its steps.

A recipe is a JSON document: declared parameters, timeout defaults and an
ordered list of steps. Every string field of a step may contain `{{name}}`
placeholders that name a declared parameter or a built-in (`run_id`,
`node_id`, `device_serial`). Shell commands are argv lists: each element is
substituted and then shell-quoted by the executor, so a parameter can never
inject a command.

This module holds the types (field by field, as msgspec checks them on
decode) and what reading a valid recipe needs (`render`, a step's timeout and
bounds, its integer fields). The rules across fields, the JSON-path faults and
the checks of what a run adds live in `contracts.recipe_check`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from contracts.ids import WORKFLOW_ID_PATTERN
from contracts.patterns import MAX_PATTERN_CHARS
from contracts.text import PLAIN_PATTERN, FreeText, PlainText

DSL_VERSION: Final = 1
DEFAULT_STEP_TIMEOUT_MS: Final = 90_000
DEFAULT_UPLOAD_TIMEOUT_MS: Final = 30_000
MIN_TIMEOUT_MS: Final = 100
MAX_TIMEOUT_MS: Final = 3_600_000
BUILTIN_PLACEHOLDERS: Final = frozenset({"run_id", "node_id", "device_serial"})
MAX_STEPS: Final = 200
MAX_PARAMS: Final = 100  # as many as a run may pass

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

STEP_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
StepId = Annotated[str, Meta(pattern=STEP_ID_PATTERN)]
PARAM_NAME_PATTERN: Final = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
ParamName = Annotated[str, Meta(pattern=PARAM_NAME_PATTERN)]
TimeoutMs = Annotated[int, Meta(ge=MIN_TIMEOUT_MS, le=MAX_TIMEOUT_MS)]
ShortText = PlainText  # at most 4096 characters, no control characters
# A regular expression (RE2 syntax, see contracts/patterns.py).
Pattern = Annotated[str, Meta(max_length=MAX_PATTERN_CHARS, pattern=PLAIN_PATTERN)]
# Integer params and defaults: 64-bit.
MIN_INT: Final = -(2**63)
MAX_INT: Final = 2**63 - 1
ParamInt = Annotated[int, Meta(ge=MIN_INT, le=MAX_INT)]
# An integer field may instead hold one `{{name}}` placeholder of an `integer` param, filled in per run.
INT_PLACEHOLDER_PATTERN: Final = r"^\{\{\s*[A-Za-z_][A-Za-z0-9_]*\s*\}\}$"
IntParamRef = Annotated[str, Meta(pattern=INT_PLACEHOLDER_PATTERN, max_length=80, description=(
    "A `{{name}}` placeholder of an integer param, filled in per run"))]
# The integer fields of steps that may hold a placeholder, with the bounds the value must fall within.
INT_FIELD_BOUNDS: Final[dict[str, tuple[int, int]]] = {
    "x": (0, MAX_INT), "y": (0, MAX_INT), "x1": (0, MAX_INT), "y1": (0, MAX_INT), "x2": (0, MAX_INT),
    "y2": (0, MAX_INT), "duration_ms": (1, 60_000), "ms": (0, MAX_TIMEOUT_MS),
}
Coord = Annotated[int, Meta(ge=0)] | IntParamRef



class ParamSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    """A parameter a run must (or may) supply.

    `default` must be of `type` and match `pattern`; `pattern` (RE2 syntax, no
    backreferences or lookaround) must match a value as a whole.
    """

    type: Literal["string", "integer", "boolean"] = "string"
    required: bool = True
    default: PlainText | ParamInt | bool | None = None
    pattern: Pattern | None = None
    description: FreeText = ""


class TimeoutDefaults(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Recipe-wide defaults and the bounds a run override must stay within."""

    step_ms: TimeoutMs = DEFAULT_STEP_TIMEOUT_MS
    upload_ms: TimeoutMs = DEFAULT_UPLOAD_TIMEOUT_MS
    min_ms: TimeoutMs = 1_000
    max_ms: TimeoutMs = 600_000


class StepBase(Struct, tag_field="action", forbid_unknown_fields=True, kw_only=True):
    id: StepId
    title: FreeText = ""
    timeout_ms: TimeoutMs | None = None
    # Bounds for a run's override of this step's timeout; recipe-wide bounds when absent.
    min_timeout_ms: TimeoutMs | None = None
    max_timeout_ms: TimeoutMs | None = None
    retries: Annotated[int, Meta(ge=0, le=10)] = 0
    on_error: Literal["fail", "continue"] = "fail"


class AdbShell(StepBase, tag="adb_shell"):
    """Run a shell command on the phone; argv elements are quoted one by one."""

    command: Annotated[list[ShortText], Meta(min_length=1, max_length=64)]


class OpenUrl(StepBase, tag="open_url"):
    url: ShortText


class LaunchApp(StepBase, tag="launch_app"):
    package: ShortText


class StopApp(StepBase, tag="stop_app"):
    package: ShortText


class KeyEvent(StepBase, tag="keyevent"):
    key: ShortText  # "home", "back", "recents" or an Android KEYCODE_* name / number


class Tap(StepBase, tag="tap"):
    x: Coord
    y: Coord


class Swipe(StepBase, tag="swipe"):
    x1: Coord
    y1: Coord
    x2: Coord
    y2: Coord
    duration_ms: Annotated[int, Meta(ge=1, le=60_000)] | IntParamRef = 300


class InputText(StepBase, tag="input_text"):
    text: ShortText


class Wait(StepBase, tag="wait"):
    ms: Annotated[int, Meta(ge=0, le=MAX_TIMEOUT_MS)] | IntParamRef


class Screenshot(StepBase, tag="screenshot"):
    pass


class Upload(StepBase, tag="upload"):
    """Store the screenshot of step `source` (default: the latest one) as an artifact."""

    source: StepId | None = None


class Assert(StepBase, tag="assert"):
    """Fail unless `pattern` (RE2 syntax, searched anywhere) matches the output of the earlier step `source`."""

    source: StepId
    pattern: Pattern


class Report(StepBase, tag="report"):
    """Finish the device's workflow: a summary of the steps is sent with the task event. The last step."""


Step = (
    AdbShell
    | OpenUrl
    | LaunchApp
    | StopApp
    | KeyEvent
    | Tap
    | Swipe
    | InputText
    | Wait
    | Screenshot
    | Upload
    | Assert
    | Report
)
STEP_TYPES: Final[tuple[type[StepBase], ...]] = Step.__args__
STEP_ACTIONS: Final[tuple[str, ...]] = tuple(str(t.__struct_config__.tag) for t in STEP_TYPES)


class Recipe(Struct, forbid_unknown_fields=True, kw_only=True):
    # (The docstring goes into recipes/schema.json; the rules it lists are in contracts/recipe_check.py.)
    """One version of a workflow (DSL v1). The backend assigns the version on publish.

    Rules across fields, checked on publish (422 `invalid_recipe`, every fault with its path):
    step ids are unique; every `{{name}}` placeholder names a declared param or a built-in
    (`run_id`, `node_id`, `device_serial`); an `assert` or `upload` `source` names an earlier
    step, and an upload's source is a `screenshot` (an upload without `source` needs an earlier
    screenshot); `timeouts.min_ms <= timeouts.max_ms`; a step's `timeout_ms` lies within its
    bounds (`min_timeout_ms`/`max_timeout_ms`, else the recipe's); a param `default` has the
    param's type and matches its `pattern`; patterns are RE2 (linear time: no backreferences, no
    lookaround). Titles and descriptions may contain tab, line feed and carriage return; no other
    string may contain a control character. `timeouts.step_ms` and `upload_ms` lie within
    `[min_ms, max_ms]`, and a step's default timeout within its own bounds; `report`, if present, is
    the last step; an integer field holding `{{name}}` names an `integer` param whose default fits the
    field; when the recipe uploads, every param the artifact path template needs is declared and
    required or defaulted. A declared param nothing uses is a warning, not a fault. `$schema` (a URI
    of `recipes/schema.json` for editors) is allowed and ignored.
    """

    schema: Annotated[str, Meta(max_length=2048, pattern=PLAIN_PATTERN)] | UnsetType = msgspec.field(
        default=UNSET, name="$schema")
    dsl: Literal[1]
    workflow_id: Annotated[str, Meta(pattern=WORKFLOW_ID_PATTERN)]
    title: FreeText = ""
    description: FreeText = ""
    params: Annotated[dict[ParamName, ParamSpec], Meta(max_length=MAX_PARAMS)] = {}
    timeouts: TimeoutDefaults = TimeoutDefaults()
    # When a step fails, the node captures the device's screen and stores it as a `failure` artifact
    # (absent: on; left out when encoded, so recipes that do not set it keep their stored form).
    failure_screenshot: bool | UnsetType = UNSET
    steps: Annotated[list[Step], Meta(min_length=1, max_length=MAX_STEPS)]

    @property
    def takes_failure_screenshots(self) -> bool:
        return self.failure_screenshot is not False

    def step(self, step_id: str) -> StepBase | None:
        for s in self.steps:
            if s.id == step_id:
                return s
        return None



def int_fields(step: StepBase) -> list[tuple[str, int | str]]:
    """The step's integer fields that may hold a param placeholder, with their values."""
    return [(f, getattr(step, f)) for f in step.__struct_fields__ if f in INT_FIELD_BOUNDS]


def placeholder_name(ref: str) -> str:
    m = PLACEHOLDER.fullmatch(ref.strip())
    return m.group(1) if m else ref


def render(text: str, values: dict[str, str]) -> str:
    """Substitute `{{name}}` placeholders (unknown names are left for the validator to catch)."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def param_text(value: str | int | bool) -> str:
    """A param value as the text steps and the artifact path see (`true`/`false` for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def step_timeout_bounds(recipe: Recipe, step: StepBase) -> tuple[int, int]:
    lo = step.min_timeout_ms if step.min_timeout_ms is not None else recipe.timeouts.min_ms
    hi = step.max_timeout_ms if step.max_timeout_ms is not None else recipe.timeouts.max_ms
    return lo, hi


def default_step_timeout(recipe: Recipe, step: StepBase) -> int:
    if step.timeout_ms is not None:
        return step.timeout_ms
    return recipe.timeouts.upload_ms if isinstance(step, Upload) else recipe.timeouts.step_ms


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of a recipe document, for editors (kept in `recipes/schema.json`)."""
    return msgspec.json.schema(Recipe)
