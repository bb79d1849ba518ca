"""Service settings: the store's settings plus the HTTP side, from ``STATESTORE_*``."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from statestore.config import StoreConfig
from statestore_api.session_registry import MAX_TTL, MIN_TTL

#: Head room for everything but X-Handle-Metadata: request line, auth, session and
#: client headers (a few hundred bytes in practice; a 512-byte name encodes to <= 1.5 KiB).
HEADER_ROOM = 16 * 1024


class ServiceSettings(StoreConfig):
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on.")
    workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes.")
    auth_tokens_file: Path | None = Field(
        default=None, description="JSON file of bearer tokens; auth is off without it."
    )
    max_state_bytes: int = Field(
        default=1 << 30, ge=0, description="Largest state one PUT may store (413 above)."
    )
    home: Path = Field(
        default=Path(".statestore"), description="Embedded default: where etcd and blobs live."
    )
    max_header_bytes: int | None = Field(
        default=None,
        ge=4096,
        description="Largest request head (request line and header fields) the service "
        "reads; larger -> 431. Default: max_metadata_bytes + 16 KiB (80 KiB), so the "
        "largest X-Handle-Metadata fits.",
    )
    max_header_count: int = Field(
        default=100, ge=16, le=10_000, description="Most header fields of one request (431)."
    )
    keep_alive_seconds: int = Field(
        default=75,
        ge=1,
        description="Idle keep-alive of client connections; keep it above any load "
        "balancer's idle timeout, or pooled clients race the server's close.",
    )
    shutdown_grace_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="On SIGTERM, how long requests still in flight may run before they are "
        "cancelled and the service stops (waiting watches and campaigns are answered at "
        "once). Keep it well under the session TTLs of the job managers it serves.",
    )
    max_session_ttl_seconds: int = Field(
        default=120,
        ge=MIN_TTL,
        le=MAX_TTL,
        description="Longest TTL a REST session may ask for (400 above). The GC grace "
        "period must be at least this long: the service refuses to start otherwise.",
    )
    maintenance: bool = Field(
        default=True, description="Run the reconciler, blob GC and compactor in this process."
    )
    gc_interval_seconds: float = Field(default=60.0, gt=0, description="Blob GC period.")
    compaction_interval_seconds: float = Field(
        default=300.0, gt=0, description="etcd compaction period (one per period in total)."
    )
    watch_buffer_bytes: int = Field(
        default=4 << 20,
        ge=0,
        description="Per watched namespace: bytes of recent events kept for long polls; "
        "polls older than the buffer read their gap from etcd.",
    )
    watch_idle_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A namespace's shared etcd watch stops after this long without a poll.",
    )
    max_watch_feeds: int = Field(
        default=1024,
        ge=1,
        description="Per process: namespaces watched at once (one etcd watch each). A poll "
        "that needs one more first stops the feed idle the longest; with none idle it is "
        "refused (503 unavailable, Retry-After).",
    )
    max_watch_polls: int = Field(
        default=10_000,
        ge=1,
        description="Per process: watch long polls held at once (about 18 KiB each); past "
        "it a poll is refused (503 unavailable, Retry-After).",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    log_json: bool = Field(default=True, description="One JSON object per log line.")

    @model_validator(mode="after")
    def _check_header_limit(self) -> Self:
        if self.max_header_bytes is not None and self.max_header_bytes < self._metadata_head:
            raise ValueError(
                f"max_header_bytes ({self.max_header_bytes}) leaves no room for an "
                f"X-Handle-Metadata of max_metadata_bytes ({self.max_metadata_bytes}): set it "
                f"to at least {self._metadata_head}, or leave it unset"
            )
        return self

    @property
    def _metadata_head(self) -> int:
        """The head of a request carrying the largest metadata, with room for the rest."""
        return self.max_metadata_bytes + HEADER_ROOM

    @property
    def header_limit(self) -> int:
        """The request head limit in force (``max_header_bytes`` or its default)."""
        return self.max_header_bytes if self.max_header_bytes is not None else self._metadata_head

    def _longest_reader_lease(self) -> tuple[int, str]:
        """REST sessions hold locks too, on leases of up to
        ``max_session_ttl_seconds``; SDK instances on ``lease_ttl``."""
        return max(
            (self.max_session_ttl_seconds, "max_session_ttl_seconds"),
            super()._longest_reader_lease(),
        )
