"""`/v1/workflows`: publish a recipe as the next version, list, read a version (operator token)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Path, Request

from contracts import api
from contracts.recipe_check import RecipeInvalid, unused_param_warnings, validate_recipe
from contracts.recipe_model import Recipe
from contracts.text import clip
from services.backend import runs, workflows
from services.backend.errors import ApiError, JSONResponse, invalid
from services.backend.openapi import RECIPE_EXAMPLE, route
from services.backend.routes.common import Context, WorkflowIdPath


def router(ctx: Context) -> APIRouter:
    r = APIRouter(dependencies=[Depends(ctx.operator)])
    pool = ctx.pool

    @r.post("/v1/workflows", operation_id="publish_workflow",
            **route((201, api.WorkflowPublished), 400, 401, 409, 413, 422, body=Recipe,
                    body_text="A recipe (DSL v1); stored as the next version of its workflow_id",
                    example=RECIPE_EXAMPLE))
    async def publish_workflow(request: Request) -> JSONResponse:
        doc = await ctx.body_of(request, Any)
        try:
            recipe = validate_recipe(doc, ctx.settings.path_template)
        except RecipeInvalid as err:
            raise invalid("recipe is invalid", err.faults, code="invalid_recipe") from None
        stored, created = await workflows.publish(pool, recipe)
        if not created:
            raise ApiError(409, "unchanged",
                           f"recipe equals the latest version {stored.version} of {stored.workflow_id}")
        warnings = [api.RecipeWarning(w.path, w.message)
                    for w in unused_param_warnings(recipe, ctx.settings.path_template)]
        return JSONResponse(api.WorkflowPublished(stored.workflow_id, stored.version, warnings), status_code=201)

    @r.get("/v1/workflows", operation_id="list_workflows", **route((200, api.WorkflowList), 401))
    async def list_workflows() -> JSONResponse:
        return JSONResponse(api.WorkflowList(await workflows.list_latest(pool)))

    async def _workflow(workflow_id: str, version: int | None) -> api.WorkflowView:
        stored = await workflows.get(pool, workflow_id, version)
        if stored is None:
            suffix = f" version {version}" if version is not None else ""
            raise ApiError(404, "workflow_not_found", f"unknown workflow {clip(workflow_id)}{suffix}")
        return api.WorkflowView(stored.workflow_id, stored.version, runs.iso(stored.created_at) or "",
                                msgspec.to_builtins(stored.recipe))

    @r.get("/v1/workflows/{workflow_id}", operation_id="get_workflow",
           **route((200, api.WorkflowView), 401, 404, 409, 422))
    async def get_workflow(workflow_id: WorkflowIdPath) -> JSONResponse:
        return JSONResponse(await _workflow(workflow_id, None))

    @r.get("/v1/workflows/{workflow_id}/versions/{version}", operation_id="get_workflow_version",
           **route((200, api.WorkflowView), 401, 404, 409, 422))
    async def get_workflow_version(workflow_id: WorkflowIdPath,
                                   version: Annotated[int, Path(ge=1, le=2**31 - 1)]) -> JSONResponse:
        return JSONResponse(await _workflow(workflow_id, version))

    return r
