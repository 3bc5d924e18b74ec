"""Workflow DSL v1: bundled recipes, the committed JSON Schema, the validator and run-time checks."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.recipe_check import (
    Fault,
    RecipeInvalid,
    check_int_params,
    decode_recipe,
    resolve_int,
    resolve_step_timeouts,
    unused_param_warnings,
    validate_params,
    validate_recipe,
)
from contracts.recipe_model import (
    DEFAULT_STEP_TIMEOUT_MS,
    DEFAULT_UPLOAD_TIMEOUT_MS,
    MAX_TIMEOUT_MS,
    STEP_ACTIONS,
    AdbShell,
    OpenUrl,
    Recipe,
    Tap,
    recipe_json_schema,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SCHEMA = RECIPES / "schema.json"
GEN_SCRIPT = ROOT / "scripts" / "gen_recipe_schema.py"
BUNDLED = sorted(p for p in RECIPES.glob("*.json") if p.name != "schema.json")


def faults_of(doc: Any) -> list[Fault]:
    with pytest.raises(RecipeInvalid) as info:
        validate_recipe(doc)
    faults = info.value.faults
    assert faults, "RecipeInvalid must carry at least one fault"
    for f in faults:
        assert f.path.startswith("$") and f.message, f
        assert f"{f.path}: {f.message}" in str(info.value)
    assert len(set(faults)) == len(faults), f"a fault is reported twice: {faults}"
    return faults


def paths_of(doc: Any) -> set[str]:
    return {f.path for f in faults_of(doc)}


def base_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "dsl": 1,
        "workflow_id": "unit-test",
        "params": {"youtubeVideoId": {"pattern": "^[A-Za-z0-9_-]{1,64}$"}},
        "steps": [
            {"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
            {"id": "shot", "action": "screenshot"},
            {"id": "upload", "action": "upload"},
            {"id": "report", "action": "report"},
        ],
    }
    doc.update(overrides)
    return doc


# -- bundled recipes and the committed schema ---------------------------------------------------


def test_there_are_bundled_recipes() -> None:
    assert BUNDLED, f"no recipes in {RECIPES}"


@pytest.mark.parametrize("path", BUNDLED, ids=[p.name for p in BUNDLED])
def test_bundled_recipe_validates(path: Path) -> None:
    recipe = decode_recipe(path.read_bytes())
    assert isinstance(recipe, Recipe)
    assert recipe.dsl == 1
    # Every step's effective timeout resolves without overrides.
    timeouts = resolve_step_timeouts(recipe, {})
    assert list(timeouts) == [s.id for s in recipe.steps]


def test_device_smoke_recipe_shape() -> None:
    recipe = decode_recipe((RECIPES / "device-smoke.json").read_bytes())
    assert recipe.workflow_id == "device-smoke"
    assert set(recipe.params) == {"url", "youtubeVideoId"}
    actions = [type(s).__struct_config__.tag for s in recipe.steps]
    assert actions.index("screenshot") < actions.index("upload") < actions.index("report")
    values = validate_params(recipe, {"url": "https://example.com/a?b=c", "youtubeVideoId": "dQw4w9WgXcQ"})
    assert values == {"url": "https://example.com/a?b=c", "youtubeVideoId": "dQw4w9WgXcQ"}
    with pytest.raises(RecipeInvalid) as info:
        validate_params(recipe, {"url": "https://x/'; reboot", "youtubeVideoId": "a/b"})
    assert {f.path for f in info.value.faults} == {"$.params.url", "$.params.youtubeVideoId"}


def test_committed_schema_matches_generated() -> None:
    fresh = json.dumps(recipe_json_schema(), indent=2, sort_keys=True) + "\n"
    committed = SCHEMA.read_text(encoding="utf-8") if SCHEMA.exists() else ""
    assert committed == fresh, (
        "recipes/schema.json is out of date with contracts/recipe_model.py: run `python scripts/gen_recipe_schema.py`"
    )


def test_schema_covers_every_action() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    recipe_def = schema["$defs"]["Recipe"]
    assert recipe_def["additionalProperties"] is False
    assert {"dsl", "workflow_id", "steps"} <= set(recipe_def["required"])
    tags = {
        enum for d in schema["$defs"].values() for enum in d.get("properties", {}).get("action", {}).get("enum", [])
    }
    assert tags == set(STEP_ACTIONS)


def test_gen_script_check_mode_passes_on_committed_schema() -> None:
    done = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


# -- validate_recipe: every fault at once -------------------------------------------------------


def test_every_fault_is_reported_at_once_with_its_path() -> None:
    doc = {
        "dsl": 1,
        "workflow_id": "multi-fault",
        "colour": "blue",  # unknown top-level field (reported at the field's own path)
        "params": {"vid": {"type": "string"}},
        "steps": [
            {"id": "model", "action": "adb_shell", "command": "getprop"},  # wrong field type
            {"id": "teleport", "action": "teleport"},  # unknown action
            {"id": "home", "action": "keyevent", "key": "home"},
            {"id": "home", "action": "keyevent", "key": "back"},  # duplicate id
            {"id": "open", "action": "open_url", "url": "https://x/{{video}}"},  # undeclared placeholder
            {"id": "up", "action": "upload"},  # no earlier screenshot
            {"id": "check", "action": "assert", "source": "home", "pattern": "(unclosed"},  # bad regex
            {"id": "slow", "action": "wait", "ms": 10, "timeout_ms": 700_000},  # above recipe max_ms
            {"id": "report", "action": "report"},
        ],
    }
    faults = faults_of(doc)
    assert any(f.path == "$.colour" and "`colour`" in f.message for f in faults)
    assert {f.path for f in faults} == {
        "$.colour",
        "$.steps[0].command",
        "$.steps[1].action",
        "$.steps[3].id",
        "$.steps[4].url",
        "$.steps[5]",
        "$.steps[6].pattern",
        "$.steps[7].timeout_ms",
    }


def test_fault_messages_say_what_is_wrong() -> None:
    doc = base_doc(
        steps=[
            {"id": "a", "action": "frobnicate"},
            {"id": "b", "action": "echo", "text": "x"},
            {"id": "a2", "action": "adb_shell", "command": ["echo", "{{nope}}"]},
        ]
    )
    with pytest.raises(RecipeInvalid) as info:
        validate_recipe(doc)
    by_path = {f.path: f.message for f in info.value.faults}
    assert "unknown action" in by_path["$.steps[0].action"]
    assert "adb_shell" in by_path["$.steps[0].action"]
    assert "unknown action" in by_path["$.steps[1].action"]
    assert "{{nope}}" in by_path["$.steps[2].command[1]"]


def test_every_top_level_fault_is_reported() -> None:
    doc = base_doc(dsl=2, workflow_id="Not An Id", colour=1, size=2, timeouts={"max": 9})
    faults = faults_of(doc)
    assert {f.path for f in faults} == {"$.dsl", "$.workflow_id", "$.colour", "$.size", "$.timeouts.max"}
    assert any(f.path == "$.timeouts.max" and "unknown field `max`" in f.message for f in faults)
    # Semantic faults of the steps are reported along with the top-level ones.
    doc = base_doc(workflow_id="Not An Id", timeouts={"min_ms": 5})
    doc["steps"].append({"id": "shot", "action": "screenshot"})
    # (and the report is no longer last)
    assert paths_of(doc) == {"$.workflow_id", "$.timeouts.min_ms", "$.steps[4].id", "$.steps[3]"}


def test_missing_top_level_fields_are_all_reported() -> None:
    faults = faults_of({"title": 5, "steps": [{"id": "r", "action": "report"}]})
    assert {f.path for f in faults} == {"$.dsl", "$.workflow_id", "$.title"}
    assert all("missing required field" in f.message for f in faults if f.path != "$.title")


def test_unknown_step_field_is_named() -> None:
    doc = base_doc()
    doc["steps"][0]["comand"] = ["ls"]
    doc["steps"][3]["extra"] = True
    faults = faults_of(doc)
    assert [(f.path, "`comand`" in f.message or "`extra`" in f.message) for f in faults] == [
        ("$.steps[0].comand", True),
        ("$.steps[3].extra", True),
    ]


def test_invalid_step_does_not_cause_spurious_faults() -> None:
    # The screenshot step is broken, but it still counts as a screenshot for the later upload,
    # and the broken adb_shell step's id still counts for the assert that reads it.
    doc = base_doc(
        steps=[
            {"id": "battery", "action": "adb_shell", "command": []},
            {"id": "check", "action": "assert", "source": "battery", "pattern": "level"},
            {"id": "shot", "action": "screenshot", "timeout_ms": "slow"},
            {"id": "upload", "action": "upload", "source": "shot"},
            {"id": "upload2", "action": "upload"},
        ]
    )
    assert paths_of(doc) == {"$.steps[0].command", "$.steps[2].timeout_ms"}


def test_missing_required_fields() -> None:
    assert paths_of({"dsl": 1, "workflow_id": "w"}) == {"$.steps"}
    assert paths_of(base_doc(steps=[])) == {"$.steps"}
    assert paths_of(base_doc(steps=[{"id": "open", "action": "open_url"}])) == {"$.steps[0].url"}
    assert paths_of(base_doc(steps="not a list")) == {"$.steps"}


def test_too_many_steps() -> None:
    steps = [{"id": f"s{i}", "action": "wait", "ms": 0} for i in range(201)]
    assert paths_of(base_doc(steps=steps)) == {"$.steps"}
    validate_recipe(base_doc(steps=steps[:200]))


def test_step_field_constraints() -> None:
    doc = base_doc(
        steps=[
            {"id": "Bad Id", "action": "report"},
            {"id": "tap", "action": "tap", "x": -1, "y": 5},
            {"id": "swipe", "action": "swipe", "x1": 0, "y1": 0, "x2": 1, "y2": 1, "duration_ms": 0},
            {"id": "retry", "action": "report", "retries": 11},
            {"id": "err", "action": "report", "on_error": "ignore"},
            {"id": "cmd", "action": "adb_shell", "command": ["ok", 5]},
            {"id": "low", "action": "wait", "ms": 1, "timeout_ms": 50},
        ]
    )
    assert paths_of(doc) == {
        "$.steps[0].id",
        "$.steps[1].x",
        "$.steps[2].duration_ms",
        "$.steps[3].retries",
        "$.steps[4].on_error",
        "$.steps[5].command[1]",
        "$.steps[6].timeout_ms",
    }


def test_param_faults() -> None:
    doc = base_doc(
        params={
            "bad-name": {},
            "kind": {"type": "float"},
            "regex": {"pattern": "("},
            "count": {"type": "integer", "default": "three"},
            "flag": {"type": "boolean", "default": True},
            "extra": {"required": False, "colour": "red"},
        },
        steps=[{"id": "r", "action": "report"}],
    )
    assert paths_of(doc) == {
        "$.params.bad-name",
        "$.params.kind.type",
        "$.params.regex.pattern",
        "$.params.count.default",
        "$.params.extra.colour",
    }


def test_source_rules() -> None:
    doc = base_doc(
        steps=[
            {"id": "early", "action": "assert", "source": "model", "pattern": "x"},  # source comes later
            {"id": "model", "action": "adb_shell", "command": ["getprop"]},
            {"id": "up-model", "action": "upload", "source": "model"},  # not a screenshot
            {"id": "ghost", "action": "assert", "source": "nowhere", "pattern": "x"},
            {"id": "shot", "action": "screenshot"},
            {"id": "up", "action": "upload", "source": "shot"},
        ]
    )
    assert paths_of(doc) == {"$.steps[0].source", "$.steps[2].source", "$.steps[3].source"}


def test_timeout_rules() -> None:
    doc = base_doc(
        timeouts={"min_ms": 5_000, "max_ms": 1_000},  # empty recipe-wide range
        steps=[{"id": "r", "action": "report"}],
    )
    # Every step inherits the empty range too.
    assert paths_of(doc) == {"$.timeouts", "$.steps[0]"}
    doc = base_doc(
        steps=[
            {"id": "a", "action": "wait", "ms": 1, "min_timeout_ms": 9_000, "max_timeout_ms": 8_000},
            {"id": "b", "action": "wait", "ms": 1, "timeout_ms": 700_000, "max_timeout_ms": 900_000},  # ok
            {"id": "c", "action": "wait", "ms": 1, "timeout_ms": 2_000, "min_timeout_ms": 3_000},
            {"id": "d", "action": "wait", "ms": 1, "timeout_ms": MAX_TIMEOUT_MS + 1},
        ]
    )
    assert paths_of(doc) == {"$.steps[0]", "$.steps[2].timeout_ms", "$.steps[3].timeout_ms"}


def test_placeholders_in_every_string_field() -> None:
    doc = base_doc(
        steps=[
            {"id": "a", "action": "launch_app", "package": "{{pkg}}", "title": "{{ run_id }} {{who}}"},
            {"id": "b", "action": "input_text", "text": "{{node_id}}/{{device_serial}}/{{youtubeVideoId}}"},
            {"id": "c", "action": "adb_shell", "command": ["echo", "ok", "{{ghost}}"]},
        ]
    )
    assert paths_of(doc) == {"$.steps[0].package", "$.steps[0].title", "$.steps[2].command[2]"}


@pytest.mark.parametrize("doc", [[], "recipe", 3, None, True])
def test_non_object_document(doc: Any) -> None:
    assert paths_of(doc) == {"$"}


@pytest.mark.parametrize("text", [b"{", b"", b"{'dsl': 1}", "[1, 2"])
def test_invalid_json(text: bytes | str) -> None:
    with pytest.raises(RecipeInvalid) as info:
        decode_recipe(text)
    [fault] = info.value.faults
    assert fault.path == "$"
    assert "not valid JSON" in fault.message


def test_decode_recipe_reports_faults_of_valid_json() -> None:
    with pytest.raises(RecipeInvalid) as info:
        decode_recipe(json.dumps(base_doc(dsl=3)))
    assert [f.path for f in info.value.faults] == ["$.dsl"]


def test_valid_recipe_round_trip() -> None:
    doc = base_doc()
    original = copy.deepcopy(doc)
    recipe = validate_recipe(doc)
    assert doc == original, "validation must not modify the document"
    assert isinstance(recipe.steps[0], AdbShell)
    assert recipe.steps[0].command == ["getprop", "ro.product.model"]
    assert recipe.step("shot") is recipe.steps[1]
    assert recipe.step("missing") is None
    assert recipe.params["youtubeVideoId"].required is True
    assert recipe.params["youtubeVideoId"].type == "string"


# -- validate_params ------------------------------------------------------------------------------


def params_recipe() -> Recipe:
    return validate_recipe(
        base_doc(
            params={
                "youtubeVideoId": {"pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "count": {"type": "integer", "required": False, "default": 3},
                "loud": {"type": "boolean", "default": False},
                "note": {"required": False},
                "limit": {"type": "integer", "pattern": "^[1-9][0-9]?$"},
            }
        )
    )


def param_fault_paths(params: dict[str, Any]) -> set[str]:
    with pytest.raises(RecipeInvalid) as info:
        validate_params(params_recipe(), params)
    return {f.path for f in info.value.faults}


def test_params_defaults_filled_and_stringified() -> None:
    values = validate_params(params_recipe(), {"youtubeVideoId": "dQw4w9WgXcQ", "limit": 20})
    assert values == {"youtubeVideoId": "dQw4w9WgXcQ", "count": "3", "loud": "false", "limit": "20"}
    values = validate_params(
        params_recipe(), {"youtubeVideoId": "abc", "count": 0, "loud": True, "note": "hi", "limit": 5}
    )
    assert values == {"youtubeVideoId": "abc", "count": "0", "loud": "true", "note": "hi", "limit": "5"}
    assert all(isinstance(v, str) for v in values.values())


def test_params_missing_required() -> None:
    assert param_fault_paths({"limit": 1}) == {"$.params.youtubeVideoId"}
    with pytest.raises(RecipeInvalid) as info:
        validate_params(params_recipe(), {"limit": 1})
    assert "required" in info.value.faults[0].message


def test_params_every_fault_at_once() -> None:
    assert param_fault_paths(
        {
            "youtubeVideoId": "has/slash",  # pattern mismatch
            "count": "3",  # string for an integer
            "loud": 1,  # int for a boolean
            "limit": True,  # bool is not an integer
            "extra": "x",  # unknown
        }
    ) == {"$.params.youtubeVideoId", "$.params.count", "$.params.loud", "$.params.limit", "$.params.extra"}


def test_params_pattern_checks_the_string_form() -> None:
    assert param_fault_paths({"youtubeVideoId": "ok", "limit": 100}) == {"$.params.limit"}
    assert param_fault_paths({"youtubeVideoId": "ok", "limit": 0}) == {"$.params.limit"}
    # The pattern must match the whole value, not a prefix.
    assert param_fault_paths({"youtubeVideoId": "ok; reboot", "limit": 1}) == {"$.params.youtubeVideoId"}


def test_params_wrong_types() -> None:
    for bad in (1.5, ["a"], {"a": 1}, 7):
        assert param_fault_paths({"youtubeVideoId": "ok", "limit": 1, "note": bad}) == {"$.params.note"}
    assert param_fault_paths({"youtubeVideoId": "ok", "limit": "12"}) == {"$.params.limit"}
    # An explicit null counts as "not given": fine for an optional param, a fault for a required one.
    assert "note" not in validate_params(params_recipe(), {"youtubeVideoId": "ok", "limit": 1, "note": None})
    assert param_fault_paths({"youtubeVideoId": None, "limit": 1}) == {"$.params.youtubeVideoId"}


# -- resolve_step_timeouts ------------------------------------------------------------------------


def timeouts_recipe() -> Recipe:
    return validate_recipe(
        base_doc(
            timeouts={"min_ms": 1_000, "max_ms": 600_000},
            steps=[
                {"id": "model", "action": "adb_shell", "command": ["getprop"]},
                {"id": "fast", "action": "adb_shell", "command": ["true"], "timeout_ms": 5_000},
                {
                    "id": "wide",
                    "action": "adb_shell",
                    "command": ["true"],
                    "min_timeout_ms": 200,
                    "max_timeout_ms": 1_200_000,
                },
                {"id": "shot", "action": "screenshot"},
                {"id": "upload", "action": "upload"},
            ],
        )
    )


def timeout_fault_paths(overrides: dict[str, Any]) -> set[str]:
    with pytest.raises(RecipeInvalid) as info:
        resolve_step_timeouts(timeouts_recipe(), overrides)
    return {f.path for f in info.value.faults}


def test_timeout_defaults() -> None:
    assert resolve_step_timeouts(timeouts_recipe(), {}) == {
        "model": DEFAULT_STEP_TIMEOUT_MS,
        "fast": 5_000,
        "wide": DEFAULT_STEP_TIMEOUT_MS,
        "shot": DEFAULT_STEP_TIMEOUT_MS,
        "upload": DEFAULT_UPLOAD_TIMEOUT_MS,
    }
    assert DEFAULT_STEP_TIMEOUT_MS == 90_000
    assert DEFAULT_UPLOAD_TIMEOUT_MS == 30_000


def test_recipe_wide_timeout_defaults_apply() -> None:
    recipe = validate_recipe(base_doc(timeouts={"step_ms": 45_000, "upload_ms": 10_000}))
    assert resolve_step_timeouts(recipe, {}) == {
        "model": 45_000,
        "shot": 45_000,
        "upload": 10_000,
        "report": 45_000,
    }


def test_timeout_overrides_within_bounds() -> None:
    resolved = resolve_step_timeouts(timeouts_recipe(), {"model": 1_000, "fast": 600_000, "wide": 200, "upload": 1_200})
    assert resolved["model"] == 1_000
    assert resolved["fast"] == 600_000
    assert resolved["wide"] == 200
    assert resolved["upload"] == 1_200
    assert resolved["shot"] == DEFAULT_STEP_TIMEOUT_MS
    assert resolve_step_timeouts(timeouts_recipe(), {"wide": 1_200_000})["wide"] == 1_200_000


def test_timeout_override_faults_all_at_once() -> None:
    assert timeout_fault_paths(
        {
            "nope": 5_000,  # unknown step
            "model": 999,  # below recipe min
            "fast": 600_001,  # above recipe max
            "wide": 199,  # below the step's own min (which is lower than the recipe's)
            "upload": "30000",  # not an int
            "shot": True,  # bool is not an int
        }
    ) == {
        "$.step_timeouts_ms.nope",
        "$.step_timeouts_ms.model",
        "$.step_timeouts_ms.fast",
        "$.step_timeouts_ms.wide",
        "$.step_timeouts_ms.upload",
        "$.step_timeouts_ms.shot",
    }
    assert timeout_fault_paths({"wide": 1_200_001}) == {"$.step_timeouts_ms.wide"}
    assert timeout_fault_paths({"model": 1.5e4}) == {"$.step_timeouts_ms.model"}


def test_timeout_fault_message_names_bounds() -> None:
    with pytest.raises(RecipeInvalid) as info:
        resolve_step_timeouts(timeouts_recipe(), {"wide": 5})
    assert "[200, 1200000]" in info.value.faults[0].message


# -- render ---------------------------------------------------------------------------------------


def test_render() -> None:
    values = {"url": "https://e.com/?a=1&b=2", "run_id": "r-1", "empty": ""}
    assert render("{{url}}", values) == "https://e.com/?a=1&b=2"
    assert render("open {{ url }} for {{run_id}}", values) == "open https://e.com/?a=1&b=2 for r-1"
    assert render("[{{empty}}]", values) == "[]"
    assert render("{{unknown}} stays", values) == "{{unknown}} stays"
    assert render("no placeholders {url} {{ }}", values) == "no placeholders {url} {{ }}"
    # Substituted values are not rendered again.
    assert render("{{a}}", {"a": "{{b}}", "b": "x"}) == "{{b}}"


def test_render_leaves_quoting_to_the_executor() -> None:
    payload = "x'; rm -rf /; echo 'pwned"
    recipe = validate_recipe(
        base_doc(
            params={"payload": {}, "url": {}},
            steps=[
                {"id": "echo", "action": "adb_shell", "command": ["echo", "{{payload}}"]},
                {"id": "open", "action": "open_url", "url": "{{url}}"},
            ],
        )
    )
    values = validate_params(recipe, {"payload": payload, "url": "https://e.com/?q=$(reboot)"})
    step = recipe.steps[0]
    assert isinstance(step, AdbShell)
    argv = [render(a, values) for a in step.command]
    assert argv == ["echo", payload]
    assert shlex.split(" ".join(shlex.quote(a) for a in argv)) == argv
    open_step = recipe.steps[1]
    assert isinstance(open_step, OpenUrl)
    assert render(open_step.url, values) == "https://e.com/?q=$(reboot)"


# -- checks at publish that would otherwise only fail on the devices (issue 11 item 8) ----------------


def test_param_default_must_match_its_own_pattern() -> None:
    doc = base_doc(params={"youtubeVideoId": {"pattern": "^[a-z]{3}$", "default": "ABCD"}})
    [fault] = faults_of(doc)
    assert fault.path == "$.params.youtubeVideoId.default" and "does not match pattern" in fault.message
    validate_recipe(base_doc(params={"youtubeVideoId": {"pattern": "^[a-z]{3}$", "default": "abc"}}))


def test_recipe_that_uploads_must_declare_the_params_the_artifact_path_needs() -> None:
    template = "{youtubeVideoId}/{site}/{node_id}/{device_serial}/{run_id}/{timestamp}.png"
    doc = base_doc(params={"site": {"required": False}})
    with pytest.raises(RecipeInvalid) as info:
        validate_recipe(doc, template)
    assert {(f.path, "artifact path" in f.message) for f in info.value.faults} == {
        ("$.params.youtubeVideoId", True), ("$.params.site.required", True)}
    validate_recipe(doc)  # without a template (e.g. `doai recipes check`): not checked
    # Declared and required (or defaulted): fine; a recipe that never uploads needs none of them.
    validate_recipe(base_doc(params={"youtubeVideoId": {}, "site": {"required": False, "default": "x"}}), template)
    no_upload = base_doc(params={}, steps=[{"id": "r", "action": "report"}])
    validate_recipe(no_upload, template)


def test_step_ms_above_max_ms_and_default_timeouts_outside_a_steps_bounds() -> None:
    doc = base_doc(timeouts={"step_ms": 700_000, "upload_ms": 500, "min_ms": 1_000, "max_ms": 600_000})
    assert paths_of(doc) == {"$.timeouts.step_ms", "$.timeouts.upload_ms"}
    # A step that narrows its bounds so the recipe's default timeout no longer fits must set its own.
    doc = base_doc()
    doc["steps"][0] = {"id": "model", "action": "adb_shell", "command": ["id"], "max_timeout_ms": 10_000}
    doc["steps"][2] = {"id": "upload", "action": "upload", "min_timeout_ms": 40_000}
    faults = faults_of(doc)
    assert {f.path for f in faults} == {"$.steps[0].timeout_ms", "$.steps[2].timeout_ms"}
    assert all("default timeout" in f.message for f in faults)
    doc["steps"][0]["timeout_ms"] = 5_000
    doc["steps"][2]["timeout_ms"] = 45_000
    validate_recipe(doc)


def test_report_must_be_the_last_step() -> None:
    doc = base_doc()
    doc["steps"].insert(1, {"id": "early", "action": "report"})
    [fault] = faults_of(doc)
    assert fault.path == "$.steps[1]" and "report must be the last step; 3 step(s)" in fault.message
    validate_recipe(base_doc(steps=[{"id": "model", "action": "adb_shell", "command": ["id"]}]))  # no report: fine


def test_schema_key_is_allowed_and_kept() -> None:
    recipe = validate_recipe(base_doc(**{"$schema": "../recipes/schema.json"}))
    assert recipe.schema == "../recipes/schema.json"
    assert json.loads(msgspec.json.encode(recipe))["$schema"] == "../recipes/schema.json"
    assert "$schema" not in json.loads(msgspec.json.encode(validate_recipe(base_doc())))
    assert paths_of(base_doc(**{"$schema": 5})) == {"$.$schema"}
    assert "$schema" in recipe_json_schema()["$defs"]["Recipe"]["properties"]


def test_integer_fields_take_a_placeholder_of_an_integer_param() -> None:
    params = {"youtubeVideoId": {}, "x": {"type": "integer", "default": 10}, "pause": {"type": "integer"},
              "label": {"type": "string"}, "far": {"type": "integer", "default": 120_000}}
    steps = [
        {"id": "tap", "action": "tap", "x": "{{x}}", "y": 5},
        {"id": "pause", "action": "wait", "ms": "{{ pause }}"},
        {"id": "swipe", "action": "swipe", "x1": 0, "y1": 0, "x2": "{{x}}", "y2": 1, "duration_ms": "{{far}}"},
        {"id": "bad", "action": "tap", "x": "{{label}}", "y": "{{ghost}}"},
        {"id": "text", "action": "tap", "x": "ten", "y": 1},
        {"id": "shot", "action": "screenshot"}, {"id": "upload", "action": "upload"},
        {"id": "r", "action": "report"},
    ]
    faults = faults_of(base_doc(params=params, steps=steps))
    assert {f.path: f.message for f in faults}.keys() == {
        "$.params.far.default",  # 120000 does not fit duration_ms (at most 60000)
        "$.steps[3].x",  # a string param
        "$.steps[3].y",  # no such param
        "$.steps[4].x",  # neither an integer nor a placeholder
    }
    ok = validate_recipe(base_doc(params={**params, "far": {"type": "integer", "default": 600}},
                                  steps=[s for s in steps if s["id"] not in ("bad", "text")]))
    tap = ok.steps[0]
    assert isinstance(tap, Tap) and tap.x == "{{x}}" and tap.y == 5
    # At run creation: the value must fit the field it fills.
    assert check_int_params(ok, {"x": "3", "pause": "100", "far": "600"}) == []
    assert [f.path for f in check_int_params(ok, {"x": "-1", "pause": "99999999", "far": "600"})] == [
        "$.params.x", "$.params.pause", "$.params.x"]
    assert resolve_int("{{x}}", "x", {"x": "7"}) == 7 and resolve_int(4, "x", {}) == 4
    with pytest.raises(ValueError):
        resolve_int("{{x}}", "x", {"x": "-7"})


def test_unused_params_are_warnings() -> None:
    template = "{youtubeVideoId}/{node_id}/{device_serial}/{run_id}/{timestamp}.png"
    doc = base_doc(params={"youtubeVideoId": {}, "spare": {"required": False}, "url": {}})
    doc["steps"].insert(0, {"id": "open", "action": "open_url", "url": "{{url}}"})
    recipe = validate_recipe(doc, template)
    assert [(w.path, "not used" in w.message) for w in unused_param_warnings(recipe, template)] == [
        ("$.params.spare", True)]
    # youtubeVideoId is used by the artifact path only because the recipe uploads.
    no_upload = validate_recipe(base_doc(params={"youtubeVideoId": {}}, steps=[{"id": "r", "action": "report"}]))
    assert [w.path for w in unused_param_warnings(no_upload, template)] == ["$.params.youtubeVideoId"]
