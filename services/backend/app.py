"""The REST API (FastAPI): the app, its middleware and its OpenAPI document.

The routes live in `services/backend/routes/`, one `APIRouter` per resource
(workflows, runs, fleet, node, health); what they share, including the input
rules every request meets, is in `routes/common.py`. Bodies are msgspec Structs
from `contracts.api`, decoded from raw bytes.

Operator endpoints take `Authorization: Bearer <token>`; node endpoints
(`/v1/node/...`) take only `X-Node-Auth: <NODE_AGENT_SHARED_SECRET>`. Every
error has the shape `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Receive, Scope, Send

from services.backend.artifact_links import ArtifactLinker
from services.backend.auth import AuthFailureLog, NodeSecretCheck, TokenCheck
from services.backend.enrollment import Enrollment
from services.backend.errors import ApiError, JSONResponse, error_response, install_error_handlers
from services.backend.openapi import add_links, components, tidy_parameters
from services.backend.relay import OutboxRelay
from services.backend.routes import artifacts, fleet, health, node, runs, workflows
from services.backend.routes.common import Context
from services.backend.settings import BackendSettings


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


def create_app(pool: asyncpg.Pool, relay: OutboxRelay, settings: BackendSettings,
               enrollment: Enrollment | None = None) -> FastAPI:
    """The app; `enrollment` (node identities on NATS) is what `run_backend` gives, else 503 on those routes."""
    ctx = Context(
        pool=pool, relay=relay, settings=settings,
        linker=ArtifactLinker(artifact_dir=settings.artifact_dir, supabase_url=settings.supabase_url,
                              supabase_key=settings.supabase_key, bucket=settings.supabase_bucket,
                              ttl_s=settings.signed_url_ttl_s,
                              url_key=settings.artifact_url_key.encode() if settings.artifact_url_key else None),
        operator_check=TokenCheck(settings.api_tokens,
                                  AuthFailureLog("operator authentication failed", settings.auth_log_interval_s)),
        node_check=NodeSecretCheck(settings.node_secret,
                                   AuthFailureLog("node authentication failed", settings.auth_log_interval_s)),
        enrollment=enrollment,
    )
    app = FastAPI(title="doai", version="1", default_response_class=JSONResponse,
                  description="Workflows on fleets of Android devices. Errors: "
                              '`{"error": {"code", "message", "details"}}`.')
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for resource in (health, workflows, runs, fleet, node, artifacts):
        app.include_router(resource.router(ctx))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components())
            add_links(schema)
            tidy_parameters(schema)
            for operations in schema["paths"].values():  # FastAPI merges a "type: string" into our refs
                for operation in operations.values():
                    for response in operation.get("responses", {}).values():
                        media = response.get("content", {}).get("application/json", {})
                        if "$ref" in media.get("schema", {}):
                            media["schema"] = {"$ref": media["schema"]["$ref"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
