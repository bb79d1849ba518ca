"""CLIENT-SIDE UNIT TESTS of ``statestore.http`` (the REST client).

No real statestore server is involved: ``FakeServer`` below is an in-memory
stand-in that implements the rest-v1.md rows the client uses (status codes,
problem+json bodies, headers, one-segment names) and is plugged in through
``httpx.MockTransport``. These tests pin the client's own work: error mapping
from problem bodies, URL encoding of tricky names, header building, streaming
of file/iterator bodies, hash checks, the session keepalive helpers, and both
faces (``StateStoreClient`` and ``AsyncStateStoreClient``) behaving alike.

They do NOT show that the client works with the real server: that is
test_http_client_integration.py and test_http_client_faces.py (both faces
through the same cases against ``statestore serve``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import io
import json
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from faces import FACES, rest_clients
from helpers import async_wait_until, wait_until

from statestore.data import MAX_INT64
from statestore.errors import (
    AlreadyExists,
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
from statestore.http import (
    CHUNK_SIZE,
    AsyncStateStoreClient,
    Forbidden,
    Leadership,
    RestCheckpoint,
    RestHandle,
    Session,
    StateStoreClient,
    Unauthorized,
    encode_segment,
    error_from_problem,
    error_from_response,
    request_headers,
)

BASE = "http://statestore.test:8080/api"
NS = "job-1"

# -- the fake server ---------------------------------------------------------------------


class _Problem(Exception):
    def __init__(self, status: int, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.response = problem_response(status, kind, detail, **extra)


def problem_response(status: int, kind: str, detail: str, **extra: Any) -> httpx.Response:
    body = {"type": kind, "title": kind, "status": status, "detail": detail, **extra}
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/problem+json"},
    )


@dataclass
class _Handle:
    data: bytes
    version: int
    metadata: dict[str, Any]
    created_at: str
    locks: set[str] = field(default_factory=set)
    pending_removal: bool = False


@dataclass
class _Checkpoint:
    savepoint: bool


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeServer:
    """An in-memory rest-v1 server for the client's unit tests.

    Implements sessions, handles, listing, counters, leadership, checkpoints,
    namespace cleanup and bearer auth as rest-v1.md states them. Routing
    splits the *raw* path on ``/`` and percent-decodes each segment, so a
    name the client did not encode as one segment lands on the wrong route.
    Knobs for the client's error paths: ``corrupt_state`` (serve altered bytes
    under the right hash), ``omit_state_hash``, ``lie_about_put`` (answer a
    PUT with a handle of other bytes), ``max_size``.
    """

    def __init__(self, tokens: dict[str, tuple[list[str], str]] | None = None) -> None:
        self.tokens = tokens  # token -> (namespace globs, role); None = auth off
        self.sessions: dict[str, int] = {}
        self.owners: dict[str, str | None] = {}
        self.keepalives: dict[str, int] = {}
        self.handles: dict[tuple[str, str], _Handle] = {}
        self.checkpoint_info: dict[tuple[str, int], _Checkpoint] = {}
        self.counters: dict[tuple[str, str], int] = {}
        self.leaders: dict[str, tuple[str, int]] = {}
        self.leader_info: dict[str, dict[str, Any]] = {}  # by namespace, of its leadership
        self.revision = 0
        self.next_session = 0
        self.next_token = 0
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        self.max_size = 64 * 1024 * 1024
        self.corrupt_state = False
        self.omit_state_hash = False
        self.lie_about_put = False
        self.lock = threading.Lock()

    # helpers for tests

    def expire(self, sid: str) -> None:
        """The session's lease ran out: it and its locks vanish."""
        with self.lock:
            self._end_session(sid)

    # plumbing

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.requests.append(request)
            self.bodies.append(request.content)
            try:
                return self._route(request)
            except _Problem as p:
                return p.response

    def _bump(self) -> int:
        self.revision += 1
        return self.revision

    def _auth(self, request: httpx.Request, ns: str | None, role: str) -> None:
        if self.tokens is None:
            return
        auth = request.headers.get("authorization", "")
        entry = (
            self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        )
        if entry is None:
            raise _Problem(401, "unauthorized", "missing or unknown bearer token")
        globs, have = entry
        rank = {"read": 0, "write": 1, "admin": 2}
        if rank[have] < rank[role]:
            raise _Problem(403, "forbidden", f"role {have} may not {role}")
        if ns is not None and not any(fnmatch.fnmatchcase(ns, g) for g in globs):
            raise _Problem(403, "forbidden", f"namespace {ns} not allowed")

    def _session(self, request: httpx.Request) -> str:
        sid = request.headers.get("x-session-id")
        if not sid:
            raise _Problem(400, "invalid-argument", "X-Session-Id is required")
        if sid not in self.sessions:
            raise _Problem(410, "session-expired", f"session {sid} is unknown or expired")
        return sid

    def _fence(self, request: httpx.Request, ns: str) -> None:
        token = request.headers.get("x-fencing-token")
        if token is not None and self.leaders.get(ns, ("", -1))[1] != int(token):
            raise _Problem(409, "fenced", f"fencing token {token} is not the leadership of {ns}")

    @staticmethod
    def _name(name: str) -> str:
        raw = name.encode("utf-8", "surrogatepass")
        if not 1 <= len(raw) <= 512 or any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise _Problem(400, "invalid-argument", f"bad name {name!r}")
        return name

    def _json(self, ns: str, name: str, h: _Handle) -> dict[str, Any]:
        return {
            "name": name,
            "version": h.version,
            "size": len(h.data),
            "sha256": _sha(h.data),
            "created_at": h.created_at,
            "metadata": h.metadata,
            "locks": sorted(h.locks),
        }

    def _checkpoint_json(self, ns: str, cid: int) -> dict[str, Any]:
        name = f"{cid:020d}"
        body = self._json(ns, name, self.handles[(ns, name)])
        return {
            **body,
            "checkpoint_id": cid,
            "savepoint": self.checkpoint_info[(ns, cid)].savepoint,
        }

    def _end_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)
        for key, h in list(self.handles.items()):
            h.locks.discard(sid)
            if h.pending_removal and not h.locks:
                del self.handles[key]
        for ns, (leader, _) in list(self.leaders.items()):
            if leader == sid:
                del self.leaders[ns]
                self.leader_info.pop(ns, None)

    def _route(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path.split(b"?")[0].decode("ascii")
        prefix = "/api/"
        assert raw_path.startswith(prefix), raw_path
        parts = [unquote(p, errors="strict") for p in raw_path[len(prefix) :].split("/")]
        method = request.method
        match parts:
            case ["v1", "sessions"] if method == "POST":
                self._auth(request, None, "read")
                return self._create_session(request)
            case ["v1", "sessions", sid, "keepalive"] if method == "POST":
                self._auth(request, None, "read")
                if sid not in self.sessions:
                    raise _Problem(410, "session-expired", f"session {sid} expired")
                self.keepalives[sid] = self.keepalives.get(sid, 0) + 1
                return httpx.Response(
                    200, json={"session_id": sid, "ttl_seconds": self.sessions[sid]}
                )
            case ["v1", "sessions", sid] if method == "DELETE":
                self._auth(request, None, "read")
                self._end_session(sid)
                return httpx.Response(204)
            case ["v1", "namespaces", ns] if method == "DELETE":
                self._auth(request, ns, "admin")
                return self._delete_namespace(ns)
            case ["v1", "namespaces", ns, "handles"] if method == "GET":
                self._auth(request, ns, "read")
                return self._list(request, ns)
            case ["v1", "namespaces", ns, "handles", name, *rest]:
                self._auth(request, ns, "read" if method == "GET" else "write")
                return self._handle_call(request, ns, self._name(name), rest)
            case ["v1", "namespaces", ns, "counters", name, *rest]:
                self._auth(request, ns, "read" if method == "GET" else "write")
                return self._counter(request, ns, name, rest)
            case ["v1", "namespaces", ns, "leader"]:
                self._auth(request, ns, "read" if method == "GET" else "write")
                return self._leader(request, ns)
            case ["v1", "namespaces", ns, "leader", "info", key]:
                self._auth(request, ns, "write")
                return self._leader_info(request, ns, self._name(key))
            case ["v1", "namespaces", ns, "checkpoints", *rest]:
                self._auth(request, ns, "read" if method == "GET" else "write")
                return self._checkpoints(request, ns, rest)
        return httpx.Response(404, json={"detail": "Not Found"})  # as FastAPI answers

    # sessions

    def _create_session(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        ttl = body.get("ttl_seconds", 10)
        if not isinstance(ttl, int) or not 1 <= ttl <= 3600:
            raise _Problem(400, "invalid-argument", f"ttl_seconds {ttl!r} out of range 1..3600")
        self.next_session += 1
        sid = f"s-{self.next_session}"
        self.sessions[sid] = ttl
        self.owners[sid] = body.get("owner")
        return httpx.Response(201, json={"session_id": sid, "ttl_seconds": ttl})

    # handles

    def _handle_call(
        self, request: httpx.Request, ns: str, name: str, rest: list[str]
    ) -> httpx.Response:
        method, key = request.method, (ns, name)
        h = self.handles.get(key)
        if rest == [] and method == "PUT":
            return self._put(request, ns, name)
        if rest == [] and method == "GET":
            if h is None:
                raise _Problem(404, "not-found", f"no handle {name!r}")
            return httpx.Response(
                200, json=self._json(ns, name, h), headers={"ETag": f'"{h.version}"'}
            )
        if rest == ["state"] and method == "GET":
            if h is None:
                raise _Problem(404, "not-found", f"no handle {name!r}")
            data = h.data
            headers = {"X-Content-SHA256": _sha(data)}
            if self.omit_state_hash:
                headers = {}
            if self.corrupt_state:
                data = bytes([data[0] ^ 1]) + data[1:]
            return httpx.Response(200, content=data, headers=headers)
        if rest == ["lock"] and method == "POST":
            sid = self._session(request)
            if h is None or h.pending_removal:
                raise _Problem(404, "not-found", f"no handle {name!r}")
            h.locks.add(sid)
            return httpx.Response(200, json=self._json(ns, name, h))
        if rest == ["lock"] and method == "DELETE":
            sid = self._session(request)
            if h is not None:
                h.locks.discard(sid)
                if h.pending_removal and not h.locks:
                    del self.handles[key]
            return httpx.Response(204)
        if rest == [] and method == "DELETE":
            sid = self._session(request)
            self._fence(request, ns)
            if h is None:
                return httpx.Response(204)
            others = sorted(h.locks - {sid})
            h.locks.discard(sid)
            if not others:
                del self.handles[key]
                self._bump()
                return httpx.Response(204)
            if request.url.params.get("deferred") == "true":
                h.pending_removal = True
                return httpx.Response(202, json={"status": "pending-removal"})
            raise _Problem(409, "locked", f"{name!r} is locked by others", holders=others)
        return httpx.Response(405, text="Method Not Allowed")

    def _put(self, request: httpx.Request, ns: str, name: str) -> httpx.Response:
        sid = self._session(request)
        data = request.content
        declared = request.headers.get("x-content-sha256")
        if declared is not None and declared != _sha(data):
            raise _Problem(400, "integrity", f"body SHA-256 is {_sha(data)}, not {declared}")
        if len(data) > self.max_size:
            raise _Problem(413, "too-large", f"{len(data)} bytes over {self.max_size}")
        try:
            metadata = json.loads(request.headers.get("x-handle-metadata", "{}"))
        except ValueError:
            raise _Problem(400, "invalid-argument", "X-Handle-Metadata is not JSON") from None
        self._fence(request, ns)
        key = (ns, name)
        h = self.handles.get(key)
        if_match = request.headers.get("if-match")
        stored = data if not self.lie_about_put else data + b"!"
        if if_match is not None:
            if h is None:
                raise _Problem(404, "not-found", f"no handle {name!r} to replace")
            if if_match != f'"{h.version}"':
                raise _Problem(
                    412, "version-conflict", f"{name!r} is at {h.version}", version=h.version
                )
            h.data, h.metadata, h.version = stored, metadata, self._bump()
            return httpx.Response(200, json=self._json(ns, name, h))
        if h is not None:
            raise _Problem(409, "already-exists", f"{name!r} exists")
        h = _Handle(stored, self._bump(), metadata, datetime.now(UTC).isoformat(), {sid})
        self.handles[key] = h
        return httpx.Response(201, json=self._json(ns, name, h))

    def _list(self, request: httpx.Request, ns: str) -> httpx.Response:
        prefix = request.url.params.get("prefix", "")
        lock = request.url.params.get("lock") == "true"
        sid = self._session(request) if lock else None
        names = sorted(n for (n_ns, n) in self.handles if n_ns == ns and n.startswith(prefix))
        out = []
        for name in names:
            h = self.handles[(ns, name)]
            if sid is not None:
                h.locks.add(sid)
            out.append(self._json(ns, name, h))
        return httpx.Response(200, json={"handles": out, "revision": self.revision})

    # counters, leadership, checkpoints, namespaces

    def _counter(
        self, request: httpx.Request, ns: str, name: str, rest: list[str]
    ) -> httpx.Response:
        key = (ns, name)
        if rest == [] and request.method == "GET":
            return httpx.Response(200, json={"value": self.counters.get(key, 1)})
        if rest == ["increment"] and request.method == "POST":
            self._fence(request, ns)
            before = self.counters.get(key, 1)
            self.counters[key] = before + 1
            return httpx.Response(200, json={"value": before})
        if rest == [] and request.method == "PUT":
            self._fence(request, ns)
            value = json.loads(request.content)["value"]
            self.counters[key] = value
            return httpx.Response(200, json={"value": value})
        return httpx.Response(405, text="Method Not Allowed")

    def _leader(self, request: httpx.Request, ns: str) -> httpx.Response:
        current = self.leaders.get(ns)
        if request.method == "GET":
            if current is None:
                raise _Problem(404, "not-found", f"nobody leads {ns}")
            info = self.leader_info.get(ns, {})
            return httpx.Response(
                200, json={"leader": current[0], "fencing_token": current[1], "info": info}
            )
        sid = self._session(request)
        if request.method == "POST":
            if current is not None and current[0] != sid:
                raise _Problem(409, "not-leader", f"{current[0]} leads {ns}", leader=current[0])
            if current is None:
                self.next_token += 1
                current = self.leaders[ns] = (sid, self.next_token)
            return httpx.Response(200, json={"leader": current[0], "fencing_token": current[1]})
        if current is not None and current[0] == sid:
            del self.leaders[ns]
            self.leader_info.pop(ns, None)
        return httpx.Response(204)

    def _leader_info(self, request: httpx.Request, ns: str, key: str) -> httpx.Response:
        sid = self._session(request)
        current = self.leaders.get(ns)
        if current is None or current[0] != sid:
            leader = None if current is None else current[0]
            raise _Problem(409, "not-leader", f"{leader} leads {ns}", leader=leader)
        if request.method == "PUT":
            if len(request.content) > 16 * 1024:
                raise _Problem(413, "too-large", "info over 16 KiB")
            self.leader_info.setdefault(ns, {})[key] = json.loads(request.content)
        else:
            self.leader_info.get(ns, {}).pop(key, None)
        return httpx.Response(204)

    def _checkpoints(self, request: httpx.Request, ns: str, rest: list[str]) -> httpx.Response:
        ids = sorted(cid for (c_ns, cid) in self.checkpoint_info if c_ns == ns)
        if rest == [] and request.method == "GET":
            lock = request.url.params.get("lock") == "true"
            sid = self._session(request) if lock else None
            for cid in ids:
                if sid is not None:
                    self.handles[(ns, f"{cid:020d}")].locks.add(sid)
            return httpx.Response(
                200, json={"checkpoints": [self._checkpoint_json(ns, c) for c in ids]}
            )
        if rest == ["latest"] and request.method == "GET":
            if not ids:
                raise _Problem(404, "not-found", f"no checkpoint in {ns}")
            return httpx.Response(200, json=self._checkpoint_json(ns, ids[-1]))
        if len(rest) == 1 and request.method == "POST":
            sid = self._session(request)
            self._fence(request, ns)
            cid = int(rest[0])
            retain = int(request.url.params.get("retain", "1"))
            savepoint = request.url.params.get("savepoint") == "true"
            name = f"{cid:020d}"
            if (ns, name) in self.handles:
                raise _Problem(409, "already-exists", f"checkpoint {cid} exists")
            created = datetime.now(UTC).isoformat()
            self.handles[(ns, name)] = _Handle(request.content, self._bump(), {}, created, {sid})
            self.checkpoint_info[(ns, cid)] = _Checkpoint(savepoint)
            ids = sorted([*ids, cid])
            newest_regular = max(
                (c for c in ids if not self.checkpoint_info[(ns, c)].savepoint), default=None
            )
            subsumed = [c for c in ids[:-retain] if c != newest_regular]
            for c in subsumed:
                h = self.handles[(ns, f"{c:020d}")]
                h.locks.discard(sid)
                if not h.locks:
                    del self.handles[(ns, f"{c:020d}")]
                    del self.checkpoint_info[(ns, c)]
            body = {"checkpoint": self._checkpoint_json(ns, cid), "subsumed": subsumed}
            return httpx.Response(201, json=body)
        return httpx.Response(405, text="Method Not Allowed")

    def _delete_namespace(self, ns: str) -> httpx.Response:
        pending = False
        for key, h in list(self.handles.items()):
            if key[0] != ns:
                continue
            if h.locks:
                h.pending_removal = pending = True
            else:
                del self.handles[key]
        for key in [k for k in self.counters if k[0] == ns]:
            del self.counters[key]
        self.leaders.pop(ns, None)
        return httpx.Response(202 if pending else 204)


# -- running both faces with the same test (see faces.py) ----------------------------------


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


MakeClient = Callable[..., Any]
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(params=FACES)
def make_client(request: pytest.FixtureRequest, server: FakeServer) -> Iterator[MakeClient]:
    """Factory of a client of either face on ``server`` or another handler
    (closed at teardown)."""
    with rest_clients(request.param, BASE, namespace=NS) as make:

        def on(handler: Handler | None = None, **kwargs: Any) -> Any:
            return make(transport=httpx.MockTransport(handler or server), **kwargs)

        yield on


@pytest.fixture
def client(make_client: MakeClient) -> Any:
    return make_client()


@pytest.fixture
def sid(client: Any) -> str:
    return str(client.create_session(ttl_seconds=30, owner="jm-test").session_id)


# -- error mapping ------------------------------------------------------------------------

ALL_KINDS: list[tuple[str, int, type[StateStoreError]]] = [
    ("already-exists", 409, AlreadyExists),
    ("not-found", 404, NotFound),
    ("version-conflict", 412, VersionConflict),
    ("locked", 409, Locked),
    ("fenced", 409, Fenced),
    ("not-leader", 409, NotLeader),
    ("session-expired", 410, SessionExpired),
    ("invalid-argument", 400, InvalidArgument),
    ("integrity", 400, IntegrityError),
    ("too-large", 413, TooLarge),
    ("unauthorized", 401, Unauthorized),
    ("forbidden", 403, Forbidden),
    ("unavailable", 503, Unavailable),
    ("possible-inconsistent-state", 503, PossibleInconsistentState),
]


@pytest.mark.parametrize(("kind", "status", "cls"), ALL_KINDS)
def test_problem_type_word_selects_the_error_class(
    kind: str, status: int, cls: type[StateStoreError]
) -> None:
    err = error_from_problem(status, {"type": kind, "status": status, "detail": "why"})
    assert type(err) is cls
    assert err.kind == kind
    assert err.http_status == status
    assert err.details["status"] == status
    assert "why" in str(err)


def test_new_auth_errors_are_statestore_errors() -> None:
    assert issubclass(Unauthorized, StateStoreError)
    assert issubclass(Forbidden, StateStoreError)
    assert (Unauthorized.kind, Unauthorized.http_status) == ("unauthorized", 401)
    assert (Forbidden.kind, Forbidden.http_status) == ("forbidden", 403)


def test_problem_extension_members_become_details() -> None:
    locked = error_from_problem(
        409, {"type": "locked", "detail": "held", "holders": ["a", "b"], "message": "x"}
    )
    assert isinstance(locked, Locked)
    assert locked.details["holders"] == ["a", "b"]
    assert locked.details["message"] == "x"  # no clash with the constructor's argument
    not_leader = error_from_problem(409, {"type": "not-leader", "title": "t", "leader": "s-9"})
    assert isinstance(not_leader, NotLeader)
    assert not_leader.details["leader"] == "s-9"
    assert "t" in str(not_leader)  # title when there is no detail


def test_unknown_problem_type_is_unavailable_with_excerpt() -> None:
    err = error_from_problem(418, {"type": "teapot", "detail": "short and stout"})
    assert type(err) is Unavailable
    assert "teapot" in str(err) and "short and stout" in str(err) and "418" in str(err)
    assert err.details["status"] == 418


def _response(status: int, content: bytes, content_type: str) -> httpx.Response:
    request = httpx.Request("PUT", f"{BASE}/v1/namespaces/{NS}/handles/x")
    return httpx.Response(
        status, content=content, headers={"content-type": content_type}, request=request
    )


def test_error_from_response_reads_problem_json() -> None:
    body = json.dumps({"type": "version-conflict", "status": 412, "detail": "at 7", "version": 7})
    err = error_from_response(_response(412, body.encode(), "application/problem+json"))
    assert isinstance(err, VersionConflict)
    assert err.details == {"version": 7, "status": 412}
    assert str(err).startswith(f"PUT {BASE}/v1/namespaces/{NS}/handles/x: at 7")


def test_non_problem_5xx_is_unavailable_with_status_and_excerpt() -> None:
    html = b"<html><body>502 Bad Gateway from nginx</body></html>" + b" " * 1000 + b"tail"
    err = error_from_response(_response(502, html, "text/html"))
    assert type(err) is Unavailable
    assert "502" in str(err) and "Bad Gateway from nginx" in str(err)
    assert "tail" not in str(err)  # an excerpt, not the whole body
    assert err.details["status"] == 502


def test_non_problem_404_is_not_taken_for_a_missing_handle() -> None:
    err = error_from_response(_response(404, b'{"detail": "Not Found"}', "application/json"))
    assert type(err) is Unavailable
    assert "base_url" in str(err)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, Unauthorized), (403, Forbidden), (413, TooLarge), (400, InvalidArgument)],
)
def test_non_problem_statuses_with_one_meaning(status: int, cls: type[StateStoreError]) -> None:
    err = error_from_response(_response(status, b"nope", "text/plain"))
    assert type(err) is cls
    assert "nope" in str(err)


