"""The REST API (FastAPI). Bodies are msgspec Structs from `contracts.api`, decoded from raw bytes.

Operator endpoints take `Authorization: Bearer <token>`; node endpoints
(`/v1/node/...`) take only `X-Node-Auth: <NODE_AGENT_SHARED_SECRET>`. Every
error has the shape `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts import api
from contracts.ids import NODE_ID_PATTERN, WORKFLOW_ID_PATTERN
from contracts.recipe import Recipe, RecipeInvalid, validate_recipe
from services.backend import runs, workflows
from services.backend.artifact_links import ArtifactLinker
from services.backend.auth import NodeSecretCheck, TokenCheck
from services.backend.enrollment import Enrollment
from services.backend.errors import (
    ApiError,
    JSONResponse,
    check_json_depth,
    decode_error,
    error_response,
    install_error_handlers,
    invalid,
)
from services.backend.openapi import ENROLL_EXAMPLE, RECIPE_EXAMPLE, RUN_EXAMPLE, components, route
from services.backend.relay import OutboxRelay
from services.backend.settings import BackendSettings

RunStatus = Literal["pending", "dispatched", "running", "completed", "cancelled"]
WorkflowIdPath = Annotated[str, Path(pattern=WORKFLOW_ID_PATTERN)]
# Security schemes (documented in OpenAPI); the checks themselves read the raw headers.
bearer = HTTPBearer(auto_error=False, description="Operator token (DOAI_API_TOKEN)")
node_header = APIKeyHeader(name="X-Node-Auth", auto_error=False, scheme_name="NodeAuth",
                           description="The node shared secret (NODE_AGENT_SHARED_SECRET)")


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, before they are read whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(too_big)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big
            return message

        await self.app(scope, limited, send)


def create_app(pool: asyncpg.Pool, relay: OutboxRelay, settings: BackendSettings,
               enrollment: Enrollment) -> FastAPI:
    operator_check = TokenCheck(settings.api_tokens)
    node_check = NodeSecretCheck(settings.node_secret)
    linker = ArtifactLinker(artifact_dir=settings.artifact_dir, supabase_url=settings.supabase_url,
                            supabase_key=settings.supabase_key, bucket=settings.supabase_bucket,
                            ttl_s=settings.signed_url_ttl_s)

    def operator(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        operator_check(request.headers.get("authorization"))

    def node(x_node_auth: Annotated[str | None, Security(node_header)]) -> None:
        node_check(x_node_auth)

    async def body_of(request: Request, kind: type[Any]) -> Any:
        data = await request.body()
        check_json_depth(data, settings.max_json_depth)
        try:
            return msgspec.json.decode(data, type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError) as err:
            if isinstance(err, msgspec.ValidationError):
                try:  # broken JSON is a 400 even where a type error came first
                    msgspec.json.decode(data)
                except msgspec.DecodeError as syntax:
                    raise decode_error(syntax) from None
            raise decode_error(err) from None

    app = FastAPI(title="doai", version="1", default_response_class=JSONResponse,
                  description="Workflows on fleets of Android devices. Errors: "
                              '`{"error": {"code", "message", "details"}}`.')
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    auth = [Depends(operator)]

    @app.get("/healthz", **route((200, api.Health)))
    async def healthz() -> JSONResponse:
        await pool.fetchval("SELECT 1")
        return JSONResponse(api.Health("ok"))

    # -- workflows ------------------------------------------------------------------

    @app.post("/v1/workflows", dependencies=auth,
              **route((201, api.WorkflowPublished), 400, 401, 409, 413, 422, body=Recipe,
                      body_text="A recipe (DSL v1); stored as the next version of its workflow_id",
                      example=RECIPE_EXAMPLE))
    async def publish_workflow(request: Request) -> JSONResponse:
        doc = await body_of(request, Any)
        try:
            recipe = validate_recipe(doc)
        except RecipeInvalid as err:
            raise invalid("recipe is invalid", err.faults, code="invalid_recipe") from None
        stored, created = await workflows.publish(pool, recipe)
        if not created:
            raise ApiError(409, "unchanged",
                           f"recipe equals the latest version {stored.version} of {stored.workflow_id}")
        return JSONResponse(api.WorkflowPublished(stored.workflow_id, stored.version), status_code=201)

    @app.get("/v1/workflows", dependencies=auth, **route((200, api.WorkflowList), 401))
    async def list_workflows() -> JSONResponse:
        return JSONResponse(api.WorkflowList(await workflows.list_latest(pool)))

    async def _workflow(workflow_id: str, version: int | None) -> api.WorkflowView:
        stored = await workflows.get(pool, workflow_id, version)
        if stored is None:
            suffix = f" version {version}" if version is not None else ""
            raise ApiError(404, "workflow_not_found", f"unknown workflow {workflow_id}{suffix}")
        return api.WorkflowView(stored.workflow_id, stored.version, runs.iso(stored.created_at) or "",
                                msgspec.to_builtins(stored.recipe))

    @app.get("/v1/workflows/{workflow_id}", dependencies=auth, **route((200, api.WorkflowView), 401, 404, 422))
    async def get_workflow(workflow_id: WorkflowIdPath) -> JSONResponse:
        return JSONResponse(await _workflow(workflow_id, None))

    @app.get("/v1/workflows/{workflow_id}/versions/{version}", dependencies=auth,
             **route((200, api.WorkflowView), 401, 404, 422))
    async def get_workflow_version(workflow_id: WorkflowIdPath,
                                   version: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> JSONResponse:
        return JSONResponse(await _workflow(workflow_id, version))

    # -- runs -----------------------------------------------------------------------

    @app.post("/v1/runs", dependencies=auth,
              **route((201, api.RunCreated), 400, 401, 404, 409, 413, 422, body=api.RunCreate,
                      body_text="Workflow, params, targets (exactly one of devices / nodes / all_online)",
                      example=RUN_EXAMPLE))
    async def create_run(
        request: Request,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", pattern=api.IDEMPOTENCY_KEY_PATTERN,
                                                      description="Same key and body: the same run again")] = None,
    ) -> JSONResponse:
        body: api.RunCreate = await body_of(request, api.RunCreate)
        created = await runs.create_run(pool, body, settings.device_stale_s, idempotency_key)
        relay.wake()
        headers = {"Idempotent-Replayed": "true"} if created.replayed else None
        return JSONResponse(created.response, status_code=201, headers=headers)

    @app.get("/v1/runs", dependencies=auth, **route((200, api.RunPage), 401, 422))
    async def list_runs(
        status: RunStatus | None = None,
        workflow_id: Annotated[str | None, Query(pattern=WORKFLOW_ID_PATTERN)] = None,
        created_after: Annotated[datetime | None, Query(description="created at or after (ISO 8601)")] = None,
        created_before: Annotated[datetime | None, Query(description="created before (ISO 8601)")] = None,
        cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=api.MAX_PAGE_SIZE)] = api.DEFAULT_PAGE_SIZE,
    ) -> JSONResponse:
        return JSONResponse(await runs.list_runs(
            pool, status=status, workflow_id=workflow_id, created_after=created_after,
            created_before=created_before, cursor=cursor, limit=limit))

    @app.get("/v1/runs/{run_id}", dependencies=auth, **route((200, api.RunView), 401, 404, 422))
    async def get_run(run_id: str) -> JSONResponse:
        return JSONResponse(await runs.get_run(pool, run_id))

    @app.post("/v1/runs/{run_id}/cancel", dependencies=auth, **route((202, api.RunCancelled), 401, 404, 409, 422))
    async def cancel_run(run_id: str) -> JSONResponse:
        cancelled = await runs.cancel_run(pool, run_id)
        relay.wake()
        return JSONResponse(cancelled, status_code=202)

    @app.get("/v1/runs/{run_id}/artifacts", dependencies=auth, **route((200, api.ArtifactList), 401, 404, 422))
    async def run_artifacts(run_id: str) -> JSONResponse:
        rid = runs.parse_run_id(run_id)
        if await pool.fetchval("SELECT 1 FROM runs WHERE run_id = $1", rid) is None:
            raise ApiError(404, "run_not_found", f"unknown run {run_id}")
        rows = await pool.fetch("SELECT * FROM artifacts WHERE run_id = $1"
                                " ORDER BY node_id, device_serial, created_at, key", rid)
        return JSONResponse(api.ArtifactList(run_id=str(rid), artifacts=await linker.links(rows)))

    # -- fleet ----------------------------------------------------------------------

    @app.get("/v1/devices", dependencies=auth, **route((200, api.DeviceList), 401))
    async def get_devices() -> JSONResponse:
        return JSONResponse(api.DeviceList(await runs.list_devices(pool)))

    @app.get("/v1/nodes", dependencies=auth, **route((200, api.NodeList), 401))
    async def get_nodes() -> JSONResponse:
        return JSONResponse(api.NodeList(await runs.list_nodes(pool)))

    # -- node-facing (X-Node-Auth only) -----------------------------------------------

    @app.get("/v1/node/config", dependencies=[Depends(node)], **route((200, api.NodeConfig), 401, 422))
    async def node_config(node_id: Annotated[str, Query(pattern=NODE_ID_PATTERN)]) -> JSONResponse:
        return JSONResponse(api.NodeConfig(
            node_id=node_id, slots=settings.slots_for(node_id),
            timeouts=api.NodeTimeouts(step_ms=settings.step_timeout_ms, upload_ms=settings.upload_timeout_ms),
        ))

    @app.post("/v1/node/enroll", dependencies=[Depends(node)],
              **route((201, api.NodeEnrollment), 400, 401, 409, 413, 422, 503, body=api.NodeEnrollRequest,
                      body_text="A new node's id and the public key of the NATS user key pair it made",
                      example=ENROLL_EXAMPLE))
    async def enroll_node(request: Request) -> JSONResponse:
        body: api.NodeEnrollRequest = await body_of(request, api.NodeEnrollRequest)
        enrolled, _ = await enrollment.enroll(body)  # the same id and key again: the same answer (retry)
        return JSONResponse(enrolled, status_code=201)

    @app.post("/v1/nodes/{node_id}/revoke", dependencies=auth,
              **route((200, api.NodeRevoked), 401, 404, 422, 503))
    async def revoke_node(node_id: Annotated[str, Path(pattern=NODE_ID_PATTERN)]) -> JSONResponse:
        return JSONResponse(await enrollment.revoke(node_id))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components())
            for operations in schema["paths"].values():  # FastAPI merges a "type: string" into our refs
                for operation in operations.values():
                    for response in operation.get("responses", {}).values():
                        media = response.get("content", {}).get("application/json", {})
                        if "$ref" in media.get("schema", {}):
                            media["schema"] = {"$ref": media["schema"]["$ref"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
