"""The CLI's API client survives a dropped keep-alive connection on GETs and never repeats a POST
without an Idempotency-Key (a real TCP server on 127.0.0.1 that closes the first connection unanswered)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import pytest

from doai.api_client import Api, ApiError, progress


class DroppingServer:
    """Closes the first `drops` connections after reading the request; answers the others with 200 JSON."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(65536)
                self.requests.append(data.split(b"\r\n", 1)[0])
                if len(self.requests) <= self.drops:
                    continue  # closed without an answer
                body = json.dumps({"ok": True}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.fixture
def server() -> Iterator[DroppingServer]:
    s = DroppingServer(drops=1)
    yield s
    s.sock.close()


def test_a_get_is_retried_after_the_connection_drops(server: DroppingServer) -> None:
    with Api(f"http://127.0.0.1:{server.port}", "t") as api:
        assert api.get("/v1/runs") == {"ok": True}
    assert server.requests == [b"GET /v1/runs HTTP/1.1"] * 2


def test_a_post_without_idempotency_key_is_not_repeated(server: DroppingServer) -> None:
    with Api(f"http://127.0.0.1:{server.port}", "t") as api, pytest.raises(ApiError) as err:
        api.post("/v1/runs", {})
    assert err.value.code == "unreachable" and server.requests == [b"POST /v1/runs HTTP/1.1"]


def test_a_post_with_idempotency_key_is_retried(server: DroppingServer) -> None:
    with Api(f"http://127.0.0.1:{server.port}", "t") as api:
        assert api.post("/v1/runs", {}, idempotency_key="k") == {"ok": True}
    assert server.requests == [b"POST /v1/runs HTTP/1.1"] * 2


def test_progress_reads_both_shapes_of_a_run() -> None:
    inline = {"run_id": "r", "workflow_id": "w", "workflow_version": 1, "status": "completed",
              "counts": {"succeeded": 1, "failed": 1}, "created_at": "2026-01-01T00:00:00Z",
              "finished_at": "2026-01-01T00:00:10Z",
              "tasks": [{"node_id": "n1", "device_serial": "A", "state": "succeeded"},
                        {"node_id": "n2", "device_serial": "B", "state": "failed"}]}
    p = progress(inline)
    assert (p.outcome, p.targets, p.done, p.exit_code()) == ("failed", 2, 2, 1)
    assert p.nodes == {"n1": {"succeeded": 1}, "n2": {"failed": 1}} and p.elapsed_s() == 10.0
    summary = {"run_id": "r", "workflow_id": "w", "workflow_version": 1, "status": "completed", "outcome": "succeeded",
               "targets": 2, "counts": {"succeeded": 2}, "created_at": "2026-01-01T00:00:00Z",
               "nodes": [{"node_id": "n1", "tasks": 2, "counts": {"succeeded": 2}}],
               "timings": {"first_started_at": "2026-01-01T00:00:02Z"}, "finished_at": "2026-01-01T00:00:06Z"}
    p = progress(summary)
    assert (p.outcome, p.exit_code(), p.nodes, p.elapsed_s(), p.rate()) == ("succeeded", 0, {"n1": {"succeeded": 2}},
                                                                             4.0, 0.5)
