"""Both faces of the REST client through the same cases, against a real
``statestore serve`` on real etcd.

Every case runs once with ``StateStoreClient`` and once with
``AsyncStateStoreClient`` (driven through ``faces.AsyncAsSync``), so a
difference between the faces fails one of the two runs. The cases follow the
sdk.md method table as the REST client offers it (locks belong to a session,
named by its id): add_and_lock, replace, exists, get, get_and_lock, read,
open_read, get_all_and_lock, get_all_names, holders, release, release_all
(``delete_session``: every lock of the session at once),
release_and_try_remove (also deferred), clear_entries (``delete_namespace``),
and the error kinds each one raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from faces import FACES, mirror_differences, public_members, rest_clients
from helpers import wait_until
from service import ServiceProcess

from statestore.errors import (
    AlreadyExists,
    Compacted,
    Fenced,
    IntegrityError,
    InvalidArgument,
    NotFound,
    NotLeader,
    SessionExpired,
    TooLarge,
    VersionConflict,
)
from statestore.etcd import EtcdClient
from statestore.http import (
    AsyncStateStoreClient,
    Leadership,
    Listing,
    RestHandle,
    RestHandleEvent,
    RestLeaderEvent,
    Session,
    StateStoreClient,
    WatchAnswer,
)
from statestore.local.etcd_process import EtcdProcess


@pytest.fixture(params=FACES)
def client(
    request: pytest.FixtureRequest, service: ServiceProcess, namespace: str
) -> Iterator[Any]:
    """A client of this test's face on the shared service, on this test's
    namespace (closed at teardown)."""
    with rest_clients(request.param, service.url, namespace=namespace) as make:
        yield make()


@pytest.fixture
def sid(client: Any) -> str:
    """The session of this test's job manager."""
    return str(client.create_session(ttl_seconds=30, owner="faces").session_id)


@pytest.fixture
def other(client: Any) -> str:
    """A second session, as another job manager."""
    return str(client.create_session(ttl_seconds=30, owner="faces-other").session_id)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- add_and_lock ---------------------------------------------------------------------


def test_add_and_lock_returns_the_locked_handle(client: Any, sid: str) -> None:
    h = client.add_and_lock("a/1", b"alpha", sid, metadata={"k": "v", "n": [1, 2]})
    assert isinstance(h, RestHandle)
    assert (h.name, h.size, h.sha256, h.metadata, h.locks) == (
        "a/1",
        5,
        sha(b"alpha"),
        {"k": "v", "n": [1, 2]},
        [sid],
    )
    assert isinstance(h.version, int) and isinstance(h.created_at, datetime)
    assert client.get("a/1") == h


@pytest.mark.parametrize("form", ["bytes", "bytearray", "file", "iterable"])
def test_add_and_lock_takes_every_data_form(client: Any, sid: str, form: str) -> None:
    data = bytes(range(256)) * 300
    given: Any = {
        "bytes": data,
        "bytearray": bytearray(data),
        "file": io.BytesIO(data),
        "iterable": iter([data[:1000], data[1000:]]),
    }[form]
    h = client.add_and_lock("x", given, sid)
    assert (h.size, h.sha256) == (len(data), sha(data))
    assert client.read("x") == data


def test_add_and_lock_refusals(client: Any, sid: str) -> None:
    client.add_and_lock("taken", b"first", sid)
    with pytest.raises(AlreadyExists):
        client.add_and_lock("taken", b"second", sid)
    assert client.read("taken") == b"first"
    with pytest.raises(IntegrityError):  # declared digest is not the data's: nothing stored
        client.add_and_lock("digest", b"abc", sid, sha256="0" * 64)
    assert client.exists("digest") is None
    for bad_name in ("", "a\x00b", "x" * 513):
        with pytest.raises(InvalidArgument):
            client.add_and_lock(bad_name, b"x", sid)
    with pytest.raises(InvalidArgument):
        client.add_and_lock("text", "not bytes", sid)
    with pytest.raises(InvalidArgument):
        client.add_and_lock("meta", b"x", sid, metadata={"t": (1, 2)})  # not plain JSON
    assert client.get_all_names() == ["taken"]


# -- replace, exists, get ---------------------------------------------------------------


