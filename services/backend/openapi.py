"""The OpenAPI document: msgspec Structs as components, request bodies and every response declared.

FastAPI never sees the bodies (they are decoded from raw bytes with msgspec),
so each route states its request body and responses here; the schemas are
generated from the same Structs the server decodes and encodes with.
"""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import api
from contracts.recipe_model import Recipe

COMPONENTS: tuple[type[Any], ...] = (
    api.RunCreate, api.RunRetry, api.RunCreated, api.RunCancelled, api.RunView, api.RunPage, api.TaskPage,
    api.TaskDetail, api.ArtifactList,
    api.WorkflowView, api.WorkflowPublished, api.WorkflowList, api.DeviceList, api.NodeList, api.NodeConfig,
    api.NodeEnrollRequest, api.NodeEnrollment, api.NodeRevoked, api.Health, api.ErrorResponse, Recipe,
)

_ERROR_TEXT = {
    400: "The body is not valid JSON",
    401: "Missing or invalid credentials",
    404: "No such resource (or no such route)",
    409: "Conflicts with the current state",
    413: "Request body too large",
    422: "The request does not validate; `details` lists every fault with its JSON path",
    500: "Internal error",
    502: "An upstream service (Supabase Storage) did not answer as it should",
    503: "A server doai depends on (NATS) is unavailable; retry later",
}


def ref(kind: type[Any]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


# A node's enrollment: its id and the public key of the NATS user key pair it made (the seed stays on the node).
ENROLL_EXAMPLE = {"node_id": "node-A1", "public_key": "UD6JOQGGXUS6SAVE7POJWYLLF7ORP3O63DZDCG7E4ZSWRILK75GL4ZYZ"}

RUN_EXAMPLE = {
    "workflow_id": "device-smoke",
    "params": {"url": "https://example.org/", "youtubeVideoId": "dQw4w9WgXcQ"},
    "targets": {"all_online": True},
    "step_timeouts_ms": {"open": 20000},
}
RECIPE_EXAMPLE = {
    "dsl": 1, "workflow_id": "hello", "title": "Open a page and take a screenshot",
    "params": {"url": {"type": "string", "pattern": "^https?://.+$"}},
    "steps": [{"id": "open", "action": "open_url", "url": "{{url}}"}, {"id": "shot", "action": "screenshot"},
              {"id": "report", "action": "report"}],
}


def components() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(COMPONENTS, ref_template="#/components/schemas/{name}")
    schemas["Targets"] = api.TARGETS_SCHEMA  # exactly one of the three: msgspec cannot say it, the server checks it
    return schemas


def _link(operation_id: str, description: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation_id, "description": description, "parameters": parameters}


# OpenAPI links: how a client (or a stateful fuzzer) follows what it created to where it can read or act on it.
LINKS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("/v1/runs", "post", "201"): {
        "GetRun": _link("get_run", "The run's summary: status, outcome, counts, failing steps, timings",
                        run_id="$response.body#/run_id"),
        "RunTasks": _link("run_tasks", "The run's tasks, paged", run_id="$response.body#/run_id"),
        "CancelRun": _link("cancel_run", "Cancel the run", run_id="$response.body#/run_id"),
        "RunArtifacts": _link("run_artifacts", "The run's artifacts", run_id="$response.body#/run_id"),
    },
    ("/v1/runs/{run_id}/cancel", "post", "202"): {
        "GetRun": _link("get_run", "The cancelled run", run_id="$response.body#/run_id"),
    },
    ("/v1/workflows", "post", "201"): {
        "GetWorkflow": _link("get_workflow", "The workflow's latest version",
                             workflow_id="$response.body#/workflow_id"),
        "GetWorkflowVersion": _link("get_workflow_version", "The version just published",
                                    workflow_id="$response.body#/workflow_id", version="$response.body#/version"),
    },
}


def tidy_parameters(schema: dict[str, Any]) -> None:
    """An optional query parameter is absent, never `null`: FastAPI's `anyOf: [X, {type: null}]` becomes X
    (with the outer keywords, such as `format`, moved into it)."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                outer = parameter.get("schema", {})
                variants = outer.get("anyOf", [])
                if len(variants) == 2 and {"type": "null"} in variants:
                    inner = dict(next(v for v in variants if v != {"type": "null"}))
                    inner.update({k: v for k, v in outer.items() if k not in ("anyOf", "default")})
                    parameter["schema"] = inner


def add_links(schema: dict[str, Any]) -> None:
    for (path, method, status), links in LINKS.items():
        schema["paths"][path][method]["responses"][status]["links"] = links


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def route(ok: tuple[int, type[Any]], *errors: int, body: type[Any] | None = None,
          body_text: str = "", example: Any = None, checked: bool = True) -> dict[str, Any]:
    """Keyword arguments for a FastAPI route decorator: its responses, and its body if it has one.

    `checked` routes run `check_request` (unknown query parameters, control characters): they can answer 422.
    """
    status, kind = ok
    responses: dict[int | str, dict[str, Any]] = {status: {"description": "OK", "content": _json(ref(kind))}}
    for code in sorted({*errors, 500, *((422,) if checked else ())}):
        entry: dict[str, Any] = {"description": _ERROR_TEXT[code], "content": _json(ref(api.ErrorResponse))}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[code] = entry
    kwargs: dict[str, Any] = {"responses": responses, "status_code": status}
    if body is not None:
        content = _json(ref(body))
        if example is not None:
            content["application/json"]["example"] = example
        kwargs["openapi_extra"] = {"requestBody": {"required": True, "description": body_text, "content": content}}
    return kwargs
