"""``statestore.http``: idempotency keys sent on its own, resent after a broken
connection, and the bulk calls, on both faces.

The first part pins what the client sends, through ``httpx.MockTransport``
(which can break a connection exactly when a test wants). The second runs
against a real ``statestore serve`` with the project's TCP fault proxy
between them: the service commits and answers, the answer is dropped and
the connection cut, and the client's own resend must learn the first
result, applied once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from faces import FACES, rest_clients
from helpers import wait_until
from rest import answer_lost
from service import ServiceProcess

from statestore.errors import Fenced, InvalidArgument, Unavailable
from statestore.http import PrefixRemoval
from statestore.local.faultproxy import FaultProxy

BASE = "http://statestore.test"
NS = "job-1"
HANDLE = {
    "name": "h",
    "version": 5,
    "size": 5,
    "sha256": "",
    "created_at": "2026-01-01T00:00:00+00:00",
    "metadata": {},
    "locks": ["s"],
}


class Server:
    """Answers every call with a fixed body after breaking the connection of
    the first ``breaks`` requests; records what each request sent."""

    def __init__(self, breaks: int = 0, body: Any = None, status: int = 200) -> None:
        self.breaks = breaks
        self.body = body
        self.status = status
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.seen.append(request)
        if len(self.seen) <= self.breaks:
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(self.status, json=self.body)

    @property
    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.seen]


@pytest.fixture(params=FACES)
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``make(server, **kwargs)``: a client of this test's face on ``server``."""
    with rest_clients(request.param, BASE, namespace=NS) as make_client:
        yield lambda server, **kw: make_client(transport=httpx.MockTransport(server), **kw)