def test_replace_exists_and_get(client: Any, sid: str) -> None:
    h = client.add_and_lock("r", b"v1", sid, metadata={"m": 1})
    assert client.exists("r") == h.version
    assert client.exists("missing") is None
    h2 = client.replace("r", h.version, b"v2", sid)
    assert h2.version > h.version and h2.metadata == {"m": 1}  # metadata kept
    assert (h2.size, h2.sha256) == (2, sha(b"v2"))
    h3 = client.replace("r", h2.version, iter([b"v", b"3"]), sid, metadata={"m": 3})
    assert h3.metadata == {"m": 3} and client.read("r") == b"v3"
    assert client.get("r") == h3
    with pytest.raises(VersionConflict):
        client.replace("r", h.version, b"stale", sid)
    with pytest.raises(NotFound):
        client.replace("missing", 1, b"x", sid)
    with pytest.raises(NotFound):
        client.get("missing")
    assert client.read("r") == b"v3"


# -- get_and_lock, holders, release, read ------------------------------------------------


def test_get_and_lock_holders_and_release(client: Any, sid: str, other: str) -> None:
    h = client.add_and_lock("l", b"x", sid)
    locked = client.get_and_lock("l", other)
    assert locked.locks == sorted([sid, other])
    assert (locked.name, locked.version, locked.sha256) == (h.name, h.version, h.sha256)
    assert client.holders("l") == sorted([sid, other])
    assert client.holders("missing") == []
    with pytest.raises(NotFound):
        client.get_and_lock("missing", other)
    client.release("l", other)
    client.release("l", other)  # not held any more: still fine
    client.release("missing", other)
    assert client.holders("l") == [sid]


def test_read_and_open_read(client: Any, sid: str) -> None:
    data = hashlib.sha256(b"seed").digest() * 40_000  # 1.28 MB: several chunks
    client.add_and_lock("big", iter([data[:300_000], data[300_000:]]), sid)
    assert client.read("big") == data
    assert b"".join(client.open_read("big")) == data
    with pytest.raises(NotFound):
        client.read("missing")
    with pytest.raises(NotFound):
        list(client.open_read("missing"))


# -- get_all_and_lock, get_all_names ------------------------------------------------------


def test_get_all_and_lock_and_get_all_names(client: Any, sid: str, other: str) -> None:
    assert client.get_all_names() == []
    assert client.get_all_and_lock(other) == []
    names = ["b/2", "a", "b/1", "ünï", "c d"]
    for n in names:
        client.add_and_lock(n, n.encode(), sid)
    assert client.get_all_names() == sorted(names)
    locked = client.get_all_and_lock(other)
    assert [h.name for h in locked] == sorted(names)
    assert all(h.locks == sorted([sid, other]) for h in locked)
    assert all(client.holders(n) == sorted([sid, other]) for n in names)
    listing = client.list("b/")
    assert isinstance(listing, Listing) and [h.name for h in listing.handles] == ["b/1", "b/2"]


# -- release_all (delete_session) --------------------------------------------------------


def test_deleting_a_session_releases_all_its_locks(client: Any, sid: str, other: str) -> None:
    for n in ("x", "y"):
        client.add_and_lock(n, b"v", sid)
        client.get_and_lock(n, other)
    client.delete_session(other)
    assert client.holders("x") == client.holders("y") == [sid]
    with pytest.raises(SessionExpired):
        client.get_and_lock("x", other)
    with pytest.raises(SessionExpired):
        client.keepalive(other)
    assert client.keepalive(sid) == Session(sid, 30)


# -- release_and_try_remove ---------------------------------------------------------------


def test_release_and_try_remove(client: Any, sid: str, other: str) -> None:
    client.add_and_lock("gone", b"x", sid)
    assert client.release_and_try_remove("gone", sid) is True
    assert client.exists("gone") is None
    assert client.release_and_try_remove("never", sid) is True

    client.add_and_lock("kept", b"x", sid)
    client.get_and_lock("kept", other)
    assert client.release_and_try_remove("kept", sid) is False  # other holds it
    assert client.holders("kept") == [other]  # own lock released, handle kept
    assert client.read("kept") == b"x"
    client.release("kept", other)
    assert client.release_and_try_remove("kept", sid) is True


