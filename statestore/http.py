"""HTTP client of the statestore REST API (rest-v1.md), for coordinators that
cannot reach etcd.

Two faces with the same methods, as httpx has ``AsyncClient`` and ``Client``:

- :class:`AsyncStateStoreClient` on ``httpx.AsyncClient``;
- :class:`StateStoreClient`, its blocking twin, on ``httpx.Client``.

Both are thin: every call is described once, as a pure :class:`_Call` that
:class:`_Api` builds (method, encoded path, query, headers, body) and that also
parses the answer. A face only sends the request and hands the response back
to the call, so request building, error mapping and response checks are
written once and shared.

Behaviour common to both faces:

- Errors are the SDK's (:mod:`statestore.errors`), chosen by the problem+json
  ``type`` word; ``Locked`` carries ``details["holders"]``, ``NotLeader``
  ``details["leader"]``, and every mapped error carries the HTTP status in
  ``details["status"]`` plus the problem's extra fields. :class:`Unauthorized`
  and :class:`Forbidden` (401/403) are defined here. An unknown problem type, a
  non-problem 5xx (or any other status without a problem body that is not
  401/403/413/400/422) and a body that is not what rest-v1 promises all raise
  ``Unavailable`` with the status and an excerpt of the body. Connection errors
  and timeouts raise ``Unavailable`` naming the URL.
- Handle names, counter names, session ids and namespaces are percent-encoded
  as ONE path segment (``/``, ``%``, spaces, ``?``, ``#``, unicode; ``.`` and
  ``..`` too, which URL normalisation would otherwise remove).
- State bodies: ``bytes`` are sent with ``Content-Length`` and, unless the
  caller gives ``sha256``, with their own ``X-Content-SHA256`` so the server
  refuses a corrupted upload. Binary file objects and (async) iterables of
  bytes are streamed in chunks (at most :data:`CHUNK_SIZE` bytes read from a
  file at a time), never read whole, and hashed on the way: the handle the
  server answers with must have the size and SHA-256 of what was sent, else
  ``IntegrityError``.
- Idempotent retries (rest-v1.md "Idempotent retries"): ``add_and_lock``,
  ``replace``, ``add_checkpoint`` and ``counter_increment`` (with a session)
  send an ``Idempotency-Key``, a fresh UUID per call unless the caller gives
  ``idempotency_key``. When the connection breaks or times out (before or
  after the request went out: ``httpx.NetworkError``,
  ``RemoteProtocolError``, ``TimeoutException``), the call is sent again
  with the same key, up to ``retries`` more times with short backoff
  (:data:`RETRY_BACKOFF` doubling, at most :data:`RETRY_BACKOFF_MAX`): the
  answer is then the first attempt's result if it took effect, else the
  operation performed once. A state given as a file object or an iterable
  cannot be sent twice, so such a call is not retried; its ``Unavailable``
  carries ``details["idempotency_key"]``, to retry by hand with bytes.
- Reads (``read`` / ``open_read``) verify the body against the response's
  ``X-Content-SHA256``. ``open_read`` holds the last chunk back until the
  whole body has matched and raises ``IntegrityError`` in its place
  otherwise, so no caller passes on all the bytes of a state that does not
  match. A body that ends before its ``Content-Length`` (the server cuts off
  a state whose blob does not match its handle) is an ``IntegrityError`` too.
- ``watch(since, timeout=30, prefix=None, kinds=None)`` is one long poll: the
  namespace's changes after revision ``since`` (``None``: now) as soon as one
  matches, or none after ``timeout`` seconds (1..300), as a
  :class:`WatchAnswer` whose ``revision`` is the next ``since``; ``prefix``
  filters handle names, ``kinds`` picks ``handles`` and/or ``leader``. A
  ``since`` etcd has compacted raises ``Compacted`` (``compact_revision``):
  re-list and watch from the listing's revision. ``follow()`` does that
  loop: it lists, watches, and after a 410 re-lists and yields what changed
  meanwhile; other errors end it. The read timeout of a poll is raised to
  cover ``timeout``.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import IO, Any, ClassVar, Generic, NamedTuple, TypeVar
from urllib.parse import quote

import httpx

from statestore.data import MAX_INT64, CounterListing, DataKind, as_bytes, data_kind
from statestore.errors import (
    AlreadyExists,
    Compacted,
    Fenced,
    IntegrityError,
    InvalidArgument,
    Locked,
    NotFound,
    NotLeader,
    PossibleInconsistentState,
    SessionExpired,
    StateStoreError,
    TooLarge,
    Unavailable,
    VersionConflict,
)
from statestore.handle import PrefixRemoval, encode_metadata, encode_plain_json
from statestore.keys import validate_idempotency_key

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Largest read from a file object given as state (bytes per request chunk).
CHUNK_SIZE = 1024 * 1024
#: How much of an unexpected response body an error message quotes.
EXCERPT_CHARS = 300
#: Retries of a call with an idempotency key after a broken connection
#: (the clients' ``retries`` default), and the backoff before the first one
#: (doubling, at most ``RETRY_BACKOFF_MAX``), in seconds.
RETRIES = 3
RETRY_BACKOFF = 0.1
RETRY_BACKOFF_MAX = 1.0

#: What ``add_and_lock``/``replace``/``add_checkpoint`` accept as state: bytes, a
#: binary file object (sync ``read``, or ``async def read`` for the async face),
#: or an iterable (the async face also: async iterable) of bytes chunks.
Body = bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]


# -- errors only the REST API has ------------------------------------------------------


class Unauthorized(StateStoreError):
    """401: the bearer token is missing or not known to the server."""

    kind = "unauthorized"
    http_status = 401


class Forbidden(StateStoreError):
    """403: the token is valid but not allowed this namespace or role."""

    kind = "forbidden"
    http_status = 403


_ERRORS_BY_KIND: dict[str, type[StateStoreError]] = {
    cls.kind: cls
    for cls in (
        AlreadyExists,
        NotFound,
        VersionConflict,
        Locked,
        Fenced,
        NotLeader,
        SessionExpired,
        InvalidArgument,
        IntegrityError,
        TooLarge,
        Unauthorized,
        Forbidden,
        Unavailable,
        PossibleInconsistentState,
        Compacted,
    )
}

# A status without a problem body (e.g. from a proxy in front of the server):
# only these have one unambiguous meaning; anything else is Unavailable.
_ERRORS_BY_BARE_STATUS: dict[int, type[StateStoreError]] = {
    400: InvalidArgument,
    401: Unauthorized,
    403: Forbidden,
    413: TooLarge,
    422: InvalidArgument,
}

_PROBLEM_MEMBERS = ("type", "title", "status", "detail", "instance")


def _excerpt(text: str) -> str:
    text = text.strip()
    if len(text) > EXCERPT_CHARS:
        return text[:EXCERPT_CHARS] + "..."
    return text or "<empty body>"


def error_from_problem(
    status: int, problem: Mapping[str, Any], *, request: str = ""
) -> StateStoreError:
    """The :mod:`statestore.errors` error for a problem+json body.

    The class is chosen by the ``type`` word; the message is ``request`` (e.g.
    ``"PUT http://..."``) followed by the problem's ``detail`` (or ``title``).
    ``details`` holds the problem's extension members (``holders``,
    ``leader``, ...) and ``status``. An unknown ``type`` gives ``Unavailable``
    quoting the body.
    """
    prefix = f"{request}: " if request else ""
    kind = problem.get("type")
    cls = _ERRORS_BY_KIND.get(kind) if isinstance(kind, str) else None
    details = {k: v for k, v in problem.items() if k not in _PROBLEM_MEMBERS}
    details["status"] = status
    if cls is None:
        err: StateStoreError = Unavailable(
            f"{prefix}the server answered HTTP {status} with a problem of unknown type "
            f"{kind!r}: {_excerpt(json.dumps(dict(problem), default=str))}; the server may be "
            "newer than this client or not a statestore server",
            problem_type=kind,
        )
    else:
        text = problem.get("detail") or problem.get("title") or f"HTTP {status} {kind}"
        err = cls(f"{prefix}{text}")
    err.details.update(details)
    return err


def error_from_response(response: httpx.Response) -> StateStoreError:
    """The error for a non-2xx response (its body must have been read).

    A JSON object with a string ``type`` is taken as a problem (whatever the
    exact content type says); otherwise the status alone decides: 400/422 ->
    ``InvalidArgument``, 401 -> :class:`Unauthorized`, 403 -> :class:`Forbidden`,
    413 -> ``TooLarge``, anything else (5xx, a 404 for a route the server does
    not have, a redirect) -> ``Unavailable`` with the status and body excerpt.
    """
    request = f"{response.request.method} {response.request.url}"
    status = response.status_code
    problem = _json_object(response)
    if problem is not None and isinstance(problem.get("type"), str):
        return error_from_problem(status, problem, request=request)
    body = _excerpt(response.text)
    cls = _ERRORS_BY_BARE_STATUS.get(status)
    if cls is not None:
        return cls(
            f"{request}: HTTP {status} {response.reason_phrase} without a problem body "
            f"(perhaps from a proxy in front of statestore): {body}",
            status=status,
        )
    if status >= 500:
        hint = "the server or something in front of it failed; retry later or check its logs"
    else:
        hint = "check base_url and that the server implements this rest-v1 call"
    return Unavailable(
        f"{request}: unexpected HTTP {status} {response.reason_phrase} without a problem "
        f"body: {body}; {hint}",
        status=status,
    )


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


# Transport errors raised before any byte of the request left this process.
_NOTHING_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)


#: Transport errors after which a call with an idempotency key is sent again
#: (the connection broke or timed out, before or after the request went out).
_RETRIED = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.TimeoutException)


def _unreachable(request: httpx.Request, exc: httpx.TransportError, tries: int = 1) -> Unavailable:
    """``Unavailable`` for a connection error or timeout, naming the URL
    (and the idempotency key, with which a retry learns the outcome)."""
    nothing_sent = isinstance(exc, _NOTHING_SENT)
    key = request.headers.get("idempotency-key")
    if nothing_sent or request.method in ("GET", "HEAD"):
        hint = "retry when the server is reachable"
    elif key is not None:
        hint = (
            f"the request may have reached the server and taken effect; retry with "
            f"idempotency_key={key!r} to learn the outcome (it answers the first result)"
        )
    else:
        hint = (
            "the request may have reached the server and taken effect; re-read the state "
            "before retrying"
        )
    sent = f" (sent {tries} times)" if tries > 1 else ""
    extra = {"idempotency_key": key} if key is not None else {}
    return Unavailable(
        f"{request.method} {request.url}: the statestore server did not answer{sent} "
        f"({type(exc).__name__}: {exc or 'no detail'}); {hint}",
        url=str(request.url),
        **extra,
    )


class _BadBody(Exception):
    """A 2xx body that is not what rest-v1 promises (becomes ``Unavailable``)."""


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """A server-side session (an etcd lease): locks taken with it vanish when it
    ends or is not kept alive within ``ttl_seconds``."""

    session_id: str
    ttl_seconds: int

    @classmethod
    def from_json(cls, body: Any) -> Session:
        return cls(session_id=_str(body["session_id"]), ttl_seconds=_int(body["ttl_seconds"]))


@dataclass(frozen=True, slots=True)
class RestHandle:
    """A handle as the REST API shows it: ``locks`` lists the session ids
    holding it; ``version`` changes on every replace."""

    name: str
    version: int
    size: int
    sha256: str
    created_at: datetime
    metadata: dict[str, Any]
    locks: list[str]

    @classmethod
    def from_json(cls, body: Any) -> RestHandle:
        """Parse a rest-v1 handle object (raises KeyError/TypeError/ValueError)."""
        return cls(**_handle_fields(body))


@dataclass(frozen=True, slots=True)
class RestCheckpoint(RestHandle):
    """A checkpoint: a handle named by its zero-padded id."""

    checkpoint_id: int
    savepoint: bool

    @classmethod
    def from_json(cls, body: Any) -> RestCheckpoint:
        """Parse a rest-v1 checkpoint object (raises KeyError/TypeError/ValueError)."""
        savepoint = body.get("savepoint", False)
        if not isinstance(savepoint, bool):
            raise TypeError(f"savepoint must be a boolean, got {savepoint!r}")
        return cls(
            **_handle_fields(body), checkpoint_id=_int(body["checkpoint_id"]), savepoint=savepoint
        )


@dataclass(frozen=True, slots=True)
class Listing:
    """One consistent snapshot of a namespace's handles, sorted by name."""

    handles: list[RestHandle]
    revision: int


