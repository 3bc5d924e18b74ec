"""Workflow DSL v1: the recipe validator and the checks of what a run adds to a recipe.

`validate_recipe` turns a decoded document into a `contracts.recipe_model.Recipe`
and reports every fault with its JSON path at once (`$.steps[2].url`), not only
the first one; `validate_params`, `resolve_step_timeouts`, `check_int_params`
and `check_assert_patterns` check what a run adds (parameter values and per-step
timeout overrides). The backend runs them on publish and on run creation, the
node again on every broadcast it admits.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec
from msgspec import Struct

from contracts.artifact_path import ArtifactPathError, param_fields
from contracts.patterns import PatternError, compile_pattern
from contracts.recipe_model import (
    BUILTIN_PLACEHOLDERS,
    DSL_VERSION,
    INT_FIELD_BOUNDS,
    MAX_INT,
    MAX_PARAMS,
    MAX_STEPS,
    MAX_TIMEOUT_MS,
    MIN_INT,
    MIN_TIMEOUT_MS,
    PARAM_NAME_PATTERN,
    PLACEHOLDER,
    STEP_ACTIONS,
    STEP_ID_PATTERN,
    Assert,
    ParamSpec,
    Recipe,
    Report,
    Screenshot,
    Step,
    TimeoutDefaults,
    Upload,
    default_step_timeout,
    int_fields,
    param_text,
    placeholder_name,
    render,
    step_timeout_bounds,
)
from contracts.text import MAX_TEXT_CHARS, explain, has_control

# Past this many faults the validator stops looking (a hostile document could otherwise keep it busy).
MAX_FAULTS: Final = 200

_STEP_ID = re.compile(STEP_ID_PATTERN)
_PARAM_NAME = re.compile(PARAM_NAME_PATTERN)


class Fault(Struct, frozen=True):
    """One problem found in a document, located by its JSON path (`$.steps[2].url`)."""

    path: str
    message: str


class RecipeInvalid(ValueError):
    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        super().__init__("; ".join(f"{f.path}: {f.message}" for f in faults))


def _join(prefix: str, msgspec_path: str) -> str:
    """Graft msgspec's `$...` path onto `prefix`."""
    return prefix + msgspec_path[1:] if msgspec_path.startswith("$") else prefix


