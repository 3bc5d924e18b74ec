"""Property-based fuzz of the REST API over its own OpenAPI document (schemathesis).

Every operation gets schema-valid and schema-violating requests (bounded,
derandomized, so the run is repeatable and fits in about a minute on two
cores) against the real backend on real PostgreSQL and nats-server, with a
recipe published and a fleet listed. Checked for every response: no 5xx, a
status code the document declares for that operation, the declared content
type and headers, and a body that validates against the declared schema
(errors included: they must be the one error shape).

Then the stateful phase: schemathesis follows the document's OpenAPI links
(a created run → its read, cancel and artifacts; a cancel → the run; a
published workflow → its versions) in generated sequences, with the same
checks on every response.

Schemathesis calls the API synchronously, so it runs in a worker thread while
the event loop keeps serving the in-process backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import FlakyStrategyDefinition, Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from doai.embedded import EmbeddedNats
from services.node.enroll import new_user_seed, user_public_key_of
from tests.backend_support import NODE_SECRET, PARAMS, fleet_of, publish_recipe, run_body, running_backend, seed_fleet
from tests.conftest import TEST_TOKEN

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}
STATEFUL_SEQUENCES = 40


def fuzz_operation(operation: Any, mode: GenerationMode, base_url: str, headers: dict[str, str],
                   seen: Counter[tuple[str, int]]) -> None:
    label = f"{operation.label} [{mode}]"

    @settings(max_examples=EXAMPLES[mode], derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        seen[(label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    check()


def fuzz(spec: dict[str, Any], base_url: str) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Run every operation in both modes; return (failures, responses by (operation, status))."""
    schema = schemathesis.openapi.from_dict(spec)
    headers = {"Authorization": f"Bearer {TEST_TOKEN}", "X-Node-Auth": NODE_SECRET}
    failures: list[str] = []
    seen: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in EXAMPLES:
            try:
                fuzz_operation(operation, mode, base_url, headers, seen)
            except Unsatisfiable:  # nothing to violate: an operation without parameters or body
                assert mode == GenerationMode.NEGATIVE, operation.label
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label} [{mode}]: {exc}")
    return failures, seen


def narrowed_for_runs(spec: dict[str, Any]) -> dict[str, Any]:
    """The document with `RunCreate` narrowed to bodies that name the published workflow and the fleet.

    A random workflow id is a 404 and a random recipe a 422, so a generated sequence would almost never get
    past its first step; every body of the narrowed schema is still valid under the real one.
    """
    narrowed = copy.deepcopy(spec)
    schemas = narrowed["components"]["schemas"]
    props = schemas["RunCreate"]["properties"]
    props["workflow_id"] = {"const": "device-smoke"}
    props["params"] = {"const": PARAMS}
    props["step_timeouts_ms"] = {"type": "object", "properties": {"open": {"type": "integer", "minimum": 1000,
                                                                           "maximum": 600000}},
                                 "additionalProperties": False}
    props["workflow_version"] = {"const": 1}
    schemas["Targets"] = {"oneOf": [schemas["Targets"]["oneOf"][2]]}  # all_online: what is online right now
    # Node identities (enroll, revoke) are no part of a run's life: fuzzed above, left out of the sequences.
    for path in ("/v1/node/enroll", "/v1/nodes/{node_id}/revoke"):
        narrowed["paths"].pop(path, None)
    return narrowed


def fuzz_stateful(spec: dict[str, Any], base_url: str) -> tuple[list[str], Counter[tuple[str, int]]]:
    """Run generated sequences that follow the links; return (failures, responses by (operation, status)).

    Check failures are collected rather than raised: a raised one makes Hypothesis replay the sequence, and
    against a server whose state moved on (more runs, more workflows) the replay draws differently and ends
    in `FlakyStrategyDefinition`, hiding the failure itself. For the same reason an inconsistent draw
    (Hypothesis's bookkeeping, not the server) ends the phase early instead of failing it; the assertions on
    what was exercised still have to hold.
    """
    schema = schemathesis.openapi.from_dict(spec)
    headers = {"Authorization": f"Bearer {TEST_TOKEN}", "X-Node-Auth": NODE_SECRET}
    seen: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": base_url, "headers": headers, "timeout": 30}

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            seen[(case.operation.label, response.status_code)] += 1
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except Exception as exc:
                failures.append(f"{case.operation.label} -> {response.status_code}: {exc}")

    with contextlib.suppress(FlakyStrategyDefinition):
        Machine.run(settings=settings(max_examples=STATEFUL_SEQUENCES, stateful_step_count=6, derandomize=True,
                                      deadline=None, database=None, phases=[Phase.generate],
                                      suppress_health_check=list(HealthCheck)))
    return failures, seen