def test_client_raises_mapped_errors_from_the_server(client: Any, sid: str) -> None:
    client.add_and_lock("a", b"1", sid)
    with pytest.raises(AlreadyExists):
        client.add_and_lock("a", b"2", sid)
    with pytest.raises(NotFound):
        client.get("missing")
    with pytest.raises(SessionExpired):
        client.get_and_lock("a", "no-such-session")


def test_non_problem_404_from_the_server_is_unavailable(make_client: MakeClient) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    c = make_client(handler)
    with pytest.raises(Unavailable, match="404"):
        c.leader()  # a server without the leadership rows must not read as "nobody leads"
    with pytest.raises(Unavailable, match="404"):
        c.exists("x")


def test_malformed_success_body_is_unavailable(make_client: MakeClient) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>a login page</html>")

    c = make_client(handler)
    with pytest.raises(Unavailable, match="a login page"):
        c.get("x")


# -- URL encoding of names --------------------------------------------------------------

TRICKY_NAMES = [
    "plain",
    "a/b/c",
    "/leading-and-trailing/",
    "with space",
    "100%",
    "%2F",
    "a%2Fb",
    "ü/ß/日本語",
    ".",
    "..",
    "a/../b",
    "./x",
    "?q=1&r=2#frag",
    "semi;colon+plus=eq",
    "back\\slash",
    "x" * 512,
    "é" * 256,
    "emoji 🧪",
]


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_encode_segment_is_one_segment(name: str) -> None:
    seg = encode_segment(name)
    assert "/" not in seg and "?" not in seg and "#" not in seg
    assert seg not in (".", "..")
    assert unquote(seg, errors="strict") == name
    url = httpx.URL(f"{BASE}/v1/namespaces/ns/handles/{seg}/state")
    segments = url.raw_path.decode().split("/")
    assert segments[-2] == seg  # httpx did not normalise or re-split it
    assert unquote(segments[-2]) == name


