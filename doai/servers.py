"""Where NATS and PostgreSQL come from: the environment, or the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from doai.embedded import EmbeddedError, EmbeddedNats, EmbeddedPostgres
from doai.nats_cluster import NatsCluster
from runtime.config import ConfigError
from runtime.nats_auth import NatsTrust, TrustError
from runtime.watchdog import Watchdog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Infra:
    nats_url: str
    database_url: str
    embedded: bool
    # The NATS trust folder (`runtime.nats_auth`): the backend's issuer keys and the central roles' creds.
    nats_auth_dir: Path
    # CA file that signed nats-server's TLS certificate (None: plain nats://).
    nats_ca: Path | None = None
    # The embedded PostgreSQL's TCP address for psql and Grafana (no password in it) and its libpq password file.
    pg_tcp_url: str | None = None
    pg_pgpass: Path | None = None
    # What the operator should know about the start (a saved port that was busy).
    notes: tuple[str, ...] = ()
    # The watchdog guarding the embedded servers (None: no embedded server); more children may be registered.
    watchdog: Watchdog | None = None
    # How many replicas the backend gives the streams (3 on the embedded cluster: `--nats-cluster 3`;
    # from DOAI_NATS_REPLICAS with an external NATS_URL).
    nats_replicas: int = 1


def _replicas(text: str | None) -> int:
    try:
        replicas = int(text or 1)
    except ValueError:
        raise ConfigError(f"DOAI_NATS_REPLICAS: expected an integer, got {text!r}") from None
    if not 1 <= replicas <= 5:
        raise ConfigError(f"DOAI_NATS_REPLICAS must be between 1 and 5 (JetStream's limit), got {replicas}")
    return replicas


def doai_home() -> Path:
    """Folder for the embedded servers' data, journals and artifacts (`DOAI_HOME`, default ./var)."""
    return Path(os.environ.get("DOAI_HOME", "var")).resolve()


def servers_state_path(home: Path) -> Path:
    """The embedded servers' ports of this DOAI_HOME, kept across restarts."""
    return home / "servers.json"


def _saved_ports(home: Path) -> dict[str, Any]:
    try:
        saved: dict[str, Any] = json.loads(servers_state_path(home).read_text(encoding="utf-8"))
        return saved
    except (OSError, ValueError):
        return {}


def _port_setting(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise EmbeddedError(f"{name} must be a port number, not {raw!r}") from None


def check_home_owner(home: Path) -> None:
    """Refuse a DOAI_HOME another local user could have prepared or can still change (POSIX).

    Everything under it is trusted: the NATS trust folder (operator keys), the PostgreSQL data
    folder, pid files of servers we may stop, the lock file. A home owned by another user (say a
    folder under /tmp made before us) or writable by everyone would let that user plant any of them.
    """
    if sys.platform == "win32":
        return
    st = home.stat()
    if st.st_uid != os.geteuid():
        raise EmbeddedError(f"{home} belongs to another user (uid {st.st_uid}): doai keeps its keys and servers' "
                            "data there, so it must be a folder of this user; use another --home")
    if st.st_mode & 0o002:
        raise EmbeddedError(f"{home} is writable by every user (mode {st.st_mode & 0o7777:o}): doai keeps its keys "
                            f"and servers' data there; `chmod o-w {home}` or use another --home")


@contextlib.contextmanager
def hold_home(home: Path) -> Iterator[None]:
    """One `doai up` per DOAI_HOME at a time: an OS lock on DOAI_HOME/doai-up.lock (released when we die).

    Holding it is what makes stopping a stale server of this home safe: nobody alive owns it.
    """
    home.mkdir(parents=True, exist_ok=True)
    check_home_owner(home)
    if sys.platform != "win32":
        # Private: logs, node journals and artifacts (phone screenshots) are nobody else's business. As root
        # the PostgreSQL user must still pass through to home/pg (search only, no listing).
        home.chmod(0o711 if os.geteuid() == 0 else 0o700)
    path = home / "doai-up.lock"
    try:
        # O_NOFOLLOW: a symlink planted as the lock file must not make us truncate and write its target.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise EmbeddedError(f"cannot open the lock file {path} ({exc.strerror}): it must be a plain file of "
                            "this user (a symlink is refused); remove it if no doai up runs") from None
    try:
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = path.read_text(encoding="utf-8", errors="replace").strip() or "?"
            except OSError:  # Windows: the locked byte cannot be read either
                holder = "?"
            raise EmbeddedError(f"another doai up (pid {holder}) is using {home}: stop it first, "
                                "or use another --home") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