async def test_api_fuzz_finds_no_server_error_and_no_schema_violation(
    database_url: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    async with running_backend(database_url, nats_server.url, artifact_dir=str(store)) as backend, \
            backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(2, 3))
        r = await client.post("/v1/runs", json=run_body())
        assert r.status_code == 201, r.text
        # One local artifact, so a valid download reaches a real file.
        key = f"abc/node-1/SIM1X000/{r.json()['run_id']}/1.png"
        (store / key).parent.mkdir(parents=True)
        (store / key).write_bytes(b"\x89PNG\r\n\x1a\n")
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO artifacts (run_id, node_id, device_serial, step_id, store, key, uri, bytes, sha256,"
                " content_type, created_at) VALUES ($1, 'node-1', 'SIM1X000', 'upload', 'local', $2, 'file:///x', 8,"
                " 'x', 'image/png', now())", uuid.UUID(r.json()["run_id"]), key)
        finally:
            await conn.close()
        # Cancelled (its queued tasks with it), so a retry of its cancelled devices can succeed too.
        assert (await client.post(f"/v1/runs/{r.json()['run_id']}/cancel")).status_code == 202
        spec = (await client.get("/openapi.json")).json()
        # A node enrolled before the fuzz, so the operator's revoke has a node to revoke.
        async with httpx.AsyncClient(base_url=backend.url, headers={"X-Node-Auth": NODE_SECRET}) as node_api:
            enrolled = await node_api.post("/v1/node/enroll", json={"node_id": "node-9",
                                                                    "public_key": user_public_key_of(new_user_seed())})
            assert enrolled.status_code == 201, enrolled.text
        # Explicit examples that name things which exist, so valid requests also reach real rows.
        known = {"run_id": r.json()["run_id"], "workflow_id": "device-smoke", "version": 1, "node_id": "node-9",
                 "store": "local", "key": key, "serial": "SIM1X000"}
        for methods in spec["paths"].values():
            for operation in methods.values():
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "path" and parameter["name"] in known:
                        parameter["example"] = known[parameter["name"]]
        # One task names three things at once, which random draws (even with the examples) rarely all hit:
        # its positive cases get the task that exists (random ones are still sent in the negative mode).
        fuzzed = copy.deepcopy(spec)
        for parameter in fuzzed["paths"]["/v1/runs/{run_id}/tasks/{node_id}/{serial}"]["get"]["parameters"]:
            if parameter["in"] == "path":
                task = {"run_id": known["run_id"], "node_id": "node-1", "serial": "SIM1X000"}
                parameter["schema"] = {**parameter["schema"], "enum": [task[parameter["name"]]]}
        failures, seen = await asyncio.to_thread(fuzz, fuzzed, backend.url)
        assert not failures, "\n\n".join(failures)
        # The credentials went through: every operation was exercised in both modes, and no
        # schema-valid request was refused for its credentials (negative ones may break the auth too).
        labels = {label for label, _ in seen}
        operations = sum(len(methods) for methods in spec["paths"].values())
        assert len([x for x in labels if x.endswith("[positive]")]) == operations
        assert len(labels) >= operations * 2 - 1  # GET /healthz has nothing to break
        assert not [k for k in seen if k[0].endswith("[positive]") and k[1] == 401], sorted(seen.items())
        for label in labels:
            if label.endswith("[positive]"):
                assert any(status < 300 for (x, status) in seen if x == label), (label, sorted(seen.items()))
        # The API still works after the fuzz.
        assert (await client.get(f"/v1/runs/{r.json()['run_id']}")).status_code == 200

        # Stateful: sequences that create runs and follow the links to read and cancel them.
        await seed_fleet(database_url, fleet_of(2, 3))  # seen again now: still targetable however long the above took
        stateful_failures, stateful = await asyncio.to_thread(fuzz_stateful, narrowed_for_runs(spec), backend.url)
        assert not stateful_failures, "\n\n".join(stateful_failures[:20])
        created = sum(n for (label, status), n in stateful.items() if label == "POST /v1/runs" and status == 201)
        followed = {label for (label, status) in stateful if status < 300}
        assert created > 0, sorted(stateful.items())
        # Sequences went past their first step: at least two different links out of a created run answered 2xx.
        # Which ones depends on Hypothesis's rule draws (and those on the server's answers), so no single link
        # is required here; every link resolving to a 2xx is checked deterministically in test_backend_input.
        from_a_run = {"GET /v1/runs/{run_id}", "GET /v1/runs/{run_id}/tasks", "GET /v1/runs/{run_id}/artifacts",
                      "POST /v1/runs/{run_id}/cancel", "POST /v1/runs/{run_id}/retry"}
        assert len(from_a_run & followed) >= 2, "; ".join(map(str, sorted(stateful.items())))
        assert not [k for k in stateful if k[1] >= 500], sorted(stateful.items())