@pytest.mark.parametrize("bad", ["", 7, None])
def test_encode_segment_refuses_empty_and_non_strings(bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        encode_segment(bad)


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_tricky_names_round_trip_through_the_server(client: Any, sid: str, name: str) -> None:
    h = client.add_and_lock(name, b"state of " + name.encode(), sid)
    assert h.name == name
    assert client.get(name).name == name
    assert client.read(name) == b"state of " + name.encode()
    assert client.exists(name) == h.version
    assert client.holders(name) == [sid]
    assert client.get_all_names() == [name]
    assert client.release_and_try_remove(name, sid) is True
    assert client.exists(name) is None


def test_namespace_is_encoded_too(client: Any, sid: str, server: FakeServer) -> None:
    client.add_and_lock("n", b"x", sid, ns="team/a b")
    assert ("team/a b", "n") in server.handles
    assert client.get_all_names(ns="team/a b") == ["n"]
    assert client.get_all_names() == []


def test_invalid_name_is_refused_by_the_server(client: Any, sid: str) -> None:
    with pytest.raises(InvalidArgument):
        client.add_and_lock("x" * 513, b"x", sid)
    with pytest.raises(InvalidArgument):
        client.get("")  # refused before sending: it would address the listing


def test_namespace_defaults_and_is_required(make_client: MakeClient, server: FakeServer) -> None:
    c = make_client(namespace=None)
    with pytest.raises(InvalidArgument, match="namespace"):
        c.get("x")
    with pytest.raises(NotFound):
        c.get("x", ns="other")
    assert c.namespace is None


# -- headers ------------------------------------------------------------------------------


def test_request_headers_build_every_rest_v1_header() -> None:
    headers = request_headers(
        session_id="s-1",
        fencing_token=42,
        metadata={"k": "v", "n": [1, 2.5, None, True]},
        sha256="AB" * 32,
        if_match=17,
    )
    assert headers == {
        "X-Session-Id": "s-1",
        "X-Fencing-Token": "42",
        "X-Handle-Metadata": '{"k":"v","n":[1,2.5,null,true]}',
        "X-Content-SHA256": "ab" * 32,
        "If-Match": '"17"',
    }
    assert request_headers() == {}


def test_metadata_header_is_ascii_and_round_trips_unicode() -> None:
    metadata = {"owner": "Jörg", "city": "東京", "emoji": "🧪", "ctl": "a\nb"}
    value = request_headers(metadata=metadata)["X-Handle-Metadata"]
    assert value.isascii() and "\n" not in value
    value.encode("latin-1")
    assert json.loads(value) == metadata


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metadata": ["not", "a", "dict"]},
        {"metadata": {"t": (1, 2)}},
        {"metadata": {1: "int key"}},
        {"metadata": {"x": float("nan")}},
        {"sha256": "xyz"},
        {"sha256": "a" * 63},
        {"fencing_token": True},
        {"fencing_token": "7"},
        {"if_match": 1.5},
        {"session_id": ""},
    ],
)
def test_request_headers_refuse_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        request_headers(**kwargs)