def handle_of(data: bytes) -> dict[str, Any]:
    return {**HANDLE, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- what is sent ---------------------------------------------------------------------------


def test_writes_send_a_fresh_key_per_call_or_the_callers(make: Callable[..., Any]) -> None:
    server = Server(body=handle_of(b"state"))
    c = make(server)
    c.add_and_lock("h", b"state", "s")
    c.add_and_lock("h", b"state", "s")
    c.replace("h", 5, b"state", "s", idempotency_key="mine")
    first, second, given = server.keys
    assert first and second and first != second and given == "mine"

    increments = Server(body={"value": 1})
    c = make(increments)
    c.counter_increment("ids", session_id="s")
    c.counter_increment("ids")  # no session: no key (a key is per session)
    c.counter_increment("ids", session_id="s", idempotency_key="i-1")
    keyed, bare, given = increments.keys
    assert keyed and bare is None and given == "i-1"
    with pytest.raises(InvalidArgument, match="session_id"):
        c.counter_increment("ids", idempotency_key="k")
    with pytest.raises(InvalidArgument, match="idempotency key"):
        c.add_and_lock("h", b"state", "s", idempotency_key="x" * 129)


def test_a_broken_connection_resends_with_the_same_key(make: Callable[..., Any]) -> None:
    server = Server(breaks=2, body=handle_of(b"state"))
    h = make(server).add_and_lock("h", b"state", "s")
    assert h.name == "h" and len(server.seen) == 3
    assert len(set(server.keys)) == 1 and server.keys[0]
    assert [r.content for r in server.seen] == [b"state"] * 3

    checkpoint = {**handle_of(b"ck"), "name": "00000000000000000002", "checkpoint_id": 2}
    server = Server(breaks=1, body={"checkpoint": checkpoint, "subsumed": [1]}, status=201)
    assert make(server).add_checkpoint(2, b"ck", "s")[1] == [1]
    assert len(server.seen) == 2 and len(set(server.keys)) == 1

    server = Server(breaks=1, body={"value": 7})
    assert make(server).counter_increment("ids", session_id="s") == 7
    assert len(server.seen) == 2 and len(set(server.keys)) == 1


def test_resends_are_bounded_and_the_error_names_the_key(make: Callable[..., Any]) -> None:
    server = Server(breaks=100, body=handle_of(b"x"))
    with pytest.raises(Unavailable) as info:
        make(server, retries=2).add_and_lock("h", b"x", "s", idempotency_key="k-9")
    assert len(server.seen) == 3
    assert info.value.details["idempotency_key"] == "k-9"
    assert "idempotency_key='k-9'" in str(info.value) and "sent 3 times" in str(info.value)


def test_a_streamed_state_is_not_resent(make: Callable[..., Any]) -> None:
    """An iterator or file cannot be read twice: one send, then the error
    with the key, for the caller to retry with bytes."""
    server = Server(breaks=1, body=handle_of(b"ab"))
    with pytest.raises(Unavailable) as info:
        make(server).add_and_lock("h", iter([b"a", b"b"]), "s")
    assert len(server.seen) == 1 and info.value.details["idempotency_key"] == server.keys[0]


def test_calls_without_a_key_are_not_resent(make: Callable[..., Any]) -> None:
    server = Server(breaks=1, body=None)
    with pytest.raises(Unavailable):
        make(server).release_and_try_remove("h", "s")
    with pytest.raises(Unavailable):
        make(server).counter_increment("ids")
    assert len(server.seen) == 2


def test_bulk_calls_build_their_requests(make: Callable[..., Any]) -> None:
    server = Server(body={"removed": ["a"], "pending": ["b"]})
    c = make(server)
    assert c.remove_prefix("j/", "s", deferred=True, fencing_token=3) == PrefixRemoval(["a"], ["b"])
    c.release_prefix("", "s")
    c.counter_delete("ids", fencing_token=4)
    remove, release, delete = server.seen
    assert (remove.method, remove.url.path) == ("DELETE", f"/v1/namespaces/{NS}/handles")
    assert dict(remove.url.params) == {"prefix": "j/", "deferred": "true"}
    assert remove.headers["x-session-id"] == "s" and remove.headers["x-fencing-token"] == "3"
    assert (release.method, release.url.path) == ("DELETE", f"/v1/namespaces/{NS}/locks")
    assert dict(release.url.params) == {"prefix": ""}
    assert (delete.method, delete.url.path) == ("DELETE", f"/v1/namespaces/{NS}/counters/ids")
    assert delete.headers["x-fencing-token"] == "4"


# -- against the real service, through a real cut ----------------------------------------------


@pytest.fixture
def proxy(service: ServiceProcess) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", service.port)
    yield p
    p.close()


@pytest.fixture(params=FACES)
def faces(
    request: pytest.FixtureRequest, service: ServiceProcess, proxy: FaultProxy, namespace: str
) -> Iterator[tuple[Any, Any]]:
    """(a client of this test's face through the proxy, one straight to the service)."""
    with (
        rest_clients(request.param, f"http://{proxy.endpoint}", namespace=namespace) as cut,
        rest_clients(request.param, service.url, namespace=namespace) as direct,
    ):
        yield cut(), direct()


def test_the_client_resends_after_a_real_cut_and_learns_the_first_result(
    faces: tuple[Any, Any], proxy: FaultProxy
) -> None:
    cut, direct = faces
    sid = direct.create_session(ttl_seconds=30).session_id

    h = answer_lost(proxy, lambda: cut.add_and_lock("h", b"state", sid, metadata={"a": 1}))
    assert h == direct.get("h") and h.locks == [sid]

    new = answer_lost(proxy, lambda: cut.replace("h", h.version, b"v2", sid))
    assert new == direct.get("h") and direct.read("h") == b"v2"

    direct.add_checkpoint(1, b"one", sid)
    ck, subsumed = answer_lost(proxy, lambda: cut.add_checkpoint(2, b"two", sid))
    assert (ck.checkpoint_id, subsumed) == (2, [1])
    assert [c.checkpoint_id for c in direct.checkpoints()] == [2]

    assert direct.counter_increment("ids") == 1
    assert answer_lost(proxy, lambda: cut.counter_increment("ids", session_id=sid)) == 2
    assert direct.counter_get("ids") == 3


def test_bulk_calls_on_both_faces(faces: tuple[Any, Any]) -> None:
    _, c = faces
    sid = c.create_session(ttl_seconds=30).session_id
    other = c.create_session(ttl_seconds=30).session_id
    for name in ("job/a", "job/b", "keep"):
        c.add_and_lock(name, name.encode(), sid)
    c.get_and_lock("job/b", other)

    assert c.remove_prefix("job/", sid) == (["job/a"], ["job/b"])
    removed, pending = c.remove_prefix("", sid, deferred=True)
    assert (removed, pending) == (["keep"], ["job/b"])
    c.release_prefix("", other)
    wait_until(lambda: c.get_all_names() == [], timeout=15)

    c.add_and_lock("x", b"x", sid)
    c.release_prefix("x", sid)
    assert c.holders("x") == []

    lead = c.campaign(sid)
    assert c.counter_increment("ids", session_id=sid) == 1
    c.resign(sid)
    with pytest.raises(Fenced):
        c.counter_delete("ids", session_id=sid, fencing_token=lead.fencing_token)
    c.counter_delete("ids")
    assert c.counter_get("ids") == 1