H = TypeVar("H", bound=RestHandle)


class _LeaderPair(NamedTuple):
    leader: str
    fencing_token: int


class Leadership(_LeaderPair):
    """Who leads a namespace and the fencing token of that leadership, with
    ``info``: what the leader published (``PUT .../leader/info/{key}``), by
    key. ``leader()`` fills it; ``campaign()`` answers without it (empty).

    ``revision``: the etcd revision the answer was read at (``leader()``,
    ``campaign()``); watching from it (``watch(since=revision)``) yields
    every later leadership change once and none earlier. ``None`` in a
    watch event (the event has its own revision) or from an older server.

    Still the ``(leader, fencing_token)`` pair it always was: it unpacks and
    indexes as that pair and equals a plain tuple of it; two ``Leadership``
    values are equal when their info is too (whatever revision each was
    read at)."""

    info: dict[str, Any]
    revision: int | None

    def __new__(
        cls,
        leader: str,
        fencing_token: int,
        info: Mapping[str, Any] | None = None,
        revision: int | None = None,
    ) -> Leadership:
        self = super().__new__(cls, leader, fencing_token)
        self.info = dict(info or {})
        self.revision = revision
        return self

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Leadership):
            return tuple(self) == tuple(other) and self.info == other.info
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = _LeaderPair.__hash__  # equal values have equal pairs

    def __repr__(self) -> str:
        return f"Leadership(leader={self.leader!r}, fencing_token={self.fencing_token!r}, " + (
            f"info={self.info!r})"
        )


@dataclass(frozen=True, slots=True)
class RestHandleEvent:
    """A watch event: handle ``name`` was put (added or replaced) or deleted."""

    kind: ClassVar[str] = "handle"

    type: str  #: "put" or "delete"
    name: str
    revision: int
    #: The handle as the put left it (``locks`` empty: events carry none);
    #: ``None`` for a delete.
    handle: RestHandle | None

    def to_json(self) -> dict[str, Any]:
        """The rest-v1 event."""
        handle = None
        if self.handle is not None:
            handle = dataclasses.asdict(self.handle)
            handle["created_at"] = self.handle.created_at.isoformat()
            del handle["locks"]
        return {
            "kind": self.kind,
            "type": self.type,
            "name": self.name,
            "revision": self.revision,
            "handle": handle,
        }


@dataclass(frozen=True, slots=True)
class RestLeaderEvent:
    """A watch event: leadership changed hands, ended (``leader`` is
    ``None``), or its info changed."""

    kind: ClassVar[str] = "leader"

    revision: int
    #: The leadership with its ``info``, as ``leader()`` answers it.
    leader: Leadership | None

    def to_json(self) -> dict[str, Any]:
        """The rest-v1 event (``leader``: the ``GET .../leader`` body)."""
        body = None
        if self.leader is not None:
            body = {**self.leader._asdict(), "info": self.leader.info}
        return {"kind": self.kind, "revision": self.revision, "leader": body}


RestWatchEvent = RestHandleEvent | RestLeaderEvent


@dataclass(frozen=True, slots=True)
class WatchAnswer:
    """One answer of ``GET .../watch``: the events after ``since`` (none when
    the timeout passed) and the revision to pass as the next ``since``."""

    events: list[RestWatchEvent]
    revision: int


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _handle_fields(body: Any) -> dict[str, Any]:
    metadata = body.get("metadata") or {}
    locks = body.get("locks") or []
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be an object, got {metadata!r}")
    if not isinstance(locks, list):
        raise TypeError(f"locks must be a list, got {locks!r}")
    return {
        "name": _str(body["name"]),
        "version": _int(body["version"]),
        "size": _int(body["size"]),
        "sha256": _str(body["sha256"]),
        "created_at": datetime.fromisoformat(_str(body["created_at"])),
        "metadata": metadata,
        "locks": [_str(s) for s in locks],
    }


# -- request pieces ------------------------------------------------------------------------


