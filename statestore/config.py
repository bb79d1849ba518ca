"""Settings of a store instance (and of the service built on it).

``StoreConfig`` is a pydantic-settings model: every field can also come from a
``STATESTORE_<FIELD>`` environment variable. ``STATESTORE_ETCD_ENDPOINTS`` is a
comma list, ``STATESTORE_STORAGE_OPTIONS`` a JSON object.

etcd over TLS: give ``https://host:port`` endpoints and/or ``etcd_ca_file``
(the CA that signed etcd's server certificate), plus ``etcd_cert_file`` and
``etcd_key_file`` (a client certificate, for etcd's ``--client-cert-auth``).
``etcd_username``/``etcd_password`` enable etcd's own authentication, over
TLS or not. A TLS setting that would have no effect (``etcd_tls_server_name``
with TLS off, TLS files with ``http://`` endpoints) is refused, never
ignored: the connection would otherwise be plaintext, credentials included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from statestore.errors import InvalidArgument

DEFAULT_ROOT = "/statestore/v1"
#: The orphan sweep's minimum age is at least this many times
#: ``intent_after_seconds`` (protocol.md s5: "by a wide margin"). A writer's
#: intent must be confirmed within ``INTENT_DEADLINE_FACTOR`` times it, so
#: the rest is margin for the rates of the clocks involved (the writer's
#: monotonic clock, the blob store's, the sweeper's).
ORPHAN_AGE_FACTOR = 10
INTENT_DEADLINE_FACTOR = 5
C = TypeVar("C", bound="StoreConfig")


class StoreConfig(BaseSettings):
    """Where the store keeps its metadata and blobs, and how it behaves."""

    model_config = SettingsConfigDict(
        env_prefix="STATESTORE_", extra="ignore", validate_default=True
    )

    etcd_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        description="etcd client endpoints, host:port (several for a cluster); "
        "https://host:port means TLS.",
    )
    blob_root: str = Field(
        default="file://./.statestore/blobs",
        description="fsspec URL under which state blobs are written.",
    )
    namespace: str = Field(default="default", description="Namespace (one per job).")
    lease_ttl: int = Field(default=10, ge=2, le=3600, description="Lease TTL, seconds.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the fsspec filesystem."
    )
    root: str = Field(default=DEFAULT_ROOT, description="etcd key prefix of all keys.")
    max_txn_ops: int = Field(
        default=128, ge=2, description="Largest txn the store builds (etcd --max-txn-ops)."
    )
    etcd_timeout: float = Field(
        default=5.0, gt=0, description="Deadline of one etcd request, seconds."
    )
    etcd_username: str | None = Field(
        default=None, description="etcd user (etcd auth enabled); needs etcd_password."
    )
    etcd_password: str | None = Field(default=None, description="Password of etcd_username.")
    etcd_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that signed etcd's server certificate; setting it "
        "turns TLS on (default roots of gRPC when TLS is on without it).",
    )
    etcd_cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate for etcd --client-cert-auth (with etcd_key_file).",
    )
    etcd_key_file: Path | None = Field(
        default=None, description="PEM private key of etcd_cert_file."
    )
    etcd_tls_server_name: str | None = Field(
        default=None,
        description="Name to check etcd's server certificate against instead of the "
        "endpoint host (gRPC ssl_target_name_override).",
    )
    group_commit: bool = Field(
        default=True,
        description="Send concurrent write transactions of this process to etcd as nested "
        "transactions of one request (each keeps its own compares and outcome): fewer "
        "requests under load, no wait for a lone caller; false sends one request per "
        'transaction. See docs/design.md, "Group commit".',
    )
    etcd_page_size: int = Field(
        default=5000,
        ge=1,
        le=100_000,
        description="Keys per etcd range request when listing (a listing is read in pages "
        "at one revision, again at a fresh one if etcd compacts under it).",
    )
    max_metadata_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        le=1024 * 1024,
        description="Largest user metadata (JSON-encoded) a handle may carry.",
    )
    blob_chunk_size: int = Field(
        default=4 * 1024 * 1024, ge=64 * 1024, description="Streaming chunk size."
    )
    gc_grace_seconds: float = Field(
        default=120.0,
        ge=0,
        description="How long a blob outlives its handle before deletion, on the GC's own "
        "clock. At least the longest lease a reader may hold (lease_ttl; in the service "
        "also max_session_ttl_seconds): a reader whose lock silently expired may still be "
        "reading. Shorter is refused unless allow_short_gc_grace.",
    )
    allow_short_gc_grace: bool = Field(
        default=False,
        description="Accept a gc_grace_seconds shorter than the longest reader lease (tests "
        "and drills only): a reader whose lock silently expired can then have its blob "
        "deleted while it still reads.",
    )
    orphan_min_age_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="An unreferenced blob younger than this is never swept (a live or "
        "just-committed write).",
    )
    intent_after_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="An add or replace whose upload has run this long puts its upload intent "
        "then; a quicker one commits without one, proving its writer's liveness key in the "
        "commit instead (one etcd round trip per add). 0: put the intent before the first "
        "byte. orphan_min_age_seconds must be at least 10 times this, and at least twice "
        "this plus lease_ttl.",
    )
    lock_concurrency: int = Field(
        default=8, ge=1, description="Lock batches get_all_and_lock keeps in flight."
    )
    idempotency_window_seconds: float = Field(
        default=600.0,
        ge=1,
        le=7 * 24 * 3600,
        description="How long the answer of an operation sent with an idempotency key is "
        "kept for retries with that key: at least this long, at most 1.5 times it. A retry "
        "after that performs the operation again.",
    )

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("etcd_endpoints")
    @classmethod
    def _check_endpoints(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one etcd endpoint (host:port) is required")
        return v

    @field_validator("etcd_ca_file", "etcd_cert_file", "etcd_key_file")
    @classmethod
    def _check_tls_file(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None or str(v) == "":
            return None
        v = v.expanduser()
        if not v.is_file():
            raise ValueError(f"{info.field_name} {str(v)!r} does not exist or is not a file")
        try:
            with v.open("rb"):
                pass
        except OSError as e:
            raise ValueError(f"{info.field_name} {str(v)!r} is not readable: {e}") from None
        return v

    @field_validator("etcd_tls_server_name")
    @classmethod
    def _blank_is_unset(cls, v: str | None) -> str | None:
        return (v.strip() or None) if v is not None else None

    @model_validator(mode="after")
    def _check_etcd_security(self) -> Self:
        if (self.etcd_cert_file is None) != (self.etcd_key_file is None):
            raise ValueError(
                "etcd_cert_file and etcd_key_file go together: give both (a client "
                "certificate and its key) or neither"
            )
        schemes = {ep.split("://", 1)[0].lower() for ep in self.etcd_endpoints if "://" in ep}
        if schemes - {"http", "https"}:
            raise ValueError(f"etcd endpoints must be host:port, http:// or https:// ({schemes})")
        if schemes == {"http", "https"}:
            raise ValueError("etcd endpoints mix http:// and https://: use one scheme")
        files = (self.etcd_ca_file, self.etcd_cert_file, self.etcd_key_file)
        if "http" in schemes and any(f is not None for f in files):
            raise ValueError(
                "etcd TLS files are set but the endpoints say http://: use https:// "
                "endpoints (or host:port) with TLS"
            )
        if self.etcd_tls_server_name is not None and not self.etcd_tls:
            where = "http://" if "http" in schemes else "host:port"
            raise ValueError(
                f"etcd_tls_server_name is set but TLS to etcd is off (the endpoints are "
                f"{where} and no etcd_ca_file is set), so it would be ignored and etcd "
                "reached in plaintext: set etcd_ca_file (the CA of etcd's server "
                "certificate) or use https:// endpoints, or unset etcd_tls_server_name"
            )
        if self.etcd_password is not None and self.etcd_username is None:
            raise ValueError("etcd_password is set without etcd_username")
        return self

    def _longest_reader_lease(self) -> tuple[int, str]:
        """The longest lease a reader may hold, and the setting that bounds it:
        an SDK instance's locks live on its lease (protocol.md s4)."""
        return self.lease_ttl, "lease_ttl"

    @model_validator(mode="after")
    def _check_gc_grace(self) -> Self:
        """protocol.md s4/s5: the grace period covers the longest lease a reader
        may hold; refuse a shorter one (start-up fails with this message)."""
        longest, setting = self._longest_reader_lease()
        if self.gc_grace_seconds < longest and not self.allow_short_gc_grace:
            raise ValueError(
                f"gc_grace_seconds ({self.gc_grace_seconds:g} s) is shorter than {setting} "
                f"({longest} s): a reader whose lock silently expired could still be reading "
                "a blob the GC deletes (protocol.md s4/s5). Set STATESTORE_GC_GRACE_SECONDS to "
                f"at least {longest}, or lower STATESTORE_{setting.upper()}"
            )
        return self

    @model_validator(mode="after")
    def _check_orphan_age(self) -> Self:
        """protocol.md s5: the orphan sweep's minimum age exceeds
        ``intent_after_seconds`` by a wide margin. A blob with no intent is
        at most ``intent_after`` old on its writer's clock when its commit is
        sent, and that commit lands only while the writer's liveness lease
        lives (at most ``lease_ttl`` after a pause begins, twice that across
        an etcd leader change, which renews leases): the sweep must wait
        longer than both (docs/design.md, "Deferred upload intents")."""
        after = self.intent_after_seconds
        if after <= 0:
            return self
        least = max(ORPHAN_AGE_FACTOR * after, 2 * (after + self.lease_ttl))
        if self.orphan_min_age_seconds < least:
            raise ValueError(
                f"orphan_min_age_seconds ({self.orphan_min_age_seconds:g} s) is below "
                f"{least:g} s, the least that intent_after_seconds ({after:g} s) and lease_ttl "
                f"({self.lease_ttl} s) allow: it must be at least {ORPHAN_AGE_FACTOR} x "
                "intent_after_seconds and 2 x (intent_after_seconds + lease_ttl), or the sweep "
                "could take the blob of a live upload that has not put its intent yet "
                "(protocol.md s5). Raise STATESTORE_ORPHAN_MIN_AGE_SECONDS, lower "
                "STATESTORE_INTENT_AFTER_SECONDS, or set it to 0 (intent before every upload)"
            )
        return self

    @property
    def etcd_tls(self) -> bool:
        """Whether etcd is reached over TLS (https endpoints or any TLS file set)."""
        return etcd_uses_tls(
            self.etcd_endpoints, self.etcd_ca_file, self.etcd_cert_file, self.etcd_key_file
        )

    @field_validator("root")
    @classmethod
    def _check_root(cls, v: str) -> str:
        v = v.rstrip("/")
        if not v.startswith("/"):
            raise ValueError("root must start with '/'")
        return v

    @field_validator("blob_root")
    @classmethod
    def _check_blob_root(cls, v: str) -> str:
        if not v:
            raise ValueError("blob_root must be an fsspec URL such as file://, s3://")
        return v.rstrip("/")


def etcd_uses_tls(endpoints: list[str], *files: Path | str | None) -> bool:
    """TLS is on when an endpoint is ``https://`` or any TLS file is given."""
    return any(ep.strip().lower().startswith("https://") for ep in endpoints) or any(
        f is not None for f in files
    )


def load_config(cls: type[C] = StoreConfig, **overrides: Any) -> C:  # type: ignore[assignment]
    """Build a config from the environment plus overrides, raising
    :class:`InvalidArgument` (not a pydantic traceback) on bad settings."""
    from pydantic import ValidationError

    try:
        return cls(**overrides)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise InvalidArgument(f"invalid statestore settings: {problems}") from None


def _describe(err: Any) -> str:
    """One pydantic error as ``setting: message`` (just the message for a
    check across settings, without pydantic's "Value error, " prefix)."""
    msg = str(err["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {msg}" if where else msg
