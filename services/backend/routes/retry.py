"""`POST /v1/runs/{run_id}/retry`: a new run over the devices of a finished run in some states (operator token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from contracts import api
from services.backend import retry
from services.backend.errors import JSONResponse
from services.backend.openapi import route
from services.backend.routes.common import Context, RunIdPath
from services.backend.routes.runs import IdempotencyKey


def router(ctx: Context) -> APIRouter:
    r = APIRouter(dependencies=[Depends(ctx.operator)])

    @r.post("/v1/runs/{run_id}/retry", operation_id="retry_run",
            **route((201, api.RunCreated), 400, 401, 404, 409, 413, 422, body=api.RunRetry,
                    body_text="Task states whose devices the new run targets (default failed, timed_out, lost)",
                    example={"states": ["failed", "timed_out", "cancelled"]}))
    async def retry_run(run_id: RunIdPath, request: Request, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        body: api.RunRetry = await ctx.body_of(request, api.RunRetry)
        created = await retry.retry_run(ctx.pool, run_id, body, ctx.settings.idempotency_ttl_s, idempotency_key,
                                        path_template=ctx.settings.path_template)
        ctx.relay.wake()
        headers = {"Idempotent-Replayed": "true"} if created.replayed else None
        return JSONResponse(created.response, status_code=201, headers=headers)

    return r