def test_headers_reach_the_server(make_client: MakeClient, server: FakeServer) -> None:
    server.tokens = {"tok-1": (["job-*"], "write")}
    c = make_client(token="tok-1")
    sid = c.create_session().session_id
    c.campaign(sid)
    token = c.leader().fencing_token
    h = c.add_and_lock("m", b"data", sid, metadata={"owner": "Jörg 東京"}, fencing_token=token)
    assert h.metadata == {"owner": "Jörg 東京"}
    put = server.requests[-1]
    assert put.headers["authorization"] == "Bearer tok-1"
    assert put.headers["x-session-id"] == sid
    assert put.headers["x-fencing-token"] == str(token)
    assert put.headers["x-content-sha256"] == _sha(b"data")  # bytes: sent automatically
    assert put.headers["content-length"] == "4"
    c.replace("m", h.version, b"new", sid, metadata={"v": 2})
    assert server.requests[-1].headers["if-match"] == f'"{h.version}"'
    assert c.get("m").metadata == {"v": 2}


# -- bodies: bytes, files, iterators ------------------------------------------------------


class ChunkReader(io.RawIOBase):
    """A binary file that records every ``read`` size and never allows an
    unbounded read (which would load the whole state)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.reads: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        assert 0 < size <= CHUNK_SIZE, f"read({size}) would not be bounded"
        self.reads.append(size)
        return self._buf.read(size)


def test_file_object_is_streamed_in_bounded_chunks(
    client: Any, sid: str, server: FakeServer
) -> None:
    data = bytes(range(256)) * (3 * CHUNK_SIZE // 256) + b"tail"
    reader = ChunkReader(data)
    h = client.add_and_lock("big", reader, sid)
    assert len(reader.reads) == 5  # 3 full chunks, the tail, the empty read at EOF
    put = server.requests[-1]
    assert "content-length" not in put.headers
    assert put.headers["transfer-encoding"] == "chunked"
    assert server.bodies[-1] == data
    assert (h.size, h.sha256) == (len(data), _sha(data))
    assert client.read("big") == data


def test_iterator_is_streamed_lazily(client: Any, sid: str, server: FakeServer) -> None:
    pulled: list[int] = []

    def chunks() -> Iterator[Any]:
        for i in range(5):
            pulled.append(i)
            yield bytes([i]) * 1000
        yield b""  # empty chunks are skipped, they would end a chunked body
        yield bytearray(b"ba")
        yield memoryview(b"mv")

    gen = chunks()
    h = client.add_and_lock("it", gen, sid)
    assert pulled == [0, 1, 2, 3, 4]
    expected = b"".join(bytes([i]) * 1000 for i in range(5)) + b"bamv"
    assert server.bodies[-1] == expected
    assert "content-length" not in server.requests[-1].headers
    assert (h.size, h.sha256) == (len(expected), _sha(expected))


def test_sha256_of_a_stream_is_sent_and_checked_by_the_server(
    client: Any, sid: str, server: FakeServer
) -> None:
    data = b"abc" * 100
    client.add_and_lock("ok", iter([data]), sid, sha256=_sha(data))
    assert server.requests[-1].headers["x-content-sha256"] == _sha(data)
    with pytest.raises(IntegrityError):
        client.add_and_lock("bad", iter([data]), sid, sha256=_sha(b"other"))
    assert client.exists("bad") is None


@pytest.mark.parametrize("bad", ["text", 12, [1, 2], {"a": 1}])
def test_bad_bodies_are_refused(client: Any, sid: str, bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        client.add_and_lock("x", bad, sid)


def test_sync_client_refuses_async_iterables(server: FakeServer) -> None:
    async def agen() -> AsyncIterator[bytes]:
        yield b"x"

    with StateStoreClient(BASE, namespace=NS, transport=httpx.MockTransport(server)) as c:
        sid = c.create_session().session_id
        with pytest.raises(InvalidArgument, match="AsyncStateStoreClient"):
            c.add_and_lock("x", agen(), sid)


class AsyncReader:
    """A file object with ``async def read`` (like aiofiles)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.reads: list[int] = []

    async def read(self, size: int = -1) -> bytes:
        assert 0 < size <= CHUNK_SIZE
        self.reads.append(size)
        await asyncio.sleep(0)
        return self._buf.read(size)


