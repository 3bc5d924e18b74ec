"""One error shape for the whole API: `{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import Response

from contracts.api import ErrorBody, ErrorResponse
from contracts.recipe import Fault


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
    return ApiError(422, "invalid", "request body is invalid", [{"path": path, "message": text}])


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def error_response(err: ApiError) -> JSONResponse:
    body = ErrorResponse(ErrorBody(err.code, err.message, err.details))
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


async def api_error_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)
