"""Every record statestore keeps in etcd: one encoder and one decoder per format.

``statestore.keys`` names the keys of protocol.md section 2; this module owns
what they hold::

    <ns>/handles/<name>             compact JSON                encode_handle, decode_handle
    <ns>/handles/<name>/locks/<id>  holder's instance id        encode_holder, decode_holder
    <ns>/leader/<id>                candidate's instance id     encode_holder, decode_holder
    <ns>/leader-info/<key>          compact JSON                LeaderInfo
    <ns>/removals/<name>            compact JSON                RemovalMarker
    <ns>/gc/<blob-id>               compact JSON                GcEntry
    <ns>/uploads/<blob-id>          compact JSON                UploadIntent
    <ns>/counters/<name>            b"<next value> <write id>"  encode_counter, decode_counter
    <ns>/idempotency/<id>/<key>     compact JSON                IdempotencyRecord
    <root>/_compactor               a revision, in decimal      encode_/decode_compactor_revision
    <root>/_sessions/<session-id>   JSON, json.dumps's spacing  SessionRecord
    <root>/_live/<writer-id>        compact JSON                LivenessRecord

(``<root>/_maintenance/leader/<id>`` holds a candidate's instance id, as
``leader/``.) These bytes are a wire format shared by every statestore
version that runs against one etcd (SDK processes, service replicas,
``statestore gc``): a change is a protocol change. ``tests/test_records.py``
pins the exact bytes of each.

Decoders are as lenient as the readers they replaced: they require only the
fields a reader uses, convert numbers (``int``/``float``) rather than check
their JSON type, and ignore fields they do not know, so a record written by
an older or newer statestore still reads.

A value a decoder cannot read (not JSON, not an object, a required field
missing or of a type that does not convert) raises :class:`MalformedRecord`:
something other than statestore wrote it, or it is corrupt. What that means
is the caller's call: the store raises ``IntegrityError`` for a handle
record; the GC leaves an unreadable gc entry in place and skips the orphan
sweep of a namespace with an unreadable handle record (it cannot tell which
blob such a record names); elsewhere (sessions, counters, elections) it is an
unexpected error.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Self, TypeVar

from statestore.handle import Handle, blob_id_of

#: ``format`` of the handle records this version writes.
HANDLE_FORMAT = 1

_T = TypeVar("_T")


class MalformedRecord(ValueError):
    """A value in etcd that is not the record its key should hold.

    ``record`` says which format was expected ("a handle record", ...),
    ``reason`` what was wrong with it (the underlying parse error)."""

    def __init__(self, record: str, reason: object) -> None:
        super().__init__(
            f"{record} in etcd is unreadable ({reason}): it was written by something other "
            "than statestore or is corrupt; inspect it with etcdctl"
        )
        self.record = record
        self.reason = str(reason)


#: ``json.dumps`` separators of the store's records: no spaces.
_COMPACT = (",", ":")


def _read_json(value: bytes, record: str, read: Callable[[dict[str, Any]], _T]) -> _T:
    """``read`` applied to ``value`` parsed as one JSON object; any failure
    (not JSON, not an object, a field missing or not convertible) raises
    MalformedRecord naming ``record``."""
    try:
        fields = json.loads(value)
        if not isinstance(fields, dict):  # valid JSON, but no record (an array, null, ...)
            raise TypeError(f"expected a JSON object, got {type(fields).__name__}")
        return read(fields)
    except (ValueError, KeyError, TypeError) as e:
        raise MalformedRecord(record, e) from None


class _JsonRecord:
    """A record stored as one JSON object whose keys are the dataclass's
    fields, in their order. A subclass says how to read one back
    (``_from_json``: required fields indexed, optional ones with ``get``)."""

    __slots__ = ()
    #: What the record is, for MalformedRecord ("a gc entry").
    _WHAT: ClassVar[str]
    #: The JSON spacing: compact unless the format has always had another.
    _SEPARATORS: ClassVar[tuple[str, str]] = _COMPACT

    def encode(self) -> bytes:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.dumps(fields, separators=self._SEPARATORS).encode()

    @classmethod
    def decode(cls, value: bytes) -> Self:
        return _read_json(value, cls._WHAT, cls._from_json)

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> Self:
        raise NotImplementedError


# -- handle record: <ns>/handles/<name> ---------------------------------------------

_HANDLE = "a handle record"


def encode_handle(
    *,
    name: str,
    blob_url: str,
    blob_id: str,
    size: int,
    sha256: str,
    metadata: dict[str, Any],
    request_id: str,
    writer: str,
    created_at: datetime | None = None,
) -> bytes:
    """The handle record (``version`` is not stored: it is the key's
    mod_revision). ``created_at`` defaults to now, in UTC."""
    return json.dumps(
        {
            "format": HANDLE_FORMAT,
            "name": name,
            "blob_url": blob_url,
            "blob_id": blob_id,
            "size": size,
            "sha256": sha256,
            "created_at": (created_at or datetime.now(UTC)).isoformat(),
            "request_id": request_id,
            "writer": writer,
            "metadata": metadata,
        },
        separators=_COMPACT,
    ).encode()


def decode_handle(value: bytes, version: int, create_revision: int = 0) -> Handle:
    """The handle a record holds, at ``version`` (the key's mod_revision).

    Required: name, size, sha256, created_at, blob_url. A record without
    ``blob_id`` names its blob by the last segment of ``blob_url``."""
    return _read_json(value, _HANDLE, lambda rec: _handle_of(rec, version, create_revision))


def _handle_of(rec: dict[str, Any], version: int, create_revision: int) -> Handle:
    """The handle of a handle record's parsed fields (``decode_handle``);
    raises KeyError/TypeError/ValueError for a field missing or unreadable."""
    return Handle(
        name=rec["name"],
        version=version,
        size=int(rec["size"]),
        sha256=rec["sha256"],
        created_at=datetime.fromisoformat(rec["created_at"]),
        metadata=rec.get("metadata") or {},
        blob_url=rec["blob_url"],
        blob_id=rec.get("blob_id", ""),
        request_id=rec.get("request_id", ""),
        writer=rec.get("writer", ""),
        create_revision=create_revision,
    )


def decode_handle_blob_ref(value: bytes) -> str:
    """Only the blob a handle record names (``Handle.blob_ref``: ``blob_id``,
    or the last segment of ``blob_url``). The orphan sweep reads this much
    and no more, so a record whose other fields do not read still keeps its
    blob from being swept."""
    return _read_json(
        value, _HANDLE, lambda rec: str(rec.get("blob_id") or blob_id_of(str(rec["blob_url"])))
    )


# -- lock and leader keys: <ns>/handles/<name>/locks/<id>, <ns>/leader/<id> --------


def encode_holder(instance_id: str) -> bytes:
    """The value of a lock key and of an election key: the instance id of
    the holder (candidate), as UTF-8."""
    return instance_id.encode()


def decode_holder(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        raise MalformedRecord("a lock or leader key's value", e) from None


# -- leader info: <ns>/leader-info/<key> ------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaderInfo(_JsonRecord):
    """One entry the leader published (e.g. its address for followers).

    ``token`` is the fencing token of the leadership that wrote it. The key
    hangs on that leader's lease and is written with the leadership compare,
    so it goes in the same revision as the leadership; readers still show
    an entry only beside the leadership whose token it carries, so no bug
    elsewhere can pair one leader's token with another's info."""

    _WHAT: ClassVar[str] = "a leader info entry"

    token: int
    value: Any

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> LeaderInfo:
        return cls(token=int(rec["token"]), value=rec["value"])


# -- removal marker: <ns>/removals/<name> ------------------------------------------


@dataclass(frozen=True, slots=True)
class RemovalMarker(_JsonRecord):
    """A removal of a still-locked handle, to complete when its last lock
    goes. The key's existence makes the handle unlockable; ``version`` says
    which handle it removes (``applies_to``); the rest tells an operator who
    asked and when."""

    _WHAT = "a removal marker"

    name: str
    #: Unix time of the request, on the requester's clock.
    requested_at: float
    #: Instance id of the requester.
    by: str
    #: The handle's version (mod_revision) the removal was decided on. 0 in
    #: markers of statestore versions that did not record it: those apply to
    #: whatever handle is there, as they always did.
    version: int = 0

    def applies_to(self, handle_version: int) -> bool:
        """Whether this marker removes the handle at ``handle_version``."""
        return self.version in (0, handle_version)

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> RemovalMarker:
        return cls(
            str(rec["name"]),
            float(rec["requested_at"]),
            str(rec["by"]),
            int(rec.get("version", 0)),
        )


# -- gc entry: <ns>/gc/<blob-id> ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcEntry(_JsonRecord):
    """A blob to delete once ``queued_at`` + the grace period has passed,
    written in the txn that made the blob unreferenced. Reading one needs
    only ``blob_url`` and ``queued_at``, what the GC acts on."""

    _WHAT = "a gc entry"

    blob_url: str
    #: Name of the handle that named the blob (for operators).
    handle: str
    #: Why it was queued: "replaced" or "removed".
    reason: str
    #: Unix time the entry was queued, on the queuing instance's clock.
    queued_at: float
    #: Instance id that queued it.
    by: str

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> GcEntry:
        return cls(
            blob_url=str(rec["blob_url"]),
            handle=str(rec.get("handle", "")),
            reason=str(rec.get("reason", "")),
            queued_at=float(rec["queued_at"]),
            by=str(rec.get("by", "")),
        )


# -- upload intent: <ns>/uploads/<blob-id> --------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadIntent(_JsonRecord):
    """A live upload, on the writer's lease: its blob is not an orphan while
    the key exists. Only the key's existence is acted on."""

    _WHAT = "an upload intent"

    blob_url: str
    #: Unix time the upload started, on the writer's clock.
    started_at: float
    #: Instance id of the writer.
    writer: str

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> UploadIntent:
        return cls(str(rec["blob_url"]), float(rec["started_at"]), str(rec["writer"]))


# -- counter: <ns>/counters/<name> ----------------------------------------------------


def encode_counter(next_value: int, write_id: str) -> bytes:
    """The value the next increment hands out, a space, and the id of the
    write that set it (unique per write: it tells an increment whose answer
    was lost whether it landed)."""
    return f"{next_value} {write_id}".encode()


def decode_counter(value: bytes) -> int:
    """The next value. The write id is compared as raw bytes, never read."""
    try:
        return int(value.split(b" ", 1)[0])
    except ValueError as e:
        raise MalformedRecord("a counter value", e) from None


# -- idempotency record: <ns>/idempotency/<owner-id>/<key> -----------------------------

#: The operations an idempotency key may be sent with, and the HTTP status of
#: their answer (rest-v1.md): what a retry with the key answers again.
IDEMPOTENT_OPS: dict[str, int] = {"add": 201, "replace": 200, "checkpoint": 201, "increment": 200}


@dataclass(frozen=True, slots=True)
class IdempotencyRecord(_JsonRecord):
    """The answer of an operation sent with an idempotency key, written in the
    operation's own txn (on the backend's idempotency lease), so that a retry
    with the same key answers it again instead of applying the operation twice.

    ``op`` (one of ``IDEMPOTENT_OPS``, which also gives the answer's HTTP
    status) and ``target`` (the handle or counter name) say what the key was
    used for: the same key sent with another operation or target is refused.
    The answer itself:

    - add, replace, checkpoint: ``handle``, the handle record's fields as
      ``encode_handle`` wrote them. The handle's version is not stored: it is
      the revision of the txn, which is the record key's create_revision.
      ``handle_created`` is the handle's own create_revision for a replace
      (0: the handle was created by this txn, at its version);
    - checkpoint: ``subsumed``, the ids subsumption removed, filled in by a
      second put once known (``None`` until then: a retry that finds it
      missing subsumes again);
    - increment: ``value``, the counter value handed out.
    """

    _WHAT = "an idempotency record"

    op: str
    #: The handle or counter name the key was used for.
    target: str
    #: Unix time of the first attempt, on the writer's clock (for operators).
    created_at: float
    handle: dict[str, Any] | None = None
    handle_created: int = 0
    value: int | None = None
    subsumed: list[int] | None = None

    def handle_at(self, version: int) -> Handle:
        """The handle answered, at ``version`` (the record key's create_revision).
        Raises MalformedRecord when the record holds none (another op's)."""
        if self.handle is None:
            raise MalformedRecord(self._WHAT, f"a {self.op!r} record holds no handle")
        try:
            return _handle_of(self.handle, version, self.handle_created or version)
        except (ValueError, KeyError, TypeError) as e:
            raise MalformedRecord(self._WHAT, e) from None

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> IdempotencyRecord:
        handle, value, subsumed = rec.get("handle"), rec.get("value"), rec.get("subsumed")
        if handle is not None and not isinstance(handle, dict):
            raise TypeError(f"handle must be an object, got {type(handle).__name__}")
        return cls(
            op=str(rec["op"]),
            target=str(rec["target"]),
            created_at=float(rec.get("created_at", 0.0)),
            handle=handle,
            handle_created=int(rec.get("handle_created", 0)),
            value=None if value is None else int(value),
            subsumed=None if subsumed is None else [int(i) for i in subsumed],
        )


# -- compactor: <root>/_compactor -----------------------------------------------------


def encode_compactor_revision(revision: int) -> bytes:
    """The store revision the compactor round's winner saw (the next round's
    target). Only the key's version is compared; the value is for operators."""
    return str(revision).encode()


def decode_compactor_revision(value: bytes) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise MalformedRecord("the compactor key's value", e) from None


# -- REST session: <root>/_sessions/<session-id> --------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRecord(_JsonRecord):
    """The record on a REST session's lease, proving the session id is real.

    Unlike the store's records it is written with ``json.dumps``'s default
    spacing (``{"owner": null, ...}``), as it always was."""

    _WHAT = "a session record"
    _SEPARATORS = (", ", ": ")

    owner: str | None
    #: The TTL etcd granted the session's lease.
    ttl_seconds: int
    #: Unix time the session was created, on the creating replica's clock.
    created_at: float
    #: Id (SHA-256) of the token that created it, never the token; ``None``
    #: when auth was off (and in records written before sessions had owners).
    token_id: str | None = None

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> SessionRecord:
        return cls(
            rec.get("owner"), int(rec["ttl_seconds"]), float(rec["created_at"]), rec.get("token_id")
        )


# -- liveness: <root>/_live/<writer-id> -----------------------------------------------


@dataclass(frozen=True, slots=True)
class LivenessRecord(_JsonRecord):
    """The liveness key of a writing process, on a lease only it keeps alive.

    Only the key's create revision is acted on (a commit without an upload
    intent compares it); the value tells an operator whose key it is."""

    _WHAT = "a liveness record"

    #: Host name and process id of the writer.
    host: str
    pid: int
    #: Unix time the key was put, on the writer's clock (for people only).
    since: float

    @classmethod
    def _from_json(cls, rec: dict[str, Any]) -> LivenessRecord:
        return cls(str(rec["host"]), int(rec["pid"]), float(rec["since"]))


__all__ = [
    "HANDLE_FORMAT",
    "IDEMPOTENT_OPS",
    "GcEntry",
    "IdempotencyRecord",
    "LeaderInfo",
    "LivenessRecord",
    "MalformedRecord",
    "RemovalMarker",
    "SessionRecord",
    "UploadIntent",
    "decode_compactor_revision",
    "decode_counter",
    "decode_handle",
    "decode_handle_blob_ref",
    "decode_holder",
    "encode_compactor_revision",
    "encode_counter",
    "encode_handle",
    "encode_holder",
]