async def test_async_client_streams_async_bodies(server: FakeServer) -> None:
    transport = httpx.MockTransport(server)
    async with AsyncStateStoreClient(BASE, namespace=NS, transport=transport) as c:
        sid = (await c.create_session()).session_id

        async def agen() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0)
                yield bytes([65 + i]) * 10

        h = await c.add_and_lock("agen", agen(), sid)
        assert server.bodies[-1] == b"A" * 10 + b"B" * 10 + b"C" * 10
        assert "content-length" not in server.requests[-1].headers
        assert h.size == 30

        data = b"z" * (2 * CHUNK_SIZE + 1)
        reader = AsyncReader(data)
        h = await c.add_and_lock("afile", reader, sid)
        assert len(reader.reads) == 4
        assert (h.size, h.sha256) == (len(data), _sha(data))

        chunks = [chunk async for chunk in c.open_read("afile", chunk_size=CHUNK_SIZE)]
        assert len(chunks) == 3 and b"".join(chunks) == data


def test_handle_of_other_bytes_than_sent_is_an_integrity_error(
    client: Any, sid: str, server: FakeServer
) -> None:
    server.lie_about_put = True
    with pytest.raises(IntegrityError, match="altered on the way") as info:
        client.add_and_lock("x", iter([b"abc"]), sid)
    assert info.value.details["name"] == "x"


