"""`/v1/runs`: create (idempotent), list, read, cancel, artifacts (operator token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request

from contracts import api
from contracts.events import RecordedTaskState
from contracts.ids import NODE_ID_PATTERN, SERIAL_PATTERN, WORKFLOW_ID_PATTERN
from contracts.text import clip
from services.backend import runs
from services.backend.errors import ApiError, JSONResponse
from services.backend.openapi import RUN_EXAMPLE, route
from services.backend.routes.common import (
    Context,
    CreatedAfter,
    CreatedBefore,
    Cursor,
    Limit,
    NodeIdPath,
    RunIdPath,
    SerialPath,
    parse_date,
)

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
        status: api.RunStatus | None = None,
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

    @r.get("/v1/runs/{run_id}", operation_id="get_run", **route((200, api.RunView), 401, 404, 422),
           summary="A run's summary", description=(
               "Status (lifecycle) and outcome, counts per state and per node, the top failing steps with"
               " their error codes, timings. Its size does not grow with the number of devices: the tasks"
               " are paged at /v1/runs/{run_id}/tasks."))
    async def get_run(run_id: RunIdPath) -> JSONResponse:
        return JSONResponse(await runs.get_run(pool, run_id))

    @r.get("/v1/runs/{run_id}/tasks", operation_id="run_tasks", **route((200, api.TaskPage), 401, 404, 422),
           summary="A run's tasks, paged", description=(
               "Ordered by (node_id, device_serial); keyset-paged: pass `next_cursor` as `cursor` with the same"
               " filters to get the next page (a page never skips or repeats a task). Steps are not included:"
               " read one task at /v1/runs/{run_id}/tasks/{node_id}/{serial}."))
    async def run_tasks(
        run_id: RunIdPath,
        state: Annotated[RecordedTaskState | None, Query(description="Only tasks in this state")] = None,
        node_id: Annotated[str | None, Query(pattern=NODE_ID_PATTERN, description="Only this node's")] = None,
        serial: Annotated[str | None, Query(pattern=SERIAL_PATTERN, description="Only this device serial")] = None,
        cursor: Cursor = None,
        limit: Limit = api.DEFAULT_PAGE_SIZE,
    ) -> JSONResponse:
        return JSONResponse(await runs.list_tasks(pool, run_id, state=state, node_id=node_id, serial=serial,
                                                  cursor=cursor, limit=limit))

    @r.get("/v1/runs/{run_id}/tasks/{node_id}/{serial}", operation_id="run_task",
           **route((200, api.TaskDetail), 401, 404, 422), summary="One task with its steps and artifacts",
           description="Every step's state, output and error, and the task's artifacts with download links.")
    async def run_task(request: Request, run_id: RunIdPath, node_id: NodeIdPath, serial: SerialPath) -> JSONResponse:
        return JSONResponse(await runs.get_task(pool, ctx.linker, run_id, node_id, serial, ctx.base_url(request)))

    @r.post("/v1/runs/{run_id}/cancel", operation_id="cancel_run",
            **route((202, api.RunCancelled), 401, 404, 409, 422))
    async def cancel_run(run_id: RunIdPath) -> JSONResponse:
        cancelled = await runs.cancel_run(pool, run_id)
        relay.wake()
        return JSONResponse(cancelled, status_code=202)

    @r.get("/v1/runs/{run_id}/artifacts", operation_id="run_artifacts",
           **route((200, api.ArtifactList), 401, 404, 422))
    async def run_artifacts(request: Request, run_id: RunIdPath) -> JSONResponse:
        rid = runs.parse_run_id(run_id)
        if await pool.fetchval("SELECT 1 FROM runs WHERE run_id = $1", rid) is None:
            raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)}")
        rows = await pool.fetch("SELECT * FROM artifacts WHERE run_id = $1"
                                " ORDER BY node_id, device_serial, created_at, key", rid)
        links = await ctx.linker.links(rows, ctx.base_url(request))
        return JSONResponse(api.ArtifactList(run_id=str(rid), artifacts=links))

    return r
