"""`/healthz`: the database answers (no credentials)."""

from __future__ import annotations

from fastapi import APIRouter

from contracts import api
from services.backend.errors import JSONResponse
from services.backend.openapi import route
from services.backend.routes.common import Context


def router(ctx: Context) -> APIRouter:
    r = APIRouter()

    @r.get("/healthz", operation_id="healthz", **route((200, api.Health), checked=False))
    async def healthz() -> JSONResponse:
        await ctx.pool.fetchval("SELECT 1")
        return JSONResponse(api.Health("ok"))

    return r
