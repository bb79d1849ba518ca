"""Every error the store raises.

All derive from :class:`StateStoreError`. Each carries a short ``kind`` word
that the REST layer uses as the problem ``type`` (rest-v1.md), and a message
that says what was asked, what was found and what to do.
"""

from __future__ import annotations

from typing import Any


class StateStoreError(Exception):
    """Base of every statestore error."""

    kind: str = "error"
    #: HTTP status of this error over REST (the service's own table,
    #: statestore_api.problems.STATUS, decides what it answers).
    http_status: int = 503

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        #: Extra machine-readable fields (e.g. ``holders``), also sent over HTTP.
        self.details: dict[str, Any] = details


class InvalidArgument(StateStoreError):
    """Bad input: a name, namespace, metadata or setting that is refused before
    anything is written."""

    kind = "invalid-argument"
    http_status = 400


class AlreadyExists(StateStoreError):
    """``add_and_lock`` of a name that already has a handle."""

    kind = "already-exists"
    http_status = 409


class NotFound(StateStoreError):
    """The named handle does not exist (or is pending removal, for locking)."""

    kind = "not-found"
    http_status = 404


class VersionConflict(StateStoreError):
    """``replace`` with an ``expected_version`` that is no longer current."""

    kind = "version-conflict"
    http_status = 412


class Locked(StateStoreError):
    """The handle is locked by other instances; ``holders`` lists them."""

    kind = "locked"
    http_status = 409


class Fenced(StateStoreError):
    """A fenced write whose leadership compare failed: nothing changed."""

    kind = "fenced"
    http_status = 409


class NotLeader(StateStoreError):
    """Leadership is held by someone else (or could not be won in time)."""

    kind = "not-leader"
    http_status = 409


class SessionExpired(StateStoreError):
    """The instance's lease (session) is gone: its locks went with it."""

    kind = "session-expired"
    http_status = 410


class IntegrityError(StateStoreError):
    """A blob's bytes do not match the SHA-256 (or size) its handle records."""

    kind = "integrity"
    http_status = 400


class OutsideBlobRoot(IntegrityError):
    """A blob path that does not lie strictly under the blob root (a record or
    gc entry naming a URL elsewhere, a path climbing with ``..``, a symlink
    in the blob directory pointing out of it): refused before the blob store
    is touched. Not the caller's fault: 502 over HTTP."""

    http_status = 502


class TooLarge(InvalidArgument):
    """State or metadata over a configured size limit."""

    kind = "too-large"
    http_status = 413


class PossibleInconsistentState(StateStoreError):
    """A write whose outcome could not be resolved (etcd answered neither yes
    nor no, and re-reading could not tell). The blob is kept; the GC resolves
    it once the outcome is known."""

    kind = "possible-inconsistent-state"
    http_status = 503


class Compacted(StateStoreError):
    """A read or watch asked for history etcd has compacted away.

    ``compact_revision`` is etcd's compaction point, the oldest revision it
    still keeps, when it says (watches; 0 for reads): re-read at the current
    revision and go on from there; a watcher re-lists (one snapshot at a
    fresh revision) and watches again from the listing's revision. Raised by
    the etcd layer, and by the REST client for a 410 ``compacted``."""

    kind = "compacted"
    http_status = 410

    def __init__(self, message: str, compact_revision: int = 0, **details: Any) -> None:
        super().__init__(message, compact_revision=compact_revision, **details)

    @property
    def compact_revision(self) -> int:
        # Read from ``details``: the REST client fills them from the problem body.
        return int(self.details.get("compact_revision") or 0)


class Unavailable(StateStoreError):
    """etcd or the blob store did not answer (or refused for a reason outside
    the caller's control, such as the NOSPACE alarm)."""

    kind = "unavailable"
    http_status = 503


__all__ = [
    "AlreadyExists",
    "Compacted",
    "Fenced",
    "IntegrityError",
    "InvalidArgument",
    "Locked",
    "NotFound",
    "NotLeader",
    "OutsideBlobRoot",
    "PossibleInconsistentState",
    "SessionExpired",
    "StateStoreError",
    "TooLarge",
    "Unavailable",
    "VersionConflict",
]