def test_deferred_release_and_try_remove(client: Any, sid: str, other: str) -> None:
    client.add_and_lock("d", b"x", sid)
    client.get_and_lock("d", other)
    assert client.release_and_try_remove("d", sid, deferred=True) is False
    assert client.holders("d") == [other]
    with pytest.raises(NotFound):  # pending removal: no longer lockable
        client.get_and_lock("d", sid)
    client.release("d", other)
    wait_until(lambda: client.exists("d") is None, 10, message="deferred removal incomplete")


# -- clear_entries (delete_namespace) ----------------------------------------------------


def test_delete_namespace(client: Any, sid: str, other: str, namespace: str) -> None:
    for n in ("free", "held"):
        client.add_and_lock(n, b"x", sid)
    client.release("free", sid)
    client.get_and_lock("held", other)
    client.counter_increment("c")
    assert client.delete_namespace(namespace) is False  # "held" is locked by live sessions
    assert client.get_all_names() == ["held"]
    client.delete_session(other)
    client.delete_session(sid)
    wait_until(lambda: client.get_all_names() == [], 10, message="namespace removal incomplete")
    assert client.counter_get("c") == 1  # counters went at once
    # (True only once the removed blobs' grace period is over: the GC tests cover that.)
    assert client.delete_namespace(namespace) in (True, False)


# -- leadership, fencing and the rest of the error kinds -------------------------------


def test_leadership_fencing_and_counters(client: Any, sid: str, other: str) -> None:
    assert client.leader() is None
    lead = client.campaign(sid)
    assert lead == Leadership(sid, lead.fencing_token) == client.leader()
    # each answer names the revision it was read at (watch from it: exact)
    assert isinstance(lead.revision, int) and client.leader().revision >= lead.revision
    assert client.watch(since=lead.revision, timeout=1, kinds=["leader"]).events == []
    with pytest.raises(NotLeader) as info:
        client.campaign(other)
    assert info.value.details["leader"] == sid

    token = lead.fencing_token
    h = client.add_and_lock("f", b"x", sid, fencing_token=token)
    assert client.counter_increment("c", fencing_token=token) == 1
    assert client.counter_set("c", 10, fencing_token=token) == 10
    client.resign(sid)
    new = client.campaign(other)
    assert new.fencing_token > token
    with pytest.raises(Fenced):
        client.replace("f", h.version, b"y", sid, fencing_token=token)
    with pytest.raises(Fenced):
        client.release_and_try_remove("f", sid, fencing_token=token)
    with pytest.raises(Fenced):
        client.counter_increment("c", fencing_token=token)
    with pytest.raises(Fenced):  # a token alone, by a writer without a session
        client.counter_set("c", 5, fencing_token=token)
    assert client.read("f") == b"x" and client.counter_get("c") == 10
    assert client.counter_increment("c", fencing_token=new.fencing_token) == 10


def test_leader_info_and_waiting_for_leadership(client: Any, sid: str, other: str) -> None:
    lead = client.campaign(sid, wait=5)  # nobody leads: at once
    assert lead == Leadership(sid, lead.fencing_token) and lead.info == {}
    values = {"address": "jm-1:6123", "a/b ✓": {"k": [1, None]}, "null": None}
    for key, value in values.items():
        client.put_leader_info(sid, key, value)
    current = client.leader()
    assert current == (sid, lead.fencing_token) and current.info == values
    with pytest.raises(NotLeader) as info:
        client.put_leader_info(other, "address", "x")
    assert info.value.details["leader"] == sid
    with pytest.raises(NotLeader):
        client.delete_leader_info(other, "address")
    with pytest.raises(TooLarge):
        client.put_leader_info(sid, "big", "x" * 16 * 1024)
    client.delete_leader_info(sid, "a/b ✓")
    assert client.leader().info == {"address": "jm-1:6123", "null": None}
    with pytest.raises(NotLeader):
        client.campaign(other, wait=0.2)

    # A leader whose session is not kept alive: a waiting campaign wins when it expires.
    client.resign(sid)
    assert client.leader() is None
    short = client.create_session(ttl_seconds=2).session_id
    first = client.campaign(short)
    client.put_leader_info(short, "address", "short")
    won = client.campaign(other, wait=30)
    assert won.leader == other and won.fencing_token > first.fencing_token
    assert client.leader() == Leadership(other, won.fencing_token, {})


