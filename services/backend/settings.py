"""Backend configuration: one typed settings object from the environment, overlaid by `doai backend` flags.

Every setting has one default here and one environment variable (the field's
encoded name); `runtime.config.load_settings` builds it and reports a bad
value as one `ConfigError` naming the variable. The rules that need several
fields are checked once, when the object is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from msgspec import field

from contracts.artifact_path import DEFAULT_PATH_TEMPLATE, ArtifactPathError, template_fields
from contracts.recipe_model import DEFAULT_STEP_TIMEOUT_MS, DEFAULT_UPLOAD_TIMEOUT_MS
from contracts.subjects import CMD_STREAM, EVT_STREAM
from runtime.config import ConfigError, Settings
from runtime.jetstream import DEFAULT_LIMITS, StreamLimits
from runtime.signing import Signer, SigningKeyError

MIN_NODE_SECRET_BYTES = 32
IDEMPOTENCY_TTL_S = 7 * 86_400.0  # how long an Idempotency-Key is remembered (DOAI_IDEMPOTENCY_TTL_S)


class BackendSettings(Settings):
    database_url: str = field(name="DATABASE_URL")
    nats_url: str = field(name="NATS_URL")
    # DOAI_API_TOKEN: operator bearer tokens, comma-separated.
    api_tokens: list[str] = field(default_factory=list, name="DOAI_API_TOKEN")
    host: str = field(default="127.0.0.1", name="DOAI_API_HOST")
    port: int = field(default=8000, name="DOAI_API_PORT")
    # NODE_AGENT_SHARED_SECRET: what nodes send as X-Node-Auth (rule 8). Never logged or returned.
    node_secret: str = field(default="", name="NODE_AGENT_SHARED_SECRET")
    max_body_bytes: int = field(default=1_048_576, name="DOAI_MAX_BODY_BYTES")
    # Deepest JSON nesting a request body may have (a recipe needs about 5).
    max_json_depth: int = field(default=32, name="DOAI_MAX_JSON_DEPTH")
    # How often the relay looks for unsent broadcasts when nothing woke it up.
    relay_poll_s: float = field(default=1.0, name="DOAI_RELAY_POLL_S")
    # How often missing streams and node command consumers are re-declared (services/backend/keeper.py).
    keeper_every_s: float = field(default=3.0, name="DOAI_NATS_KEEPER_S")
    # Stream limits the backend declares (discard new; docs/architecture.md "Streams").
    cmd_max_bytes: int = field(default=DEFAULT_LIMITS[CMD_STREAM].max_bytes, name="DOAI_CMD_MAX_BYTES")
    cmd_max_msgs: int = field(default=DEFAULT_LIMITS[CMD_STREAM].max_msgs, name="DOAI_CMD_MAX_MSGS")
    cmd_max_msg_size: int = field(default=DEFAULT_LIMITS[CMD_STREAM].max_msg_size, name="DOAI_CMD_MAX_MSG_SIZE")
    evt_max_bytes: int = field(default=DEFAULT_LIMITS[EVT_STREAM].max_bytes, name="DOAI_EVT_MAX_BYTES")
    evt_max_msgs: int = field(default=DEFAULT_LIMITS[EVT_STREAM].max_msgs, name="DOAI_EVT_MAX_MSGS")
    evt_max_msg_size: int = field(default=DEFAULT_LIMITS[EVT_STREAM].max_msg_size, name="DOAI_EVT_MAX_MSG_SIZE")
    # Retention (services/backend/retention.py): an Idempotency-Key is remembered this long; a sent
    # outbox row is kept this long after its JetStream ack (an unsent row is never pruned).
    idempotency_ttl_s: float = field(default=IDEMPOTENCY_TTL_S, name="DOAI_IDEMPOTENCY_TTL_S")
    outbox_keep_s: float = field(default=86_400.0, name="DOAI_OUTBOX_KEEP_S")
    retention_every_s: float = field(default=60.0, name="DOAI_RETENTION_S")
    # What `GET /v1/node/config` answers: slots per node (default and overrides) and step timeouts.
    default_node_slots: int = field(default=20, name="DOAI_DEFAULT_SLOTS")
    node_slots: dict[str, int] = field(default_factory=dict, name="DOAI_NODE_SLOTS")  # node-1=10,node-2=30
    step_timeout_ms: int = field(default=DEFAULT_STEP_TIMEOUT_MS, name="DOAI_STEP_TIMEOUT_MS")
    upload_timeout_ms: int = field(default=DEFAULT_UPLOAD_TIMEOUT_MS, name="DOAI_UPLOAD_TIMEOUT_MS")
    # Local artifact store root (for `GET /v1/runs/{id}/artifacts` paths); None: use the stored URI only.
    artifact_dir: str | None = field(default=None, name="DOAI_ARTIFACT_DIR")
    # Supabase Storage, for signed artifact URLs (the service key is a secret: never logged).
    supabase_url: str | None = field(default=None, name="SUPABASE_URL")
    supabase_key: str | None = field(default=None, name="SUPABASE_SERVICE_KEY")
    supabase_bucket: str = field(default="artifacts", name="DOAI_SUPABASE_BUCKET")
    signed_url_ttl_s: int = field(default=3600, name="DOAI_SIGNED_URL_TTL_S")
    # Signs artifact download links (HMAC-SHA256). Unset: the key kept in fleet_settings (made at the first
    # start), shared by every backend and by `artifact_url()` in SQL (Grafana).
    artifact_url_key: str | None = field(default=None, name="DOAI_ARTIFACT_URL_KEY")
    # The API's address as operators reach it, for absolute download links (unset: the address the request
    # came to, e.g. http://127.0.0.1:8080).
    public_url: str | None = field(default=None, name="DOAI_PUBLIC_URL")
    # The command-signing seed (an nkey seed, 'SN…'), or a file holding it: the relay signs every
    # RunBroadcast and RunCancel with it; nodes verify with `command_public_key`. A secret: never logged.
    command_signing_seed: str = field(default="", name="DOAI_COMMAND_SIGNING_KEY")
    command_signing_key_file: Path | None = field(default=None, name="DOAI_COMMAND_SIGNING_KEY_FILE")
    # The artifact path template the nodes use (set the same on both): a run whose workflow uploads is refused
    # at creation when a param the template uses is missing or not a plain path segment.
    path_template: str = field(default=DEFAULT_PATH_TEMPLATE, name="DOAI_ARTIFACT_PATH_TEMPLATE")
    # At most this many node identities enrolled (not revoked): the shared secret lets anyone who holds it
    # add nodes, so a leaked secret cannot mint NATS identities without bound.
    max_nodes: int = field(default=1000, name="DOAI_MAX_NODES")
    # Failed authentications are logged as one line per interval, with their count.
    auth_log_interval_s: float = field(default=60.0, name="DOAI_AUTH_LOG_INTERVAL_S")
    # The NATS trust folder (`doai nats-auth init`): the account signing key that signs node
    # credentials at enrollment, the operator signing key and system user for revocations.
    nats_auth_dir: Path | None = field(default=None, name="DOAI_NATS_AUTH_DIR")
    # The backend's own NATS credentials; default: `backend.creds` in DOAI_NATS_AUTH_DIR.
    nats_creds: Path | None = field(default=None, name="DOAI_NATS_CREDS")
    # CA file that signed nats-server's TLS certificate (use a tls:// NATS_URL).
    nats_ca: Path | None = field(default=None, name="DOAI_NATS_CA")

    SECRETS: ClassVar[frozenset[str]] = frozenset({"api_tokens", "node_secret", "supabase_key",
                                                   "command_signing_seed", "artifact_url_key"})
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"supabase_key": ("SUPABASE_KEY",)}

    def __post_init__(self) -> None:
        self.api_tokens = [t.strip() for t in self.api_tokens if t.strip()]
        if not self.api_tokens:
            raise ConfigError("set DOAI_API_TOKEN (one or more comma-separated tokens)")
        if not 1.0 <= self.idempotency_ttl_s <= 365 * 86_400.0:
            raise ConfigError(f"DOAI_IDEMPOTENCY_TTL_S must be between 1 and 31536000, got {self.idempotency_ttl_s}")
        if not self.outbox_keep_s > 0:
            raise ConfigError(f"DOAI_OUTBOX_KEEP_S must be > 0, got {self.outbox_keep_s}")
        if not 0.1 <= self.retention_every_s <= 86_400.0:
            raise ConfigError(f"DOAI_RETENTION_S must be between 0.1 and 86400, got {self.retention_every_s}")
        if not 0.1 <= self.keeper_every_s <= 3600:
            raise ConfigError(f"DOAI_NATS_KEEPER_S must be between 0.1 and 3600, got {self.keeper_every_s}")
        for prefix in ("cmd", "evt"):
            for name in ("max_bytes", "max_msgs", "max_msg_size"):
                if getattr(self, f"{prefix}_{name}") < 1:
                    raise ConfigError(f"DOAI_{prefix.upper()}_{name.upper()} must be at least 1,"
                                      f" got {getattr(self, f'{prefix}_{name}')}")
            if getattr(self, f"{prefix}_max_msg_size") > getattr(self, f"{prefix}_max_bytes"):
                raise ConfigError(f"DOAI_{prefix.upper()}_MAX_MSG_SIZE must not exceed DOAI_{prefix.upper()}_MAX_BYTES")
        if not self.node_secret:
            raise ConfigError("set NODE_AGENT_SHARED_SECRET (the X-Node-Auth secret, at least 32 bytes)")
        if len(self.node_secret.encode()) < MIN_NODE_SECRET_BYTES:
            raise ConfigError(f"NODE_AGENT_SHARED_SECRET is too short: use at least {MIN_NODE_SECRET_BYTES} bytes"
                              " (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"DOAI_API_PORT (--port) must be between 0 and 65535, got {self.port}")
        for node, slots in self.node_slots.items():
            if slots < 1:
                raise ConfigError(f"DOAI_NODE_SLOTS: {node}={slots} is not node_id=slots with slots >= 1")
        if not 1 <= self.max_nodes <= 1_000_000:
            raise ConfigError(f"DOAI_MAX_NODES must be between 1 and 1000000, got {self.max_nodes}")
        if self.default_node_slots < 1:
            raise ConfigError(f"DOAI_DEFAULT_SLOTS must be at least 1, got {self.default_node_slots}")
        try:
            template_fields(self.path_template)
        except ArtifactPathError as exc:
            raise ConfigError(f"DOAI_ARTIFACT_PATH_TEMPLATE: {exc}") from None
        if self.nats_auth_dir is None:
            raise ConfigError("set DOAI_NATS_AUTH_DIR to the NATS trust folder (made by `doai nats-auth init`)")
        if self.nats_creds is None:
            self.nats_creds = self.nats_auth_dir / "backend.creds"
        self._load_signing_seed()

    def _load_signing_seed(self) -> None:
        """The backend does not start without a usable command-signing key: it would send unsigned commands."""
        path = self.command_signing_key_file
        if path is not None and self.command_signing_seed:
            raise ConfigError("set DOAI_COMMAND_SIGNING_KEY or DOAI_COMMAND_SIGNING_KEY_FILE, not both")
        if path is not None:
            try:
                self.command_signing_seed = Path(path).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"DOAI_COMMAND_SIGNING_KEY_FILE: cannot read {path}: {exc.strerror}") from None
        if not self.command_signing_seed.strip():
            raise ConfigError("set DOAI_COMMAND_SIGNING_KEY (an nkey seed; `doai keygen --out FILE` makes one) or "
                              "DOAI_COMMAND_SIGNING_KEY_FILE: the backend signs every command it sends to nodes")
        self.command_signer()

    def command_signer(self) -> Signer:
        try:
            return Signer(self.command_signing_seed)
        except SigningKeyError as exc:
            raise ConfigError(f"DOAI_COMMAND_SIGNING_KEY is unusable: {exc}") from None

    @property
    def command_public_key(self) -> str:
        """The public key nodes verify commands with (safe to show and to hand to nodes at enrollment)."""
        return self.command_signer().public_key

    def stream_limits(self) -> dict[str, StreamLimits]:
        return {
            CMD_STREAM: StreamLimits(self.cmd_max_bytes, self.cmd_max_msgs, self.cmd_max_msg_size),
            EVT_STREAM: StreamLimits(self.evt_max_bytes, self.evt_max_msgs, self.evt_max_msg_size),
        }

    def slots_for(self, node_id: str) -> int:
        return self.node_slots.get(node_id, self.default_node_slots)
