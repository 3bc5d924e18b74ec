"""The whole system on a 3-server NATS cluster (`doai.nats_cluster`) losing the server that leads DOAI_EVT.

Real nats-servers (three, routed on loopback, decentralized auth), real
PostgreSQL, three node agents with their simulators. Mid-run the server that
leads the event stream is SIGKILLed: the run must still complete with every
task succeeded once, every event of the run stored once in the stream and
folded once into PostgreSQL. Then the server comes back on the same store
and must catch up (its replicas current, the same messages as the leader).

A node revoked while one server is down is refused by every server, the
restarted one included (the `full` resolver of every server gets the update).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest
import structlog
import trustme
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig, StreamInfo
from nats.js.client import JetStreamContext

from contracts.subjects import AGGREGATOR_DURABLE, CMD_STREAM, EVT_STREAM, node_durable
from doai.cli import build_parser
from doai.embedded import free_port, nats_server_binary
from doai.nats_cluster import ClusterMember, NatsCluster
from doai.servers import Infra, infrastructure
from doai.up import UpOptions, fleet_devices, publish_recipes, running_system, wait_for_devices
from runtime import jetstream
from runtime.config import ConfigError, load_settings
from runtime.nats_auth import NatsTrust, inbox_prefix
from runtime.nats_creds import format_creds, write_secret
from services.backend.settings import BackendSettings
from services.node.enroll import new_user_seed, user_public_key_of
from tests.aggregator_support import consumer_settled
from tests.backend_support import NODE_SECRET, running_backend
from tests.conftest import TEST_TOKEN, AuthNats, creds_file
from tests.impostor_support import Impostor
from tests.signing_support import TEST_SIGNING_SEED
from tests.test_e2e import wait_completed
from tests.test_security_enrollment import connects

NODES = 3
DEVICES = 6
SLOTS = 2  # three waves per node: the run is still going when the leader dies
STEPS = 10  # device-smoke
log = structlog.get_logger(__name__)
PARAMS = {"url": "https://example.org/cluster", "youtubeVideoId": "vid_CLUSTER"}


@pytest.fixture
def nats_cluster(tmp_path: Path, log_file: Path, nats_trust: NatsTrust) -> Any:
    cluster = NatsCluster(tmp_path / "cluster", nats_trust)
    cluster.start()
    yield cluster
    cluster.stop()


async def admin(cluster: NatsCluster, servers: list[str] | None = None, **extra: Any) -> NATS:
    nc: NATS = await nats.connect(servers or cluster.urls, user_credentials=str(creds_file("admin")),
                                  inbox_prefix=inbox_prefix("admin"), max_reconnect_attempts=-1,
                                  reconnect_time_wait=0.2, **extra)
    return nc


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = await check()
        except Exception as exc:  # a leader election under way: JetStream answers 503 or times out
            value, last = None, repr(exc)
        else:
            last = repr(value)
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s} s (last: {last})"
        await asyncio.sleep(0.2)


async def published(js: JetStreamContext, subject: str, payload: bytes, seq: int) -> bool:
    """One try of a publish expected to be stored at `seq`. Every try carries the same Nats-Msg-Id: a try
    buffered over a reconnect and stored after its timeout makes the next try a duplicate, answered with
    the same sequence."""
    ack = await js.publish(subject, payload, timeout=2, headers={"Nats-Msg-Id": f"{subject}-{seq}"})
    return ack.seq == seq


def member(cluster: NatsCluster, name: str) -> ClusterMember:
    [found] = [m for m in cluster.members if m.name == name]
    return found


def all_current(info: Any, size: int) -> bool:
    """The leader and every other replica present, current and without lag."""
    c = info.cluster
    return (c is not None and c.leader is not None and len(c.replicas or []) == size - 1
            and all(r.current and not r.offline and not r.lag for r in c.replicas or []))


async def server_stream_state(cluster: NatsCluster, one: ClusterMember) -> dict[str, tuple[int, int]]:
    """{stream: (messages, last_seq)} as that one server holds it (its own JSZ, over the system account)."""
    nc = await nats.connect(one.url, user_credentials=str(cluster.trust.creds_path("sys-user")),
                            allow_reconnect=False)
    try:
        server_id = nc._server_info["server_id"]
        reply = await nc.request(f"$SYS.REQ.SERVER.{server_id}.JSZ",
                                 json.dumps({"accounts": True, "streams": True}).encode(), timeout=3)
        data = json.loads(reply.data)["data"]
        return {s["name"]: (s["state"]["messages"], s["state"]["last_seq"])
                for a in data.get("account_details", []) for s in a.get("stream_detail", [])}
    finally:
        await nc.close()


async def run_events(nc: NATS, run_id: str) -> list[str]:
    """The event_id of every message of this run in DOAI_EVT, in stream order (duplicates kept).

    Read with the stream leader's message get, one subject-filtered step at a time, not with an ephemeral
    consumer: a server that was SIGKILLed counts as online to the others until its statsz goes stale
    (nats-server's orphan check, 150 s), and an R1 ephemeral consumer lands on a random peer of the stream,
    the dead one included, whose create then times out (seen on CI).
    """
    js = nc.jetstream()
    subject = f"doai.evt.*.*.{run_id}"
    info = await js.stream_info(EVT_STREAM, subjects_filter=subject)
    expected = sum((info.state.subjects or {}).values())
    ids: list[str] = []
    seq = info.state.first_seq
    while len(ids) < expected:
        msg = await js.get_msg(EVT_STREAM, seq=seq, subject=subject, next=True)
        assert msg.data is not None and msg.seq is not None
        ids.append(msgspec.json.decode(msg.data)["event_id"])
        seq = msg.seq + 1
    return ids


@pytest.fixture
async def cluster_system(nats_cluster: NatsCluster, database_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    opts = UpOptions(home=tmp_path / "home", nodes=NODES, devices=DEVICES, slots=SLOTS, sim_latency_ms=60.0,
                     screen_latency_ms=200.0, inventory_interval_s=0.5, command_signing_seed=TEST_SIGNING_SEED)
    infra = Infra(nats_cluster.url, database_url, embedded=False, nats_auth_dir=nats_cluster.trust.dir,
                  nats_replicas=nats_cluster.replicas)
    async with running_system(opts, infra, TEST_TOKEN, port=0) as system:
        async with system.client() as client:
            await publish_recipes(client)
            online = await wait_for_devices(client, fleet_devices(system.sims), timeout_s=30)
        assert online == NODES * DEVICES
        yield system


async def test_a_run_completes_exactly_when_the_evt_leader_is_killed_and_the_server_catches_up(
    nats_cluster: NatsCluster, cluster_system: Any, database_url: str
) -> None:
    system = cluster_system
    total = NODES * DEVICES
    nc = await admin(nats_cluster)
    try:
        js = nc.jetstream()
        # Streams and every durable consumer are replicated on all three servers.
        for stream in (CMD_STREAM, EVT_STREAM):
            info: StreamInfo = await js.stream_info(stream)
            assert info.config.num_replicas == 3, info.config

            async def current(stream: str = stream) -> bool:  # a follower lags for a moment after each write
                return all_current(await js.stream_info(stream), 3)

            await poll(current, 15, f"every replica of {stream} current")
        for stream, durable in [(EVT_STREAM, AGGREGATOR_DURABLE),
                                *[(CMD_STREAM, node_durable(f"node-{i}")) for i in range(1, NODES + 1)]]:
            consumer = await js.consumer_info(stream, durable)
            assert consumer.cluster is not None and len(consumer.cluster.replicas or []) == 2, (durable,
                                                                                             consumer.cluster)

        async with system.client() as client:
            r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                     "targets": {"all_online": True}})
            assert r.status_code == 201, r.text
            run_id = r.json()["run_id"]

            async def some_done() -> bool:
                counts = (await client.get(f"/v1/runs/{run_id}")).json()["counts"]
                return 0 < counts.get("succeeded", 0) < total // 2

            await poll(some_done, 30, "the first tasks of the run succeeded")
            leader = (await js.stream_info(EVT_STREAM)).cluster.leader  # type: ignore[union-attr]
            assert leader is not None
            victim = member(nats_cluster, leader)
            await asyncio.to_thread(victim.kill)
            killed_at = time.monotonic()
            done_before_kill = (await client.get(f"/v1/runs/{run_id}")).json()["counts"].get("succeeded", 0)
            assert done_before_kill < total, "the run ended before the leader was killed: nothing was tested"

            async def new_leader() -> str | None:
                name = (await js.stream_info(EVT_STREAM)).cluster.leader  # type: ignore[union-attr]
                return name if name not in (None, leader) else None

            elected = await poll(new_leader, 30, "a new DOAI_EVT leader")
            run = await wait_completed(client, run_id, timeout_s=45)
            log.info("cluster test: DOAI_EVT leader killed mid-run", killed=leader, elected=elected,
                     succeeded_before_kill=done_before_kill, tasks=total,
                     completed_after_kill_s=round(time.monotonic() - killed_at, 1))

        # REST: every task succeeded, once.
        assert run["status"] == "completed" and run["outcome"] == "succeeded", run
        assert run["counts"] == {"succeeded": total}
        assert len(run["task_rows"]) == total
        assert all(t["state"] == "succeeded" and t["attempt"] == 1 for t in run["task_rows"])

        # The stream holds every event of the run once (Nats-Msg-Id dedup held across the leader change) and
        # the aggregator folded every one of them, once.
        settling = time.monotonic()
        await poll(lambda: consumer_settled(js), 30, "the aggregator acked every event")
        log.info("cluster test: events settled", settle_s=round(time.monotonic() - settling, 1))
        stream_ids = await run_events(nc, run_id)
        assert len(stream_ids) == len(set(stream_ids)), "an event of the run is stored twice"
        conn = await asyncpg.connect(database_url)
        try:
            folded = {r["event_id"] for r in await conn.fetch(
                "SELECT event_id FROM processed_events WHERE event_id = ANY($1::text[])", stream_ids)}
            tasks = await conn.fetch("SELECT state, attempt FROM run_tasks WHERE run_id = $1", run_id)
            steps = await conn.fetchval("SELECT count(*) FROM step_results WHERE run_id = $1 AND state = 'ok'",
                                        run_id)
            artifacts = await conn.fetchval("SELECT count(*) FROM artifacts WHERE run_id = $1", run_id)
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
        finally:
            await conn.close()
        assert folded == set(stream_ids)
        assert len(tasks) == total and {(t["state"], t["attempt"]) for t in tasks} == {("succeeded", 1)}
        assert steps == total * STEPS and artifacts == total and dead == 0

        # The killed server comes back on its store and catches up: every replica current, its own copy of
        # both streams equal to the leader's.
        await asyncio.to_thread(victim.start)

        async def caught_up() -> bool:
            for stream in (CMD_STREAM, EVT_STREAM):
                info = await js.stream_info(stream)
                if not all_current(info, 3):
                    return False
            if not all_current(await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE), 3):
                return False
            mine = await server_stream_state(nats_cluster, victim)
            for stream in (CMD_STREAM, EVT_STREAM):
                state = (await js.stream_info(stream)).state
                if mine.get(stream) != (state.messages, state.last_seq):
                    return False
            return True

        restarted_at = time.monotonic()
        await poll(caught_up, 30, f"{victim.name} caught up")
        log.info("cluster test: killed server caught up", server=victim.name,
                 catch_up_s=round(time.monotonic() - restarted_at, 1))
    finally:
        await nc.close()



async def test_a_node_revoked_while_a_server_is_down_is_refused_by_every_server_once_it_is_back(
    nats_cluster: NatsCluster, database_url: str, tmp_path: Path
) -> None:
    down = nats_cluster.members[0]  # the first URL of NATS_URL: the backend's push must go to another
    others = nats_cluster.members[1:]
    async with running_backend(database_url, nats_cluster.url, stream_replicas=3, account_push_s=1.0) as backend:
        seed = new_user_seed()
        async with httpx.AsyncClient(base_url=backend.url, headers={"X-Node-Auth": NODE_SECRET},
                                     timeout=30) as node_api:  # enrolling creates an R3 consumer
            r = await node_api.post("/v1/node/enroll", json={"node_id": "node-r", "public_key":
                                                              user_public_key_of(seed)})
            assert r.status_code == 201, r.text
        creds = tmp_path / "node-r.creds"
        write_secret(creds, format_creds(r.json()["user_jwt"], seed))
        other = creds_file("node", "node-other")
        for m in nats_cluster.members:
            assert await connects(m.url, creds, "node-r"), m.name

        await asyncio.to_thread(down.kill)
        async with backend.client() as client:
            r = await client.post("/v1/nodes/node-r/revoke")
            assert r.status_code == 200, r.text
        for m in others:  # the update reaches every running server (the push's answer is the first one's)
            async def refused(m: ClusterMember = m) -> bool:
                return not await connects(m.url, creds, "node-r")

            await poll(refused, 10, f"{m.name} refusing the revoked node")
            assert await connects(m.url, other, "node-other"), m.name

        # The server that missed the update restarts with its old account JWT; the backend pushes the account
        # again every DOAI_NATS_ACCOUNT_PUSH_S (1 s here) while a key is revoked: the revoked node is refused
        # there too, everyone else still admitted.
        await asyncio.to_thread(down.start)

        async def refused_on_restarted() -> bool:
            return not await connects(down.url, creds, "node-r")

        await poll(refused_on_restarted, 10, f"{down.name} refusing the node revoked while it was down")
        assert await connects(down.url, other, "node-other")


def test_replicas_and_server_lists_are_settings_with_clear_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    required = {"DATABASE_URL": "postgresql://x/y", "NATS_URL": "nats://a:4222, nats://b:4222,,nats://c:4222",
                "DOAI_API_TOKEN": "t", "NODE_AGENT_SHARED_SECRET": "s" * 32,
                "DOAI_COMMAND_SIGNING_KEY": TEST_SIGNING_SEED, "DOAI_NATS_AUTH_DIR": "/etc/doai/nats-auth"}
    settings = load_settings(BackendSettings, {**required, "DOAI_NATS_REPLICAS": "3"})
    assert {limits.replicas for limits in settings.stream_limits().values()} == {3}
    assert {c.num_replicas for c in jetstream.stream_configs(settings.stream_limits())} == {3}
    assert {limits.replicas for limits in load_settings(BackendSettings, required).stream_limits().values()} == {1}
    assert jetstream.server_urls(settings.nats_url) == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    for bad in ("0", "6", "three"):
        with pytest.raises(ConfigError, match="DOAI_NATS_REPLICAS"):
            load_settings(BackendSettings, {**required, "DOAI_NATS_REPLICAS": bad})
    with pytest.raises(ValueError, match="no NATS server URL"):
        jetstream.server_urls(" , ")
    # `doai up`: a cluster needs 3 servers, and is not started when NATS_URL names servers already.
    assert build_parser().parse_args(["up", "--nats-cluster", "3"]).nats_cluster == 3
    for size in ("2", "1", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["up", "--nats-cluster", size])
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("DOAI_NATS_AUTH_DIR", "/nonexistent")

    async def start() -> None:
        async with infrastructure(Path("/nonexistent"), nats_cluster=3):
            raise AssertionError("started")

    with pytest.raises(ConfigError, match="NATS_URL is set"):
        asyncio.run(start())


def rogue_route(route: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A nats-server of no trust at all that dials `route` (a local process trying to join the cluster)."""
    return subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(free_port()), "--cluster",
                             f"nats://127.0.0.1:{free_port()}", "--cluster_name", "doai", "--routes", route,
                             "-l", str(log_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_the_embedded_cluster_refuses_a_route_without_its_password(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """A local process dialing a route (wrong password, no certificate of the cluster) is refused: it never
    becomes a route."""
    first = nats_cluster.members[0]
    assert stat.S_IMODE(first.store_dir.stat().st_mode) == 0o700  # the config with the password is in here
    rogue_log = tmp_path / "rogue.log"
    rogue = rogue_route(f"nats-route://doai-route:wrong@127.0.0.1:{first.route_port}", rogue_log)
    try:
        async def refused() -> bool:
            # Refused at the TLS handshake (it has no certificate of the cluster's CA), before any password.
            return "TLS route handshake error" in (first.store_dir / "nats-server.log").read_text()

        await poll(refused, 20, "the rogue route refused")
        assert await _routed_to(nats_cluster, first) == {m.name for m in nats_cluster.members[1:]}
    finally:
        rogue.kill()
        rogue.wait()


async def test_a_local_process_on_the_port_of_a_server_that_is_down_never_gets_the_route_password(
    nats_cluster: NatsCluster,
) -> None:
    """While a server is down the others keep dialing its route port; a local process that binds that port
    (any local user can) must get neither the route password nor a route. Before route TLS the others sent
    `CONNECT {"user":"doai-route","pass":...}` in clear to whoever listened there."""
    first, down, third = nats_cluster.members
    password = down._route_password.encode()
    down.kill()
    # What the real server would say first; a dialer that sends its CONNECT now gives the password away.
    fake = Impostor({"server_id": "NIMPOSTOR", "server_name": down.name, "cluster": "doai", "auth_required": True})
    rogue = await fake.listen(down.route_port)
    try:
        await asyncio.wait_for(fake.dialed.wait(), 20)  # a surviving server dialed the impostor ...
        await asyncio.wait_for(fake.heard.wait(), 20)  # ... and the conversation is over
    finally:
        rogue.close()
        await rogue.wait_closed()
    assert not any(password in chunk for chunk in fake.received), "the route password went to the impostor"
    assert not any(b"CONNECT" in chunk for chunk in fake.received)
    # The survivors are still routed to each other, and to nobody else.
    assert await _routed_to(nats_cluster, first) == {third.name}
    tls_folder = nats_cluster.route_tls.folder
    assert stat.S_IMODE(tls_folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(nats_cluster.route_tls.key_file.stat().st_mode) == 0o600


async def test_a_client_dialing_a_server_that_is_down_gives_an_impostor_on_its_port_nothing(
    tmp_path: Path, nats_trust: NatsTrust
) -> None:
    """`doai up --nats-cluster` clients use TLS with the cluster's own CA. A client that dials the port of a
    server that is down (a start or a reconnect while it is down) meets whatever local process bound that
    port; over plain TCP it sent its user JWT and its signature of the impostor's nonce (a nonce the
    impostor could have taken from a live server, to act as that client), and then its traffic."""
    cluster = NatsCluster(tmp_path / "cluster", nats_trust, own_tls=True)
    await asyncio.to_thread(cluster.start)
    try:
        first, down, _ = cluster.members
        assert cluster.url.startswith("tls://") and cluster.ca_file == cluster.route_tls.ca_file
        down.kill()
        creds = cluster.trust.creds_path("backend")
        user_jwt = next(line for line in creds.read_text().splitlines() if line.startswith("eyJ")).encode()
        fake = Impostor({"server_id": "NIMPOSTOR", "server_name": down.name, "version": "2.10.0", "proto": 1,
                                "max_payload": 1048576, "auth_required": True, "nonce": "bm9uY2U", "headers": True})
        rogue = await fake.listen(down.port)
        try:
            with pytest.raises((TimeoutError, OSError, nats.errors.Error)):  # no server there: no connection
                await asyncio.wait_for(nats.connect(
                    [down.url], user_credentials=str(creds), inbox_prefix=inbox_prefix("backend"),
                    **jetstream.tls_options(cluster.url, cluster.ca_file), allow_reconnect=False,
                    connect_timeout=2), 20)
            await asyncio.wait_for(fake.heard.wait(), 20)
            # The live servers still take the same client.
            nc = await nats.connect([first.url], user_credentials=str(creds), inbox_prefix=inbox_prefix("backend"),
                                    **jetstream.tls_options(cluster.url, cluster.ca_file), allow_reconnect=False)
            assert nc.is_connected
            await nc.close()
        finally:
            rogue.close()
            await rogue.wait_closed()
        assert fake.received, "the client never dialed the impostor"
        assert not any(b"CONNECT" in chunk or user_jwt in chunk for chunk in fake.received), fake.received
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_tls_cluster_keeps_a_client_on_tls_when_its_server_dies(
    tmp_path: Path, log_file: Path, nats_trust: NatsTrust
) -> None:
    """TLS as on one server: every server serves the same certificate; a client that loses its server
    reconnects to another over TLS, verified against the CA, and its R3 stream lost nothing."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    for name, pem in (("ca.pem", ca.cert_pem), ("server.pem", cert.cert_chain_pems[0]),
                      ("server.key", cert.private_key_pem)):
        pem.write_to_path(str(tmp_path / name))
    cluster = NatsCluster(tmp_path / "cluster", nats_trust, tls_cert=tmp_path / "server.pem",
                          tls_key=tmp_path / "server.key", ca_file=tmp_path / "ca.pem")
    await asyncio.to_thread(cluster.start)
    try:
        assert all(u.startswith("tls://") for u in cluster.urls)
        stop = asyncio.Event()
        nc = await jetstream.connect(cluster.url, "tls-test", stop, creds=creds_file("admin"),
                                     ca_file=tmp_path / "ca.pem")
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="TLS_R3", subjects=["tls.r3"], num_replicas=3))
            # A new R3 stream answers publishes only once its leader is elected and its subject interest has
            # reached this client's server: until then a publish gets "no responders".
            await poll(lambda: published(js, "tls.r3", b"1", 1), 30, "the first publish to the new stream")
            assert nc.connected_url is not None
            [mine] = [m for m in cluster.members if m.port == nc.connected_url.port]
            await asyncio.to_thread(mine.kill)
            await poll(lambda: published(js, "tls.r3", b"2", 2), 30, "a publish through another server")
            assert nc.connected_url is not None and nc.connected_url.port != mine.port
            assert (await js.stream_info("TLS_R3")).state.messages == 2
        finally:
            await jetstream.close(nc)
        # A client that does not trust the CA gets no connection to any of them.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.wait_for(nats.connect([m.url for m in cluster.members if m is not mine],
                                                user_credentials=str(creds_file("admin")), allow_reconnect=False,
                                                tls_handshake_first=True,
                                                tls=ssl.create_default_context(cafile=str(_other_ca(tmp_path)))), 20)
    finally:
        await asyncio.to_thread(cluster.stop)


async def _routed_to(cluster: NatsCluster, member: ClusterMember) -> set[str]:
    """The names of the servers `member` has a route to, from its own ROUTEZ (asked as the system user)."""
    nc = await nats.connect(member.url, user_credentials=str(cluster.trust.creds_path("sys-user")),
                            allow_reconnect=False)
    try:
        reply = await nc.request(f"$SYS.REQ.SERVER.{nc._server_info['server_id']}.ROUTEZ", b"{}", timeout=3)
    finally:
        await nc.close()
    routes = json.loads(reply.data)["data"].get("routes") or []
    return {r.get("remote_name") for r in routes}


def _other_ca(tmp_path: Path) -> Path:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


async def test_three_replicas_on_a_single_server_stop_the_backend_with_jetstreams_reason(
    nats_server: AuthNats, database_url: str
) -> None:
    with pytest.raises(RuntimeError, match="JetStream refused doai's streams: .*replicas > 1 not supported"):
        async with running_backend(database_url, nats_server.url, stream_replicas=3):
            raise AssertionError("the backend started")
    nc = await nats_server.connect()
    try:  # nothing was declared
        assert [s async for s in _stream_names(nc)] == []
    finally:
        await nc.close()


async def _stream_names(nc: NATS) -> AsyncIterator[str]:
    for info in await nc.jetstream().streams_info():
        yield info.config.name or ""