@asynccontextmanager
async def infrastructure(home: Path | None = None, nats_cluster: int = 0) -> AsyncIterator[Infra]:
    """Yield server addresses; start embedded servers for whatever the environment lacks.

    NATS trust material: `DOAI_NATS_AUTH_DIR` with an external `NATS_URL` (made by
    `doai nats-auth init`); for the embedded server it is made once under
    `DOAI_HOME/nats-auth` and reused on every start. `nats_cluster` (3 or more): the embedded
    NATS is a cluster of that many servers (`doai.nats_cluster`), with streams of 3 replicas.

    Embedded servers keep their ports across restarts of the same home
    (`DOAI_HOME/servers.json`; `DOAI_NATS_PORT` / `DOAI_PG_PORT` fix them), are
    guarded by a watchdog (they die with this process, even on SIGKILL), and a
    stale server left by an earlier, killed run on this home is stopped first.
    """
    home = home or doai_home()
    nats_url = os.environ.get("NATS_URL")
    database_url = os.environ.get("DATABASE_URL")
    configured_auth = os.environ.get("DOAI_NATS_AUTH_DIR")
    if nats_url and not configured_auth:
        raise TrustError("NATS_URL is set: also set DOAI_NATS_AUTH_DIR to its trust folder "
                         "(`doai nats-auth init --dir DIR`)")
    auth_dir = Path(configured_auth) if configured_auth else home / "nats-auth"
    nats_ca = Path(os.environ["DOAI_NATS_CA"]) if os.environ.get("DOAI_NATS_CA") else None
    if nats_url and nats_cluster:
        raise ConfigError("--nats-cluster starts an embedded NATS cluster, but NATS_URL is set: unset it, or "
                          "give NATS_URL every server of your cluster and DOAI_NATS_REPLICAS=3")
    replicas = _replicas(os.environ.get("DOAI_NATS_REPLICAS"))
    if nats_url and database_url:
        yield Infra(nats_url, database_url, embedded=False, nats_auth_dir=auth_dir, nats_ca=nats_ca,
                    nats_replicas=replicas)
        return
    with hold_home(home):
        saved = _saved_ports(home)
        nats_port, pg_port = _port_setting("DOAI_NATS_PORT"), _port_setting("DOAI_PG_PORT")
        watchdog = await asyncio.to_thread(Watchdog.start)
        nats: EmbeddedNats | NatsCluster | None = None
        if not nats_url:
            trust = await asyncio.to_thread(NatsTrust.ensure, auth_dir)
            if nats_cluster:  # ports chosen at each start (the single server's are kept)
                nats = NatsCluster(home / "nats-cluster", trust, nats_cluster, own_tls=True, watchdog=watchdog)
                replicas = nats.replicas
                nats_ca = nats.ca_file  # clients verify the cluster's own CA (made at each start)
            else:
                nats = EmbeddedNats(home / "nats", trust, port=nats_port or saved.get("nats_port"),
                                    fallback_port=nats_port is None, watchdog=watchdog)
        pg = None if database_url else EmbeddedPostgres(
            home / "pg", port=pg_port or saved.get("pg_port"), password_file=home / "keys" / "postgres.password",
            fallback_port=pg_port is None, watchdog=watchdog)
        try:
            if nats is not None:
                await asyncio.to_thread(nats.start)
                nats_url = nats.url
            if pg is not None:
                database_url = await asyncio.to_thread(pg.start)
            assert nats_url is not None and database_url is not None
            single = nats if isinstance(nats, EmbeddedNats) else None
            ports = {**saved, **({"nats_port": single.port} if single else {}), **({"pg_port": pg.port} if pg else {})}
            await asyncio.to_thread(servers_state_path(home).write_text, json.dumps(ports), "utf-8")
            notes = tuple(n for server in (single, pg) if server is not None
                          for n in (server.stale_note, server.port_note) if n)
            notes += (pg.socket_note,) if pg is not None and pg.socket_note else ()
            yield Infra(nats_url, database_url, embedded=True, nats_auth_dir=auth_dir, nats_ca=nats_ca,
                        pg_tcp_url=pg.tcp_url if pg else None, pg_pgpass=pg.pgpass_file if pg else None,
                        notes=notes, watchdog=watchdog, nats_replicas=replicas)
        finally:
            # Each stop is bounded (a kill after a few seconds), even when a server hangs.
            if nats is not None:
                await asyncio.to_thread(nats.stop)
            if pg is not None:
                await asyncio.to_thread(pg.stop)
            await asyncio.to_thread(watchdog.close)
            log.info("embedded servers stopped", home=str(home))
