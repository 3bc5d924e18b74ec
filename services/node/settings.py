"""Node agent configuration (flags of `doai node`, or environment variables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contracts.ids import is_node_id

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
    # WebSocket connections to the vendor program, each strictly one request at a time (no request id).
    # Default: one per slot, so devices never wait for each other's requests; if `doai vendor probe`
    # finds the program accepts fewer connections, set what it recommends (docs/vendor.md).
    vendor_pool_size: int | None = None
    # Keep-alive ping on each idle vendor connection (None: off); the probe checks the program answers pings.
    vendor_ping_interval_s: float | None = 20.0
    # How long a screenshot may take to appear (and finish being written) after the program answered.
    vendor_screenshot_wait_s: float = 10.0
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
        if self.vendor_pool_size is not None and not 1 <= self.vendor_pool_size <= 1000:
            raise ValueError(f"vendor connections must be between 1 and 1000, got {self.vendor_pool_size}")
        if self.vendor_ping_interval_s is not None and self.vendor_ping_interval_s <= 0:
            self.vendor_ping_interval_s = None  # 0 turns the keep-alive ping off
        if self.vendor_screenshot_wait_s <= 0:
            raise ValueError(f"vendor screenshot wait must be positive, got {self.vendor_screenshot_wait_s}")
        if self.offline_grace_s < 0:
            raise ValueError(f"offline_grace_s must not be negative, got {self.offline_grace_s}")

    @property
    def journal_path(self) -> Path:
        return self.state_dir / f"{self.node_id}.journal.sqlite"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool" / self.node_id
