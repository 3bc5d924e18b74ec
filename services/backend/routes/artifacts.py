"""`/v1/artifacts/{store}/{key}`: an artifact, downloaded through the backend.

`local`: the file of the local artifact store, served by the backend.
`supabase`: a redirect (307) to a fresh Supabase Storage signed URL.

Authenticated by the operator's bearer token, or by the `expires` and `sig` of
a signed link (`GET /v1/runs/{id}/artifacts`, one task's artifacts, or
`artifact_url()` in SQL for Grafana's image cells): an HMAC under the key in
`fleet_settings`, so a browser or Grafana can open it without a token.

Only keys recorded in the `artifacts` table (store `local`) are served, and only
when the file, symlinks resolved, lies inside the store's root
(`DOAI_ARTIFACT_DIR`): a traversing key, or a recorded key that points outside,
is refused before anything is opened. The content type is the recorded one when
it is an image type, else the file is sent as an opaque download (a node cannot
make the API's origin serve HTML).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from contracts.text import clip
from services.backend.errors import ApiError
from services.backend.openapi import route
from services.backend.routes.common import Context, _client, bearer, check_request

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})
SIG_PATTERN = r"^[0-9a-f]{64}$"


def router(ctx: Context) -> APIRouter:
    r = APIRouter()
    linker = ctx.linker

    async def access(
        request: Request,
        store: str,
        key: str,
        _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        expires: Annotated[int | None, Query(ge=0, le=2**62, description="Expiry of a signed link (epoch s)")] = None,
        sig: Annotated[str | None, Query(pattern=SIG_PATTERN, description="Signature of a signed link")] = None,
    ) -> None:
        """A valid signed link for this key, else the operator's bearer token (401); then the request's shape."""
        if expires is not None and sig is not None and request.headers.get("authorization") is None:
            if not linker.signature_ok(store, key, expires, sig):
                raise ApiError(401, "unauthorized", "the link is invalid or has expired; ask the API for a new one")
        else:
            ctx.operator_check(request.headers.get("authorization"), client=_client(request))
        check_request(request)

    ok: dict[str, Any] = route((200, Any), 401, 404, 422, 502)
    ok["responses"][200] = {"description": "The file (local store; an image type, or application/octet-stream)",
                            "content": {kind: {"schema": {"type": "string", "format": "binary"}}
                                        for kind in (*sorted(IMAGE_TYPES), "application/octet-stream")}}
    ok["responses"][307] = {"description": "Supabase store: redirect to a fresh signed URL of Supabase Storage",
                            "headers": {"Location": {"schema": {"type": "string"}}}}

    @r.get("/v1/artifacts/{store}/{key:path}", operation_id="download_artifact", dependencies=[Depends(access)],
           response_class=FileResponse, summary="Download an artifact", **ok)
    async def download_artifact(store: Literal["local", "supabase"], key: str) -> Response:
        row = await ctx.pool.fetchrow("SELECT content_type FROM artifacts WHERE store = $1 AND key = $2", store, key)
        if row is None:
            raise ApiError(404, "artifact_not_found", f"no {store} artifact has the key {clip(key)!r}")
        if store == "supabase":
            url, error = await linker.signed_storage_url(key)
            if url is None:
                raise ApiError(502, "storage_unavailable", f"Supabase Storage gave no signed URL: {clip(error or '')}")
            return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
        if linker.root is None:
            raise ApiError(404, "artifact_not_served", "this backend does not serve the local store"
                                                       " (DOAI_ARTIFACT_DIR is not set)")
        path = linker.contained(key)
        if path is None:  # recorded, but pointing outside the store (a hostile key or a symlink): never opened
            raise ApiError(404, "artifact_not_found", f"no local artifact has the key {clip(key)!r}")
        if not path.is_file():
            raise ApiError(404, "artifact_gone", f"the file of artifact {clip(key)!r} is no longer in the store")
        kind = row["content_type"] if row["content_type"] in IMAGE_TYPES else "application/octet-stream"
        headers = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type=kind, headers=headers,
                            content_disposition_type="inline" if kind in IMAGE_TYPES else "attachment",
                            filename=path.name)

    return r
