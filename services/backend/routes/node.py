"""`/v1/node/...`: what node agents ask, with `X-Node-Auth` only (rule 8): their config, and enrollment."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from contracts import api
from contracts.ids import NODE_ID_PATTERN
from services.backend.errors import JSONResponse
from services.backend.openapi import ENROLL_EXAMPLE, route
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

    @r.post("/v1/node/enroll", operation_id="enroll_node",
            **route((201, api.NodeEnrollment), 400, 401, 409, 413, 422, 503, body=api.NodeEnrollRequest,
                    body_text="A new node's id and the public key of the NATS user key pair it made",
                    example=ENROLL_EXAMPLE))
    async def enroll_node(request: Request) -> JSONResponse:
        body: api.NodeEnrollRequest = await ctx.body_of(request, api.NodeEnrollRequest)
        enrolled, _ = await ctx.enrollments().enroll(body)  # the same id and key again: the same answer
        return JSONResponse(enrolled, status_code=201)

    return r
