"""The operator CLI's one reading of the REST API (`doai runs`): requests, errors, and a run's progress.

Everything the CLI knows about the shape of the API's answers is here, so a change of the API is one
change in this module. Idempotent GETs are retried when the connection drops (a keep-alive connection
the server or a proxy closed); POSTs are not, except through an `Idempotency-Key`.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from contracts.api import FINISHED_RUN_STATUSES, RunOutcome, RunStatus
from contracts.events import RecordedTaskState

# What `doai runs watch` counts as done (as the run summary's `not_succeeded` does, `interrupted` too).
FINAL_TASK_STATES: frozenset[RecordedTaskState] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "skipped", "lost", "interrupted"})
GET_TRIES = 4


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def may_retry(request: httpx.Request, exc: httpx.TransportError) -> bool:
    """Whether `request` may be sent again after `exc`.

    A request that never left (the connection could not be opened) always may; one that may have
    reached the server (the connection dropped: a keep-alive connection the server or a proxy closed,
    `RemoteProtocolError: Server disconnected without sending a response`) only when it is
    idempotent: GET and friends, or a POST with an `Idempotency-Key` (the API replays the answer).
    """
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return request.method in IDEMPOTENT_METHODS or "Idempotency-Key" in request.headers


class RetryingTransport(httpx.AsyncBaseTransport):
    """An async transport that sends a request again (short back-off) when `may_retry` allows it."""

    def __init__(self, tries: int = GET_TRIES, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.tries = tries
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(self.tries):
            try:
                return await self.inner.handle_async_request(request)
            except httpx.TransportError as exc:
                if attempt == self.tries - 1 or not may_retry(request, exc):
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self.inner.aclose()


class ApiError(Exception):
    """The API answered with an error (`status` > 0) or could not be reached (`status` 0)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}" if status == 0 else f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _error(resp: httpx.Response) -> ApiError:
    try:
        err = resp.json()["error"]
        return ApiError(resp.status_code, str(err.get("code")), str(err.get("message")), err.get("details"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return ApiError(resp.status_code, "http_error", resp.text[:200] or resp.reason_phrase)


class Api:
    """A small synchronous client of the doai REST API (bearer token)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        url = url or os.environ.get("DOAI_API_URL") or "http://127.0.0.1:8000"
        token = token or os.environ.get("DOAI_API_TOKEN")
        if not token:
            raise ApiError(0, "no_token", "set DOAI_API_TOKEN or pass --token (doai up prints it)")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET, retried with a short back-off when the connection fails or drops (GET is idempotent)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self._send("GET", path, GET_TRIES, params=query)

    def post(self, path: str, body: Any, idempotency_key: str | None = None) -> Any:
        """POST once; with an `Idempotency-Key` a dropped connection is retried (the server replays)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._send("POST", path, GET_TRIES if idempotency_key else 1, json=body, headers=headers)

    def _send(self, method: str, path: str, tries: int, **kwargs: Any) -> Any:
        for attempt in range(tries):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == tries - 1:
                    raise ApiError(0, "unreachable", f"{self.url}{path}: {exc or type(exc).__name__}") from None
                time.sleep(0.2 * 2 ** attempt)
                continue
            if resp.status_code >= 400:
                raise _error(resp)
            try:
                return resp.json()
            except ValueError:  # e.g. a proxy's HTML page: one clear line, not a traceback
                raise ApiError(resp.status_code, "bad_answer",
                               f"{self.url}{path}: not JSON: {resp.text[:200]!r}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- resources ---------------------------------------------------------------

    def workflow(self, workflow_id: str, version: int | None = None) -> dict[str, Any]:
        path = f"/v1/workflows/{workflow_id}" + (f"/versions/{version}" if version else "")
        result: dict[str, Any] = self.get(path)
        return result

    def create_run(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.post("/v1/runs", body, idempotency_key)
        return result

    def list_runs(self, status: RunStatus | None = None, workflow_id: str | None = None,
                  limit: int = 20) -> list[dict[str, Any]]:
        page = self.get("/v1/runs", {"status": status, "workflow_id": workflow_id, "limit": limit})
        runs: list[dict[str, Any]] = page["runs"]
        return runs

    def run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/v1/runs/{run_id}")
        return result

    def tasks(self, run_id: str, state: RecordedTaskState | None = None, node_id: str | None = None,
              serial: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """The run's tasks (paged endpoint when the API has it, else the run document's inline list)."""
        try:
            page = self.get(f"/v1/runs/{run_id}/tasks",
                            {"state": state, "node_id": node_id, "serial": serial, "limit": min(limit, 200)})
        except ApiError as err:
            if err.status not in (404, 405) or err.code == "run_not_found":
                raise
            rows = list(self.run(run_id).get("tasks", []))
            return [t for t in rows if (state is None or t["state"] == state)
                    and (node_id is None or t["node_id"] == node_id)
                    and (serial is None or t["device_serial"] == serial)][:limit]
        out: list[dict[str, Any]] = list(page.get("tasks", []))
        cursor = page.get("next_cursor")
        while cursor and len(out) < limit:
            page = self.get(f"/v1/runs/{run_id}/tasks", {"state": state, "node_id": node_id, "serial": serial,
                                                          "limit": min(limit - len(out), 200), "cursor": cursor})
            out += page.get("tasks", [])
            cursor = page.get("next_cursor")
        return out[:limit]

    def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.post(f"/v1/runs/{run_id}/cancel", {})
        return result

    def retry(self, run_id: str, states: list[str], idempotency_key: str | None = None) -> dict[str, Any]:
        """`states` as the operator typed them: the API checks them (422 names a state that is not one)."""
        result: dict[str, Any] = self.post(f"/v1/runs/{run_id}/retry", {"states": states}, idempotency_key)
        return result


# -- a run's progress, from either shape of GET /v1/runs/{id} -------------------------


def _ts(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Progress:
    """What `doai runs watch` shows and decides on."""

    run_id: str
    workflow: str
    status: RunStatus
    outcome: RunOutcome | None  # succeeded / failed / cancelled once finished, else None
    targets: int
    counts: dict[RecordedTaskState, int]
    nodes: dict[str, dict[RecordedTaskState, int]] = field(default_factory=dict)
    started: datetime | None = None
    finished_at: datetime | None = None
    parent_run_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_RUN_STATUSES

    @property
    def done(self) -> int:
        return sum(n for s, n in self.counts.items() if s in FINAL_TASK_STATES)

    def elapsed_s(self, now: datetime | None = None) -> float:
        if self.started is None:
            return 0.0
        end = self.finished_at if self.finished and self.finished_at else (now or datetime.now(UTC))
        return max(0.0, (end - self.started).total_seconds())

    def rate(self, now: datetime | None = None) -> float:
        """Tasks finished per second since the run started."""
        elapsed = self.elapsed_s(now)
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self, now: datetime | None = None) -> float | None:
        rate = self.rate(now)
        if self.finished:
            return 0.0
        return None if rate <= 0 else (self.targets - self.done) / rate

    def exit_code(self) -> int:
        """0 when every device succeeded, 1 when the run ended otherwise."""
        return 0 if self.outcome == "succeeded" else 1

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "workflow": self.workflow, "status": self.status, "outcome": self.outcome,
                "targets": self.targets, "counts": self.counts, "nodes": self.nodes,
                "elapsed_s": round(self.elapsed_s(), 3), "parent_run_id": self.parent_run_id}


def progress(run: dict[str, Any]) -> Progress:
    counts: dict[RecordedTaskState, int] = dict(run.get("counts") or {})
    targets = int(run.get("targets") or sum(counts.values()))
    nodes: dict[str, dict[RecordedTaskState, int]] = {}
    if isinstance(run.get("nodes"), list):  # summary shape: counts per node
        nodes = {n["node_id"]: dict(n["counts"]) for n in run["nodes"]}
    for t in run.get("tasks") or []:  # inline tasks (older shape)
        per = nodes.setdefault(t["node_id"], {})
        per[t["state"]] = per.get(t["state"], 0) + 1
    status: RunStatus = run["status"]
    outcome: RunOutcome | None = run.get("outcome")
    if outcome is None and status in FINISHED_RUN_STATUSES:
        outcome = ("cancelled" if status == "cancelled"
                   else "succeeded" if counts.get("succeeded", 0) == targets else "failed")
    timings = run.get("timings") or {}
    started = _ts(timings.get("first_started_at")) or _ts(run.get("dispatched_at")) or _ts(run.get("created_at"))
    return Progress(run_id=str(run["run_id"]), workflow=f"{run['workflow_id']}@{run['workflow_version']}",
                    status=status, outcome=outcome, targets=targets, counts=counts, nodes=nodes,
                    started=started, finished_at=_ts(run.get("finished_at")),
                    parent_run_id=run.get("parent_run_id"))
