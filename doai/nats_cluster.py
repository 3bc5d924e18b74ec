"""The embedded NATS cluster: three `nats-server -js` on loopback, routed to each other (`doai up --nats-cluster 3`).

Each server is an `EmbeddedNats` (same binary, same packaged settings, same
decentralized auth and optional TLS) with its own store folder, its own
`full` account resolver folder and a `cluster` block:

* routes to the other servers, on loopback ports of their own, with a route
  user and password made for this cluster (a local process that does not know
  it cannot join as a route and read every account's traffic), over TLS that
  both ends verify against a CA made for this cluster (`RouteTls`): a server
  sends the password only to a peer holding the cluster's key. Without it, a
  local process that bound the port of a server that was down received the
  password from the others, which keep dialing it;
* every server runs the `full` resolver preloaded with the same operator and
  accounts: an account JWT update (a node's revocation) sent to any one server
  is answered by every server of the cluster, and a server that was down gets
  the updates it missed from the others when it rejoins (the resolver's sync).

Clients get all the servers' URLs (`url`: comma-separated) and move to another
server when theirs goes away; the backend declares the streams with 3 replicas
(`replicas`), so losing one server loses neither a message nor the quorum
(2 of 3). docs/scaling.md describes what happens on the loss of a leader.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS

from doai.embedded import EmbeddedError, EmbeddedNats, free_port
from runtime import aio
from runtime.jetstream import tls_options
from runtime.nats_auth import NatsTrust, inbox_prefix
from runtime.nats_creds import write_secret
from runtime.watchdog import Watchdog

log = structlog.get_logger(__name__)

CLUSTER_NAME = "doai"
ROUTE_USER = "doai-route"


@dataclass(frozen=True)
class RouteTls:
    """The routes' TLS material: a CA made for one cluster start and one certificate (127.0.0.1) it signed."""

    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "route-ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.folder / "route.pem"

    @property
    def key_file(self) -> Path:
        return self.folder / "route.key"

    def make(self) -> None:
        """A new CA and certificate (EC P-256, server and client use, valid 10 years); the CA's key is not kept."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        until = now + datetime.timedelta(days=3650)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"doai route CA {secrets.token_hex(4)}")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doai route")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(until)
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder.chmod(0o700)
        write_secret(self.key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()).decode())
        write_secret(self.cert_file, cert.public_bytes(serialization.Encoding.PEM).decode())
        write_secret(self.ca_file, ca.public_bytes(serialization.Encoding.PEM).decode())

    def config(self) -> str:
        return "\n".join([
            "  tls {",
            f"    cert_file: {json.dumps(str(self.cert_file))}",
            f"    key_file: {json.dumps(str(self.key_file))}",
            f"    ca_file: {json.dumps(str(self.ca_file))}",
            "    verify: true",
            "    timeout: 5",
            "  }",
        ])


class ClusterMember(EmbeddedNats):
    """One server of the cluster: `EmbeddedNats` plus its name and the `cluster` block."""

    def __init__(self, store_dir: Path, trust: NatsTrust, *, name: str, route_port: int, peers: list[int],
                 route_password: str, route_tls: RouteTls, port: int | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None,
                 watchdog: Watchdog | None = None) -> None:
        super().__init__(store_dir, trust, port=port, tls_cert=tls_cert, tls_key=tls_key, watchdog=watchdog)
        self.name = name
        self.route_port = route_port
        self.peers = peers
        self._route_password = route_password
        self.route_tls = route_tls

    def config(self) -> str:
        routes = ", ".join(json.dumps(f"nats-route://{ROUTE_USER}:{self._route_password}@127.0.0.1:{port}")
                           for port in self.peers)
        return "\n".join([
            super().config(),
            f"server_name: {json.dumps(self.name)}",
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  listen: 127.0.0.1:{self.route_port}",
            "  authorization {",
            f"    user: {json.dumps(ROUTE_USER)}",
            f"    password: {json.dumps(self._route_password)}",
            "    timeout: 2",
            "  }",
            self.route_tls.config(),
            f"  routes: [{routes}]",
            "}",
            "",
        ])

    def start(self, timeout_s: float = 15.0) -> None:
        # The config holds the route password: keep the folder (and so the file) to this user.
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store_dir.chmod(0o700)
        super().start(timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests): the store stays as the process left it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class NatsCluster:
    """`size` servers (3: the quorum survives the loss of one) under `store_dir/<name>`."""

    def __init__(self, store_dir: Path, trust: NatsTrust, size: int = 3, *, tls_cert: Path | None = None,
                 tls_key: Path | None = None, ca_file: Path | None = None, own_tls: bool = False,
                 watchdog: Watchdog | None = None) -> None:
        """`own_tls` (what `doai up` uses): clients too get TLS with the cluster's own certificate, verified
        against `route_tls.ca_file` (then `ca_file`). While a server is down its clients keep dialing its
        port; without TLS a local process that bound it could relay their nonce-signed CONNECT to a live
        server and act as them (or read their traffic)."""
        if size < 3:
            raise EmbeddedError(f"a NATS cluster needs at least 3 servers to survive losing one, got {size}")
        self.store_dir = store_dir
        self.trust = trust
        self.route_tls = RouteTls(store_dir / "route-tls")
        if own_tls:
            tls_cert, tls_key, ca_file = self.route_tls.cert_file, self.route_tls.key_file, self.route_tls.ca_file
        self.ca_file = ca_file
        route_password = secrets.token_urlsafe(24)
        route_ports = [free_port() for _ in range(size)]
        self.members = [
            ClusterMember(store_dir / f"n{i}", trust, name=f"doai-n{i}", route_port=route_ports[i - 1],
                          peers=[p for p in route_ports if p != route_ports[i - 1]],
                          route_password=route_password, route_tls=self.route_tls, tls_cert=tls_cert,
                          tls_key=tls_key, watchdog=watchdog)
            for i in range(1, size + 1)
        ]

    @property
    def replicas(self) -> int:
        """How many replicas the streams get on this cluster (every server keeps a copy, up to 3)."""
        return min(3, len(self.members))

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (what `NATS_URL` takes)."""
        return ",".join(m.url for m in self.members)

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every server, then wait until JetStream has a leader and answers (a stream can be declared)."""
        deadline = time.monotonic() + timeout_s
        try:
            self.route_tls.make()  # new at each start, as the password and the route ports
            for member in self.members:
                member.start(max(1.0, deadline - time.monotonic()))
            aio.run(self.wait_ready(max(1.0, deadline - time.monotonic())))
        except BaseException:
            self.stop()
            raise
        log.info("embedded nats cluster ready", urls=self.url, store=str(self.store_dir))

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every server sees the same JetStream meta leader, which sees every other server
        current, and JetStream answers the backend (`$JS.API.INFO`): then a 3-replica stream can be
        placed. (Right after the leader is elected, a stream create can still fail with "no suitable
        peers for placement".)"""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                not_ready = await self._not_ready()
            except Exception as exc:
                not_ready = repr(exc)
            if not_ready is None:
                return
            last = not_ready
            await asyncio.sleep(0.2)
        raise EmbeddedError(f"the NATS cluster at {self.url} did not form within {timeout_s:g} s: {last}")

    async def _connect(self, urls: list[str], role: str) -> NATS:
        options: dict[str, Any] = tls_options(self.url, self.ca_file)
        if role != "sys-user":
            options["inbox_prefix"] = inbox_prefix(role)

        async def quiet(_: Exception) -> None:
            return None

        nc: NATS = await asyncio.wait_for(nats.connect(
            urls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, error_cb=quiet,
            user_credentials=str(self.trust.creds_path(role)), **options), timeout=5)
        return nc

    async def _not_ready(self) -> str | None:
        """None when the cluster is ready, else what is missing."""
        leaders = set()
        for member in self.members:
            nc = await self._connect([member.url], "sys-user")
            try:
                reply = await nc.request(f"$SYS.REQ.SERVER.{nc._server_info['server_id']}.JSZ", b"{}", timeout=2)
            finally:
                await nc.close()
            meta = json.loads(reply.data).get("data", {}).get("meta_cluster") or {}
            if not meta.get("leader"):
                return f"{member.name} knows no JetStream meta leader yet"
            if meta.get("cluster_size") != len(self.members):
                return f"{member.name} sees a meta group of {meta.get('cluster_size')} servers"
            leaders.add(meta["leader"])
            if meta["leader"] == member.name:
                peers = meta.get("replicas") or []
                if len(peers) != len(self.members) - 1 or not all(p.get("current") for p in peers):
                    return f"the meta leader {member.name} does not see every server current yet"
        if len(leaders) != 1:
            return f"the servers name different meta leaders: {sorted(leaders)}"
        nc = await self._connect(self.urls, "backend")
        try:
            answer = json.loads((await nc.request("$JS.API.INFO", b"", timeout=2)).data)
        finally:
            await nc.close()
        if "error" in answer:
            return str(answer["error"].get("description"))
        return None

    def stop(self) -> None:
        for member in self.members:
            member.stop()
