"""Settings of a store instance (and of the service built on it).

``StoreConfig`` is a pydantic-settings model: every field can also come from a
``STATESTORE_<FIELD>`` environment variable. ``STATESTORE_ETCD_ENDPOINTS`` is a
comma list, ``STATESTORE_STORAGE_OPTIONS`` a JSON object.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from statestore.errors import InvalidArgument

DEFAULT_ROOT = "/statestore/v1"
C = TypeVar("C", bound="StoreConfig")


class StoreConfig(BaseSettings):
    """Where the store keeps its metadata and blobs, and how it behaves."""

    model_config = SettingsConfigDict(
        env_prefix="STATESTORE_", extra="ignore", validate_default=True
    )

    etcd_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        description="etcd client endpoints, host:port (several for a cluster).",
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
    etcd_username: str | None = None
    etcd_password: str | None = None
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
        default=20.0,
        ge=0,
        description="How long a blob outlives its handle before deletion (>= lease_ttl: a "
        "reader whose lock silently expired may still be reading).",
    )
    orphan_min_age_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="An unreferenced blob younger than this is never swept (a live or "
        "just-committed write).",
    )
    lock_concurrency: int = Field(
        default=8, ge=1, description="Lock batches get_all_and_lock keeps in flight."
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


def load_config(cls: type[C] = StoreConfig, **overrides: Any) -> C:  # type: ignore[assignment]
    """Build a config from the environment plus overrides, raising
    :class:`InvalidArgument` (not a pydantic traceback) on bad settings."""
    from pydantic import ValidationError

    try:
        return cls(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise InvalidArgument(f"invalid statestore settings: {problems}") from None