_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(.*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(.*)`$")


def _fault_from(err: msgspec.ValidationError, prefix: str) -> Fault:
    """A msgspec error as a Fault; an unknown or missing field is located at the field itself."""
    text = str(err)
    path = prefix
    if " - at `" in text:
        text, _, raw_path = text.rpartition(" - at `")
        path = _join(prefix, raw_path.rstrip("`"))
    text = explain(text)
    named = _UNKNOWN_FIELD.match(text) or _MISSING_FIELD.match(text)
    if named:
        path = f"{path}.{named.group(1)}"
    return Fault(path, text)


# The title of a stand-in step (no real title can hold a NUL): the report-is-last rule skips them.
_STAND_IN: Final = "\x00stand-in"


def _stand_in(raw: Any, i: int) -> Screenshot | Report:
    """A neutral step in place of one that did not convert, so the semantic checks can still run.

    It keeps the step's id (for duplicate and `source` checks) and whether it was a screenshot.
    """
    raw_id = raw.get("id") if isinstance(raw, dict) else None
    step_id = raw_id if isinstance(raw_id, str) and _STEP_ID.match(raw_id) else f"<invalid step {i}>"
    is_shot = isinstance(raw, dict) and raw.get("action") == "screenshot"
    return Screenshot(id=step_id, title=_STAND_IN) if is_shot else Report(id=step_id, title=_STAND_IN)


def _convert_each(doc: dict[str, Any], faults: list[Fault]) -> tuple[list[Step], dict[str, ParamSpec]]:
    """Check every step and every param by itself so all their faults are reported.

    Returns the steps and params, with neutral stand-ins for the ones that did not convert.
    """
    steps_out: list[Step] = []
    params_out: dict[str, ParamSpec] = {}
    steps = doc.get("steps")
    if isinstance(steps, list):
        for i, raw in enumerate(steps[:MAX_STEPS]):  # (more steps: one fault, from the top-level check)
            try:
                steps_out.append(msgspec.convert(raw, Step))
            except msgspec.ValidationError as err:
                steps_out.append(_stand_in(raw, i))
                fault = _fault_from(err, f"$.steps[{i}]")
                if "Invalid value" in fault.message and fault.path.endswith(".action"):
                    fault = Fault(
                        fault.path, f"unknown action; expected one of {', '.join(STEP_ACTIONS)}"
                    )
                faults.append(fault)
    params = doc.get("params")
    if isinstance(params, dict):
        for name, raw in list(params.items())[:MAX_PARAMS]:
            if not isinstance(name, str) or not _PARAM_NAME.match(name):
                faults.append(Fault(f"$.params.{name}", "param names are letters, digits and '_' (max 64)"))
            try:
                params_out[name] = msgspec.convert(raw, ParamSpec)
            except msgspec.ValidationError as err:
                params_out[name] = ParamSpec(required=False)
                faults.append(_fault_from(err, f"$.params.{name}"))
    return steps_out, params_out


# Stand-ins for required top-level fields that are missing or wrong, so the other fields are still checked.
_TOP_LEVEL_STAND_INS: Final[dict[str, Any]] = {
    "dsl": DSL_VERSION,
    "workflow_id": "stand-in",
    "steps": [{"id": "stub", "action": "report"}],
}


def _check_top_level(doc: dict[str, Any], faults: list[Fault]) -> Recipe | None:
    """Check the top-level fields (steps and params stubbed out), reporting every bad one.

    Returns the top level with stand-ins for the bad fields, or None when no stand-in fits.
    """
    shell = dict(doc)
    steps = doc.get("steps")
    if isinstance(steps, list) and steps:
        shell["steps"] = _TOP_LEVEL_STAND_INS["steps"] * len(steps)  # keeps the length rule
    if isinstance(doc.get("params"), dict):
        shell["params"] = {}
    trusted_timeouts = True
    for _ in range(len(shell) + len(_TOP_LEVEL_STAND_INS)):
        try:
            top = msgspec.convert(shell, Recipe)
        except msgspec.ValidationError as err:
            fault = _fault_from(err, "$")
            faults.append(fault)
            if len(faults) >= MAX_FAULTS:
                return None
            key = re.split(r"[.\[]", fault.path[2:], maxsplit=1)[0]
            if key in _TOP_LEVEL_STAND_INS:
                shell[key] = _TOP_LEVEL_STAND_INS[key]
            elif key in shell:
                del shell[key]  # an unknown field, or one with a default
            else:
                return None
            trusted_timeouts = trusted_timeouts and key != "timeouts"
            continue
        if not trusted_timeouts:  # bounds unknown: check steps against the widest ones only
            top.timeouts = TimeoutDefaults(min_ms=MIN_TIMEOUT_MS, max_ms=MAX_TIMEOUT_MS)
        return top
    return None


def _semantic_faults(recipe: Recipe) -> list[Fault]:
    faults: list[Fault] = []
    seen: dict[str, int] = {}
    declared = set(recipe.params) | BUILTIN_PLACEHOLDERS
    t = recipe.timeouts
    if t.min_ms > t.max_ms:
        faults.append(Fault("$.timeouts", "min_ms is greater than max_ms"))
    else:
        for name in ("step_ms", "upload_ms"):
            value = getattr(t, name)
            if not t.min_ms <= value <= t.max_ms:
                faults.append(Fault(f"$.timeouts.{name}", f"{value} ms is outside the recipe's bounds"
                                                          f" [min_ms {t.min_ms}, max_ms {t.max_ms}]"))
    last = len(recipe.steps) - 1
    for name, spec in recipe.params.items():
        pattern_ok = True
        if spec.pattern is not None:
            try:
                compile_pattern(spec.pattern)
            except PatternError as exc:
                pattern_ok = False
                faults.append(Fault(f"$.params.{name}.pattern", str(exc)))
        if spec.default is not None:
            problem = _param_value_fault(spec, spec.default) if pattern_ok else _param_type_fault(spec, spec.default)
            if problem is not None:
                faults.append(Fault(f"$.params.{name}.default", problem))
    for i, step in enumerate(recipe.steps):
        base = f"$.steps[{i}]"
        if step.id in seen:
            faults.append(Fault(f"{base}.id", f"duplicate step id {step.id!r} (first at $.steps[{seen[step.id]}])"))
        else:
            seen[step.id] = i
        lo, hi = step_timeout_bounds(recipe, step)
        if lo > hi:
            faults.append(Fault(base, f"timeout bounds are empty: min {lo} ms > max {hi} ms"))
        elif step.timeout_ms is not None and not lo <= step.timeout_ms <= hi:
            faults.append(Fault(f"{base}.timeout_ms", f"must be within [{lo}, {hi}] ms"))
        elif step.timeout_ms is None and (step.min_timeout_ms is not None or step.max_timeout_ms is not None):
            ms = default_step_timeout(recipe, step)
            if not lo <= ms <= hi and lo <= hi and t.min_ms <= t.max_ms:
                kind = "upload_ms" if isinstance(step, Upload) else "step_ms"
                faults.append(Fault(f"{base}.timeout_ms", f"the step's default timeout (timeouts.{kind}, {ms} ms)"
                                                          f" is outside its bounds [{lo}, {hi}] ms: set timeout_ms"))
        if isinstance(step, Report) and i < last and step.title != _STAND_IN:
            faults.append(Fault(base, f"report must be the last step; {last - i} step(s) follow it"))
        for field, value in int_fields(step):
            if isinstance(value, str):
                faults.extend(_int_placeholder_faults(recipe, f"{base}.{field}", field, value))
        for field in step.__struct_fields__:
            value = getattr(step, field)
            texts = value if isinstance(value, list) else [value]
            for j, text in enumerate(texts):
                if not isinstance(text, str):
                    continue
                where = f"{base}.{field}" + (f"[{j}]" if isinstance(value, list) else "")
                for name in PLACEHOLDER.findall(text):
                    if name not in declared:
                        faults.append(Fault(where, f"placeholder {{{{{name}}}}} names no declared param"))
        if isinstance(step, Assert | Upload) and step.source is not None:
            earlier = {s.id for s in recipe.steps[:i]}
            if step.source not in earlier:
                faults.append(Fault(f"{base}.source", f"no earlier step has id {step.source!r}"))
            elif isinstance(step, Upload) and not isinstance(recipe.step(step.source), Screenshot):
                faults.append(Fault(f"{base}.source", f"step {step.source!r} is not a screenshot"))
        if isinstance(step, Assert):
            try:  # placeholders are filled in per run (see `check_assert_patterns`); "0" stands in here
                compile_pattern(PLACEHOLDER.sub("0", step.pattern))
            except PatternError as exc:
                faults.append(Fault(f"{base}.pattern", str(exc)))
        if isinstance(step, Upload) and step.source is None and not any(
            isinstance(s, Screenshot) for s in recipe.steps[:i]
        ):
            faults.append(Fault(base, "upload needs an earlier screenshot step"))
    return faults


def int_value_fault(field: str, value: Any) -> str | None:
    """Why `value` cannot fill the integer field `field`, or None."""
    lo, hi = INT_FIELD_BOUNDS[field]
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        return f"{field} must be an integer"
    if not lo <= number <= hi:
        return f"{field} must be within [{lo}, {hi}], got {number}"
    return None


def _int_placeholder_faults(recipe: Recipe, where: str, field: str, ref: str) -> list[Fault]:
    name = placeholder_name(ref)
    spec = recipe.params.get(name)
    if spec is None:
        return []  # reported by the placeholder check of every string field
    if spec.type != "integer":
        return [Fault(where, f"placeholder {{{{{name}}}}} must name an integer param (it is a {spec.type})")]
    if spec.default is not None and (problem := int_value_fault(field, spec.default)) is not None:
        return [Fault(f"$.params.{name}.default", f"fills {where}: {problem}")]
    return []


def used_params(recipe: Recipe, path_template: str | None = None) -> set[str]:
    """Params a step's placeholder names, or (when the recipe uploads) the artifact path needs."""
    used: set[str] = set()
    for step in recipe.steps:
        for field in step.__struct_fields__:
            value = getattr(step, field)
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str):
                    used.update(PLACEHOLDER.findall(text))
    if path_template is not None and any(isinstance(s, Upload) for s in recipe.steps):
        try:
            used.update(param_fields(path_template))
        except ArtifactPathError:
            pass
    return used


