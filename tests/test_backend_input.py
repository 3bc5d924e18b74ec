"""Hostile input at the REST API: each attack from issue 9 (item 4) performed, refused with a 422 that
names the JSON path, and nothing stored (no run, no outbox row, no command on NATS).

Against the real backend (uvicorn) on real PostgreSQL and nats-server.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from contracts.recipe_check import MAX_FAULTS, RecipeInvalid, validate_recipe
from contracts.recipe_model import MAX_PARAMS, MAX_STEPS
from contracts.text import MAX_TEXT_CHARS
from doai.embedded import EmbeddedNats
from runtime.config import ConfigError, load_settings
from services.backend.settings import BackendSettings
from tests.backend_support import (
    NODE_SECRET,
    PARAMS,
    fetchval,
    fleet_of,
    publish_recipe,
    run_body,
    running_backend,
    seed_fleet,
    stream_counts,
    wait_until,
)
from tests.signing_support import TEST_SIGNING_SEED


def refused(response: httpx.Response, path: str, status: int = 422, contains: str = "") -> dict[str, Any]:
    """A 422 (in the one error shape) whose details name `path`; returns the error."""
    assert response.status_code == status, (path, response.status_code, response.text[:2000])
    body: dict[str, Any] = response.json()["error"]
    paths = [d["path"] for d in body["details"]]
    assert path in paths, (path, body)
    if contains:
        assert any(contains in d["message"] for d in body["details"] if d["path"] == path), body
    return body


async def nothing_stored(database_url: str, nats_url: str) -> None:
    assert await fetchval(database_url, "SELECT count(*) FROM runs") == 0
    assert await fetchval(database_url, "SELECT count(*) FROM run_tasks") == 0
    assert await fetchval(database_url, "SELECT count(*) FROM outbox") == 0
    assert await stream_counts(nats_url) == {}


def recipe(workflow_id: str, params: dict[str, Any], steps: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {"dsl": 1, "workflow_id": workflow_id, "params": params, "steps": steps, **top}


SHOT_STEPS = [{"id": "shot", "action": "screenshot"}, {"id": "upload", "action": "upload"},
              {"id": "report", "action": "report"}]


async def test_control_characters_in_any_string_are_422_with_their_path(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 2))
        nul = "a\x00b"
        # Body strings: param values, keys, ids; NUL, other C0 controls, DEL and C1 controls alike.
        for bad in (nul, "a\x07b", "a\x7fb", "a\x85b", "line\nbreak", "tab\there"):
            refused(await client.post("/v1/runs", json=run_body(params={**PARAMS, "url": f"https://x.org/{bad}"})),
                    "$.params.url")
        refused(await client.post("/v1/runs", json=run_body(params={**PARAMS, "youtubeVideoId": nul})),
                "$.params.youtubeVideoId")
        refused(await client.post("/v1/runs", json=run_body(params={**PARAMS, nul: "x"})), "$.params (a key)")
        refused(await client.post("/v1/runs", json=run_body(step_timeouts_ms={nul: 5000})),
                "$.step_timeouts_ms (a key)")
        refused(await client.post("/v1/runs", json=run_body(workflow_id=nul)), "$.workflow_id")
        refused(await client.post("/v1/runs", json=run_body(targets={"nodes": [nul]})), "$.targets.nodes[0]")
        refused(await client.post("/v1/runs", json=run_body(targets={"devices": [{"node_id": "node-1",
                                                                                  "serial": nul}]})),
                "$.targets.devices[0].serial")
        # Recipes: commands, URLs and patterns allow no control character at all; prose allows tab/LF/CR.
        steps = [{"id": "a", "action": "adb_shell", "command": ["echo", "x\ny"]},
                 {"id": "b", "action": "open_url", "url": "https://x.org/\x00"},
                 {"id": "c", "action": "assert", "source": "a", "pattern": "x\ty"},
                 {"id": "report", "action": "report", "title": "ok\x1b[31m"}]
        body = refused(await client.post("/v1/workflows", json=recipe("ctl", {}, steps, title=nul)), "$.title")
        paths = {d["path"]: d["message"] for d in body["details"]}
        assert "$.steps[1].url" in paths and "$.steps[3].title" in paths  # NUL and ESC: found before decoding
        body = refused(await client.post("/v1/workflows", json=recipe("ctl", {}, steps[:1] + steps[2:3])),
                       "$.steps[0].command[1]", contains="control characters")
        assert "$.steps[1].pattern" in {d["path"] for d in body["details"]}
        refused(await client.post("/v1/workflows", json=recipe("ctl", {"p": {"description": "d\x00"}},
                                                               [{"id": "r", "action": "report"}])),
                "$.params.p.description")
        # Prose may hold tab, line feed and carriage return.
        prose = recipe("prose", {"p": {"description": "first line\nsecond\tline\r\n", "required": False}},
                       [{"id": "r", "action": "report", "title": "a\tb"}], title="T\nU", description="x\r\ny")
        assert (await client.post("/v1/workflows", json=prose)).status_code == 201
        # Query and path parameters.
        refused(await client.get("/v1/runs", params={"workflow_id": nul}), "$.query.workflow_id")
        refused(await client.get("/v1/runs", params={"cursor": "abc\x01"}), "$.query.cursor")
        refused(await client.get("/v1/runs", params={"created_after": "2026-01-01T00:00:00Z\x00"}),
                "$.query.created_after")
        refused(await client.get("/v1/workflows/a%00b"), "$.path.workflow_id")
        refused(await client.get("/v1/runs/%00"), "$.path.run_id")
        refused(await client.post("/v1/runs/%0a/cancel"), "$.path.run_id")
        refused(await client.get("/v1/node/config", params={"node_id": "n\x00"}, headers={"X-Node-Auth": NODE_SECRET}),
                "$.query.node_id")
        # Unknown query parameters are refused too (a typo is not silently ignored).
        refused(await client.get("/v1/runs", params={"staus": "running"}), "$.query.staus",
                contains="unknown query parameter")
        refused(await client.get("/v1/devices", params={"x\x00": "1"}), "$.query.x\x00")
        await nothing_stored(database_url, nats_server.url)
        assert await fetchval(database_url, "SELECT count(*) FROM workflows") == 2  # device-smoke and prose


async def test_date_filters_are_rfc3339_with_an_offset_and_in_range(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 1))
        assert (await client.post("/v1/runs", json=run_body())).status_code == 201
        for name in ("created_after", "created_before"):
            for bad in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "0.5", "-1", "1700000000",
                        "2026-01-01T00:00:00", "2026-01-01", "2026-13-01T00:00:00Z", "2026-01-01T25:00:00Z",
                        "2026-01-01 00:00:00Z", "yesterday", ""):
                refused(await client.get("/v1/runs", params={name: bad}), f"$.query.{name}")
        ok = {"created_after": "2000-01-01T00:00:00Z", "created_before": "9999-12-31T23:59:59+14:00"}
        r = await client.get("/v1/runs", params=ok)
        assert r.status_code == 200 and len(r.json()["runs"]) == 1, r.text
        r = await client.get("/v1/runs", params={"created_after": "2000-01-01t00:00:00.123456789+02:00"})
        assert r.status_code == 200 and len(r.json()["runs"]) == 1, r.text
        r = await client.get("/v1/runs", params={"created_before": "2000-01-01T00:00:00-05:30"})
        assert r.status_code == 200 and r.json()["runs"] == [], r.text
        # The document says the same: a date-time string of that pattern.
        spec = (await client.get("/openapi.json")).json()
        for p in spec["paths"]["/v1/runs"]["get"]["parameters"]:
            if p["name"].startswith("created_"):
                schema = p["schema"]
                assert schema["format"] == "date-time" and schema["pattern"].startswith("^[0-9]{4}"), p


async def test_param_values_over_the_documented_limit_are_refused(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 1))
        spec = (await client.get("/openapi.json")).json()
        value_schema = spec["components"]["schemas"]["RunCreate"]["properties"]["params"]["additionalProperties"]
        documented = value_schema["anyOf"][0]["maxLength"]
        assert documented == MAX_TEXT_CHARS == 4096
        url = "https://example.org/"
        for size in (documented + 1, 900_000):  # (the 900 KB value froze `doai up` once)
            long = url + "a" * (size - len(url))
            refused(await client.post("/v1/runs", json=run_body(params={**PARAMS, "url": long})), "$.params.url",
                    contains=f"longer than {documented}")
        refused(await client.post("/v1/workflows", json=recipe("big", {}, [
            {"id": "a", "action": "adb_shell", "command": ["echo", "x" * (documented + 1)]},
            {"id": "r", "action": "report"}])), "$.steps[0].command[1]")
        await nothing_stored(database_url, nats_server.url)
        exact = url + "a" * (documented - len(url))
        r = await client.post("/v1/runs", json=run_body(params={**PARAMS, "url": exact}))
        assert r.status_code == 201, r.text[:500]
        # Integer params are 64-bit, as documented.
        ints = recipe("ints", {"n": {"type": "integer"}}, [{"id": "r", "action": "report"}])
        assert (await client.post("/v1/workflows", json=ints)).status_code == 201
        assert value_schema["anyOf"][1]["maximum"] == 2**63 - 1
        refused(await client.post("/v1/runs", json=run_body(workflow_id="ints", params={"n": 2**63})),
                "$.params.n", contains="64-bit")
        assert (await client.post("/v1/runs", json=run_body(workflow_id="ints", params={"n": 2**63 - 1}))
                ).status_code == 201


async def test_patterns_run_in_linear_time_and_backtracking_ones_are_refused(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client(timeout=60) as client:
        await seed_fleet(database_url, fleet_of(1, 1))
        # Patterns that need backtracking cannot be published: backreferences, lookaround.
        for pattern in (r"^(a)\1$", r"^(?=a).*$", r"^(?<!b)a$", r"^a{2000}$"):
            refused(await client.post("/v1/workflows", json=recipe("bad-re", {"p": {"pattern": pattern}},
                                                                   [{"id": "r", "action": "report"}])),
                    "$.params.p.pattern", contains="RE2")
        refused(await client.post("/v1/workflows", json=recipe("bad-re", {}, [
            {"id": "a", "action": "adb_shell", "command": ["echo"]},
            {"id": "b", "action": "assert", "source": "a", "pattern": r"(x)\1"}, {"id": "r", "action": "report"}])),
            "$.steps[1].pattern", contains="RE2")
        # A default that fails its own pattern is refused when published, not when a run needs it.
        refused(await client.post("/v1/workflows", json=recipe("bad-re", {"p": {"pattern": "^a+$", "default": "b"}},
                                                               [{"id": "r", "action": "report"}])),
                "$.params.p.default", contains="does not match")
        # `(a+)+$` doubles per character with a backtracking engine; RE2 is linear. 4,000 characters and a
        # mismatch at the end would take longer than the universe's age with `re`; here every request returns.
        evil = recipe("evil", {"p": {"pattern": "^(a+)+$"}, "q": {"required": False}},
                      [{"id": "a", "action": "adb_shell", "command": ["echo", "{{q}}"]},
                       {"id": "b", "action": "assert", "source": "a", "pattern": "^(a+)+{{q}}$"},
                       {"id": "r", "action": "report"}])
        assert (await client.post("/v1/workflows", json=evil)).status_code == 201
        value = "a" * 4000 + "!"
        ticks = 0
        stop = asyncio.Event()

        async def heartbeat() -> None:  # the event loop keeps serving other requests meanwhile
            nonlocal ticks
            while not stop.is_set():
                assert (await client.get("/healthz")).status_code == 200
                ticks += 1

        beating = asyncio.create_task(heartbeat())
        answers = await asyncio.gather(*(client.post("/v1/runs", json=run_body(workflow_id="evil", params={"p": value}))
                                         for _ in range(10)))
        await wait_until(lambda: asyncio.sleep(0, result=ticks > 0), what="a health check between the patterns")
        stop.set()
        await beating
        for r in answers:
            refused(r, "$.params.p", contains="does not match")
        # The same pattern with a value that matches.
        assert (await client.post("/v1/runs", json=run_body(workflow_id="evil", params={"p": "a" * 4000}))
                ).status_code == 201
        # An assert pattern that a param value would make invalid is refused at run creation.
        refused(await client.post("/v1/runs", json=run_body(workflow_id="evil", params={"p": "a", "q": "("})),
                "$.params.q", contains="assert step 'b'")
        assert await fetchval(database_url, "SELECT count(*) FROM runs") == 1


async def test_artifact_path_params_are_checked_when_the_run_is_created(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await seed_fleet(database_url, fleet_of(1, 2))
        # A recipe that uploads, whose youtubeVideoId has no pattern of its own.
        shot = recipe("shot", {"youtubeVideoId": {}}, SHOT_STEPS)
        assert (await client.post("/v1/workflows", json=shot)).status_code == 201
        for bad in ("../../etc", "..", ".", "a/b", "a\\b", "vid%2Fx", "x" * 256, "é" * 128):
            refused(await client.post("/v1/runs", json=run_body(workflow_id="shot", params={"youtubeVideoId": bad})),
                    "$.params.youtubeVideoId", contains="artifact path")
        # A recipe that uploads but lacks the param the template needs: refused at publish (a workflow
        # stored earlier, or under another template, is still refused at run creation: see below).
        lacking = recipe("lacking", {}, SHOT_STEPS)
        refused(await client.post("/v1/workflows", json=lacking), "$.params.youtubeVideoId",
                contains="artifact path template")
        assert (await client.get("/v1/workflows/lacking")).status_code == 404
        await nothing_stored(database_url, nats_server.url)
        # A workflow that never uploads does not care what its params look like as paths.
        plain = recipe("plain", {"youtubeVideoId": {}}, [{"id": "r", "action": "report"}])
        assert (await client.post("/v1/workflows", json=plain)).status_code == 201
        r = await client.post("/v1/runs", json=run_body(workflow_id="plain", params={"youtubeVideoId": "../../etc"}))
        assert r.status_code == 201, r.text
        ok = await client.post("/v1/runs", json=run_body(workflow_id="shot", params={"youtubeVideoId": "dQw4w9WgXcQ"}))
        assert ok.status_code == 201, ok.text
    # The backend checks against its configured template (the same variable the nodes read).
    async with running_backend(database_url, nats_server.url, path_template="{site}/{run_id}/{timestamp}.png") as b2, \
            b2.client() as client:
        site = recipe("site", {"site": {}}, SHOT_STEPS)
        assert (await client.post("/v1/workflows", json=site)).status_code == 201
        refused(await client.post("/v1/runs", json=run_body(workflow_id="site", params={"site": "../x"})),
                "$.params.site", contains="artifact path")
        refused(await client.post("/v1/runs", json=run_body(workflow_id="shot", params={"youtubeVideoId": "x"})),
                "$.params.site", contains="required by the artifact path template")
        both = recipe("both", {"site": {}, "youtubeVideoId": {}}, SHOT_STEPS)
        assert (await client.post("/v1/workflows", json=both)).status_code == 201
        r = await client.post("/v1/runs", json=run_body(workflow_id="both",
                                                        params={"site": "s", "youtubeVideoId": "../x"}))
        assert r.status_code == 201, r.text  # this template does not use youtubeVideoId
    assert await fetchval(database_url, "SELECT count(*) FROM runs") == 3


async def test_error_messages_echo_bounded_excerpts(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        long_path = "/v1/" + "x" * 8000
        r = await client.get(long_path)
        assert r.status_code == 404 and len(r.text) < 400, len(r.text)
        assert "8004 characters" in r.json()["error"]["message"]
        # A recipe whose faults would echo megabytes: each path and message is cut, and so is the list.
        name = "p" * 60_000
        steps = [{"id": f"s{i}", "action": "teleport"} for i in range(300)]
        r = await client.post("/v1/workflows", json=recipe("echo", {name: {}}, steps))
        body = refused(r, "$.steps[0].action")
        assert len(body["details"]) == 101 and body["details"][-1]["message"].endswith("more faults")
        assert len(r.content) < 60_000, len(r.content)
        assert all(len(d["path"]) <= 240 and len(d["message"]) <= 540 for d in body["details"])
        # Workflow ids in a 404 (pattern-bounded) and run ids (a UUID) are short by construction.
        r = await client.post("/v1/runs", json=run_body(workflow_id="w" * 64))
        assert r.status_code == 404 and len(r.text) < 300


async def test_failed_authentications_are_logged_in_aggregate(
    database_url: str, nats_server: EmbeddedNats, log_file: Path
) -> None:
    interval = 1.0
    start = log_file.stat().st_size
    async with running_backend(database_url, nats_server.url, auth_log_interval_s=interval) as backend:
        async with backend.client(token="wrong-token-guess") as guesser:
            began = time.monotonic()
            for _ in range(6):  # a probe: 600 guesses in bursts
                answers = await asyncio.gather(*(guesser.get("/v1/runs") for _ in range(100)))
                assert {r.status_code for r in answers} == {401}
            nodes = await asyncio.gather(*(guesser.get("/v1/node/config", params={"node_id": "n"},
                                                       headers={"X-Node-Auth": f"guess-{i}"}) for i in range(50)))
            assert {r.status_code for r in nodes} == {401}
            elapsed = time.monotonic() - began

            def lines(event: str) -> list[dict[str, Any]]:
                with log_file.open() as f:
                    f.seek(start)
                    return [d for d in map(json.loads, f.read().splitlines()) if d.get("event") == event]

            async def all_counted() -> bool:
                return (sum(d["failures"] for d in lines("operator authentication failed")) == 600
                        and sum(d["failures"] for d in lines("node authentication failed")) == 50)

            await wait_until(all_counted, timeout_s=10 + interval, what="the aggregated auth failure lines")
    operator = lines("operator authentication failed")
    # One line at the first failure, then at most one per interval (plus the closing one).
    assert 1 < len(operator) <= 2 + elapsed / interval, (len(operator), elapsed)
    assert operator[0]["failures"] == 1 and operator[0]["clients"] == ["127.0.0.1"]
    assert operator[0]["reasons"] == {"invalid_token": 1}
    assert len(lines("node authentication failed")) <= 2 + elapsed / interval
    text = log_file.read_text()[start:]
    assert "wrong-token-guess" not in text and "guess-1" not in text and NODE_SECRET not in text


async def test_openapi_tells_the_truth_about_methods_targets_integers_and_links(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 2))
        # 405 names every method the path serves.
        for method, path, allow in (("DELETE", "/v1/runs", "GET, POST"), ("PUT", "/v1/workflows", "GET, POST"),
                                    ("POST", "/v1/devices", "GET"), ("DELETE", f"/v1/runs/{'0' * 8}", "GET")):
            r = await client.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
        spec = (await client.get("/openapi.json")).json()
        schemas = spec["components"]["schemas"]
        # targets: exactly one of three, as the server enforces.
        assert [v["required"] for v in schemas["Targets"]["oneOf"]] == [["devices"], ["nodes"], ["all_online"]]
        for targets in ({}, {"all_online": False}, {"devices": None}, {"nodes": ["node-1"], "all_online": True},
                        {"devices": [{"node_id": "node-1", "serial": "SIM1X000"}], "nodes": ["node-1"]}):
            r = await client.post("/v1/runs", json=run_body(targets=targets))
            assert r.status_code == 422, (targets, r.text)
            assert r.json()["error"]["details"][0]["path"].startswith("$.targets"), r.text
        await nothing_stored(database_url, nats_server.url)
        # Integers: JSON Schema counts 1.0 as an integer, and so does the server; 1.5 is not one.
        r = await client.post("/v1/runs", json=run_body(workflow_version=1.0, step_timeouts_ms={"open": 20000.0}))
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        refused(await client.post("/v1/runs", json=run_body(workflow_version=1.5)), "$.workflow_version")
        assert (await client.get("/v1/runs", params={"limit": "1.0"})).status_code == 200
        refused(await client.get("/v1/runs", params={"limit": "1.5"}), "$.query.limit")
        # Cross-field rules are written down where the schema cannot express them.
        assert "exactly one of" in schemas["RunCreate"]["description"]
        for rule in ("unique", "names an earlier", "placeholder", "RE2", "control character"):
            assert rule in schemas["Recipe"]["description"], rule
        # Links: from a created run to its read, cancel and artifacts (and on, from a cancel to the run).
        operations = {op["operationId"]: (path, method) for path, methods in spec["paths"].items()
                      for method, op in methods.items()}
        links = spec["paths"]["/v1/runs"]["post"]["responses"]["201"]["links"]
        assert {link["operationId"] for link in links.values()} == {"get_run", "run_tasks", "cancel_run",
                                                                    "run_artifacts"}
        for link in links.values():
            assert link["parameters"] == {"run_id": "$response.body#/run_id"}
            path, _ = operations[link["operationId"]]
            assert "{run_id}" in path
            assert (await client.request(operations[link["operationId"]][1].upper(),
                                         path.replace("{run_id}", run_id))).status_code < 300
        published = spec["paths"]["/v1/workflows"]["post"]["responses"]["201"]["links"]
        assert {link["operationId"] for link in published.values()} == {"get_workflow", "get_workflow_version"}


@pytest.mark.parametrize("template, message", [
    ("{youtubeVideoId.__class__}/{run_id}.png", "plain names"),
    ("/{run_id}.png", "relative"),
    ("static.png", "at least one field"),
    ("{run_id", "not valid"),
])
def test_backend_refuses_an_artifact_path_template_it_cannot_check(template: str, message: str) -> None:
    env = {"DATABASE_URL": "postgresql://x", "NATS_URL": "nats://x", "DOAI_API_TOKEN": "t",
           "NODE_AGENT_SHARED_SECRET": NODE_SECRET, "DOAI_ARTIFACT_PATH_TEMPLATE": template,
           "DOAI_COMMAND_SIGNING_KEY": TEST_SIGNING_SEED, "DOAI_NATS_AUTH_DIR": "/etc/doai/nats-auth"}
    with pytest.raises(ConfigError, match=f"DOAI_ARTIFACT_PATH_TEMPLATE: .*{message}"):
        load_settings(BackendSettings, env)
    env["DOAI_ARTIFACT_PATH_TEMPLATE"] = "{site}/{node_id}/{run_id}.png"
    assert load_settings(BackendSettings, env).path_template == "{site}/{node_id}/{run_id}.png"


async def test_the_json_depth_check_is_linear_on_hostile_bodies(database_url: str, nats_server: EmbeddedNats) -> None:
    """An unterminated string full of `\\"` after 33 brackets made the depth check's string scan restart at
    every quote (quadratic: about 15 s for 40 KB, hours for 1 MiB, with the event loop blocked)."""
    async with running_backend(database_url, nats_server.url) as backend, backend.client(timeout=60) as client:
        hostile = b"{" * 40 + b'"' + b'\\"' * 500_000  # just under 1 MiB
        answers = await asyncio.gather(*(client.post(path, content=hostile) for path in ("/v1/runs", "/v1/workflows")),
                                       client.get("/healthz"))
        assert [r.status_code for r in answers] == [422, 422, 200]
        assert {r.json()["error"]["code"] for r in answers[:2]} == {"json_too_deep"}
        # 75,000 unknown fields (and 5,000 steps): the validator stops after a bounded number of faults
        # instead of re-checking the document once per fault.
        crowded = {**{f"k{i}": 1 for i in range(75_000)}, "dsl": 1, "workflow_id": "crowded",
                   "steps": [{"id": "r", "action": "nope"}] * 5_000}
        body = json.dumps(crowded, separators=(",", ":")).encode()
        assert len(body) < backend.settings.max_body_bytes
        r, health = await asyncio.gather(client.post("/v1/workflows", content=body), client.get("/healthz"))
        assert health.status_code == 200
        assert r.status_code == 422 and len(r.json()["error"]["details"]) == 101, r.text[:300]
        await nothing_stored(database_url, nats_server.url)
        assert await fetchval(database_url, "SELECT count(*) FROM workflows") == 0


def test_recipe_validation_stops_after_a_bounded_number_of_faults() -> None:
    """The work per fault is a re-check of the document: an unbounded list of faults was quadratic work."""
    crowded = {**{f"k{i}": 1 for i in range(20_000)}, "dsl": 1, "workflow_id": "crowded",
               "params": {f"p{i}": {"type": "x"} for i in range(5_000)}, "steps": [{"id": "r", "action": "x"}] * 5_000}
    with pytest.raises(RecipeInvalid) as info:
        validate_recipe(crowded)
    assert len(info.value.faults) <= MAX_FAULTS + MAX_STEPS + MAX_PARAMS


async def test_versions_stored_under_older_rules_are_refused_cleanly(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    """Rows published before these rules (a bell in a title, a `{1,2000}` repetition RE2 refuses) get a 409 or
    a 422 that says to publish a new version, never a 500."""
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await seed_fleet(database_url, fleet_of(1, 1))
        old = {"bell": recipe("bell", {}, [{"id": "r", "action": "report"}], title="ding\x07"),
               "wide": recipe("wide", {"u": {"pattern": "^[a-z]{1,2000}$"}}, [{"id": "r", "action": "report"}])}
        conn = await asyncpg.connect(database_url)
        try:
            for workflow_id, doc in old.items():
                await conn.execute("INSERT INTO workflows (workflow_id, version, recipe, digest)"
                                   " VALUES ($1, 1, $2::jsonb, $3)", workflow_id, json.dumps(doc), workflow_id)
        finally:
            await conn.close()
        for path in ("/v1/workflows/bell", "/v1/workflows/bell/versions/1"):
            r = await client.get(path)
            assert r.status_code == 409 and r.json()["error"]["code"] == "workflow_outdated", r.text
        r = await client.post("/v1/runs", json=run_body(workflow_id="bell", params={}))
        assert r.status_code == 409 and "publish a new version" in r.json()["error"]["message"], r.text
        refused(await client.post("/v1/runs", json=run_body(workflow_id="wide", params={"u": "abc"})),
                "$.params.u", contains="publish a new version")
        assert (await client.get("/v1/workflows")).status_code == 200
        await nothing_stored(database_url, nats_server.url)
