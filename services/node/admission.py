"""What a node checks in a command before anything is journaled or reaches a device.

The signature is checked first (`CommandConsumer`); these checks come after it
and hold even for a correctly signed command (defence in depth): a bug or a
compromised backend must still not make a node write outside its folders or
run a recipe the backend's own validator would refuse.

A `RunBroadcast` is admitted only when
* it is addressed to this node and its `run_id` is a canonical UUID (it becomes
  a folder name under the spool);
* its recipe snapshot passes `validate_recipe`, the validator the backend runs
  when a recipe is published, and names the broadcast's `workflow_id`;
* its params are exactly what `validate_params` makes of them (declared, typed,
  matching their patterns, defaults filled in) and keep every `assert` pattern
  valid RE2 once filled in (`check_assert_patterns`, as at run creation);
* its step timeouts name every step of the recipe and no other, each within the
  step's bounds (`resolve_step_timeouts`);
* its devices are valid serials, at least one, no duplicates, never the
  vendor's `all` target and never a comma list (rule 6).

Whether each device belongs to this node is decided by the agent, per device
(`NodeAgent.on_broadcast`): a serial the node's driver never listed ends
`skipped` with `unknown_device` and is never sent to the driver.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

from contracts.commands import RunBroadcast, RunCancel
from contracts.ids import WORKFLOW_ID_PATTERN, is_run_id, is_serial
from contracts.recipe_check import (
    RecipeInvalid,
    check_assert_patterns,
    resolve_step_timeouts,
    validate_params,
    validate_recipe,
)
from contracts.recipe_model import Recipe
from services.node.errors import NodeError

MAX_DEVICES: Final = 10_000
_WORKFLOW_ID: Final = re.compile(WORKFLOW_ID_PATTERN)
_INTEGER: Final = re.compile(r"-?[0-9]{1,19}")


class Refused(NodeError):
    """A command the node will not act on; `code` names the rule, the message says what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message[:600], code=code)


def shown(value: str) -> str:
    """An untrusted value for a log line or an error: bounded, repr-quoted."""
    return repr(value[:100]) + ("…" if len(value) > 100 else "")


def _check_address(command: RunBroadcast | RunCancel, node_id: str) -> None:
    if command.node_id != node_id:
        raise Refused("wrong_node", f"addressed to node {shown(command.node_id)}, this is {node_id!r}")
    if not is_run_id(command.run_id):
        raise Refused("bad_run_id", f"run_id {shown(command.run_id)} is not a UUID in canonical form")


def _typed(recipe: Recipe, params: dict[str, str]) -> dict[str, Any]:
    """The broadcast's string params back as the types the recipe declares (what the operator sent)."""
    typed: dict[str, Any] = {}
    for name, text in params.items():
        spec = recipe.params.get(name)
        value: Any = text
        if spec is not None and spec.type == "integer" and _INTEGER.fullmatch(text):
            value = int(text)
        elif spec is not None and spec.type == "boolean" and text in ("true", "false"):
            value = text == "true"
        typed[name] = value  # anything else stays a string: validate_params reports it
    return typed


def _check_devices(devices: list[str]) -> None:
    if not devices:
        raise Refused("bad_devices", "the broadcast names no device")
    if len(devices) > MAX_DEVICES:
        raise Refused("bad_devices", f"the broadcast names {len(devices)} devices (at most {MAX_DEVICES})")
    seen: set[str] = set()
    for serial in devices:
        if serial.strip().lower() == "all" or "," in serial:
            raise Refused("bad_devices", f"device {shown(serial)} is a group target; a node runs explicit serials only")
        if not is_serial(serial):
            raise Refused("bad_devices", f"device {shown(serial)} is not a valid serial")
        if serial in seen:
            raise Refused("bad_devices", f"device {shown(serial)} is named twice")
        seen.add(serial)


def check_broadcast(b: RunBroadcast, node_id: str) -> None:
    """Raise `Refused` unless `b` may be journaled by node `node_id` (see the module docstring)."""
    _check_address(b, node_id)
    try:
        recipe = validate_recipe(msgspec.to_builtins(b.recipe))
    except RecipeInvalid as err:
        raise Refused("invalid_recipe", f"the recipe snapshot fails validation: {err}") from None
    if b.workflow_id != recipe.workflow_id or not _WORKFLOW_ID.match(b.workflow_id) or b.workflow_version < 1:
        raise Refused("invalid_workflow", f"workflow {shown(b.workflow_id)} version {b.workflow_version} does not "
                                          f"match the recipe snapshot ({recipe.workflow_id!r})")
    try:
        resolved = validate_params(recipe, _typed(recipe, b.params))
    except RecipeInvalid as err:
        raise Refused("invalid_params", f"params do not fit the recipe: {err}") from None
    if resolved != b.params:
        raise Refused("invalid_params", "params are not in the form the backend sends (defaults, canonical values)")
    faults = check_assert_patterns(recipe, b.params)
    if faults:
        raise Refused("invalid_params", f"params make an assert pattern invalid: {RecipeInvalid(faults)}")
    try:
        timeouts = resolve_step_timeouts(recipe, b.step_timeouts_ms)
    except RecipeInvalid as err:
        raise Refused("invalid_timeouts", f"step timeouts do not fit the recipe: {err}") from None
    if timeouts != b.step_timeouts_ms:
        missing = sorted(set(timeouts) - set(b.step_timeouts_ms))
        raise Refused("invalid_timeouts", f"step timeouts missing for steps {missing[:10]}")
    _check_devices(b.devices)


def check_cancel(c: RunCancel, node_id: str) -> None:
    """Raise `Refused` unless `c` may be applied by node `node_id`."""
    _check_address(c, node_id)
