"""The handle: the small record in etcd that points at a state blob.

Its bytes in etcd are ``statestore.records``'s (``encode_handle`` /
``decode_handle``); this module holds the view users get and the checks on
their metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from statestore.errors import InvalidArgument, TooLarge

#: Deepest nesting of objects and lists in user metadata (``{"k": 1}`` is 1).
#: JSON parsers and encoders recurse once per level and Python's raise
#: RecursionError near 1,000; far below that, no checkpoint metadata needs
#: more than a few levels.
MAX_METADATA_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Handle:
    """An immutable view of one handle record.

    ``version`` is the etcd mod_revision of the record: it changes on every
    replace and is what ``replace(expected_version=...)`` compares.
    """

    name: str
    version: int
    size: int
    sha256: str
    created_at: datetime
    metadata: dict[str, Any]
    blob_url: str
    blob_id: str = ""
    request_id: str = ""
    writer: str = ""
    create_revision: int = field(default=0, compare=False)

    @property
    def blob_ref(self) -> str:
        """The id of the blob this handle names (its ``gc/`` key): ``blob_id``,
        or for records without one the last segment of ``blob_url``."""
        return self.blob_id or blob_id_of(self.blob_url)

    def to_json(self) -> dict[str, Any]:
        """The handle as rest-v1.md shows it (without ``locks``)."""
        return {
            "name": self.name,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at.isoformat(),
            "metadata": self.metadata,
        }


class PrefixRemoval(NamedTuple):
    """What a removal by name prefix did (``StateHandleStore.remove_prefix``,
    REST ``DELETE .../handles?prefix=``), names sorted. Unpacks as
    ``removed, kept``."""

    #: Names removed (also those found already gone).
    removed: list[str]
    #: Names kept because other sessions or instances hold locks on them (our
    #: own lock released): "locked"; with ``deferred=True`` their removal is
    #: pending and completes when the last lock goes: "pending".
    kept: list[str]


def blob_id_of(url: str) -> str:
    """The blob id at the end of a blob URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def metadata_too_deep(what: str = "metadata") -> InvalidArgument:
    """The error for ``what`` nested deeper than MAX_METADATA_DEPTH (also for a
    JSON text too deep to parse: catch ``RecursionError`` from ``json.loads``)."""
    return InvalidArgument(
        f"{what} is nested deeper than {MAX_METADATA_DEPTH} levels of objects and lists; flatten it"
    )


def _check_depth(value: Any, what: str) -> None:
    """Raise unless ``value`` nests at most MAX_METADATA_DEPTH containers.
    Iterative, so any depth (or a cycle) is refused without recursing."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        container, depth = pending.pop()
        if not isinstance(container, dict | list | tuple):
            continue
        if depth > MAX_METADATA_DEPTH:
            raise metadata_too_deep(what)
        values = container.values() if isinstance(container, dict) else container
        pending.extend((v, depth + 1) for v in values)


def encode_plain_json(value: Any, what: str, limit: int, *, ensure_ascii: bool = True) -> str:
    """``value`` as compact JSON, checked: nested at most MAX_METADATA_DEPTH
    levels (first: encoding and comparing recurse per level), plain JSON
    (it reads back equal: no tuples, non-string keys, NaN or infinities)
    and at most ``limit`` bytes of UTF-8. InvalidArgument (TooLarge for the
    size) names ``what``."""
    _check_depth(value, what)
    try:
        raw = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=ensure_ascii)
        size = len(raw.encode())  # a lone surrogate cannot be UTF-8 (ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} is not JSON-serialisable: {e}") from None
    if json.loads(raw) != value:
        raise InvalidArgument(
            f"{what} must be plain JSON: object keys must be strings and values must be "
            "str, int, float, bool, None, lists or objects (tuples and non-string keys would "
            "silently change)"
        )
    if size > limit:
        raise TooLarge(
            f"{what} is {size} bytes of JSON, over the limit of {limit}; "
            "keep large data in the state itself"
        )
    return raw


def encode_metadata(metadata: Any, limit: int) -> dict[str, Any]:
    """Validate user metadata: a JSON object of at most ``limit`` bytes,
    nested at most MAX_METADATA_DEPTH levels."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidArgument(
            f"metadata must be a JSON object (a dict), got {type(metadata).__name__}"
        )
    return dict(json.loads(encode_plain_json(metadata, "metadata", limit)))
