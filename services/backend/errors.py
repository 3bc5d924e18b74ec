"""One error shape for the whole API: `{"error": {"code", "message", "details"}}`.

Errors raised by this code (`ApiError`), FastAPI's own (unknown route 404,
405, request validation 422) and unexpected ones (500, logged, nothing of
the request echoed) all leave in that shape.

Whatever an error echoes of the request is bounded: ids in messages are cut to
64 characters (`contracts.text.clip`), every message to `MAX_MESSAGE_CHARS`,
every path to `MAX_PATH_CHARS`, and `details` to `MAX_DETAILS` entries.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts.api import ErrorBody, ErrorResponse
from contracts.recipe_check import Fault
from contracts.text import clip, explain

MAX_MESSAGE_CHARS = 500
MAX_PATH_CHARS = 200
MAX_DETAILS = 100

log = structlog.get_logger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


def invalid(message: str, faults: list[Fault], code: str = "invalid") -> ApiError:
    return ApiError(422, code, message, [{"path": f.path, "message": f.message} for f in faults])


def decode_error(err: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """A body that does not fit its Struct: 422 with the JSON path msgspec reports."""
    text = str(err)
    path = "$"
    if " - at `" in text:
        text, _, raw_path = text.rpartition(" - at `")
        path = raw_path.rstrip("`")
    if not isinstance(err, msgspec.ValidationError):  # (ValidationError is a DecodeError too)
        return ApiError(400, "bad_json", f"body is not valid JSON: {text}")
    return ApiError(422, "invalid", "request body is invalid", [{"path": path, "message": explain(text)}])


# A JSON string, or an unterminated one up to the end: a backslash may end the text and nothing makes the
# star give back, so one scan is linear (the plain `"(?:[^"\\]|\\.)*"` restarts at every quote of an unterminated
# string full of `\"`, quadratic: minutes of a blocked event loop for a 1 MiB body).
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.?)*(?:"|\Z)', re.S)
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_json_depth(data: bytes, limit: int) -> None:
    """Refuse JSON nested deeper than `limit` before any decoder recurses into it."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return
    depth = 0
    for m in _BRACKETS.finditer(_STRINGS.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise ApiError(422, "json_too_deep", f"JSON nesting is deeper than {limit} levels",
                               [{"path": "$", "message": f"maximum depth is {limit}"}])
        else:
            depth -= 1


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def _bounded(details: list[dict[str, str]]) -> list[dict[str, str]]:
    out = [{k: clip(v, MAX_PATH_CHARS if k == "path" else MAX_MESSAGE_CHARS) for k, v in d.items()}
           for d in details[:MAX_DETAILS]]
    if len(details) > MAX_DETAILS:
        out.append({"path": "$", "message": f"… and {len(details) - MAX_DETAILS} more faults"})
    return out


def error_response(err: ApiError) -> JSONResponse:
    body = ErrorResponse(ErrorBody(err.code, clip(err.message, MAX_MESSAGE_CHARS), _bounded(err.details)))
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


async def api_error_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no such route, method not allowed) in our shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"no such endpoint: {clip(request.method, 16)} {clip(request.url.path)}"
    elif exc.status_code == 405:
        message = f"method {clip(request.method, 16)} is not allowed here"
        headers["Allow"] = ", ".join(allowed_methods(request))
    else:
        message = str(exc.detail)
    response = error_response(ApiError(exc.status_code, code, message))
    for name, value in headers.items():
        response.headers[name] = value
    return response


def allowed_methods(request: Request) -> list[str]:
    """Every method the OpenAPI document lists for this path (Starlette's 405 names only the first route's)."""
    paths = request.app.openapi().get("paths", {})
    path = request.url.path
    for template, operations in paths.items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), path):
            return sorted(method.upper() for method in operations)
    return []


def _loc_path(loc: tuple[Any, ...]) -> str:
    """FastAPI's ("query", "limit") → "$.query.limit"."""
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


async def validation_error_handler(_: Request, exc: Exception) -> Response:
    """Query, path and header parameters that do not fit: 422 listing every fault with its path."""
    assert isinstance(exc, RequestValidationError)
    details = [{"path": _loc_path(tuple(e.get("loc", ()))), "message": str(e.get("msg", "invalid"))}
               for e in exc.errors()]
    return error_response(ApiError(422, "invalid", "request is invalid", details))


async def unexpected_error_handler(request: Request, exc: Exception) -> Response:
    log.error("unexpected error in request", method=request.method, path=request.url.path,
              error_type=type(exc).__name__)
    return error_response(ApiError(500, "internal_error", "internal error; see the backend log"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