# -- reads --------------------------------------------------------------------------------


def test_read_and_open_read_return_the_exact_bytes(client: Any, sid: str) -> None:
    data = bytes(range(256)) * 40
    client.add_and_lock("r", data, sid)
    assert client.read("r") == data
    chunks = list(client.open_read("r", chunk_size=1000))
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= 1000 and len(chunks) > 1


def test_read_verifies_the_declared_hash(client: Any, sid: str, server: FakeServer) -> None:
    client.add_and_lock("r", b"precious state", sid)
    server.corrupt_state = True
    with pytest.raises(IntegrityError, match="SHA-256"):
        client.read("r")


def test_open_read_yields_chunks_then_raises_instead_of_the_last(
    client: Any, sid: str, server: FakeServer
) -> None:
    client.add_and_lock("r", b"0123456789" * 10, sid)
    server.corrupt_state = True
    got: list[bytes] = []
    with pytest.raises(IntegrityError):
        for chunk in client.open_read("r", chunk_size=10):
            got.append(chunk)
    # Chunks come through as they arrive, but the last one waits for the
    # verdict: the caller never holds every byte of a state that does not match.
    assert len(got) == 9


def test_missing_hash_header_cannot_be_verified(client: Any, sid: str, server: FakeServer) -> None:
    client.add_and_lock("r", b"x", sid)
    server.omit_state_hash = True
    with pytest.raises(IntegrityError, match="X-Content-SHA256"):
        client.read("r")
    with pytest.raises(IntegrityError, match="X-Content-SHA256"):
        list(client.open_read("r"))


def test_open_read_of_a_missing_handle(client: Any) -> None:
    with pytest.raises(NotFound):
        list(client.open_read("missing"))


# -- handle semantics (as the fake server implements rest-v1) ---------------------------


def test_handle_lifecycle(client: Any, server: FakeServer) -> None:
    a = client.create_session().session_id
    b = client.create_session().session_id
    h = client.add_and_lock("h", b"v1", a, metadata={"k": 1})
    assert isinstance(h, RestHandle)
    assert h.locks == [a] and h.metadata == {"k": 1}
    assert isinstance(h.created_at, datetime)

    h2 = client.replace("h", h.version, b"v2", a)
    assert h2.version > h.version and client.read("h") == b"v2"
    with pytest.raises(VersionConflict) as conflict:
        client.replace("h", h.version, b"v3", a)
    assert conflict.value.details["version"] == h2.version
    with pytest.raises(NotFound):
        client.replace("nope", 1, b"x", a)

    assert client.get_and_lock("h", b).locks == sorted([a, b])
    assert client.holders("h") == sorted([a, b])
    assert client.holders("nope") == []

    assert client.release_and_try_remove("h", a) is False  # b holds it: kept
    assert client.holders("h") == [b]
    client.release("h", b)
    client.release("h", b)  # releasing what is not held is fine
    assert client.holders("h") == []
    assert client.release_and_try_remove("h", a) is True
    assert client.release_and_try_remove("h", a) is True  # never existed


def test_locked_error_on_other_paths_is_still_raised(make_client: MakeClient) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return problem_response(409, "locked", "held", holders=["s-2"])

    c = make_client(handler)
    with pytest.raises(Locked) as info:
        c.get_and_lock("x", "s-1")
    assert info.value.details["holders"] == ["s-2"]
    assert c.release_and_try_remove("x", "s-1") is False


def test_deferred_removal(client: Any, server: FakeServer) -> None:
    a = client.create_session().session_id
    b = client.create_session().session_id
    client.add_and_lock("d", b"x", a)
    client.get_and_lock("d", b)
    assert client.release_and_try_remove("d", a, deferred=True) is False
    assert server.requests[-1].url.params["deferred"] == "true"
    with pytest.raises(NotFound):
        client.get_and_lock("d", a)  # pending removal: no longer lockable
    client.release("d", b)
    assert client.exists("d") is None


def test_listing_and_lock_all(client: Any, sid: str, server: FakeServer) -> None:
    for name in ["b/2", "a/1", "b/1", "c"]:
        client.add_and_lock(name, name.encode(), sid)
    listing = client.list()
    assert [h.name for h in listing.handles] == ["a/1", "b/1", "b/2", "c"]
    assert listing.revision == server.revision
    assert [h.name for h in client.list("b/").handles] == ["b/1", "b/2"]
    assert server.requests[-1].url.params["prefix"] == "b/"
    assert client.get_all_names() == ["a/1", "b/1", "b/2", "c"]

    other = client.create_session().session_id
    locked = client.get_all_and_lock(other)
    assert [h.name for h in locked] == ["a/1", "b/1", "b/2", "c"]
    assert all(other in h.locks for h in locked)
    with pytest.raises(InvalidArgument, match="session_id"):
        client.list(lock=True)


def test_expired_session_loses_its_locks(client: Any, server: FakeServer) -> None:
    sid = client.create_session(ttl_seconds=5).session_id
    client.add_and_lock("e", b"x", sid)
    server.expire(sid)
    assert client.holders("e") == []
    with pytest.raises(SessionExpired):
        client.keepalive(sid)
    with pytest.raises(SessionExpired):
        client.get_and_lock("e", sid)


