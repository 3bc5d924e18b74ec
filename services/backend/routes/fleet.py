"""`/v1/devices`, `/v1/nodes`: the fleet as the nodes last reported it; revoking a node (operator token)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from contracts import api
from contracts.events import RecordedTaskState
from contracts.ids import NODE_ID_PATTERN
from services.backend import runs
from services.backend.errors import JSONResponse
from services.backend.openapi import route
from services.backend.routes.common import Context, Cursor, Limit, NodeIdPath, SerialPath


def router(ctx: Context) -> APIRouter:
    r = APIRouter(dependencies=[Depends(ctx.operator)])

    @r.get("/v1/devices", operation_id="list_devices", **route((200, api.DeviceList), 401))
    async def get_devices() -> JSONResponse:
        return JSONResponse(api.DeviceList(await runs.list_devices(ctx.pool)))

    @r.get("/v1/nodes", operation_id="list_nodes", **route((200, api.NodeList), 401))
    async def get_nodes() -> JSONResponse:
        return JSONResponse(api.NodeList(await runs.list_nodes(ctx.pool)))

    @r.get("/v1/devices/{node_id}/{serial}/tasks", operation_id="device_tasks",
           **route((200, api.TaskPage), 401, 422), summary="A device's history",
           description=("The device's tasks across runs, newest run first (with each run's workflow),"
                        " keyset-paged: pass `next_cursor` as `cursor`. A device with no task answers an"
                        " empty page."))
    async def device_tasks(
        node_id: NodeIdPath,
        serial: SerialPath,
        state: Annotated[RecordedTaskState | None, Query(description="Only tasks in this state")] = None,
        cursor: Cursor = None,
        limit: Limit = api.DEFAULT_PAGE_SIZE,
    ) -> JSONResponse:
        return JSONResponse(await runs.device_tasks(ctx.pool, node_id, serial, state=state, cursor=cursor,
                                                    limit=limit))
    @r.post("/v1/nodes/{node_id}/revoke", operation_id="revoke_node",
            **route((200, api.NodeRevoked), 401, 404, 422, 503))
    async def revoke_node(node_id: Annotated[str, Path(pattern=NODE_ID_PATTERN)]) -> JSONResponse:
        """The node's NATS identity stops working at once (no nats-server restart).

        The node id cannot enroll again until an operator re-admits it (`POST /v1/nodes/{node_id}/readmit`):
        whoever holds a stolen node PC also holds the shared secret.
        """
        return JSONResponse(await ctx.enrollments().revoke(node_id))

    @r.post("/v1/nodes/{node_id}/readmit", operation_id="readmit_node",
            **route((200, api.NodeReadmitted), 401, 404, 409, 422))
    async def readmit_node(node_id: Annotated[str, Path(pattern=NODE_ID_PATTERN)]) -> JSONResponse:
        """Let a revoked node id enroll again, with a new key pair (its revoked key stays revoked)."""
        return JSONResponse(await ctx.enrollments().readmit(node_id))

    return r