def path_template_faults(recipe: Recipe, path_template: str) -> list[Fault]:
    """A recipe that uploads must declare every param the artifact path template needs, required or defaulted
    (else every device would run all its steps and then fail at the upload)."""
    if not any(isinstance(s, Upload) for s in recipe.steps):
        return []
    faults = []
    for name in dict.fromkeys(param_fields(path_template)):
        spec = recipe.params.get(name)
        if spec is None:
            faults.append(Fault(f"$.params.{name}", f"the artifact path template {path_template!r} needs param"
                                                    f" {name!r} and the recipe uploads a screenshot: declare it"))
        elif not spec.required and spec.default is None:
            faults.append(Fault(f"$.params.{name}.required", "the artifact path template needs this param:"
                                                             " make it required or give it a default"))
    return faults


def unused_param_warnings(recipe: Recipe, path_template: str | None = None) -> list[Fault]:
    used = used_params(recipe, path_template)
    return [Fault(f"$.params.{name}", "declared but not used by any step (nor by the artifact path)")
            for name in recipe.params if name not in used]


def validate_recipe(doc: Any, path_template: str | None = None) -> Recipe:
    """Turn a decoded JSON document into a `Recipe`, or raise `RecipeInvalid` with every fault.

    With `path_template` (the backend's artifact path template), a recipe that uploads must also declare
    the params the template needs."""
    if not isinstance(doc, dict):
        raise RecipeInvalid([Fault("$", "a recipe must be a JSON object")])
    faults: list[Fault] = []
    steps, params = _convert_each(doc, faults)
    top = _check_top_level(doc, faults)
    if faults:
        if top is not None:  # also report the semantic faults of everything that did convert
            top.steps, top.params = steps, params
            faults.extend(_semantic_faults(top))
        raise RecipeInvalid(faults)
    try:
        recipe = msgspec.convert(doc, Recipe)
    except msgspec.ValidationError as err:  # a whole-list rule, e.g. too many steps
        raise RecipeInvalid([_fault_from(err, "$")]) from None
    faults = _semantic_faults(recipe)
    if path_template is not None:
        faults += path_template_faults(recipe, path_template)
    if faults:
        raise RecipeInvalid(faults)
    return recipe


