"""Node agent configuration: one typed settings object from the environment, overlaid by `doai node` flags.

Every setting has one default here and one environment variable (the field's
encoded name); `runtime.config.load_settings` builds it and reports a bad
value as one `ConfigError` naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from msgspec import field

from contracts.artifact_path import DEFAULT_PATH_TEMPLATE
from contracts.ids import is_node_id
from runtime.config import ConfigError, Settings, env_names
from runtime.jetstream import STREAM_MAX_AGE_S
from runtime.signing import SigningKeyError, Verifier

__all__ = ["DEFAULT_PATH_TEMPLATE", "NodeSettings"]


class NodeSettings(Settings, kw_only=True):
    node_id: str = field(name="DOAI_NODE_ID")
    nats_url: str = field(name="NATS_URL")
    vendor_url: str = field(default="ws://127.0.0.1:22222/", name="DOAI_VENDOR_URL")
    slots: int = field(default=20, name="DOAI_SLOTS")
    # Local state: the journal (SQLite) and the screenshot spool live here.
    state_dir: Path = field(default=Path("var/node"), name="DOAI_STATE_DIR")
    # The local artifact store's root (the embedded default store).
    artifact_dir: Path = field(default=Path("var/artifacts"), name="DOAI_ARTIFACT_DIR")
    path_template: str = field(default=DEFAULT_PATH_TEMPLATE, name="DOAI_ARTIFACT_PATH_TEMPLATE")
    # WebSocket connections to the vendor program, each strictly one request at a time (no request id).
    # Default: one per slot, so devices never wait for each other's requests; if `doai vendor probe`
    # finds the program accepts fewer connections, set what it recommends (docs/vendor.md).
    vendor_pool_size: int | None = field(default=None, name="DOAI_VENDOR_POOL_SIZE")
    # Keep-alive ping on each idle vendor connection (0: off); the probe checks the program answers pings.
    vendor_ping_interval_s: float | None = field(default=20.0, name="DOAI_VENDOR_PING_INTERVAL_S")
    # How long a screenshot may take to appear (and finish being written) after the program answered.
    vendor_screenshot_wait_s: float = field(default=10.0, name="DOAI_VENDOR_SCREENSHOT_WAIT_S")
    vendor_request_timeout_s: float = field(default=120.0, name="DOAI_VENDOR_REQUEST_TIMEOUT_S")
    # After a request is abandoned (step timeout or cancel) the device is `draining` (no new job starts on it)
    # until the old request answers or this grace passes.
    drain_grace_s: float = field(default=60.0, name="DOAI_DRAIN_GRACE_S")
    # How often the vendor's device list is polled and a heartbeat is sent.
    inventory_interval_s: float = field(default=5.0, name="DOAI_INVENTORY_INTERVAL_S")
    # The device list is sent when it changes, and unchanged at most this often (a full snapshot); keep it
    # below the aggregator's DOAI_LIVENESS_WINDOW_S (60 s), which reads device liveness from the last listing.
    inventory_snapshot_s: float = field(default=30.0, name="DOAI_INVENTORY_SNAPSHOT_S")
    # How long one `list` poll may take (connect retries included) before it counts as "unavailable".
    inventory_timeout_s: float = field(default=10.0, name="DOAI_INVENTORY_TIMEOUT_S")
    # Queued jobs of a device that stays offline this long (while they wait) end `skipped`.
    offline_grace_s: float = field(default=300.0, name="DOAI_OFFLINE_GRACE_S")
    # At start and after a reconnect, how long the node may spend reading the commands waiting for it
    # (so a cancel sent while it was down wins) before it starts jobs anyway.
    command_catch_up_s: float = field(default=30.0, name="DOAI_COMMAND_CATCH_UP_S")
    # Journal retention: a run whose jobs all finished loses its jobs and broadcast payload after
    # journal_max_age_s; its run id is kept ("seen") until journal_seen_max_age_s, which must outlast the
    # DOAI_CMD stream's 7-day max_age (a recreated consumer redelivers the whole stream). Checked hourly.
    journal_max_age_s: float = field(default=2 * 86400.0, name="DOAI_JOURNAL_MAX_AGE_S")
    journal_seen_max_age_s: float = field(default=8 * 86400.0, name="DOAI_JOURNAL_SEEN_MAX_AGE_S")
    journal_prune_interval_s: float = field(default=3600.0, name="DOAI_JOURNAL_PRUNE_INTERVAL_S")
    # A job found `running` after a crash is re-queued (attempt + 1) while attempt < max_attempts, else failed.
    max_attempts: int = field(default=2, name="DOAI_MAX_ATTEMPTS")
    # Vendor reconnect backoff: a request that cannot connect retries from base doubling to max, within its timeout.
    vendor_backoff_base_s: float = field(default=1.0, name="DOAI_VENDOR_BACKOFF_BASE_S")
    vendor_backoff_max_s: float = field(default=30.0, name="DOAI_VENDOR_BACKOFF_MAX_S")
    # Which device driver: "vendor" (the WebSocket program) or "adb" (an adb server at adb_host:adb_port).
    driver: str = field(default="vendor", name="DOAI_DRIVER")
    adb_host: str = field(default="127.0.0.1", name="ANDROID_ADB_SERVER_HOST")
    adb_port: int = field(default=5037, name="ANDROID_ADB_SERVER_PORT")
    # Which artifact store: "local" (artifact_dir) or "supabase" (Supabase Storage through the official client).
    store: str = field(default="local", name="DOAI_ARTIFACT_STORE")
    supabase_url: str = field(default="", name="SUPABASE_URL")
    supabase_key: str = field(default="", name="SUPABASE_SERVICE_KEY")  # a secret: never logged or shown
    supabase_bucket: str = field(default="artifacts", name="DOAI_SUPABASE_BUCKET")
    # The backend's command-signing public key (an nkey starting with 'N'): commands that do not verify
    # with it are refused. Required to start (enrollment fills it); see `command_verifier`.
    command_public_key: str = field(default="", name="DOAI_COMMAND_PUBLIC_KEY")
    # NATS identity. A new node enrolls once at the backend (`api_url`, with the shared secret as
    # X-Node-Auth) and keeps `<state_dir>/<node_id>.creds`; a pre-provisioned node is given
    # `creds_file` instead (`--creds`) and never enrolls.
    api_url: str = field(default="", name="DOAI_API_URL")
    node_secret: str = field(default="", name="NODE_AGENT_SHARED_SECRET")  # a secret: never logged or shown
    creds_file: Path | None = field(default=None, name="DOAI_NATS_CREDS")
    # CA file that signed nats-server's TLS certificate (use a tls:// NATS_URL).
    nats_ca: Path | None = field(default=None, name="DOAI_NATS_CA")

    SECRETS: ClassVar[frozenset[str]] = frozenset({"supabase_key", "node_secret"})
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"supabase_key": ("SUPABASE_KEY",)}

    def __post_init__(self) -> None:
        if not is_node_id(self.node_id):
            raise ConfigError(
                f"DOAI_NODE_ID (--node-id) {self.node_id[:80]!r} is invalid: use letters, digits, '-' and '_' (max 64)"
            )
        if not 1 <= self.slots <= 1000:
            raise ConfigError(f"DOAI_SLOTS (--slots) must be between 1 and 1000, got {self.slots}")
        if self.max_attempts < 1:
            raise ConfigError(f"DOAI_MAX_ATTEMPTS (--max-attempts) must be at least 1, got {self.max_attempts}")
        if self.driver not in ("vendor", "adb"):
            raise ConfigError(f"DOAI_DRIVER (--driver) must be 'vendor' or 'adb', got {self.driver!r}")
        if self.store not in ("local", "supabase"):
            raise ConfigError(f"DOAI_ARTIFACT_STORE (--store) must be 'local' or 'supabase', got {self.store!r}")
        if self.store == "supabase" and not (self.supabase_url and self.supabase_key and self.supabase_bucket):
            raise ConfigError("the supabase store needs SUPABASE_URL, SUPABASE_SERVICE_KEY and DOAI_SUPABASE_BUCKET")
        if self.vendor_pool_size is not None and not 1 <= self.vendor_pool_size <= 1000:
            raise ConfigError(f"DOAI_VENDOR_POOL_SIZE (--vendor-connections) must be between 1 and 1000, "
                              f"got {self.vendor_pool_size}")
        if self.vendor_ping_interval_s is not None and self.vendor_ping_interval_s <= 0:
            self.vendor_ping_interval_s = None  # 0 turns the keep-alive ping off
        if not self.vendor_screenshot_wait_s > 0:
            raise ConfigError(f"DOAI_VENDOR_SCREENSHOT_WAIT_S (--screenshot-wait) must be positive, "
                              f"got {self.vendor_screenshot_wait_s}")
        if self.offline_grace_s < 0:
            raise ConfigError(
                f"DOAI_OFFLINE_GRACE_S (--offline-grace) must not be negative, got {self.offline_grace_s}")
        for attr in ("inventory_interval_s", "inventory_timeout_s", "vendor_request_timeout_s", "command_catch_up_s",
                     "drain_grace_s", "inventory_snapshot_s", "journal_prune_interval_s"):
            if not getattr(self, attr) > 0:
                raise ConfigError(f"{env_names(NodeSettings)[attr]} must be positive, got {getattr(self, attr)}")
        if self.journal_seen_max_age_s <= STREAM_MAX_AGE_S:
            raise ConfigError(f"DOAI_JOURNAL_SEEN_MAX_AGE_S must be longer than the DOAI_CMD stream's max_age "
                              f"({STREAM_MAX_AGE_S:g} s): a recreated consumer redelivers the whole stream and "
                              f"only the journal recognises a broadcast already run; got {self.journal_seen_max_age_s}")
        if not 0 < self.journal_max_age_s <= self.journal_seen_max_age_s:
            raise ConfigError(f"DOAI_JOURNAL_MAX_AGE_S must be positive and at most DOAI_JOURNAL_SEEN_MAX_AGE_S, "
                              f"got {self.journal_max_age_s}")
        if self.command_public_key:
            self.command_verifier()  # a key that is set must be usable; an empty one is refused at start

    @property
    def journal_path(self) -> Path:
        return self.state_dir / f"{self.node_id}.journal.sqlite"

    @property
    def enrolled_creds_path(self) -> Path:
        """Where an enrolled node keeps its NATS credentials (0600)."""
        return self.state_dir / f"{self.node_id}.creds"

    @property
    def enrollment_path(self) -> Path:
        """The enrollment answer without the JWT (the backend's command public key, when, as whom)."""
        return self.state_dir / f"{self.node_id}.enrollment.json"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool" / self.node_id

    def check_command_key_source(self) -> None:
        """Refuse to start, before touching anything, when no command key is given and none can come.

        Enrollment (an API URL, or an earlier enrollment's record) hands the node the
        backend's key; without either, the node could only run unsigned commands.
        """
        if not self.command_public_key and not (self.api_url or self.enrollment_path.is_file()):
            self.command_verifier()  # raises the ConfigError that says what to set

    def command_verifier(self) -> Verifier:
        """The verifier of the backend's command signatures, or `ConfigError` when none is usable.

        A node without the key would have to run unsigned commands: it does not start instead
        (`run_node` and `NodeAgent.run` call this first). Enrollment may fill the key after the
        settings are loaded, so an empty key is refused here, at start, not when loading.
        """
        if not self.command_public_key.strip():
            raise ConfigError(
                "no command public key: set DOAI_COMMAND_PUBLIC_KEY to the backend's command-signing public key"
                " (enrollment provides it); without it the node would run unsigned commands"
            )
        try:
            return Verifier(self.command_public_key)
        except SigningKeyError as exc:
            raise ConfigError(f"DOAI_COMMAND_PUBLIC_KEY is unusable: {exc}") from None