def test_session_errors(client: Any) -> None:
    with pytest.raises(InvalidArgument):
        client.create_session(ttl_seconds=0)
    with pytest.raises(SessionExpired):
        client.keepalive("no-such-session")
    with pytest.raises(SessionExpired):
        client.add_and_lock("x", b"x", "no-such-session")
    assert client.exists("x") is None


def test_both_faces_have_the_same_methods() -> None:
    """Same public methods and parameters on both faces (``close`` is the
    async face's ``aclose``)."""
    sync, model = StateStoreClient, AsyncStateStoreClient
    assert public_members(sync) - {"close"} == public_members(model) - {"aclose"}
    assert mirror_differences(sync, model, public_members(sync), {"close": "aclose"}) == []


# -- watch and follow -----------------------------------------------------------------


def compact_now(etcd: EtcdProcess) -> int:
    """Compact the session etcd at its current revision; that revision."""

    async def run() -> int:
        async with EtcdClient([etcd.endpoint]) as c:
            revision = (await c.status()).revision
            await c.compact(revision)
            return revision

    return asyncio.run(run())


def test_watch_answers_events_and_raises_compacted(
    client: Any, sid: str, etcd: EtcdProcess
) -> None:
    since = client.list().revision
    added = client.add_and_lock("a/1", b"x", sid, metadata={"k": 1})
    token = client.campaign(sid).fencing_token
    events: list[Any] = []
    revision = since
    while len(events) < 2:
        answer = client.watch(revision, timeout=5)
        assert isinstance(answer, WatchAnswer) and answer.revision >= revision
        events += answer.events
        revision = answer.revision
    assert events == [
        RestHandleEvent("put", "a/1", added.version, dataclasses.replace(added, locks=[])),
        RestLeaderEvent(token, Leadership(sid, token)),
    ]
    assert events[0].to_json()["handle"] == {
        "name": "a/1",
        "version": added.version,
        "size": 1,
        "sha256": added.sha256,
        "created_at": added.created_at.isoformat(),
        "metadata": {"k": 1},
    }
    assert client.watch(since, kinds="leader", timeout=5).events == events[1:]
    assert client.watch(since, prefix="b", kinds=["handles"], timeout=1).events == []
    with pytest.raises(InvalidArgument):
        client.watch(since, kinds="handles,nothing", timeout=1)
    compacted_at = compact_now(etcd)
    with pytest.raises(Compacted) as caught:
        client.watch(since, timeout=5)
    assert caught.value.compact_revision == compacted_at
    assert caught.value.details["status"] == 410


def test_follow_lists_watches_and_relists_after_410(
    client: Any, sid: str, service: ServiceProcess, namespace: str, etcd: EtcdProcess
) -> None:
    """follow() yields the changes after its listing; after its position was
    compacted it re-lists and yields one event per difference, so the
    picture its events build is the namespace's again."""
    kept = client.add_and_lock("kept", b"x", sid)
    client.add_and_lock("removed", b"x", sid)
    picture = {"kept": kept.version}
    picture["removed"] = client.exists("removed")
    leader: Any = None

    def apply(event: Any) -> None:
        nonlocal leader
        if isinstance(event, RestLeaderEvent):
            leader = event.leader
        elif event.type == "put":  # (a re-list's events are at its revision)
            picture[event.name] = event.handle.version
        else:
            picture.pop(event.name, None)

    # Another writer ticks until the follower has listed and seen a change.
    stop = threading.Event()

    def ticker() -> None:
        with StateStoreClient(service.url, namespace=namespace) as other:
            s = other.create_session(ttl_seconds=30).session_id
            n = 0
            while not stop.is_set():
                other.add_and_lock(f"tick-{n}", b"t", s)
                n += 1
                stop.wait(0.1)

    ticking = threading.Thread(target=ticker, daemon=True)
    ticking.start()
    events = client.follow(timeout=2)
    try:
        apply(next(events))
    finally:
        stop.set()
        ticking.join(10)
    # The gap: changes, a new leader, then compaction past the follower.
    client.replace("kept", kept.version, b"y", sid)
    client.release_and_try_remove("removed", sid)
    client.add_and_lock("added", b"x", sid)
    token = client.campaign(sid).fencing_token
    compact_now(etcd)

    def caught_up() -> bool:
        apply(next(events))
        current = {h.name: h.version for h in client.list().handles}
        return picture == current and leader == Leadership(sid, token)

    wait_until(caught_up, 30, interval=0)