def decode_recipe(data: bytes | str, path_template: str | None = None) -> Recipe:
    """Parse and validate recipe JSON text."""
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as err:
        raise RecipeInvalid([Fault("$", f"not valid JSON: {err}")]) from None
    return validate_recipe(doc, path_template)


def resolve_step_timeouts(recipe: Recipe, overrides: dict[str, int]) -> dict[str, int]:
    """Effective timeout of every step for one run; raise `RecipeInvalid` on a bad override."""
    faults: list[Fault] = []
    for step_id, ms in overrides.items():
        step = recipe.step(step_id)
        where = f"$.step_timeouts_ms.{step_id}"
        if step is None:
            faults.append(Fault(where, f"the workflow has no step {step_id!r}"))
            continue
        lo, hi = step_timeout_bounds(recipe, step)
        if isinstance(ms, bool) or not isinstance(ms, int) or not lo <= ms <= hi:
            faults.append(Fault(where, f"timeout for step {step_id!r} must be within [{lo}, {hi}] ms"))
    if faults:
        raise RecipeInvalid(faults)
    return {s.id: overrides.get(s.id, default_step_timeout(recipe, s)) for s in recipe.steps}


def _param_type_fault(spec: ParamSpec, value: Any) -> str | None:
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[spec.type]
    if not ok:
        return f"must be a{'n' if spec.type == 'integer' else ''} {spec.type}"
    if isinstance(value, str):
        if len(value) > MAX_TEXT_CHARS:
            return f"is longer than {MAX_TEXT_CHARS} characters"
        if has_control(value):
            return "must not contain control characters (U+0000–U+001F, U+007F–U+009F)"
    if isinstance(value, int) and not isinstance(value, bool) and not MIN_INT <= value <= MAX_INT:
        return "must be a 64-bit integer"
    return None


