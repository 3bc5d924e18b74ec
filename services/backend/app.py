"""The operator REST API (FastAPI). Bodies are msgspec Structs from `contracts.api`."""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
import msgspec
from fastapi import Depends, FastAPI, Header, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts.api import RunCreate, RunCreated, WorkflowView
from contracts.recipe import RecipeInvalid, validate_recipe
from services.backend import runs, workflows
from services.backend.auth import TokenCheck
from services.backend.errors import (
    ApiError,
    JSONResponse,
    api_error_handler,
    decode_error,
    error_response,
    invalid,
)
from services.backend.relay import OutboxRelay


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


def _decode(data: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as err:
        raise decode_error(err) from None


def create_app(pool: asyncpg.Pool, relay: OutboxRelay, api_tokens: list[str],
               max_body_bytes: int = 1_048_576, device_stale_s: float = 60.0) -> FastAPI:
    check = TokenCheck(api_tokens)

    def operator(authorization: Annotated[str | None, Header()] = None) -> None:
        check(authorization)

    app = FastAPI(title="doai", version="1", default_response_class=JSONResponse)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    auth = [Depends(operator)]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        await pool.fetchval("SELECT 1")
        return {"status": "ok"}

    @app.post("/v1/workflows", status_code=201, dependencies=auth)
    async def publish_workflow(request: Request) -> JSONResponse:
        try:
            doc = msgspec.json.decode(await request.body())
        except msgspec.DecodeError as err:
            raise decode_error(err) from None
        try:
            recipe = validate_recipe(doc)
        except RecipeInvalid as err:
            raise invalid("recipe is invalid", err.faults, code="invalid_recipe") from None
        stored, created = await workflows.publish(pool, recipe)
        if not created:
            raise ApiError(409, "unchanged",
                           f"recipe equals the latest version {stored.version} of {stored.workflow_id}")
        return JSONResponse({"workflow_id": stored.workflow_id, "version": stored.version},
                            status_code=201)

    async def _workflow(workflow_id: str, version: int | None) -> WorkflowView:
        stored = await workflows.get(pool, workflow_id, version)
        if stored is None:
            suffix = f" version {version}" if version is not None else ""
            raise ApiError(404, "workflow_not_found", f"unknown workflow {workflow_id}{suffix}")
        return WorkflowView(stored.workflow_id, stored.version, runs.iso(stored.created_at) or "",
                            msgspec.to_builtins(stored.recipe))

    @app.get("/v1/workflows/{workflow_id}", dependencies=auth)
    async def get_workflow(workflow_id: str) -> JSONResponse:
        return JSONResponse(await _workflow(workflow_id, None))

    @app.get("/v1/workflows/{workflow_id}/versions/{version}", dependencies=auth)
    async def get_workflow_version(workflow_id: str, version: int) -> JSONResponse:
        return JSONResponse(await _workflow(workflow_id, version))

    @app.post("/v1/runs", status_code=201, dependencies=auth)
    async def create_run(request: Request) -> JSONResponse:
        body: RunCreate = _decode(await request.body(), RunCreate)
        run_id, count, rejected = await runs.create_run(pool, body, device_stale_s)
        relay.wake()
        created = RunCreated(run_id=run_id, status="pending", targets=count)
        return JSONResponse({**msgspec.to_builtins(created), "rejected": rejected}, status_code=201)

    @app.get("/v1/runs/{run_id}", dependencies=auth)
    async def get_run(run_id: str) -> JSONResponse:
        return JSONResponse(await runs.get_run(pool, run_id))

    @app.get("/v1/devices", dependencies=auth)
    async def get_devices() -> JSONResponse:
        return JSONResponse({"devices": await runs.list_devices(pool)})

    @app.get("/v1/nodes", dependencies=auth)
    async def get_nodes() -> JSONResponse:
        return JSONResponse({"nodes": await runs.list_nodes(pool)})

    return app
