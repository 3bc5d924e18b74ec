"""An active attacker between a doai part and nats-server must not strip TLS (review of wave 3).

nats-py reads the server's first line (INFO) in clear and upgrades to TLS only when that INFO says
`tls_required`, even for a `tls://` URL with a CA. Whoever answers in the server's place (an intruder
on the fleet network, or a local process on the port of a cluster server that is down) could send an
INFO without it and receive the CONNECT in clear: the user JWT and the signature of a nonce it may
have relayed from the real server, so it could act as the node or the backend. doai's clients now
start TLS before reading anything (`runtime.jetstream.tls_options`); the servers expect it
(`handshake_first: true`) and say nothing in clear. Real parts: an impostor on a TCP port, a real nats-server with TLS.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trustme

from doai.embedded import EmbeddedNats, free_port
from runtime import jetstream
from runtime.aio import Stopped
from runtime.nats_auth import NatsTrust, inbox_prefix
from tests.conftest import creds_file
from tests.impostor_support import Impostor


def _jwt_of(creds: Path) -> bytes:
    return next(line for line in creds.read_text().splitlines() if line.startswith("eyJ")).encode()


async def test_an_impostor_answering_in_clear_gets_no_connect_from_a_tls_client(
    tmp_path: Path, nats_trust: NatsTrust
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    creds = creds_file("admin")
    # What a nats-server without TLS says; a client that answers with CONNECT gives itself away.
    fake = Impostor({"server_id": "NIMPOSTOR", "version": "2.10.0", "proto": 1, "max_payload": 1048576,
                    "auth_required": True, "nonce": "bm9uY2U", "headers": True})
    port = free_port()
    rogue = await fake.listen(port)
    stop = asyncio.Event()
    client = asyncio.create_task(jetstream.connect(f"tls://127.0.0.1:{port}", "doai-node-victim", stop,
                                                   creds=creds, ca_file=ca_file))
    try:
        await asyncio.wait_for(fake.heard.wait(), 20)
    finally:
        stop.set()
        with pytest.raises(Stopped):
            await asyncio.wait_for(client, 10)
        rogue.close()
        await rogue.wait_closed()
    assert fake.received, "the client never spoke to the impostor"
    assert fake.received[0][:1] == b"\x16", "the client's first bytes are not a TLS handshake record"
    assert not any(b"CONNECT" in chunk or _jwt_of(creds) in chunk for chunk in fake.received), fake.received


async def test_a_real_tls_server_takes_doai_clients_and_says_nothing_in_clear(
    tmp_path: Path, nats_trust: NatsTrust
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    server = EmbeddedNats(tmp_path / "nats", nats_trust, tls_cert=cert_file, tls_key=key_file)
    await asyncio.to_thread(server.start)
    try:
        creds = nats_trust.creds_path("backend")
        nc = await jetstream.connect(server.url, "doai-backend", creds=creds, ca_file=ca_file,
                                     inbox_prefix=inbox_prefix("backend"))
        try:
            assert nc.is_connected and nc._server_info.get("tls_required") is True
        finally:
            await nc.close()
        # A client that waits for INFO first (nats-py's default) hears nothing in clear: the server
        # waits for a TLS ClientHello and drops the connection at its TLS timeout (5 s).
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            heard = await asyncio.wait_for(reader.read(), 20)  # until the server closes
        finally:
            writer.close()
        assert heard == b"", heard
    finally:
        await asyncio.to_thread(server.stop)
