"""What every router shares: the request context, the credential dependencies and the input rules.

Input rules (each a 422 with the JSON path of every fault): no control
character in any string of a body, query or path (tab, line feed and carriage
return only in recipe titles and descriptions), no query parameter an operation
does not declare, date filters in RFC 3339 with an offset, whole-number floats
accepted wherever an integer is. Credentials are checked first (401), then the
request's shape (422).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from fastapi import Path, Query, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from contracts import api
from contracts.ids import NODE_ID_PATTERN, SERIAL_PATTERN, WORKFLOW_ID_PATTERN
from contracts.text import clip, control_faults, has_control, whole_numbers
from services.backend.artifact_links import ArtifactLinker
from services.backend.auth import NodeSecretCheck, TokenCheck
from services.backend.enrollment import Enrollment
from services.backend.errors import ApiError, check_json_depth, decode_error
from services.backend.relay import OutboxRelay
from services.backend.settings import BackendSettings

NodeIdPath = Annotated[str, Path(pattern=NODE_ID_PATTERN, description="A node id")]
SerialPath = Annotated[str, Path(pattern=SERIAL_PATTERN, description="A device serial on that node")]
Limit = Annotated[int, Query(ge=1, le=api.MAX_PAGE_SIZE, description="Page size")]
WorkflowIdPath = Annotated[str, Path(pattern=WORKFLOW_ID_PATTERN)]
RunIdPath = Annotated[str, Path(pattern=api.RUN_ID_PATTERN, description="A run id (UUID) as POST /v1/runs returned it")]
# RFC 3339 date-time with a time offset (`Z` or `±hh:mm`): no bare numbers, no dates without a zone.
RFC3339_PATTERN = (r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                   r"([Zz]|[+-][0-9]{2}:[0-9]{2})$")
DATE_TEXT = ("RFC 3339 date-time with an offset, e.g. 2026-01-31T12:00:00Z or 2026-01-31T14:00:00+02:00;"
             " its UTC time must fall within the years 0001-9999")
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,200}$"
# Security schemes (documented in OpenAPI); the checks themselves read the raw headers.
bearer = HTTPBearer(auto_error=False, description="Operator token (DOAI_API_TOKEN)")
node_header = APIKeyHeader(name="X-Node-Auth", auto_error=False, scheme_name="NodeAuth",
                           description="The node shared secret (NODE_AGENT_SHARED_SECRET)")


def parse_date(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 date filter (already pattern-checked) as an aware UTC datetime; 422 when out of range."""
    if value is None:
        return None
    fault = [{"path": f"$.query.{name}", "message": DATE_TEXT}]
    try:
        parsed = datetime.fromisoformat(value.upper())  # (3.11+: any number of fractional digits)
        if parsed.tzinfo is None:
            raise ValueError("no offset")
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ApiError(422, "invalid", f"{name} is not a valid date-time", fault) from None


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def check_request(request: Request) -> None:
    """Refuse what no operation's parameters can express: unknown query parameters, control characters."""
    faults: list[dict[str, str]] = []
    route = request.scope.get("route")
    declared = _query_names(route.dependant) if isinstance(route, APIRoute) else None
    for name, value in request.query_params.multi_items():
        where = f"$.query.{clip(name)}"
        if declared is not None and name not in declared:
            faults.append({"path": where, "message": "unknown query parameter; this operation takes "
                                                     + (", ".join(sorted(declared)) or "none")})
        elif has_control(name) or has_control(value):
            faults.append({"path": where, "message": "must not contain control characters"})
    for name, value in request.path_params.items():
        if isinstance(value, str) and has_control(value):
            faults.append({"path": f"$.path.{name}", "message": "must not contain control characters"})
    if faults:
        raise ApiError(422, "invalid", "request is invalid", faults)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@dataclass
class Context:
    """What the routes of one app work with."""

    pool: asyncpg.Pool
    relay: OutboxRelay
    settings: BackendSettings
    linker: ArtifactLinker
    operator_check: TokenCheck
    node_check: NodeSecretCheck
    # Node identities on NATS (enrollment, revocation); None: those routes answer 503.
    enrollment: Enrollment | None = None

    def enrollments(self) -> Enrollment:
        if self.enrollment is None:
            raise ApiError(503, "enrollment_unavailable", "node enrollment is not configured on this backend")
        return self.enrollment

    async def operator(self, request: Request,
                       _: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> None:
        """Dependency of operator routes: the bearer token (401), then the request's shape (422)."""
        self.operator_check(request.headers.get("authorization"), client=_client(request))
        check_request(request)

    async def node(self, request: Request, x_node_auth: Annotated[str | None, Security(node_header)]) -> None:
        """Dependency of node routes: `X-Node-Auth` only (401), then the request's shape (422)."""
        self.node_check(x_node_auth, client=_client(request))
        check_request(request)

    def base_url(self, request: Request) -> str:
        """The API's address for absolute links: DOAI_PUBLIC_URL, else the address this request came to."""
        return self.settings.public_url or str(request.base_url)

    async def body_of(self, request: Request, kind: Any) -> Any:
        """The body decoded (400 if not JSON), checked for control characters, then converted to `kind`."""
        data = await request.body()
        check_json_depth(data, self.settings.max_json_depth)
        try:
            doc = msgspec.json.decode(data)
        except msgspec.DecodeError as err:
            raise decode_error(err) from None
        faults = control_faults(doc)
        if faults:
            raise ApiError(422, "invalid", "request body contains control characters",
                           [{"path": path, "message": message} for path, message in faults])
        doc = whole_numbers(doc)
        if kind is Any:
            return doc
        try:
            return msgspec.convert(doc, type=kind)
        except msgspec.ValidationError as err:
            raise decode_error(err) from None


CreatedAfter = Annotated[str | None, Query(pattern=RFC3339_PATTERN, json_schema_extra={"format": "date-time"},
                                           description=f"created at or after: {DATE_TEXT}")]
CreatedBefore = Annotated[str | None, Query(pattern=RFC3339_PATTERN, json_schema_extra={"format": "date-time"},
                                            description=f"created before: {DATE_TEXT}")]
Cursor = Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="next_cursor of the previous page")]