def _param_value_fault(spec: ParamSpec, value: Any) -> str | None:
    """Type, length, characters and pattern (matched as a whole, in linear time)."""
    problem = _param_type_fault(spec, value)
    if problem is None and spec.pattern is not None:
        try:
            if not compile_pattern(spec.pattern).fullmatch(param_text(value)):
                problem = f"does not match pattern {spec.pattern}"
        except PatternError as exc:  # a version published before patterns were RE2
            problem = f"cannot be checked: the workflow's pattern for it is refused ({exc}); publish a new version"
    return problem


def validate_params(recipe: Recipe, params: dict[str, Any]) -> dict[str, str]:
    """Check a run's parameters against the recipe; return them as strings, defaults filled in."""
    faults: list[Fault] = []
    resolved: dict[str, str] = {}
    for name in params:
        if name not in recipe.params:
            faults.append(Fault(f"$.params.{name}", "the workflow declares no such param"))
    for name, spec in recipe.params.items():
        where = f"$.params.{name}"
        value = params.get(name, spec.default)
        if value is None:
            if spec.required:
                faults.append(Fault(where, "required param is missing"))
            continue
        problem = _param_value_fault(spec, value)
        if problem:
            faults.append(Fault(where, problem))
            continue
        resolved[name] = param_text(value)
    if faults:
        raise RecipeInvalid(faults)
    return resolved


# What the built-in placeholders stand for when a run's assert patterns are checked before any node has them.
_BUILTIN_STAND_INS: Final = {"run_id": "00000000-0000-0000-0000-000000000000", "node_id": "node",
                             "device_serial": "serial"}


def check_int_params(recipe: Recipe, params: dict[str, str]) -> list[Fault]:
    """Faults for integer params whose value does not fit an integer field it fills (`$.params.<name>`)."""
    faults: list[Fault] = []
    for i, step in enumerate(recipe.steps):
        for field, ref in int_fields(step):
            if isinstance(ref, str) and (name := placeholder_name(ref)) in params:
                if (problem := int_value_fault(field, params[name])) is not None:
                    faults.append(Fault(f"$.params.{name}", f"fills $.steps[{i}].{field}: {problem}"))
    return faults


def resolve_int(ref: int | str, field: str, values: dict[str, str]) -> int:
    """An integer field's value for one device: the number, or its placeholder filled in and checked.

    `ValueError` when the value does not fit the field (the backend refuses such a run already)."""
    if isinstance(ref, int):
        return ref
    text = render(ref, values)
    problem = int_value_fault(field, text)
    if problem is not None:
        raise ValueError(problem)
    return int(text)


def check_assert_patterns(recipe: Recipe, params: dict[str, str]) -> list[Fault]:
    """Faults for `assert` patterns that stop being valid RE2 once this run's params are filled in."""
    faults: list[Fault] = []
    values = {**_BUILTIN_STAND_INS, **params}
    for i, step in enumerate(recipe.steps):
        if not isinstance(step, Assert) or not PLACEHOLDER.search(step.pattern):
            continue
        try:
            compile_pattern(render(step.pattern, values))
        except PatternError as exc:
            used = [n for n in PLACEHOLDER.findall(step.pattern) if n in params]
            where = f"$.params.{used[0]}" if used else f"$.steps[{i}].pattern"
            faults.append(Fault(where, f"makes the pattern of assert step {step.id!r} invalid: {exc}"))
    return faults


