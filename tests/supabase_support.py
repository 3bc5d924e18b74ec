"""A local HTTP endpoint that answers the Supabase Storage REST calls the official client makes.

No Supabase project can run on this machine, so the boundary is faked here:
upload (`POST /storage/v1/object/{bucket}/{key}`, multipart), download
(`GET /storage/v1/object/{bucket}/{key}`) and signed URLs
(`POST /storage/v1/object/sign/{bucket}/{key}`, opened with
`GET /storage/v1/object/sign/{bucket}/{key}?token=`), with the service key checked
and failures injectable. The client under test is the real `supabase` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass
class FakeStorage:
    key: str
    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # "bucket/key" -> (data, type)
    fail_uploads: int = 0
    uploads: int = 0
    signed: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> ("bucket/key", expires at)
    signed_downloads: int = 0

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.key}"

    @staticmethod
    def _error(status: int, error: str, message: str) -> JSONResponse:
        return JSONResponse({"statusCode": str(status), "error": error, "message": message}, status_code=status)

    async def upload(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._error(403, "Unauthorized", "invalid signature")
        self.uploads += 1
        if self.fail_uploads:
            self.fail_uploads -= 1
            return self._error(503, "ServiceUnavailable", "storage is overloaded")
        path = f"{request.path_params['bucket']}/{request.path_params['key']}"
        if path in self.objects and request.headers.get("x-upsert") != "true":
            return self._error(409, "Duplicate", "The resource already exists")
        raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + await request.body()
        message = BytesParser(policy=HTTP).parsebytes(raw)
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                self.objects[path] = (part.get_payload(decode=True), part.get_content_type())
                return JSONResponse({"Key": path, "Id": str(len(self.objects))})
        return self._error(400, "InvalidRequest", "no file part")

    async def download(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._error(403, "Unauthorized", "invalid signature")
        found = self.objects.get(f"{request.path_params['bucket']}/{request.path_params['key']}")
        if found is None:
            return self._error(404, "not_found", "Object not found")
        return Response(found[0], media_type=found[1])

    async def sign(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._error(403, "Unauthorized", "invalid signature")
        path = f"{request.path_params['bucket']}/{request.path_params['key']}"
        if path not in self.objects:
            return self._error(404, "not_found", "Object not found")
        body = await request.json()
        token = f"t-{body['expiresIn']}-{secrets.token_hex(8)}"
        self.signed[token] = (path, time.time() + int(body["expiresIn"]))
        return JSONResponse({"signedURL": f"/object/sign/{path}?token={token}"})

    async def sign_many(self, request: Request) -> Response:
        """`create_signed_urls`: one answer per path, with an error for a missing object."""
        if not self._authorised(request):
            return self._error(403, "Unauthorized", "invalid signature")
        bucket = request.path_params["bucket"]
        body = await request.json()
        answers = []
        for key in body["paths"]:
            path = f"{bucket}/{key}"
            if path not in self.objects:
                answers.append({"path": key, "signedURL": None, "error": "Either the object does not exist or"
                                                                         " you do not have access to it"})
                continue
            token = f"t-{body['expiresIn']}-{secrets.token_hex(8)}"
            self.signed[token] = (path, time.time() + int(body["expiresIn"]))
            answers.append({"path": key, "signedURL": f"/object/sign/{path}?token={token}", "error": None})
        return JSONResponse(answers)

    async def signed_download(self, request: Request) -> Response:
        """What a signed URL opens: no service key, only a token this storage issued for that object."""
        path = f"{request.path_params['bucket']}/{request.path_params['key']}"
        grant = self.signed.get(request.query_params.get("token", ""))
        if grant is None or grant[0] != path or grant[1] < time.time():
            return self._error(400, "InvalidJWT", "invalid or expired token")
        found = self.objects.get(path)
        if found is None:
            return self._error(404, "not_found", "Object not found")
        self.signed_downloads += 1
        return Response(found[0], media_type=found[1])

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/storage/v1/object/sign/{bucket}", self.sign_many, methods=["POST"]),
            Route("/storage/v1/object/sign/{bucket}/{key:path}", self.sign, methods=["POST"]),
            Route("/storage/v1/object/sign/{bucket}/{key:path}", self.signed_download, methods=["GET"]),
            Route("/storage/v1/object/{bucket}/{key:path}", self.upload, methods=["POST"]),
            Route("/storage/v1/object/{bucket}/{key:path}", self.download, methods=["GET"]),
        ])


@contextlib.asynccontextmanager
async def serving(storage: FakeStorage) -> AsyncIterator[str]:
    """Serve `storage` on a free loopback port; yield the project URL."""
    server = uvicorn.Server(uvicorn.Config(storage.app(), host="127.0.0.1", port=0, log_config=None,
                                           access_log=False, lifespan="off"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "fake storage did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