def test_sessions(client: Any, server: FakeServer) -> None:
    s = client.create_session(ttl_seconds=7, owner="jm-1")
    assert s == Session(s.session_id, 7)
    assert server.owners[s.session_id] == "jm-1"
    assert client.keepalive(s.session_id) == s
    client.delete_session(s.session_id)
    assert s.session_id not in server.sessions
    with pytest.raises(InvalidArgument, match="ttl"):
        client.create_session(ttl_seconds=0)


# -- counters, leadership, checkpoints, namespaces ----------------------------------------


def test_counters(client: Any) -> None:
    assert client.counter_get("checkpoint-id") == 1
    assert client.counter_increment("checkpoint-id") == 1
    assert client.counter_increment("checkpoint-id") == 2
    assert client.counter_set("checkpoint-id", 2**63 - 1) == 2**63 - 1
    assert client.counter_get("checkpoint-id") == 2**63 - 1
    assert client.counter_get("other/one") == 1
    with pytest.raises(InvalidArgument):
        client.counter_set("c", "7")


def test_leadership_and_fencing(client: Any, server: FakeServer) -> None:
    a = client.create_session().session_id
    b = client.create_session().session_id
    assert client.leader() is None
    lead = client.campaign(a)
    assert lead == Leadership(a, lead.fencing_token)
    leader, token = lead  # also a plain pair
    assert client.campaign(a) == lead
    assert client.leader() == (leader, token)
    with pytest.raises(NotLeader) as info:
        client.campaign(b)
    assert info.value.details["leader"] == a

    client.add_and_lock("f", b"x", a, fencing_token=token)
    assert client.counter_increment("c", fencing_token=token) == 1
    client.resign(a)
    assert client.leader() is None
    new = client.campaign(b)
    assert new.fencing_token > token
    with pytest.raises(Fenced):
        client.replace("f", client.exists("f"), b"y", a, fencing_token=token)
    with pytest.raises(Fenced):
        client.release_and_try_remove("f", a, fencing_token=token)
    with pytest.raises(Fenced):
        client.counter_set("c", 5, fencing_token=token)
    assert client.read("f") == b"x"


def test_leader_info_and_waiting_campaign_requests(
    make_client: MakeClient, server: FakeServer
) -> None:
    client = make_client(timeout=7)
    a = client.create_session().session_id
    b = client.create_session().session_id
    lead = client.campaign(a)
    sent = server.requests[-1]
    assert sent.url.params.get("wait") is None  # wait 0: the request it always was
    assert sent.extensions["timeout"]["read"] == 7
    assert lead.info == {} and lead == (a, lead.fencing_token)

    key = "a/b ✓"
    client.put_leader_info(a, key, None)  # null is a value: it is sent
    sent = server.requests[-1]
    assert sent.method == "PUT"
    assert sent.url.raw_path.decode().endswith("/leader/info/a%2Fb%20%E2%9C%93")
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["x-session-id"] == a
    assert server.bodies[-1] == b"null"
    client.put_leader_info(a, "address", {"rpc": "jm-1:6123", "ü": [1, 2.5]})
    assert json.loads(server.bodies[-1]) == {"rpc": "jm-1:6123", "ü": [1, 2.5]}
    current = client.leader()
    assert current.info == {key: None, "address": {"rpc": "jm-1:6123", "ü": [1, 2.5]}}
    leader, token = current  # still a pair
    assert (leader, token) == current == (a, lead.fencing_token)
    assert current != lead  # lead has no info
    assert "address" in repr(current)

    client.delete_leader_info(a, key)
    assert server.requests[-1].method == "DELETE"
    assert client.leader().info == {"address": {"rpc": "jm-1:6123", "ü": [1, 2.5]}}
    with pytest.raises(NotLeader) as info:
        client.put_leader_info(b, "address", "x")
    assert info.value.details["leader"] == a
    with pytest.raises(TooLarge):
        client.put_leader_info(a, "big", "x" * 16 * 1024)

    # Refused before anything is sent.
    before = len(server.requests)
    for bad in (float("nan"), (1, 2), {1: 2}, object()):
        with pytest.raises(InvalidArgument):
            client.put_leader_info(a, "bad", bad)
    with pytest.raises(InvalidArgument):
        client.put_leader_info(a, "", 1)
    for wait in (-1, "5", True, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument):
            client.campaign(b, wait=wait)
    assert len(server.requests) == before

    # A waiting campaign names its wait and may take that much longer to answer.
    with pytest.raises(NotLeader):
        client.campaign(b, wait=2.5)
    sent = server.requests[-1]
    assert sent.url.params["wait"] == "2.5"
    assert sent.extensions["timeout"]["read"] == 7 + 2.5
    client.resign(a)
    assert client.leader() is None
    assert client.campaign(b, wait=30).leader == b


def test_checkpoints(client: Any, sid: str, server: FakeServer) -> None:
    assert client.latest_checkpoint() is None
    assert client.checkpoints() == []
    c1, subsumed = client.add_checkpoint(1, b"one", sid)
    assert isinstance(c1, RestCheckpoint) and isinstance(c1, RestHandle)
    assert (c1.checkpoint_id, c1.savepoint, c1.name, subsumed) == (1, False, f"{1:020d}", [])
    sp, subsumed = client.add_checkpoint(2, iter([b"two"]), sid, savepoint=True, retain=1)
    assert sp.savepoint and subsumed == []  # checkpoint 1 is the newest non-savepoint: kept
    assert server.requests[-1].url.params["savepoint"] == "true"
    c3, subsumed = client.add_checkpoint(3, b"three", sid, retain=2)
    assert subsumed == [1]
    assert server.requests[-1].url.params["retain"] == "2"
    assert [c.checkpoint_id for c in client.checkpoints()] == [2, 3]
    assert client.latest_checkpoint() == c3
    assert client.read(c3.name) == b"three"
    other = client.create_session().session_id
    recovered = client.checkpoints(lock=True, session_id=other)
    assert all(other in c.locks for c in recovered)
    with pytest.raises(InvalidArgument):
        client.add_checkpoint(-1, b"x", sid)
    with pytest.raises(InvalidArgument):
        client.add_checkpoint(2**64, b"x", sid)
    sent = len(server.requests)
    with pytest.raises(InvalidArgument):  # the server's bound (2**63 - 1)
        client.add_checkpoint(MAX_INT64 + 1, b"x", sid)
    assert len(server.requests) == sent  # refused before sending


