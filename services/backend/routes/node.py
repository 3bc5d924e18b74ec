"""`/v1/node/...`: what node agents ask, with `X-Node-Auth` only (rule 8)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from contracts import api
from contracts.ids import NODE_ID_PATTERN
from services.backend.errors import JSONResponse
from services.backend.openapi import route
from services.backend.routes.common import Context


def router(ctx: Context) -> APIRouter:
    r = APIRouter(dependencies=[Depends(ctx.node)])
    settings = ctx.settings

    @r.get("/v1/node/config", operation_id="node_config", **route((200, api.NodeConfig), 401, 422))
    async def node_config(node_id: Annotated[str, Query(pattern=NODE_ID_PATTERN)]) -> JSONResponse:
        return JSONResponse(api.NodeConfig(
            node_id=node_id, slots=settings.slots_for(node_id),
            timeouts=api.NodeTimeouts(step_ms=settings.step_timeout_ms, upload_ms=settings.upload_timeout_ms),
        ))

    return r
