"""API clients survive a server that drops a keep-alive connection (issue 12: the 5,000-phone demo died with
`httpx.RemoteProtocolError: Server disconnected without sending a response` and a traceback).

The server is real (TCP on 127.0.0.1, HTTP/1.1 keep-alive): it answers the first request of each connection
with `Connection: keep-alive`, then closes the connection without answering the second request on it, as a
server does whose keep-alive timer fired just as the client reused the connection.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from doai.api_client import Api, RetryingTransport

ROOT = Path(__file__).resolve().parent.parent
RUN: dict[str, object] = {"run_id": "11111111-1111-1111-1111-111111111111", "workflow_id": "w", "workflow_version": 1,
       "status": "completed", "outcome": "succeeded", "targets": 1, "counts": {"succeeded": 1}}


class KeepAliveDropper:
    """Answers request 1 of a connection (keep-alive), drops the connection on its request 2."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request line)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        conn_no = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn_no += 1
            threading.Thread(target=self.serve, args=(conn, conn_no), daemon=True).start()

    def serve(self, conn: socket.socket, conn_no: int) -> None:
        with conn:
            buf = b""
            for nth in (1, 2):
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                self.requests.append((conn_no, head.split(b"\r\n", 1)[0]))
                if nth == 2:
                    return  # closed without an answer, the client had every reason to reuse it
                body = json.dumps(RUN).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def lines(self) -> list[bytes]:
        return [line for _, line in self.requests]


@pytest.fixture
def server() -> Iterator[KeepAliveDropper]:
    s = KeepAliveDropper()
    yield s
    s.sock.close()


async def test_the_demo_client_retries_a_get_on_a_dropped_keep_alive_connection(server: KeepAliveDropper) -> None:
    async with httpx.AsyncClient(base_url=server.url, transport=RetryingTransport()) as client:
        for _ in range(3):
            assert (await client.get("/v1/runs/x")).json()["status"] == "completed"
    # connection 1 answered, dropped on reuse; the GET went again on connection 2, and so on.
    assert server.requests[:3] == [(1, b"GET /v1/runs/x HTTP/1.1"), (1, b"GET /v1/runs/x HTTP/1.1"),
                                   (2, b"GET /v1/runs/x HTTP/1.1")]


async def test_the_demo_client_repeats_a_post_only_with_an_idempotency_key(server: KeepAliveDropper) -> None:
    async with httpx.AsyncClient(base_url=server.url, transport=RetryingTransport()) as client:
        await client.get("/v1/runs")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/runs", json={})  # may have reached the server: not sent again
        assert server.lines() == [b"GET /v1/runs HTTP/1.1", b"POST /v1/runs HTTP/1.1"]
        await client.get("/v1/runs")
        r = await client.post("/v1/runs", json={}, headers={"Idempotency-Key": "k1"})
        assert r.status_code == 200
    assert server.lines()[2:] == [b"GET /v1/runs HTTP/1.1", b"POST /v1/runs HTTP/1.1", b"POST /v1/runs HTTP/1.1"]


def test_the_cli_client_retries_a_get_on_a_dropped_keep_alive_connection(server: KeepAliveDropper) -> None:
    with Api(server.url, "t") as api:
        for _ in range(3):
            assert api.run("x")["status"] == "completed"
    assert [c for c, _ in server.requests] == [1, 1, 2, 2, 3]


def test_doai_runs_watch_shows_no_traceback_when_the_api_drops_connections(server: KeepAliveDropper) -> None:
    env = {**os.environ, "DOAI_API_URL": server.url, "DOAI_API_TOKEN": "t"}
    res = subprocess.run([sys.executable, "-m", "doai.cli", "runs", "watch", str(RUN["run_id"]), "--interval", "0.05"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_doai_runs_show_is_one_line_when_the_api_stays_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    env = {**os.environ, "DOAI_API_URL": f"http://127.0.0.1:{port}", "DOAI_API_TOKEN": "t"}
    res = subprocess.run([sys.executable, "-m", "doai.cli", "runs", "show", str(RUN["run_id"])],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "unreachable" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