def encode_segment(value: str, what: str = "name") -> str:
    """``value`` percent-encoded as exactly one URL path segment.

    Everything but unreserved ASCII is escaped (``/`` -> ``%2F``, ``%`` ->
    ``%25``, UTF-8 bytes of non-ASCII); ``.`` and ``..`` become ``%2E`` /
    ``%2E%2E`` so that URL normalisation cannot drop them. Empty values are
    refused: they would address a different endpoint.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"the {what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"the {what} must not be empty")
    seg = quote(value, safe="")
    if seg in (".", ".."):
        seg = "%2E" * len(seg)
    return seg


def request_headers(
    *,
    session_id: str | None = None,
    fencing_token: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    if_match: int | None = None,
    idempotency_key: str | None = None,
) -> dict[str, str]:
    """The rest-v1 request headers for the given values (``None`` -> absent).

    ``X-Handle-Metadata`` is compact JSON with non-ASCII escaped (``\\uXXXX``),
    since header values travel as latin-1; the metadata must be plain JSON
    (the SDK's rule). ``If-Match`` is the quoted version.
    """
    headers: dict[str, str] = {}
    if session_id is not None:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidArgument(f"session_id must be a non-empty string, got {session_id!r}")
        headers["X-Session-Id"] = session_id
    if fencing_token is not None:
        headers["X-Fencing-Token"] = str(_checked_int(fencing_token, "fencing_token"))
    if metadata is not None:
        given = dict(metadata) if isinstance(metadata, Mapping) else metadata
        plain = encode_metadata(given, limit=2**62)  # the size limit is the server's to enforce
        headers["X-Handle-Metadata"] = json.dumps(
            plain, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    if sha256 is not None:
        digest = sha256.lower() if isinstance(sha256, str) else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidArgument(f"sha256 must be 64 hex digits, got {sha256!r}")
        headers["X-Content-SHA256"] = digest
    if if_match is not None:
        headers["If-Match"] = f'"{_checked_int(if_match, "expected_version")}"'
    if idempotency_key is not None:
        headers["Idempotency-Key"] = validate_idempotency_key(idempotency_key)
    return headers


def _fresh_key(given: str | None) -> str:
    """The idempotency key of a call: the caller's, or a fresh UUID."""
    return given if given is not None else str(uuid.uuid4())


def _checked_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, got {value!r}")
    return value


class _Upload:
    """A state body: bytes as they are, anything else streamed in chunks.

    Counts and hashes what is actually sent, so that the handle the server
    answers with can be checked against it (:meth:`check`).
    """

    def __init__(self, data: Body) -> None:
        self._data: Any = data
        self._sha = hashlib.sha256()
        self.size = 0
        self.raw: bytes | None = None
        self._kind: DataKind = data_kind(data)  # the SDK's forms and refusals
        if self._kind == "bytes":
            self.raw = bytes(self._data)
            self._feed(self.raw)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def add_digest(self, headers: dict[str, str]) -> None:
        """Bytes get their own ``X-Content-SHA256`` (unless the caller already
        gave one), so the server refuses a corrupted upload. A streamed body's
        digest is only known once sent: :meth:`check` covers it."""
        if self.raw is not None:
            headers.setdefault("X-Content-SHA256", self.sha256)

    def _feed(self, chunk: bytes) -> bytes:
        self._sha.update(chunk)
        self.size += len(chunk)
        return chunk

    def sync_content(self) -> bytes | Iterator[bytes]:
        """The body for ``httpx.Client``: bytes or a generator of chunks."""
        if self.raw is not None:
            return self.raw
        if self._kind.startswith("async"):
            raise InvalidArgument(
                f"the blocking StateStoreClient cannot send an {self._kind.replace('-', ' ')}; "
                "pass bytes, a file or an iterable, or use AsyncStateStoreClient"
            )
        return self._sync_chunks()

    def _sync_chunks(self) -> Iterator[bytes]:
        if self._kind == "file":
            read = self._data.read
            while chunk := as_bytes(read(CHUNK_SIZE)):
                yield self._feed(chunk)
            return
        for item in self._data:
            if chunk := as_bytes(item):  # an empty chunk would end a chunked body early
                yield self._feed(chunk)

    def async_content(self) -> bytes | AsyncIterator[bytes]:
        """The body for ``httpx.AsyncClient``: bytes or an async generator of
        chunks (a blocking file is read on a worker thread)."""
        if self.raw is not None:
            return self.raw
        return self._async_chunks()

    async def _async_chunks(self) -> AsyncIterator[bytes]:
        data = self._data
        if self._kind in ("file", "async-file"):
            while True:
                if self._kind == "file":
                    got = await asyncio.to_thread(data.read, CHUNK_SIZE)
                else:
                    got = await data.read(CHUNK_SIZE)
                if not (chunk := as_bytes(got)):
                    return
                yield self._feed(chunk)
        elif self._kind == "async-iterable":
            async for item in data:
                if chunk := as_bytes(item):
                    yield self._feed(chunk)
        else:
            for item in data:
                if chunk := as_bytes(item):
                    yield self._feed(chunk)

    def check(self, handle: H) -> H:
        """Raise ``IntegrityError`` unless ``handle`` records the size and
        SHA-256 of the bytes sent."""
        if handle.size != self.size or handle.sha256.lower() != self.sha256:
            raise IntegrityError(
                f"handle {handle.name!r} was stored at version {handle.version} with "
                f"{handle.size} bytes and SHA-256 {handle.sha256}, but this client sent "
                f"{self.size} bytes with SHA-256 {self.sha256}; the state was altered on the "
                "way: replace it",
                name=handle.name,
                version=handle.version,
            )
        return handle


class _Verifier:
    """Checks a state response's bytes against its ``X-Content-SHA256``."""

    def __init__(self, response: httpx.Response) -> None:
        self._what = f"{response.request.method} {response.request.url}"
        expected = response.headers.get("x-content-sha256")
        if not expected:
            raise IntegrityError(
                f"{self._what}: the server sent no X-Content-SHA256 header, so the state "
                "cannot be verified; the server does not follow rest-v1"
            )
        self._expected = expected.strip().lower()
        self._length = response.headers.get("content-length")
        self._sha = hashlib.sha256()
        self._held = b""
        self.size = 0

    def pass_on(self, chunk: bytes) -> bytes:
        """Hash ``chunk`` and hold it back; returns the chunk held before
        (``b""`` at first). The last chunk is thus only released by
        :meth:`finish`, so a caller never passes on every byte of a state
        that does not match."""
        self._sha.update(chunk)
        self.size += len(chunk)
        ready, self._held = self._held, chunk
        return ready

    def finish(self) -> bytes:
        """The held-back last chunk, once the whole body matches."""
        got = self._sha.hexdigest()
        if got != self._expected:
            raise IntegrityError(
                f"{self._what}: received {self.size} bytes with SHA-256 {got}, but the server "
                f"declared {self._expected}; the state was altered or truncated on the way: "
                "read it again",
                expected_sha256=self._expected,
                sha256=got,
            )
        return self._held

    def cut_off(self, exc: httpx.RemoteProtocolError) -> IntegrityError:
        """The error for a body that ended before its ``Content-Length``.

        The server ends a state response this way when it finds, mid-stream,
        that the blob does not match its handle (it cannot change the 200
        already sent); a connection broken on the way looks the same. Either
        way the bytes received are not the state."""
        return IntegrityError(
            f"{self._what}: the body ended after {self.size} of {self._length or '?'} bytes "
            f"({exc or 'no detail'}); the server cuts a state off before its last byte when "
            "the blob does not match its handle (see its log), or the connection broke: "
            "these bytes are not the state, read it again",
            expected_sha256=self._expected,
            received=self.size,
        )


# -- calls ----------------------------------------------------------------------------------


def _raise(err: StateStoreError) -> Any:
    raise err


def _none_if_not_found(err: StateStoreError) -> None:
    if isinstance(err, NotFound):
        return None
    raise err


def _false_if_locked(err: StateStoreError) -> bool:
    if isinstance(err, Locked):
        return False
    raise err


def _empty_if_not_found(err: StateStoreError) -> list[str]:
    if isinstance(err, NotFound):
        return []
    raise err


def _done_unless_accepted(response: httpx.Response) -> bool:
    return response.status_code != 202


def _nothing(response: httpx.Response) -> None:
    return None


@dataclass(slots=True)
class _Call(Generic[T]):
    """One REST call: everything to build its request and read its answer.

    ``parse`` turns a 2xx response into the result; a non-2xx response becomes
    a :mod:`statestore.errors` error that ``on_error`` may turn into a result
    (e.g. 404 -> ``None``) or raise.
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    upload: _Upload | None = None
    on_error: Callable[[StateStoreError], T] = _raise
    #: Seconds the server may hold the answer back on purpose (a waiting
    #: campaign, a watch's long poll): added to the client's read timeout
    #: for this call.
    waits: float = 0.0

    def retry_delay(self, error: httpx.TransportError, tries: int, retries: int) -> float | None:
        """How long to wait before sending the call again after ``error`` on
        its ``tries``-th send; ``None``: do not (no idempotency key, a state
        that cannot be sent twice, another kind of error, or ``retries``
        retries already made)."""
        replayable = self.upload is None or self.upload.raw is not None
        if "Idempotency-Key" not in self.headers or not replayable or tries > retries:
            return None
        if not isinstance(error, _RETRIED):
            return None
        return min(RETRY_BACKOFF * 2 ** (tries - 1), RETRY_BACKOFF_MAX)

    def build(self, http: httpx.Client | httpx.AsyncClient, content: Any) -> httpx.Request:
        """The request on ``http`` (whose base URL, auth and timeouts apply)."""
        timeout = http.timeout
        if self.waits and timeout.read is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect,
                read=timeout.read + self.waits,
                write=timeout.write,
                pool=timeout.pool,
            )
        return http.build_request(
            self.method,
            self.path,
            params=self.params or None,
            headers=self.headers,
            json=self.json,
            content=content,
            timeout=timeout,
        )

    def finish(self, response: httpx.Response) -> T:
        """The result of a response whose body has been read."""
        if not response.is_success:
            return self.on_error(error_from_response(response))
        try:
            return self.parse(response)
        except (_BadBody, KeyError, TypeError, ValueError, AttributeError) as e:
            raise Unavailable(
                f"{response.request.method} {response.request.url}: the server answered "
                f"HTTP {response.status_code} with a body that is not what rest-v1 promises "
                f"({type(e).__name__}: {e}): {_excerpt(response.text)}",
                status=response.status_code,
            ) from None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise _BadBody(f"not JSON: {e}") from None


def _handle(response: httpx.Response) -> RestHandle:
    return RestHandle.from_json(_body(response))


def _sessions_listing(response: httpx.Response) -> list[dict[str, Any]]:
    return list(_body(response)["sessions"])


def _session(response: httpx.Response) -> Session:
    return Session.from_json(_body(response))


def _value(response: httpx.Response) -> int:
    return _int(_body(response)["value"])


def _leadership_of(body: Any) -> Leadership:
    """A ``GET .../leader`` body (also a leader event's ``leader``)."""
    info = body.get("info", {})
    if not isinstance(info, dict):
        raise TypeError(f"info must be an object, got {info!r}")
    revision = body.get("revision")
    return Leadership(
        _str(body["leader"]),
        _int(body["fencing_token"]),
        info,
        None if revision is None else _int(revision),
    )


def _leadership(response: httpx.Response) -> Leadership:
    return _leadership_of(_body(response))


def _counter_listing(response: httpx.Response) -> CounterListing:
    body = _body(response)
    counters = body["counters"]
    if not isinstance(counters, dict):
        raise TypeError(f"counters must be an object, got {counters!r}")
    values = {_str(name): _int(value) for name, value in counters.items()}
    return CounterListing(dict(sorted(values.items())), _int(body["revision"]))


def _listing(response: httpx.Response) -> Listing:
    body = _body(response)
    return Listing(
        handles=[RestHandle.from_json(h) for h in body["handles"]],
        revision=_int(body["revision"]),
    )


def _watch_event(body: Any) -> RestWatchEvent | None:
    """One event of a watch answer; ``None`` for a kind this client does not
    know (a newer server's), which is skipped."""
    kind = body.get("kind")
    if kind == "handle":
        if body["type"] not in ("put", "delete"):
            raise ValueError(f"a handle event's type must be put or delete, got {body['type']!r}")
        handle = body.get("handle")
        return RestHandleEvent(
            body["type"],
            _str(body["name"]),
            _int(body["revision"]),
            None if handle is None else RestHandle.from_json(handle),
        )
    if kind == "leader":
        leader = body.get("leader")
        return RestLeaderEvent(
            _int(body["revision"]), None if leader is None else _leadership_of(leader)
        )
    return None


def _watch_answer(response: httpx.Response) -> WatchAnswer:
    body = _body(response)
    events = [e for e in map(_watch_event, body["events"]) if e is not None]
    return WatchAnswer(events, _int(body["revision"]))


def _checkpoint(response: httpx.Response) -> RestCheckpoint:
    return RestCheckpoint.from_json(_body(response))


def _checkpoints(response: httpx.Response) -> list[RestCheckpoint]:
    return [RestCheckpoint.from_json(c) for c in _body(response)["checkpoints"]]


def _names(body: Any, member: str) -> list[str]:
    names = body.get(member, [])
    if not isinstance(names, list):
        raise TypeError(f"{member} must be a list, got {names!r}")
    return [_str(n) for n in names]


class _Api:
    """Builds the :class:`_Call` of every rest-v1 operation (no I/O).

    ``ns=None`` means the client's namespace; with neither, ``InvalidArgument``.
    """

    def __init__(self, namespace: str | None) -> None:
        if namespace is not None:
            encode_segment(namespace, "namespace")
        self.namespace = namespace

    def _ns_path(self, ns: str | None) -> str:
        ns = ns if ns is not None else self.namespace
        if ns is None:
            raise InvalidArgument(
                "no namespace: pass ns=... or create the client with namespace=..."
            )
        return f"/v1/namespaces/{encode_segment(ns, 'namespace')}"

    def _handle_path(self, name: str, ns: str | None) -> str:
        return f"{self._ns_path(ns)}/handles/{encode_segment(name, 'handle name')}"

    # sessions

    def create_session(self, ttl_seconds: int, owner: str | None) -> _Call[Session]:
        body: dict[str, Any] = {"ttl_seconds": ttl_seconds}
        if owner is not None:
            body["owner"] = owner
        return _Call("POST", "/v1/sessions", _session, json=body)

    def keepalive(self, session_id: str) -> _Call[Session]:
        path = f"/v1/sessions/{encode_segment(session_id, 'session id')}/keepalive"
        return _Call("POST", path, _session)

    def delete_session(self, session_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/sessions/{encode_segment(session_id, 'session id')}", _nothing)

    def list_sessions(self) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/sessions", _sessions_listing)

    # handles

    def put(
        self,
        name: str,
        data: Body,
        session_id: str,
        *,
        expected_version: int | None,
        metadata: Mapping[str, Any] | None,
        sha256: str | None,
        fencing_token: int | None,
        idempotency_key: str | None,
        ns: str | None,
    ) -> _Call[RestHandle]:
        path = self._handle_path(name, ns)
        headers = request_headers(
            session_id=session_id,
            fencing_token=fencing_token,
            metadata=metadata,
            sha256=sha256,
            if_match=expected_version,
            idempotency_key=_fresh_key(idempotency_key),
        )
        upload = _Upload(data)
        upload.add_digest(headers)
        return _Call(
            "PUT", path, lambda r: upload.check(_handle(r)), headers=headers, upload=upload
        )

    def get(self, name: str, ns: str | None) -> _Call[RestHandle]:
        return _Call("GET", self._handle_path(name, ns), _handle)

    def exists(self, name: str, ns: str | None) -> _Call[int | None]:
        path = self._handle_path(name, ns)
        return _Call("GET", path, lambda r: _handle(r).version, on_error=_none_if_not_found)

    def holders(self, name: str, ns: str | None) -> _Call[list[str]]:
        path = self._handle_path(name, ns)
        return _Call("GET", path, lambda r: _handle(r).locks, on_error=_empty_if_not_found)

    def state(self, name: str, ns: str | None) -> _Call[None]:
        """GET of the state bytes. The faces' ``open_read`` streams and
        verifies the body itself (a body cut off mid-way is an integrity
        error, not an unreachable server); ``finish`` only maps errors."""
        return _Call("GET", f"{self._handle_path(name, ns)}/state", _nothing)

    def get_and_lock(self, name: str, session_id: str, ns: str | None) -> _Call[RestHandle]:
        headers = request_headers(session_id=session_id)
        return _Call("POST", f"{self._handle_path(name, ns)}/lock", _handle, headers=headers)

    def release(self, name: str, session_id: str, ns: str | None) -> _Call[None]:
        headers = request_headers(session_id=session_id)
        return _Call("DELETE", f"{self._handle_path(name, ns)}/lock", _nothing, headers=headers)

    def release_and_try_remove(
        self,
        name: str,
        session_id: str,
        *,
        deferred: bool,
        fencing_token: int | None,
        ns: str | None,
    ) -> _Call[bool]:
        return _Call(
            "DELETE",
            self._handle_path(name, ns),
            _done_unless_accepted,
            params={"deferred": "true"} if deferred else {},
            headers=request_headers(session_id=session_id, fencing_token=fencing_token),
            on_error=_false_if_locked,
        )

    def remove_prefix(
        self,
        prefix: str,
        session_id: str,
        *,
        deferred: bool,
        fencing_token: int | None,
        ns: str | None,
    ) -> _Call[PrefixRemoval]:
        kept = "pending" if deferred else "locked"

        def parse(response: httpx.Response) -> PrefixRemoval:
            body = _body(response)
            return PrefixRemoval(_names(body, "removed"), _names(body, kept))

        params = {"prefix": prefix}
        if deferred:
            params["deferred"] = "true"
        return _Call(
            "DELETE",
            f"{self._ns_path(ns)}/handles",
            parse,
            params=params,
            headers=request_headers(session_id=session_id, fencing_token=fencing_token),
        )

    def release_prefix(self, prefix: str, session_id: str, ns: str | None) -> _Call[None]:
        return _Call(
            "DELETE",
            f"{self._ns_path(ns)}/locks",
            _nothing,
            params={"prefix": prefix},
            headers=request_headers(session_id=session_id),
        )

    def listing(
        self, prefix: str | None, *, lock: bool, session_id: str | None, ns: str | None
    ) -> _Call[Listing]:
        if lock and session_id is None:
            raise InvalidArgument("list(lock=True) locks every handle: it needs a session_id")
        params: dict[str, str] = {}
        if prefix is not None:
            params["prefix"] = prefix
        if lock:
            params["lock"] = "true"
        return _Call(
            "GET",
            f"{self._ns_path(ns)}/handles",
            _listing,
            params=params,
            headers=request_headers(session_id=session_id),
        )

    # counters

    def _counter_path(self, name: str, ns: str | None) -> str:
        return f"{self._ns_path(ns)}/counters/{encode_segment(name, 'counter name')}"

    def counter_get(self, name: str, ns: str | None) -> _Call[int]:
        return _Call("GET", self._counter_path(name, ns), _value)

    def counter_increment(
        self,
        name: str,
        session_id: str | None,
        fencing_token: int | None,
        idempotency_key: str | None,
        ns: str | None,
    ) -> _Call[int]:
        if session_id is None and idempotency_key is not None:
            raise InvalidArgument(
                "an idempotency key is scoped by the session that sends it: pass session_id"
            )
        headers = request_headers(
            session_id=session_id,
            fencing_token=fencing_token,
            idempotency_key=None if session_id is None else _fresh_key(idempotency_key),
        )
        return _Call("POST", f"{self._counter_path(name, ns)}/increment", _value, headers=headers)

    def counter_delete(
        self, name: str, session_id: str | None, fencing_token: int | None, ns: str | None
    ) -> _Call[None]:
        headers = request_headers(session_id=session_id, fencing_token=fencing_token)
        return _Call("DELETE", self._counter_path(name, ns), _nothing, headers=headers)

    def counter_list(self, prefix: str, ns: str | None) -> _Call[CounterListing]:
        path = f"{self._ns_path(ns)}/counters"
        return _Call("GET", path, _counter_listing, params={"prefix": prefix})

    def counter_delete_prefix(
        self, prefix: str, session_id: str | None, fencing_token: int | None, ns: str | None
    ) -> _Call[list[str]]:
        headers = request_headers(session_id=session_id, fencing_token=fencing_token)
        return _Call(
            "DELETE",
            f"{self._ns_path(ns)}/counters",
            lambda r: _names(_body(r), "deleted"),
            params={"prefix": prefix},
            headers=headers,
        )

    def counter_set(
        self, name: str, value: int, fencing_token: int | None, ns: str | None
    ) -> _Call[int]:
        body = {"value": _checked_int(value, "counter value")}
        headers = request_headers(fencing_token=fencing_token)
        return _Call("PUT", self._counter_path(name, ns), _value, json=body, headers=headers)

    # leadership

    def campaign(self, session_id: str, wait: float, ns: str | None) -> _Call[Leadership]:
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < 1e9:
            raise InvalidArgument(f"wait must be a number of seconds >= 0, got {wait!r}")
        headers = request_headers(session_id=session_id)
        return _Call(
            "POST",
            f"{self._ns_path(ns)}/leader",
            _leadership,
            params={"wait": str(wait)} if wait else {},
            headers=headers,
            waits=wait,
        )

    def leader(self, ns: str | None) -> _Call[Leadership | None]:
        path = f"{self._ns_path(ns)}/leader"
        return _Call("GET", path, _leadership, on_error=_none_if_not_found)

    def resign(self, session_id: str, ns: str | None) -> _Call[None]:
        headers = request_headers(session_id=session_id)
        return _Call("DELETE", f"{self._ns_path(ns)}/leader", _nothing, headers=headers)

    def _info_path(self, key: str, ns: str | None) -> str:
        return f"{self._ns_path(ns)}/leader/info/{encode_segment(key, 'leader info key')}"

    def put_leader_info(self, session_id: str, key: str, value: Any, ns: str | None) -> _Call[None]:
        path = self._info_path(key, ns)
        # plain JSON, as UTF-8; the size limit is the server's to enforce
        body = encode_plain_json(value, f"leader info {key!r}", 2**62, ensure_ascii=False)
        headers = request_headers(session_id=session_id)
        headers["Content-Type"] = "application/json"
        # Sent as bytes: ``json=None`` would send no body at all for a null value.
        return _Call("PUT", path, _nothing, headers=headers, upload=_Upload(body.encode()))

    def delete_leader_info(self, session_id: str, key: str, ns: str | None) -> _Call[None]:
        headers = request_headers(session_id=session_id)
        return _Call("DELETE", self._info_path(key, ns), _nothing, headers=headers)

    # watch

    def watch(
        self,
        since: int | None,
        timeout: float,
        prefix: str | None,
        kinds: str | Iterable[str] | None,
        ns: str | None,
    ) -> _Call[WatchAnswer]:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise InvalidArgument(f"timeout must be a number of seconds, got {timeout!r}")
        params = {"timeout": f"{timeout:g}"}
        if since is not None:
            params["since"] = str(_checked_int(since, "since"))
        if prefix:
            params["prefix"] = prefix
        if kinds is not None:
            params["kinds"] = kinds if isinstance(kinds, str) else ",".join(kinds)
        path = f"{self._ns_path(ns)}/watch"
        return _Call("GET", path, _watch_answer, params=params, waits=timeout + 2)

    # checkpoints

    def add_checkpoint(
        self,
        checkpoint_id: int,
        data: Body,
        session_id: str,
        *,
        retain: int,
        savepoint: bool,
        fencing_token: int | None,
        idempotency_key: str | None,
        ns: str | None,
    ) -> _Call[tuple[RestCheckpoint, list[int]]]:
        cid = _checked_int(checkpoint_id, "checkpoint_id")
        if not 0 <= cid <= MAX_INT64:
            raise InvalidArgument(f"checkpoint_id must be an integer 0..{MAX_INT64}, got {cid}")
        params = {"retain": str(_checked_int(retain, "retain"))}
        if savepoint:
            params["savepoint"] = "true"
        headers = request_headers(
            session_id=session_id,
            fencing_token=fencing_token,
            idempotency_key=_fresh_key(idempotency_key),
        )
        upload = _Upload(data)
        upload.add_digest(headers)

        def parse(response: httpx.Response) -> tuple[RestCheckpoint, list[int]]:
            body = _body(response)
            checkpoint = upload.check(RestCheckpoint.from_json(body["checkpoint"]))
            return checkpoint, [_int(i) for i in body["subsumed"]]

        path = f"{self._ns_path(ns)}/checkpoints/{cid}"
        return _Call("POST", path, parse, params=params, headers=headers, upload=upload)

    def checkpoints(
        self, lock: bool, session_id: str | None, ns: str | None
    ) -> _Call[list[RestCheckpoint]]:
        if lock and session_id is None:
            raise InvalidArgument("checkpoints(lock=True) locks them all: it needs a session_id")
        return _Call(
            "GET",
            f"{self._ns_path(ns)}/checkpoints",
            _checkpoints,
            params={"lock": "true"} if lock else {},
            headers=request_headers(session_id=session_id),
        )

    def latest_checkpoint(self, ns: str | None) -> _Call[RestCheckpoint | None]:
        path = f"{self._ns_path(ns)}/checkpoints/latest"
        return _Call("GET", path, _checkpoint, on_error=_none_if_not_found)

    # namespaces

    def delete_namespace(self, ns: str) -> _Call[bool]:
        path = f"/v1/namespaces/{encode_segment(ns, 'namespace')}"
        return _Call("DELETE", path, _done_unless_accepted)


# -- follow(): list, then watch, re-listing on 410 (shared by both faces) -------------------

#: ``_Follower``'s marker for a watch answered 410 ``compacted``.
_COMPACTED: Any = object()


class _Follower:
    """The loop of ``follow()`` as calls and what their answers yield (no
    I/O), so both faces run the same loop: ``next_call()``, send it, then
    ``receive(result)`` gives the events to yield.

    It lists first (unless started from ``since``) and reads the leadership
    (when leader events are wanted), yielding neither, then watches from the
    listing's revision, each answer's ``revision`` becoming the next
    ``since``. After a 410 ``compacted`` it does the same at a fresh
    revision R and yields what changed meanwhile, all at revision R: a
    ``put`` for every handle whose version it did not know (every handle,
    when it started from ``since`` without a listing), a ``delete`` for
    every handle it knew that is gone, and a leader event when the
    leadership is not the one it last saw (when it never saw one: when
    someone leads); then it watches from R. The gap's individual changes
    are not replayed, but the consumer's picture is right again."""

    def __init__(
        self,
        api: _Api,
        since: int | None,
        *,
        timeout: float,
        prefix: str | None,
        kinds: str | Iterable[str] | None,
        ns: str | None,
    ) -> None:
        self._api = api
        self._timeout, self._prefix, self._kinds, self._ns = timeout, prefix, kinds, ns
        words = kinds.split(",") if isinstance(kinds, str) else kinds
        self._leader_wanted = words is None or "leader" in {w.strip() for w in words}
        self.since = since
        #: Versions of the handles this follower has seen (None: unknown).
        self.known: dict[str, int] | None = None
        #: The leadership it last saw (None: nobody, or not known yet).
        self.leader: Leadership | None = None
        self._step = "list" if since is None else "watch"
        self._relisted = False

    def _compacted(self, err: StateStoreError) -> Any:
        if isinstance(err, Compacted):
            return _COMPACTED
        raise err

    def next_call(self) -> _Call[Any]:
        if self._step in ("list", "relist"):
            return self._api.listing(self._prefix, lock=False, session_id=None, ns=self._ns)
        if self._step == "leader":
            return self._api.leader(self._ns)
        call = self._api.watch(self.since, self._timeout, self._prefix, self._kinds, self._ns)
        call.on_error = self._compacted
        return call

    def receive(self, result: Any) -> builtins.list[RestWatchEvent]:
        step = self._step
        if step == "watch":
            if result is _COMPACTED:
                self._step = "relist"
                return []
            self._saw(result.events)
            self.since = result.revision
            return result.events
        if step == "leader":
            self._step = "watch"
            previous, self.leader = self.leader, result
            if not self._relisted or result == previous:
                return []  # the starting point, or no difference
            return [RestLeaderEvent(self.since or 0, result)]
        listing: Listing = result
        self._relisted = step == "relist"
        events = self._differences(listing) if self._relisted else []
        self.known = {h.name: h.version for h in listing.handles}
        self.since = listing.revision
        self._step = "leader" if self._leader_wanted else "watch"
        return events

    def _differences(self, listing: Listing) -> builtins.list[RestWatchEvent]:
        known = self.known or {}
        current = {h.name: h for h in listing.handles}
        events: builtins.list[RestWatchEvent] = []
        for name in sorted(known.keys() | current.keys()):
            h = current.get(name)
            if h is None:
                events.append(RestHandleEvent("delete", name, listing.revision, None))
            elif known.get(name) != h.version:
                unlocked = dataclasses.replace(h, locks=[])  # events carry no locks
                events.append(RestHandleEvent("put", name, listing.revision, unlocked))
        return events

    def _saw(self, events: Iterable[RestWatchEvent]) -> None:
        for e in events:
            if isinstance(e, RestLeaderEvent):
                self.leader = e.leader
            elif self.known is not None:
                if e.type == "put":
                    self.known[e.name] = e.revision
                else:
                    self.known.pop(e.name, None)


# -- session keepalive policy (shared by the thread and the task) ---------------------------


class _Keeper:
    """When to send the next keepalive: every ttl/3; sooner (at most 1 s) after
    a failure that may pass; never again once the session is gone."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.interval = max(session.ttl_seconds / 3, 0.05)

    def next_delay(self, error: StateStoreError | None) -> float | None:
        """The delay before the next keepalive after one that raised ``error``
        (``None`` = succeeded); ``None`` means stop."""
        if error is None:
            return self.interval
        if isinstance(error, SessionExpired | NotFound):
            logger.error(
                "session %s expired before its keepalive (%s); its locks are gone",
                self.session.session_id,
                error,
            )
            return None
        logger.warning("keepalive of session %s failed: %s", self.session.session_id, error)
        return min(self.interval, 1.0)


def _after_session(session: Session, error: StateStoreError | None, *, body_failed: bool) -> None:
    """What to do with an error of the final ``delete_session``: a session
    already gone is fine; any other error is logged when the ``with`` body
    already raised (that error wins) and raised otherwise."""
    if error is None or isinstance(error, SessionExpired | NotFound):
        return
    if body_failed:
        logger.warning(
            "could not delete session %s (%s); it expires within %s s",
            session.session_id,
            error,
            session.ttl_seconds,
        )
        return
    raise error


def _checked_retries(retries: Any) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgument(f"retries must be an integer >= 0, got {retries!r}")
    return retries


def _client_args(
    base_url: str, token: str | None, timeout: float, transport: Any
) -> dict[str, Any]:
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as e:
        raise InvalidArgument(f"base_url {base_url!r} is not a valid URL: {e}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidArgument(f"base_url must be an http:// or https:// URL, got {base_url!r}")
    headers = {"Accept": "application/json, application/problem+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    args: dict[str, Any] = {
        "base_url": url,
        "headers": headers,
        "timeout": httpx.Timeout(timeout),
    }
    if transport is not None:
        args["transport"] = transport
    return args


# -- the blocking face ----------------------------------------------------------------------


class StateStoreClient:
    """Blocking client of the statestore REST API (rest-v1.md).

    ``namespace`` is the default of every ``ns=`` argument; ``token`` is sent as
    ``Authorization: Bearer``; ``timeout`` (seconds) applies to connecting and
    to each read or write on the connection; ``transport`` replaces httpx's
    (e.g. ``httpx.MockTransport`` in tests); ``retries`` bounds the resends of
    a call with an idempotency key after a broken connection (see the
    module). Use as ``with StateStoreClient(...) as client`` or call
    :meth:`close`. Safe to share between threads.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        namespace: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = RETRIES,
    ) -> None:
        self._api = _Api(namespace)
        self._retries = _checked_retries(retries)
        self._http = httpx.Client(**_client_args(base_url, token, timeout, transport))

    @property
    def namespace(self) -> str | None:
        """The default namespace (``None``: every call needs ``ns=``)."""
        return self._api.namespace

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def __enter__(self) -> StateStoreClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (idempotent)."""
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        tries = 0
        while True:
            tries += 1
            request = call.build(self._http, call.upload.sync_content() if call.upload else None)
            try:
                response = self._http.send(request)
            except httpx.TransportError as e:
                delay = call.retry_delay(e, tries, self._retries)
                if delay is None:
                    raise _unreachable(request, e, tries) from e
                time.sleep(delay)
                continue
            return call.finish(response)

    # sessions

    def create_session(self, ttl_seconds: int = 10, owner: str | None = None) -> Session:
        """Start a session (lease) of ``ttl_seconds``; ``InvalidArgument`` if the
        server refuses the TTL."""
        return self._send(self._api.create_session(ttl_seconds, owner))

    def keepalive(self, session_id: str) -> Session:
        """Renew the session; ``SessionExpired`` once it is gone."""
        return self._send(self._api.keepalive(session_id))

    def delete_session(self, session_id: str) -> None:
        """End the session: all its locks are released at once."""
        self._send(self._api.delete_session(session_id))

    def list_sessions(self) -> builtins.list[dict[str, Any]]:
        """The live sessions this admin token may manage (every one for an admin
        of namespace ``*``, else its own): session_id, ttl_seconds, owner, created_at."""
        return self._send(self._api.list_sessions())

    @contextmanager
    def session(
        self, ttl_seconds: int = 10, owner: str | None = None, keepalive: bool = True
    ) -> Iterator[Session]:
        """A session for the ``with`` block, kept alive every ttl/3 by a daemon
        thread (unless ``keepalive=False``) and deleted on exit. A keepalive
        that fails is retried within a second (and logged); a session found
        expired is logged and no longer kept alive."""
        session = self.create_session(ttl_seconds, owner)
        stop = threading.Event()
        thread = None
        if keepalive:
            thread = threading.Thread(
                target=self._keep_alive,
                args=(_Keeper(session), stop),
                name=f"statestore-keepalive-{session.session_id}",
                daemon=True,
            )
            thread.start()
        try:
            yield session
        except BaseException:
            self._end_session(session, stop, thread, body_failed=True)
            raise
        self._end_session(session, stop, thread, body_failed=False)

    def _keep_alive(self, keeper: _Keeper, stop: threading.Event) -> None:
        delay: float | None = keeper.interval
        while delay is not None and not stop.wait(delay):
            try:
                self.keepalive(keeper.session.session_id)
                delay = keeper.next_delay(None)
            except StateStoreError as e:
                delay = keeper.next_delay(e)

    def _end_session(
        self,
        session: Session,
        stop: threading.Event,
        thread: threading.Thread | None,
        *,
        body_failed: bool,
    ) -> None:
        stop.set()
        if thread is not None:
            thread.join()
        try:
            self.delete_session(session.session_id)
        except StateStoreError as e:
            _after_session(session, e, body_failed=body_failed)

    # handles

    def add_and_lock(
        self,
        name: str,
        data: Body,
        session_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        sha256: str | None = None,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> RestHandle:
        """Create handle ``name`` with ``data`` (streamed unless bytes), locked by
        the session. ``AlreadyExists``, ``IntegrityError`` (``sha256`` does not
        match, nothing stored), ``TooLarge``, ``Fenced``, ``SessionExpired``.
        Sent with ``idempotency_key`` (default: a fresh one) and resent with it
        after a broken connection (see the module)."""
        return self._send(
            self._api.put(
                name,
                data,
                session_id,
                expected_version=None,
                metadata=metadata,
                sha256=sha256,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                ns=ns,
            )
        )

    def replace(
        self,
        name: str,
        expected_version: int,
        data: Body,
        session_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        sha256: str | None = None,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> RestHandle:
        """Replace the state of ``name`` if it is still at ``expected_version``
        (``If-Match``). ``VersionConflict``, ``NotFound``, ``Fenced``, ...
        Sent with ``idempotency_key`` (default: a fresh one) and resent with it
        after a broken connection (see the module)."""
        return self._send(
            self._api.put(
                name,
                data,
                session_id,
                expected_version=expected_version,
                metadata=metadata,
                sha256=sha256,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                ns=ns,
            )
        )

    def get(self, name: str, *, ns: str | None = None) -> RestHandle:
        """The handle, without locking; ``NotFound``."""
        return self._send(self._api.get(name, ns))

    def exists(self, name: str, *, ns: str | None = None) -> int | None:
        """The handle's version, or ``None`` when there is no such handle."""
        return self._send(self._api.exists(name, ns))

    def read(self, name: str, *, ns: str | None = None) -> bytes:
        """The state bytes, verified against ``X-Content-SHA256``
        (``IntegrityError``, also for a body the server cut off); ``NotFound``."""
        return b"".join(self.open_read(name, ns=ns))

    def open_read(
        self, name: str, *, ns: str | None = None, chunk_size: int | None = None
    ) -> Iterator[bytes]:
        """Iterate over the state in chunks as they arrive, the last one held
        back until the body has matched ``X-Content-SHA256``: on a mismatch,
        or a body cut off before its ``Content-Length``, ``IntegrityError``
        comes in its place.
        The request is sent on the first ``next()``; close the iterator (or
        exhaust it) to free the connection."""
        call = self._api.state(name, ns)
        request = call.build(self._http, None)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as e:
            raise _unreachable(request, e) from e
        try:
            if not response.is_success:
                response.read()
                call.finish(response)
            verifier = _Verifier(response)
            try:
                for chunk in response.iter_bytes(chunk_size):
                    if ready := verifier.pass_on(chunk):
                        yield ready
            except httpx.RemoteProtocolError as e:
                raise verifier.cut_off(e) from e
            except httpx.TransportError as e:
                raise _unreachable(request, e) from e
            if last := verifier.finish():
                yield last
        finally:
            response.close()

    def get_and_lock(self, name: str, session_id: str, *, ns: str | None = None) -> RestHandle:
        """Lock the handle for the session and return it; ``NotFound`` (also
        while its removal is pending)."""
        return self._send(self._api.get_and_lock(name, session_id, ns))

    def release(self, name: str, session_id: str, *, ns: str | None = None) -> None:
        """Drop the session's lock on ``name`` (fine when not held)."""
        self._send(self._api.release(name, session_id, ns))

    def release_and_try_remove(
        self,
        name: str,
        session_id: str,
        *,
        deferred: bool = False,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> bool:
        """Release the session's lock and remove the handle: ``True`` when gone
        (or never there); ``False`` when others hold locks (own lock released,
        handle kept; with ``deferred=True`` it is removed once they let go)."""
        return self._send(
            self._api.release_and_try_remove(
                name, session_id, deferred=deferred, fencing_token=fencing_token, ns=ns
            )
        )

    def remove_prefix(
        self,
        prefix: str,
        session_id: str,
        *,
        deferred: bool = False,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> PrefixRemoval:
        """``release_and_try_remove`` of every handle whose name starts with
        ``prefix`` (``""``: all): ``(removed, kept)`` names, where ``kept`` are
        those other sessions lock (with ``deferred=True``: pending removal,
        done when they let go). ``Fenced`` (nothing removed) with a stale
        ``fencing_token``."""
        return self._send(
            self._api.remove_prefix(
                prefix, session_id, deferred=deferred, fencing_token=fencing_token, ns=ns
            )
        )

    def release_prefix(self, prefix: str, session_id: str, *, ns: str | None = None) -> None:
        """Drop every lock of the session on handles whose name starts with
        ``prefix`` (``""``: all); the session stays alive."""
        self._send(self._api.release_prefix(prefix, session_id, ns))

    def list(
        self,
        prefix: str | None = None,
        *,
        lock: bool = False,
        session_id: str | None = None,
        ns: str | None = None,
    ) -> Listing:
        """All handles (whose names start with ``prefix``), sorted, one snapshot;
        ``lock=True`` also locks each for ``session_id``."""
        return self._send(self._api.listing(prefix, lock=lock, session_id=session_id, ns=ns))

    def get_all_and_lock(
        self, session_id: str, *, ns: str | None = None
    ) -> builtins.list[RestHandle]:
        """Lock every handle of the namespace for the session; sorted by name."""
        return self.list(lock=True, session_id=session_id, ns=ns).handles

    def get_all_names(self, *, ns: str | None = None) -> builtins.list[str]:
        """The names of all handles, sorted."""
        return [h.name for h in self.list(ns=ns).handles]

    def holders(self, name: str, *, ns: str | None = None) -> builtins.list[str]:
        """Session ids holding a lock on ``name`` (``[]`` when there is none)."""
        return self._send(self._api.holders(name, ns))

    # counters

    def counter_get(self, name: str, *, ns: str | None = None) -> int:
        """The counter's value (1 if never set)."""
        return self._send(self._api.counter_get(name, ns))

    def counter_increment(
        self,
        name: str,
        *,
        session_id: str | None = None,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> int:
        """Atomically add one; returns the value before the increment. With
        ``session_id`` it is sent with ``idempotency_key`` (default: a fresh
        one) and resent with it after a broken connection, so the counter
        advances once (a key is per session: without one, no key, no resend)."""
        return self._send(
            self._api.counter_increment(name, session_id, fencing_token, idempotency_key, ns)
        )

    def counter_delete(
        self,
        name: str,
        *,
        session_id: str | None = None,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> None:
        """Delete the counter (fine when absent): the next read is 1 again.
        ``Fenced`` (nothing deleted) with a stale ``fencing_token``."""
        self._send(self._api.counter_delete(name, session_id, fencing_token, ns))

    def counter_set(
        self, name: str, value: int, *, fencing_token: int | None = None, ns: str | None = None
    ) -> int:
        """Set the counter to ``value``; returns the value stored."""
        return self._send(self._api.counter_set(name, value, fencing_token, ns))

    def counter_list(self, prefix: str = "", *, ns: str | None = None) -> CounterListing:
        """Every counter whose name starts with ``prefix`` (empty: all) with
        its value, sorted by name, from one snapshot, and its revision."""
        return self._send(self._api.counter_list(prefix, ns))

    def counter_delete_prefix(
        self,
        prefix: str = "",
        *,
        session_id: str | None = None,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> builtins.list[str]:
        """Delete every counter whose name starts with ``prefix`` (empty: all);
        returns their names, sorted. ``Fenced`` (nothing deleted) with a stale
        ``fencing_token``."""
        return self._send(self._api.counter_delete_prefix(prefix, session_id, fencing_token, ns))

    # leadership

    def campaign(self, session_id: str, *, wait: float = 0, ns: str | None = None) -> Leadership:
        """Lead the namespace (also if already leading): ``(leader,
        fencing_token)``. When another session leads, wait up to ``wait``
        seconds (server limit 60) for leadership; then ``NotLeader`` with
        ``details["leader"]``. The call's read timeout grows by ``wait``."""
        return self._send(self._api.campaign(session_id, wait, ns))

    def leader(self, *, ns: str | None = None) -> Leadership | None:
        """The current ``(leader, fencing_token)`` with the leader's ``info``
        (one read on the server), or ``None`` if nobody leads."""
        return self._send(self._api.leader(ns))

    def resign(self, session_id: str, *, ns: str | None = None) -> None:
        """Give up leadership held by the session; its info goes with it."""
        self._send(self._api.resign(session_id, ns))

    def put_leader_info(
        self, session_id: str, key: str, value: Any, *, ns: str | None = None
    ) -> None:
        """Publish ``value`` (plain JSON, at most 16 KiB) under ``key`` for as
        long as the session's leadership lasts. ``NotLeader`` (nothing
        written) unless the session leads; ``TooLarge`` over the limits."""
        self._send(self._api.put_leader_info(session_id, key, value, ns))

    def delete_leader_info(self, session_id: str, key: str, *, ns: str | None = None) -> None:
        """Remove the info entry ``key`` (also when absent); ``NotLeader``
        unless the session leads."""
        self._send(self._api.delete_leader_info(session_id, key, ns))

    # watch

    def watch(
        self,
        since: int | None = None,
        *,
        timeout: float = 30,
        prefix: str | None = None,
        kinds: str | Iterable[str] | None = None,
        ns: str | None = None,
    ) -> WatchAnswer:
        """One long poll of the namespace's changes after ``since`` (see the
        module docstring); ``Compacted`` when etcd no longer keeps ``since``."""
        return self._send(self._api.watch(since, timeout, prefix, kinds, ns))

    def follow(
        self,
        since: int | None = None,
        *,
        timeout: float = 30,
        prefix: str | None = None,
        kinds: str | Iterable[str] | None = None,
        ns: str | None = None,
    ) -> Iterator[RestWatchEvent]:
        """Every change from now (or after ``since``) on, forever, re-listing
        after a 410 (see the module docstring and :class:`_Follower`)."""
        follower = _Follower(self._api, since, timeout=timeout, prefix=prefix, kinds=kinds, ns=ns)
        while True:
            yield from follower.receive(self._send(follower.next_call()))

    # checkpoints

    def add_checkpoint(
        self,
        checkpoint_id: int,
        data: Body,
        session_id: str,
        *,
        retain: int = 1,
        savepoint: bool = False,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> tuple[RestCheckpoint, builtins.list[int]]:
        """Store checkpoint ``checkpoint_id`` (locked by the session) and subsume
        older ones beyond ``retain``: ``(checkpoint, subsumed ids)``. Sent with
        ``idempotency_key`` (default: a fresh one) and resent with it after a
        broken connection (see the module)."""
        return self._send(
            self._api.add_checkpoint(
                checkpoint_id,
                data,
                session_id,
                retain=retain,
                savepoint=savepoint,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                ns=ns,
            )
        )

    def checkpoints(
        self, lock: bool = False, session_id: str | None = None, *, ns: str | None = None
    ) -> builtins.list[RestCheckpoint]:
        """All checkpoints ascending by id; ``lock=True`` locks them for
        ``session_id`` (recovery)."""
        return self._send(self._api.checkpoints(lock, session_id, ns))

    def latest_checkpoint(self, *, ns: str | None = None) -> RestCheckpoint | None:
        """The newest checkpoint, or ``None`` when there is none."""
        return self._send(self._api.latest_checkpoint(ns))

    # namespaces

    def delete_namespace(self, ns: str) -> bool:
        """Remove everything in namespace ``ns`` (admin): ``True`` when done,
        ``False`` while handles locked by live sessions are still pending."""
        return self._send(self._api.delete_namespace(ns))


# -- the async face -------------------------------------------------------------------------


class AsyncStateStoreClient:
    """Async client of the statestore REST API (rest-v1.md); the same methods as
    :class:`StateStoreClient`, as coroutines.

    Use as ``async with AsyncStateStoreClient(...) as client`` or call
    :meth:`aclose`. State may also be an async iterable of bytes or a file
    object with ``async def read``; a blocking file object is read on a
    worker thread, while a plain iterable is iterated on the event loop (so
    it should not block).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        namespace: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retries: int = RETRIES,
    ) -> None:
        self._api = _Api(namespace)
        self._retries = _checked_retries(retries)
        self._http = httpx.AsyncClient(**_client_args(base_url, token, timeout, transport))

    @property
    def namespace(self) -> str | None:
        """The default namespace (``None``: every call needs ``ns=``)."""
        return self._api.namespace

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    async def __aenter__(self) -> AsyncStateStoreClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (idempotent)."""
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        tries = 0
        while True:
            tries += 1
            request = call.build(self._http, call.upload.async_content() if call.upload else None)
            try:
                response = await self._http.send(request)
            except httpx.TransportError as e:
                delay = call.retry_delay(e, tries, self._retries)
                if delay is None:
                    raise _unreachable(request, e, tries) from e
                await asyncio.sleep(delay)
                continue
            return call.finish(response)

    # sessions

    async def create_session(self, ttl_seconds: int = 10, owner: str | None = None) -> Session:
        """Start a session (lease) of ``ttl_seconds``; ``InvalidArgument`` if the
        server refuses the TTL."""
        return await self._send(self._api.create_session(ttl_seconds, owner))

    async def keepalive(self, session_id: str) -> Session:
        """Renew the session; ``SessionExpired`` once it is gone."""
        return await self._send(self._api.keepalive(session_id))

    async def delete_session(self, session_id: str) -> None:
        """End the session: all its locks are released at once."""
        await self._send(self._api.delete_session(session_id))

    async def list_sessions(self) -> builtins.list[dict[str, Any]]:
        """The live sessions this admin token may manage (every one for an admin
        of namespace ``*``, else its own): session_id, ttl_seconds, owner, created_at."""
        return await self._send(self._api.list_sessions())

    @asynccontextmanager
    async def session(
        self, ttl_seconds: int = 10, owner: str | None = None, keepalive: bool = True
    ) -> AsyncIterator[Session]:
        """A session for the ``async with`` block, kept alive every ttl/3 by a
        task (unless ``keepalive=False``) and deleted on exit. A keepalive that
        fails is retried within a second (and logged); a session found expired
        is logged and no longer kept alive."""
        session = await self.create_session(ttl_seconds, owner)
        task = None
        if keepalive:
            task = asyncio.create_task(
                self._keep_alive(_Keeper(session)),
                name=f"statestore-keepalive-{session.session_id}",
            )
        try:
            yield session
        except BaseException:
            await self._end_session(session, task, body_failed=True)
            raise
        await self._end_session(session, task, body_failed=False)

    async def _keep_alive(self, keeper: _Keeper) -> None:
        delay: float | None = keeper.interval
        while delay is not None:
            await asyncio.sleep(delay)
            try:
                await self.keepalive(keeper.session.session_id)
                delay = keeper.next_delay(None)
            except StateStoreError as e:
                delay = keeper.next_delay(e)

    async def _end_session(
        self, session: Session, task: asyncio.Task[None] | None, *, body_failed: bool
    ) -> None:
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled() and (failure := task.exception()) is not None:
                logger.warning(
                    "keepalive task of session %s failed: %r", session.session_id, failure
                )
        try:
            await self.delete_session(session.session_id)
        except StateStoreError as e:
            _after_session(session, e, body_failed=body_failed)

    # handles

    async def add_and_lock(
        self,
        name: str,
        data: Body,
        session_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        sha256: str | None = None,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> RestHandle:
        """Create handle ``name`` with ``data`` (streamed unless bytes), locked by
        the session. ``AlreadyExists``, ``IntegrityError`` (``sha256`` does not
        match, nothing stored), ``TooLarge``, ``Fenced``, ``SessionExpired``.
        Sent with ``idempotency_key`` (default: a fresh one) and resent with it
        after a broken connection (see the module)."""
        return await self._send(
            self._api.put(
                name,
                data,
                session_id,
                expected_version=None,
                metadata=metadata,
                sha256=sha256,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                ns=ns,
            )
        )

    async def replace(
        self,
        name: str,
        expected_version: int,
        data: Body,
        session_id: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        sha256: str | None = None,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> RestHandle:
        """Replace the state of ``name`` if it is still at ``expected_version``
        (``If-Match``). ``VersionConflict``, ``NotFound``, ``Fenced``, ...
        Sent with ``idempotency_key`` (default: a fresh one) and resent with it
        after a broken connection (see the module)."""
        return await self._send(
            self._api.put(
                name,
                data,
                session_id,
                expected_version=expected_version,
                metadata=metadata,
                sha256=sha256,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                ns=ns,
            )
        )

    async def get(self, name: str, *, ns: str | None = None) -> RestHandle:
        """The handle, without locking; ``NotFound``."""
        return await self._send(self._api.get(name, ns))

    async def exists(self, name: str, *, ns: str | None = None) -> int | None:
        """The handle's version, or ``None`` when there is no such handle."""
        return await self._send(self._api.exists(name, ns))

    async def read(self, name: str, *, ns: str | None = None) -> bytes:
        """The state bytes, verified against ``X-Content-SHA256``
        (``IntegrityError``, also for a body the server cut off); ``NotFound``."""
        return b"".join([chunk async for chunk in self.open_read(name, ns=ns)])

    async def open_read(
        self, name: str, *, ns: str | None = None, chunk_size: int | None = None
    ) -> AsyncIterator[bytes]:
        """Iterate over the state in chunks as they arrive, the last one held
        back until the body has matched ``X-Content-SHA256``: on a mismatch,
        or a body cut off before its ``Content-Length``, ``IntegrityError``
        comes in its place.
        The request is sent on the first ``__anext__``; wrap the iterator in
        ``contextlib.aclosing`` when leaving the loop early."""
        call = self._api.state(name, ns)
        request = call.build(self._http, None)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as e:
            raise _unreachable(request, e) from e
        try:
            if not response.is_success:
                await response.aread()
                call.finish(response)
            verifier = _Verifier(response)
            try:
                async for chunk in response.aiter_bytes(chunk_size):
                    if ready := verifier.pass_on(chunk):
                        yield ready
            except httpx.RemoteProtocolError as e:
                raise verifier.cut_off(e) from e
            except httpx.TransportError as e:
                raise _unreachable(request, e) from e
            if last := verifier.finish():
                yield last
        finally:
            await response.aclose()

    async def get_and_lock(
        self, name: str, session_id: str, *, ns: str | None = None
    ) -> RestHandle:
        """Lock the handle for the session and return it; ``NotFound`` (also
        while its removal is pending)."""
        return await self._send(self._api.get_and_lock(name, session_id, ns))

    async def release(self, name: str, session_id: str, *, ns: str | None = None) -> None:
        """Drop the session's lock on ``name`` (fine when not held)."""
        await self._send(self._api.release(name, session_id, ns))

    async def release_and_try_remove(
        self,
        name: str,
        session_id: str,
        *,
        deferred: bool = False,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> bool:
        """Release the session's lock and remove the handle: ``True`` when gone
        (or never there); ``False`` when others hold locks (own lock released,
        handle kept; with ``deferred=True`` it is removed once they let go)."""
        return await self._send(
            self._api.release_and_try_remove(
                name, session_id, deferred=deferred, fencing_token=fencing_token, ns=ns
            )
        )

    async def remove_prefix(
        self,
        prefix: str,
        session_id: str,
        *,
        deferred: bool = False,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> PrefixRemoval:
        """``release_and_try_remove`` of every handle whose name starts with
        ``prefix`` (``""``: all): ``(removed, kept)`` names, where ``kept`` are
        those other sessions lock (with ``deferred=True``: pending removal,
        done when they let go). ``Fenced`` (nothing removed) with a stale
        ``fencing_token``."""
        return await self._send(
            self._api.remove_prefix(
                prefix, session_id, deferred=deferred, fencing_token=fencing_token, ns=ns
            )
        )

    async def release_prefix(self, prefix: str, session_id: str, *, ns: str | None = None) -> None:
        """Drop every lock of the session on handles whose name starts with
        ``prefix`` (``""``: all); the session stays alive."""
        await self._send(self._api.release_prefix(prefix, session_id, ns))

    async def list(
        self,
        prefix: str | None = None,
        *,
        lock: bool = False,
        session_id: str | None = None,
        ns: str | None = None,
    ) -> Listing:
        """All handles (whose names start with ``prefix``), sorted, one snapshot;
        ``lock=True`` also locks each for ``session_id``."""
        return await self._send(self._api.listing(prefix, lock=lock, session_id=session_id, ns=ns))

    async def get_all_and_lock(
        self, session_id: str, *, ns: str | None = None
    ) -> builtins.list[RestHandle]:
        """Lock every handle of the namespace for the session; sorted by name."""
        return (await self.list(lock=True, session_id=session_id, ns=ns)).handles

    async def get_all_names(self, *, ns: str | None = None) -> builtins.list[str]:
        """The names of all handles, sorted."""
        return [h.name for h in (await self.list(ns=ns)).handles]

    async def holders(self, name: str, *, ns: str | None = None) -> builtins.list[str]:
        """Session ids holding a lock on ``name`` (``[]`` when there is none)."""
        return await self._send(self._api.holders(name, ns))

    # counters

    async def counter_get(self, name: str, *, ns: str | None = None) -> int:
        """The counter's value (1 if never set)."""
        return await self._send(self._api.counter_get(name, ns))

    async def counter_increment(
        self,
        name: str,
        *,
        session_id: str | None = None,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> int:
        """Atomically add one; returns the value before the increment. With
        ``session_id`` it is sent with ``idempotency_key`` (default: a fresh
        one) and resent with it after a broken connection, so the counter
        advances once (a key is per session: without one, no key, no resend)."""
        return await self._send(
            self._api.counter_increment(name, session_id, fencing_token, idempotency_key, ns)
        )

    async def counter_delete(
        self,
        name: str,
        *,
        session_id: str | None = None,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> None:
        """Delete the counter (fine when absent): the next read is 1 again.
        ``Fenced`` (nothing deleted) with a stale ``fencing_token``."""
        await self._send(self._api.counter_delete(name, session_id, fencing_token, ns))

    async def counter_set(
        self, name: str, value: int, *, fencing_token: int | None = None, ns: str | None = None
    ) -> int:
        """Set the counter to ``value``; returns the value stored."""
        return await self._send(self._api.counter_set(name, value, fencing_token, ns))

    async def counter_list(self, prefix: str = "", *, ns: str | None = None) -> CounterListing:
        """Every counter whose name starts with ``prefix`` (empty: all) with
        its value, sorted by name, from one snapshot, and its revision."""
        return await self._send(self._api.counter_list(prefix, ns))

    async def counter_delete_prefix(
        self,
        prefix: str = "",
        *,
        session_id: str | None = None,
        fencing_token: int | None = None,
        ns: str | None = None,
    ) -> builtins.list[str]:
        """Delete every counter whose name starts with ``prefix`` (empty: all);
        returns their names, sorted. ``Fenced`` (nothing deleted) with a stale
        ``fencing_token``."""
        return await self._send(
            self._api.counter_delete_prefix(prefix, session_id, fencing_token, ns)
        )

    # leadership

    async def campaign(
        self, session_id: str, *, wait: float = 0, ns: str | None = None
    ) -> Leadership:
        """Lead the namespace (also if already leading): ``(leader,
        fencing_token)``. When another session leads, wait up to ``wait``
        seconds (server limit 60) for leadership; then ``NotLeader`` with
        ``details["leader"]``. The call's read timeout grows by ``wait``."""
        return await self._send(self._api.campaign(session_id, wait, ns))

    async def leader(self, *, ns: str | None = None) -> Leadership | None:
        """The current ``(leader, fencing_token)`` with the leader's ``info``
        (one read on the server), or ``None`` if nobody leads."""
        return await self._send(self._api.leader(ns))

    async def resign(self, session_id: str, *, ns: str | None = None) -> None:
        """Give up leadership held by the session; its info goes with it."""
        await self._send(self._api.resign(session_id, ns))

    async def put_leader_info(
        self, session_id: str, key: str, value: Any, *, ns: str | None = None
    ) -> None:
        """Publish ``value`` (plain JSON, at most 16 KiB) under ``key`` for as
        long as the session's leadership lasts. ``NotLeader`` (nothing
        written) unless the session leads; ``TooLarge`` over the limits."""
        await self._send(self._api.put_leader_info(session_id, key, value, ns))

    async def delete_leader_info(self, session_id: str, key: str, *, ns: str | None = None) -> None:
        """Remove the info entry ``key`` (also when absent); ``NotLeader``
        unless the session leads."""
        await self._send(self._api.delete_leader_info(session_id, key, ns))

    # watch

    async def watch(
        self,
        since: int | None = None,
        *,
        timeout: float = 30,
        prefix: str | None = None,
        kinds: str | Iterable[str] | None = None,
        ns: str | None = None,
    ) -> WatchAnswer:
        """One long poll of the namespace's changes after ``since`` (see the
        module docstring); ``Compacted`` when etcd no longer keeps ``since``."""
        return await self._send(self._api.watch(since, timeout, prefix, kinds, ns))

    async def follow(
        self,
        since: int | None = None,
        *,
        timeout: float = 30,
        prefix: str | None = None,
        kinds: str | Iterable[str] | None = None,
        ns: str | None = None,
    ) -> AsyncIterator[RestWatchEvent]:
        """Every change from now (or after ``since``) on, forever, re-listing
        after a 410 (see the module docstring and :class:`_Follower`)."""
        follower = _Follower(self._api, since, timeout=timeout, prefix=prefix, kinds=kinds, ns=ns)
        while True:
            for event in follower.receive(await self._send(follower.next_call())):
                yield event

    # checkpoints

    async def add_checkpoint(
        self,
        checkpoint_id: int,
        data: Body,
        session_id: str,
        *,
        retain: int = 1,
        savepoint: bool = False,
        fencing_token: int | None = None,
        idempotency_key: str | None = None,
        ns: str | None = None,
    ) -> tuple[RestCheckpoint, builtins.list[int]]:
        """Store checkpoint ``checkpoint_id`` (locked by the session) and subsume
        older ones beyond ``retain``: ``(checkpoint, subsumed ids)``. Sent with
        ``idempotency_key`` (default: a fresh one) and resent with it after a
        broken connection (see the module)."""
        return await self._send(
            self._api.add_checkpoint(
                checkpoint_id,
                data,
                session_id,
                retain=retain,
                savepoint=savepoint,
                fencing_token=fencing_token,
                idempotency_key=idempotency_key,
                ns=ns,
            )
        )

    async def checkpoints(
        self, lock: bool = False, session_id: str | None = None, *, ns: str | None = None
    ) -> builtins.list[RestCheckpoint]:
        """All checkpoints ascending by id; ``lock=True`` locks them for
        ``session_id`` (recovery)."""
        return await self._send(self._api.checkpoints(lock, session_id, ns))

    async def latest_checkpoint(self, *, ns: str | None = None) -> RestCheckpoint | None:
        """The newest checkpoint, or ``None`` when there is none."""
        return await self._send(self._api.latest_checkpoint(ns))

    # namespaces

    async def delete_namespace(self, ns: str) -> bool:
        """Remove everything in namespace ``ns`` (admin): ``True`` when done,
        ``False`` while handles locked by live sessions are still pending."""
        return await self._send(self._api.delete_namespace(ns))


__all__ = [
    "CHUNK_SIZE",
    "AsyncStateStoreClient",
    "Body",
    "CounterListing",
    "Forbidden",
    "Leadership",
    "Listing",
    "PrefixRemoval",
    "RestCheckpoint",
    "RestHandle",
    "RestHandleEvent",
    "RestLeaderEvent",
    "RestWatchEvent",
    "Session",
    "StateStoreClient",
    "Unauthorized",
    "WatchAnswer",
    "encode_segment",
    "error_from_problem",
    "error_from_response",
    "request_headers",
]
