"""The whole path over TLS: nats-server with a certificate the test makes (trustme), every part verifying it.

Backend (relay, enrollment, the system-account push), aggregator and nodes all
connect with `tls://` and the CA file; a run completes. A client that does not
speak TLS, or that trusts another CA, does not get in.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import trustme

from runtime.nats_auth import NatsTrust
from tests.conftest import _SERVERS, AuthNats
from tests.test_e2e import wait_completed

PARAMS = {"url": "https://example.org/tls", "youtubeVideoId": "tlsVideo001"}


@pytest.fixture
def nats_server(tmp_path: Path, log_file: Path, nats_trust: NatsTrust) -> Iterator[AuthNats]:
    """This module's nats-server speaks TLS only, with a certificate for 127.0.0.1 from a fresh CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tls_dir / "server.pem"))
    cert.private_key_pem.write_to_path(str(tls_dir / "server.key"))
    server = AuthNats(tmp_path / "nats", nats_trust, tls_cert=tls_dir / "server.pem", tls_key=tls_dir / "server.key")
    server.ca_file = tls_dir / "ca.pem"
    server.start()
    _SERVERS[server.url] = server
    yield server
    server.stop()
    _SERVERS.pop(server.url, None)


async def test_a_run_completes_with_every_part_on_tls(start_system: Any, nats_server: AuthNats) -> None:
    assert nats_server.url.startswith("tls://")
    # Two nodes enroll (the backend pushes the account over TLS too) and run one device each.
    system = await start_system(nodes=2, devices=2)
    async with system.client() as client:
        r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                "targets": {"all_online": True}})
        assert r.status_code == 201, r.text
        run = await wait_completed(client, r.json()["run_id"])
    assert run["counts"] == {"succeeded": 4}, run


async def test_no_tls_or_another_ca_gets_no_connection(nats_server: AuthNats, tmp_path: Path) -> None:
    creds = str(nats_server.creds("tap"))
    plain = nats_server.url.replace("tls://", "nats://")
    # The server says nothing in clear (handshake_first: true) and drops the silent client at its TLS
    # timeout (5 s); nats-py's own timeouts do not all cover the wait for INFO, so a hard deadline here.
    with pytest.raises(Exception):  # noqa: B017 (nats-py raises several types here; any refusal will do)
        await asyncio.wait_for(nats.connect(plain, user_credentials=creds, allow_reconnect=False,
                                            max_reconnect_attempts=0, connect_timeout=3), 20)
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(nats.connect(nats_server.url, user_credentials=creds, allow_reconnect=False,
                                            max_reconnect_attempts=0, connect_timeout=3, tls_handshake_first=True,
                                            tls=ssl.create_default_context(cafile=str(tmp_path / "other-ca.pem"))),
                               20)
    # The right CA (positive control).
    nc = await nats_server.connect("tap")
    assert nc.is_connected
    await nc.close()
