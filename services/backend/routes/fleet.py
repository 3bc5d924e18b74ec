"""`/v1/devices`, `/v1/nodes`: the fleet as the nodes last reported it (operator token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from contracts import api
from services.backend import runs
from services.backend.errors import JSONResponse
from services.backend.openapi import route
from services.backend.routes.common import Context


def router(ctx: Context) -> APIRouter:
    r = APIRouter(dependencies=[Depends(ctx.operator)])

    @r.get("/v1/devices", operation_id="list_devices", **route((200, api.DeviceList), 401))
    async def get_devices() -> JSONResponse:
        return JSONResponse(api.DeviceList(await runs.list_devices(ctx.pool)))

    @r.get("/v1/nodes", operation_id="list_nodes", **route((200, api.NodeList), 401))
    async def get_nodes() -> JSONResponse:
        return JSONResponse(api.NodeList(await runs.list_nodes(ctx.pool)))

    return r