def test_delete_namespace(client: Any, server: FakeServer) -> None:
    a = client.create_session().session_id
    client.add_and_lock("x", b"x", a, ns="gone")
    client.release("x", a, ns="gone")
    assert client.delete_namespace("gone") is True
    client.add_and_lock("y", b"y", a, ns="busy")
    assert client.delete_namespace("busy") is False  # still locked by a live session
    client.delete_session(a)
    assert client.get_all_names(ns="busy") == []


# -- auth ---------------------------------------------------------------------------------


def test_auth_errors(make_client: MakeClient, server: FakeServer) -> None:
    server.tokens = {
        "reader": (["job-*"], "read"),
        "writer": (["job-*"], "write"),
        "admin": (["*"], "admin"),
    }
    with pytest.raises(Unauthorized):
        make_client().get_all_names()
    with pytest.raises(Unauthorized):
        make_client(token="wrong").get_all_names()
    writer = make_client(token="writer")
    assert writer.get_all_names() == []
    with pytest.raises(Forbidden):
        writer.get_all_names(ns="other-team")
    with pytest.raises(Forbidden):
        writer.delete_namespace(NS)
    reader = make_client(token="reader")
    sid = reader.create_session().session_id
    with pytest.raises(Forbidden) as info:
        reader.add_and_lock("x", b"x", sid)
    assert info.value.details["status"] == 403
    assert make_client(token="admin").delete_namespace(NS) is True


# -- transport failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "hint"),
    [
        (httpx.ConnectError("connection refused"), "retry when"),
        (httpx.ReadTimeout("timed out"), "may have reached the server"),
    ],
)
def test_transport_errors_are_unavailable_naming_the_url(
    make_client: MakeClient, exc: Exception, hint: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    c = make_client(handler)
    with pytest.raises(Unavailable, match=hint) as info:
        c.add_and_lock("a b", b"x", "s-1")
    assert f"{BASE}/v1/namespaces/{NS}/handles/a%20b" in str(info.value)
    assert info.value.details["url"] == f"{BASE}/v1/namespaces/{NS}/handles/a%20b"
    with pytest.raises(Unavailable, match="retry when"):
        c.get("a")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_over_real_sockets() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with StateStoreClient(url, namespace=NS, timeout=2) as c:
        with pytest.raises(Unavailable, match=re.escape(url)):
            c.get("x")


async def test_unreachable_server_over_real_sockets_async() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    async with AsyncStateStoreClient(url, namespace=NS, timeout=2) as c:
        with pytest.raises(Unavailable, match=re.escape(url)):
            await c.create_session()


@pytest.mark.parametrize("url", ["statestore:8080", "ftp://x/", "http://"])
def test_bad_base_url(url: str) -> None:
    with pytest.raises(InvalidArgument):
        StateStoreClient(url)


# -- session helper -----------------------------------------------------------------------


def test_session_context_keeps_alive_and_deletes(server: FakeServer) -> None:
    with StateStoreClient(BASE, namespace=NS, transport=httpx.MockTransport(server)) as c:
        with c.session(ttl_seconds=1, owner="jm") as s:
            assert s.session_id in server.sessions
            wait_until(lambda: server.keepalives.get(s.session_id, 0) >= 2, timeout=10)
        assert s.session_id not in server.sessions
        assert not any(t.name.endswith(s.session_id) for t in threading.enumerate())

        with pytest.raises(RuntimeError, match="boom"), c.session(keepalive=False) as s2:
            raise RuntimeError("boom")
        assert s2.session_id not in server.sessions
        assert server.keepalives.get(s2.session_id, 0) == 0


def test_session_context_stops_keepalive_after_expiry(server: FakeServer) -> None:
    with StateStoreClient(BASE, namespace=NS, transport=httpx.MockTransport(server)) as c:
        with c.session(ttl_seconds=1) as s:
            thread = next(t for t in threading.enumerate() if t.name.endswith(s.session_id))
            server.expire(s.session_id)
            thread.join(timeout=10)  # the keeper gives up once the session is gone
            assert not thread.is_alive()
        # leaving the block deletes an already-gone session without complaint


def test_session_context_raises_a_failed_delete_only_after_success(server: FakeServer) -> None:
    down = {"on": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if down["on"] and request.method == "DELETE":
            return httpx.Response(503, text="maintenance")
        return server(request)

    with StateStoreClient(BASE, namespace=NS, transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(Unavailable, match="maintenance"), c.session(keepalive=False):
            down["on"] = True
        with pytest.raises(KeyError), c.session(keepalive=False):
            raise KeyError("the body's error wins")


async def test_async_session_context_keeps_alive_and_deletes(server: FakeServer) -> None:
    transport = httpx.MockTransport(server)
    async with AsyncStateStoreClient(BASE, namespace=NS, transport=transport) as c:
        async with c.session(ttl_seconds=1) as s:
            assert s.session_id in server.sessions
            await async_wait_until(lambda: server.keepalives.get(s.session_id, 0) >= 2, timeout=10)
            task = next(t for t in asyncio.all_tasks() if t.get_name().endswith(s.session_id))
        assert task.done()
        assert s.session_id not in server.sessions

        with pytest.raises(RuntimeError, match="boom"):
            async with c.session() as s2:
                raise RuntimeError("boom")
        assert s2.session_id not in server.sessions


async def test_async_session_keeper_stops_after_expiry(server: FakeServer) -> None:
    transport = httpx.MockTransport(server)
    async with AsyncStateStoreClient(BASE, namespace=NS, transport=transport) as c:
        async with c.session(ttl_seconds=1) as s:
            task = next(t for t in asyncio.all_tasks() if t.get_name().endswith(s.session_id))
            server.expire(s.session_id)
            await asyncio.wait_for(task, timeout=10)


# -- lifecycle ----------------------------------------------------------------------------


def test_context_managers_close_the_connections(server: FakeServer) -> None:
    with StateStoreClient(BASE, transport=httpx.MockTransport(server)) as c:
        assert c.base_url == BASE + "/"
    assert c._http.is_closed
    c.close()  # idempotent


async def test_async_context_manager_closes(server: FakeServer) -> None:
    async with AsyncStateStoreClient(BASE, transport=httpx.MockTransport(server)) as c:
        pass
    assert c._http.is_closed
    await c.aclose()
