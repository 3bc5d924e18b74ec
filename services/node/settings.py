"""Node agent configuration (flags of `doai node`, or environment variables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contracts.ids import is_node_id
from runtime.signing import SigningKeyError, Verifier


class NodeConfigError(RuntimeError):
    """A configuration the node agent refuses to start with (one line: what to set)."""

DEFAULT_PATH_TEMPLATE = "{youtubeVideoId}/{node_id}/{device_serial}/{run_id}/{timestamp}.png"


@dataclass
class NodeSettings:
    node_id: str
    nats_url: str
    vendor_url: str = "ws://127.0.0.1:22222/"
    slots: int = 20
    # Local state: the journal (SQLite) and the screenshot spool live here.
    state_dir: Path = Path("var/node")
    # The local artifact store's root (the embedded default store).
    artifact_dir: Path = Path("var/artifacts")
    path_template: str = DEFAULT_PATH_TEMPLATE
    vendor_pool_size: int | None = None  # default: one connection per slot
    vendor_request_timeout_s: float = 120.0
    # How often the vendor's device list is polled and a heartbeat is sent.
    inventory_interval_s: float = 5.0
    # How long one `list` poll may take (connect retries included) before it counts as "unavailable".
    inventory_timeout_s: float = 10.0
    # Queued jobs of a device that stays offline this long (while they wait) end `skipped`.
    offline_grace_s: float = 300.0
    # A job found `running` after a crash is re-queued (attempt + 1) while attempt < max_attempts, else failed.
    max_attempts: int = 2
    # Vendor reconnect backoff: a request that cannot connect retries from base doubling to max, within its timeout.
    vendor_backoff_base_s: float = 1.0
    vendor_backoff_max_s: float = 30.0
    # Which device driver: "vendor" (the WebSocket program) or "adb" (an adb server at adb_host:adb_port).
    driver: str = "vendor"
    adb_host: str = "127.0.0.1"
    adb_port: int = 5037
    # Which artifact store: "local" (artifact_dir) or "supabase" (Supabase Storage through the official client).
    store: str = "local"
    supabase_url: str = ""
    supabase_key: str = field(default="", repr=False)  # a secret: never logged or shown
    supabase_bucket: str = "artifacts"
    # The backend's command-signing public key (an nkey starting with 'N'): commands that do not
    # verify with it are refused. Required to start (DOAI_COMMAND_PUBLIC_KEY; enrollment fills it).
    command_public_key: str = ""

    def __post_init__(self) -> None:
        if not is_node_id(self.node_id):
            raise ValueError(
                f"node id {self.node_id!r} is invalid: use letters, digits, '-' and '_' (max 64)"
            )
        if not 1 <= self.slots <= 1000:
            raise ValueError(f"slots must be between 1 and 1000, got {self.slots}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.driver not in ("vendor", "adb"):
            raise ValueError(f"driver must be 'vendor' or 'adb', got {self.driver!r}")
        if self.store not in ("local", "supabase"):
            raise ValueError(f"artifact store must be 'local' or 'supabase', got {self.store!r}")
        if self.store == "supabase" and not (self.supabase_url and self.supabase_key and self.supabase_bucket):
            raise ValueError("the supabase store needs SUPABASE_URL, SUPABASE_SERVICE_KEY and DOAI_SUPABASE_BUCKET")
        if self.offline_grace_s < 0:
            raise ValueError(f"offline_grace_s must not be negative, got {self.offline_grace_s}")

    @property
    def journal_path(self) -> Path:
        return self.state_dir / f"{self.node_id}.journal.sqlite"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool" / self.node_id

    def command_verifier(self) -> Verifier:
        """The verifier of the backend's command signatures, or `NodeConfigError` when none is configured.

        A node without it would have to run unsigned commands: it does not start instead.
        """
        if not self.command_public_key.strip():
            raise NodeConfigError(
                "no command public key: set DOAI_COMMAND_PUBLIC_KEY to the backend's command-signing public key"
                " (enrollment provides it); without it the node would run unsigned commands"
            )
        try:
            return Verifier(self.command_public_key)
        except SigningKeyError as exc:
            raise NodeConfigError(f"DOAI_COMMAND_PUBLIC_KEY is unusable: {exc}") from None
