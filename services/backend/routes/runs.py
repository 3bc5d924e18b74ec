"""`/v1/runs`: create (idempotent), list, read, cancel, artifacts (operator token)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request

from contracts import api
from contracts.ids import WORKFLOW_ID_PATTERN
from contracts.text import clip
from services.backend import runs
from services.backend.errors import ApiError, JSONResponse
from services.backend.openapi import RUN_EXAMPLE, route
from services.backend.routes.common import Context, CreatedAfter, CreatedBefore, Cursor, RunIdPath, parse_date

RunStatus = Literal["pending", "dispatched", "running", "completed", "cancelled"]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", pattern=api.IDEMPOTENCY_KEY_PATTERN,
                                              description="Same key and body: the same run again; another body:"
                                              " 409. A key is remembered for 7 days (DOAI_IDEMPOTENCY_TTL_S),"
                                              " then forgotten (used again, it makes a new run)")]


def router(ctx: Context) -> APIRouter:
    r = APIRouter(dependencies=[Depends(ctx.operator)])
    pool, relay, settings = ctx.pool, ctx.relay, ctx.settings

    @r.post("/v1/runs", operation_id="create_run",
            **route((201, api.RunCreated), 400, 401, 404, 409, 413, 422, body=api.RunCreate,
                    body_text="Workflow, params, targets (exactly one of devices / nodes / all_online)",
                    example=RUN_EXAMPLE))
    async def create_run(request: Request, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        body: api.RunCreate = await ctx.body_of(request, api.RunCreate)
        created = await runs.create_run(pool, body, settings.idempotency_ttl_s, idempotency_key,
                                        path_template=settings.path_template)
        relay.wake()
        headers = {"Idempotent-Replayed": "true"} if created.replayed else None
        return JSONResponse(created.response, status_code=201, headers=headers)

    @r.get("/v1/runs", operation_id="list_runs", **route((200, api.RunPage), 401, 422))
    async def list_runs(
        status: RunStatus | None = None,
        workflow_id: Annotated[str | None, Query(pattern=WORKFLOW_ID_PATTERN)] = None,
        created_after: CreatedAfter = None,
        created_before: CreatedBefore = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=api.MAX_PAGE_SIZE)] = api.DEFAULT_PAGE_SIZE,
    ) -> JSONResponse:
        after = parse_date(created_after, "created_after")
        before = parse_date(created_before, "created_before")
        return JSONResponse(await runs.list_runs(
            pool, status=status, workflow_id=workflow_id, created_after=after,
            created_before=before, cursor=cursor, limit=limit))

    @r.get("/v1/runs/{run_id}", operation_id="get_run", **route((200, api.RunView), 401, 404, 422))
    async def get_run(run_id: RunIdPath) -> JSONResponse:
        return JSONResponse(await runs.get_run(pool, run_id))

    @r.post("/v1/runs/{run_id}/cancel", operation_id="cancel_run",
            **route((202, api.RunCancelled), 401, 404, 409, 422))
    async def cancel_run(run_id: RunIdPath) -> JSONResponse:
        cancelled = await runs.cancel_run(pool, run_id)
        relay.wake()
        return JSONResponse(cancelled, status_code=202)

    @r.get("/v1/runs/{run_id}/artifacts", operation_id="run_artifacts",
           **route((200, api.ArtifactList), 401, 404, 422))
    async def run_artifacts(run_id: RunIdPath) -> JSONResponse:
        rid = runs.parse_run_id(run_id)
        if await pool.fetchval("SELECT 1 FROM runs WHERE run_id = $1", rid) is None:
            raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)}")
        rows = await pool.fetch("SELECT * FROM artifacts WHERE run_id = $1"
                                " ORDER BY node_id, device_serial, created_at, key", rid)
        return JSONResponse(api.ArtifactList(run_id=str(rid), artifacts=await ctx.linker.links(rows)))

    return r
