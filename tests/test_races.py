"""Races of deferred removal, locking and ``release_all`` (the hardening issue).

Every test runs against real etcd and forces its interleaving at one exact
moment with a hook on the store's own client (``interleave.hook_txn``): the
competing action runs through other instances, then the original request
goes to etcd unchanged. Each test says which breaking change makes it fail.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from helpers import Gate, OpenStore, async_wait_until
from interleave import Send, deletes, hook_txn, lock_holders, puts
from rest import enc, sess

from statestore import CompletedCheckpointStore, LeaderElection, StateHandleStore, StoreConfig
from statestore.checkpoints import checkpoint_name
from statestore.errors import (
    InvalidArgument,
    NotFound,
    PossibleInconsistentState,
    SessionExpired,
)
from statestore.etcd import Ambiguous, Txn, TxnResult
from statestore.keys import READER_ID, Layout, prefix_end, validate_instance_id
from statestore.maintenance.reconciler import RemovalReconciler
from statestore.records import RemovalMarker, encode_holder
from statestore_api.app import create_app
from statestore_api.service import Service
from statestore_api.session_registry import SessionRegistry
from statestore_api.settings import ServiceSettings


@pytest.fixture
async def trio(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> tuple[StateHandleStore, StateHandleStore, StateHandleStore]:
    """Three instances of one deployment (one namespace, one blob root)."""
    cfg = make_config()
    return await open_store(cfg), await open_store(cfg), await open_store(cfg)


# -- 1a. a deferred removal marks only the version it decided on ----------------------


@pytest.mark.parametrize(
    "moment",
    ["before-marker", "before-removal-txn"],
    ids=["between-refusal-and-marker", "between-read-and-removal-txn"],
)
async def test_deferred_removal_never_marks_a_re_created_handle(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
) -> None:
    """A asks to remove generation 1 of ``h`` (B locks it, so the removal is
    deferred). Meanwhile B lets go, C removes generation 1 and writes
    generation 2, and keeps it locked. A's marker must not land on generation
    2: it would be removed as soon as C lets go, an acknowledged write lost
    (invariant 3). Breaks if the marker txn compares only that the handle
    exists (not the version A read), or if a refused removal that finds a
    re-created handle decides again on that new handle."""
    a, b, c = trio
    await a.add_and_lock("h", b"generation 1")
    await a.release("h")
    await b.get_and_lock("h")
    hkey, rkey = a.keys.handle("h"), a.keys.removal("h")
    recreated: list[Any] = []

    async def recreate() -> None:
        await b.release("h")
        assert await c.release_and_try_remove("h"), "nobody locks generation 1 any more"
        recreated.append(await c.add_and_lock("h", b"generation 2"))

    async def hook(t: Txn, send: Send) -> TxnResult:
        if not recreated:
            if moment == "before-marker" and rkey in puts(t):
                await recreate()
            elif moment == "before-removal-txn" and hkey in deletes(t):
                await recreate()
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    outcome = await a.try_remove("h", deferred=True)
    monkeypatch.undo()

    assert recreated, "the injection did not run"
    assert await c.etcd.get(rkey) is None, "A's removal marker landed on generation 2"
    # What A asked to remove (generation 1) is gone.
    assert outcome.removed and not outcome.pending, outcome
    gen2 = recreated[0]
    await c.release("h")
    kv = await c.etcd.get(hkey)
    assert kv is not None and kv.mod_revision == gen2.version, "generation 2 was removed"
    assert await c.read("h") == b"generation 2"
    assert await b.get_and_lock("h") == gen2, "generation 2 must be lockable"


async def test_deferred_removal_of_a_replaced_handle_decides_again(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The marker's version compare fails when the holder replaced the handle
    (same generation) in between: the removal then decides again on the new
    version and is still deferred, not reported done. Breaks if a failed
    marker compare is taken for "the handle is gone"."""
    a, b, _ = trio
    await a.add_and_lock("h", b"v1")
    h1 = await b.get_and_lock("h")
    rkey = a.keys.removal("h")
    replaced: list[Any] = []

    async def hook(t: Txn, send: Send) -> TxnResult:
        if not replaced and rkey in puts(t):
            replaced.append(await b.replace("h", h1.version, b"v2"))
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    outcome = await a.try_remove("h", deferred=True)
    monkeypatch.undo()

    assert replaced, "the injection did not run"
    assert outcome.pending and not outcome.removed, outcome
    assert outcome.holders == [b.instance_id]
    assert await a.pending_removals() == {"h"}
    await b.release("h")  # the last lock goes: the removal completes
    assert await a.etcd.get(a.keys.handle("h")) is None
    assert await lock_holders(a.etcd, a, "h") == []


# -- 1b. locking everything skips a handle whose removal is requested meanwhile -------

N_CHECKPOINTS = 4


async def _checkpoints(a: StateHandleStore) -> list[str]:
    """Checkpoints 1..N written by A, none locked (their names, ascending)."""
    cps = CompletedCheckpointStore(a, max_retained=N_CHECKPOINTS)
    for i in range(1, N_CHECKPOINTS + 1):
        await cps.add_checkpoint_and_subsume(i, b"state %d" % i)
    names = [checkpoint_name(i) for i in range(1, N_CHECKPOINTS + 1)]
    for n in names:
        await a.release(n)
    return names


async def _get_all_and_lock(s: StateHandleStore) -> list[str]:
    return [h.name for h in await s.get_all_and_lock()]


async def _lock_all_by_prefix(s: StateHandleStore) -> list[str]:
    """What REST ``GET .../handles?lock=true&prefix=`` runs."""
    handles, _, _ = await s.lock_all(checkpoint_name(0)[:4])
    return [h.name for h in handles]


async def _recover(s: StateHandleStore) -> list[str]:
    """What REST ``GET .../checkpoints?lock=true`` runs."""
    return [c.handle.name for c in await CompletedCheckpointStore(s).recover()]


def _puts_lock_of(store: StateHandleStore, t: Txn) -> bool:
    suffix = Layout.lock_suffix(store.instance_id)
    return any(k.endswith(suffix) for k in puts(t))


@pytest.mark.parametrize("moment", ["first-send", "resend-after-re-read"])
@pytest.mark.parametrize(
    "lock_everything",
    [_get_all_and_lock, _lock_all_by_prefix, _recover],
    ids=["get_all_and_lock", "lock_all-prefix", "checkpoint-recover"],
)
async def test_locking_all_skips_a_handle_whose_removal_is_requested_meanwhile(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    moment: str,
    lock_everything: Callable[[StateHandleStore], Awaitable[list[str]]],
) -> None:
    """The locker's snapshot shows ``doomed`` unmarked; its removal is
    requested (deferred: B locks it) before the lock txn is sent, either the
    first one or the one re-sent after another handle of the batch changed
    and the batch was re-read. Breaks if the lock txn compares only the
    versions: ``doomed`` would then be locked and returned although it is no
    longer lockable (rest-v1), and its removal would wait for the locker."""
    a, b, locker = trio
    names = await _checkpoints(a)
    doomed, changed = names[1], names[2]
    await b.get_and_lock(doomed)
    lock_txns: list[Txn] = []

    async def mark_doomed() -> None:
        outcome = await a.try_remove(doomed, deferred=True)
        assert outcome.pending, outcome

    async def hook(t: Txn, send: Send) -> TxnResult:
        if _puts_lock_of(locker, t):
            lock_txns.append(t)
            if moment == "first-send" and len(lock_txns) == 1:
                await mark_doomed()
            elif moment == "resend-after-re-read" and len(lock_txns) == 1:
                await a.replace(changed, (await a.get(changed)).version, b"changed")
            elif moment == "resend-after-re-read" and len(lock_txns) == 2:
                await mark_doomed()
        return await send(t)

    hook_txn(monkeypatch, locker.etcd, hook)
    got = await lock_everything(locker)
    monkeypatch.undo()

    assert len(lock_txns) >= (1 if moment == "first-send" else 2), "the injection did not run"
    assert got == [n for n in names if n != doomed], "a handle pending removal was returned"
    assert await lock_holders(a.etcd, a, doomed) == [b.instance_id], "and locked"
    for n in got:
        assert locker.instance_id in await lock_holders(a.etcd, a, n), n
    await b.release(doomed)  # the last lock goes: the removal completes at once
    assert await a.etcd.get(a.keys.handle(doomed)) is None, "the locker kept it alive"


@pytest.fixture
async def rest_in_process(
    make_config: Callable[..., StoreConfig], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """The REST app in this process (so a test can hook its etcd client), on
    the session etcd and the test's blob root; no maintenance tasks."""
    cfg = make_config()
    # configure_logging would take over the "statestore" loggers of the session.
    monkeypatch.setattr("statestore_api.app.configure_logging", lambda *_: None)
    settings = ServiceSettings(
        etcd_endpoints=cfg.etcd_endpoints, blob_root=cfg.blob_root, maintenance=False
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://statestore") as api:
            yield api, app.state.service


@pytest.mark.parametrize("listing", ["handles", "checkpoints"])
async def test_rest_lock_listing_skips_a_handle_whose_removal_is_requested_meanwhile(
    rest_in_process: tuple[httpx.AsyncClient, Service],
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    listing: str,
) -> None:
    """``GET .../handles?lock=true`` and ``GET .../checkpoints?lock=true``
    (recovery): the removal of ``doomed`` is requested between the service's
    snapshot and its lock txn. Breaks if the listing locks and returns it."""
    api, svc = rest_in_process
    a, b, _ = trio
    names = await _checkpoints(a)
    doomed = names[1]
    await b.get_and_lock(doomed)
    r = await api.post("/v1/sessions", json={"ttl_seconds": 30})
    sid = r.json()["session_id"]
    marked: list[bool] = []

    async def hook(t: Txn, send: Send) -> TxnResult:
        if not marked and any(k.endswith(Layout.lock_suffix(sid)) for k in puts(t)):
            marked.append((await a.try_remove(doomed, deferred=True)).pending)
        return await send(t)

    hook_txn(monkeypatch, svc.backend.client, hook)
    path = f"/v1/namespaces/{enc(a.namespace)}/{listing}?lock=true"
    r = await api.get(path, headers=sess(sid))
    monkeypatch.undo()

    assert marked == [True], "the injection did not run"
    assert r.status_code == 200, r.text
    got = [doc["name"] for doc in r.json()[listing]]
    assert got == [n for n in names if n != doomed], "a handle pending removal was returned"
    assert sid not in await lock_holders(a.etcd, a, doomed), "and locked by the session"
    for n in got:
        assert sid in await lock_holders(a.etcd, a, n), n
    await b.release(doomed)
    assert await a.etcd.get(a.keys.handle(doomed)) is None


# -- 2a. a removal marker acts only on the handle version it was put for ---------------


@pytest.mark.parametrize("left_over", [False, True], ids=["no-marker", "marker-left-over"])
async def test_complete_removal_never_drops_the_marker_of_a_re_created_handle(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    left_over: bool,
) -> None:
    """A's ``complete_removal`` reads ``h`` absent (its removal is done, or
    only a marker left behind by hand is there); before it acts, B writes a
    new ``h`` and keeps it locked, and C asks to remove it (deferred). A must
    not delete C's marker: C's removal would be lost, and the new ``h``
    lockable and never removed. Breaks if "handle absent" deletes the marker
    unconditionally instead of comparing the marker it read."""
    a, b, c = trio
    hkey, rkey = a.keys.handle("h"), a.keys.removal("h")
    if left_over:  # e.g. an operator deleted the handle key with etcdctl
        await b.etcd.put(rkey, RemovalMarker("h", time.time(), "gone-instance").encode())
    raced: list[bool] = []

    async def write_and_mark() -> None:
        await b.add_and_lock("h", b"generation 2")
        raced.append((await c.try_remove("h", deferred=True)).pending)

    def reads_handle(t: Txn) -> bool:
        req = t.request()
        return not req.compare and any(
            op.WhichOneof("request") == "request_range" and op.request_range.key == hkey
            for op in req.success
        )

    async def hook(t: Txn, send: Send) -> TxnResult:
        answer = await send(t)
        if not raced and reads_handle(t):
            await write_and_mark()  # after A's read, before A acts on it
        return answer

    original_get = a.etcd.get

    async def get(key: bytes, **kwargs: Any) -> Any:
        answer = await original_get(key, **kwargs)
        if not raced and key == hkey:
            await write_and_mark()
        return answer

    hook_txn(monkeypatch, a.etcd, hook)
    monkeypatch.setattr(a.etcd, "get", get)
    await a.complete_removal("h")
    monkeypatch.undo()

    assert raced == [True], "the injection did not run"
    marker = await c.etcd.get(rkey)
    assert marker is not None, "A deleted the removal marker C put for the new handle"
    with pytest.raises(NotFound):
        await a.get_and_lock("h")  # pending removal: not lockable
    await b.release("h")  # the last lock goes: C's removal completes
    assert await c.etcd.get(hkey) is None, "C's requested removal was lost"


@pytest.mark.parametrize("completer", ["complete_removal", "reconciler"])
async def test_a_stale_marker_is_dropped_not_applied(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore], completer: str
) -> None:
    """A marker recording another version than the handle's (whatever left it
    there: a restore, a hand edit) is not a removal of this handle: it is
    dropped and the handle kept. Breaks if complete_removal (or the
    reconciler, which calls it) acts on the marker's existence alone."""
    a, b, _ = trio
    h = await a.add_and_lock("h", b"state")
    await a.release("h")
    rkey = a.keys.removal("h")
    # A marker as records.RemovalMarker writes it, for the version before.
    stale = {"name": "h", "requested_at": time.time(), "by": "someone", "version": h.version - 1}
    await a.etcd.put(rkey, json.dumps(stale, separators=(",", ":")).encode())

    if completer == "complete_removal":
        assert await a.complete_removal("h") is False
    else:
        await RemovalReconciler(a).resync()

    assert await a.etcd.get(a.keys.handle("h")) is not None, "the handle was removed"
    assert await a.etcd.get(rkey) is None, "the stale marker was kept"
    assert await b.get_and_lock("h") == h


async def test_add_drops_a_marker_left_without_its_handle(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
) -> None:
    """A marker whose handle is gone (deleted by hand with etcdctl) belongs to
    no handle: the add that writes the name again drops it in its commit txn.
    Breaks if the new handle inherits it (then it is unlockable, skipped by
    recovery, and removed when its writer lets go)."""
    a, b, _ = trio
    await a.add_and_lock("h", b"generation 1")
    await b.get_and_lock("h")
    assert (await a.try_remove("h", deferred=True)).pending
    hkey = a.keys.handle("h")
    await a.etcd.delete(hkey, prefix_end(hkey))  # the handle and its locks, by hand

    gen2 = await a.add_and_lock("h", b"generation 2")

    assert await a.etcd.get(a.keys.removal("h")) is None
    assert await b.get_and_lock("h") == gen2
    assert [x.name for x in await b.get_all_and_lock()] == ["h"]
    await a.release("h")
    await b.release("h")
    assert await b.read("h") == b"generation 2"


# -- 2b. an add resolved by its request id holds its lock, or says it does not --------


async def _own_lock_lease(store: StateHandleStore, name: str) -> int | None:
    """The lease of ``store``'s lock on ``name``; None when it holds none."""
    kv = await store.etcd.get(store.keys.lock(name, store.instance_id))
    return None if kv is None else kv.lease


@pytest.mark.parametrize(
    "meanwhile", ["lock-released", "lock-released-and-removal-requested", "lease-lost"]
)
async def test_ambiguous_add_resolved_by_request_id_holds_its_lock(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: str,
) -> None:
    """A's commit txn is applied but its answer is lost (``Ambiguous``);
    before A resolves it by reading its request id back, A's lock goes. A
    must not report "added and locked" while holding nothing: it either
    takes the lock again (on its current lease, at the version it wrote) or
    raises. Breaks if the resolution returns the handle without looking at
    the lock."""
    a, b, c = trio
    hkey = a.keys.handle("x")
    dropped: list[str] = []

    async def drop_lock() -> None:
        if meanwhile == "lease-lost":  # expiry, as etcd does it: every key of the lease
            await b.etcd.lease_revoke(a.session.lease_id)
            return
        if meanwhile == "lock-released-and-removal-requested":
            await b.get_and_lock("x")
        await b.etcd.delete(a.keys.lock("x", a.instance_id))
        if meanwhile == "lock-released-and-removal-requested":
            assert (await c.try_remove("x", deferred=True)).pending

    async def hook(t: Txn, send: Send) -> TxnResult:
        if not dropped and hkey in puts(t):
            await send(t)  # applied ...
            await drop_lock()
            dropped.append(meanwhile)
            raise Ambiguous("test: the commit's answer was lost")  # ... but unconfirmed
        return await send(t)

    hook_txn(monkeypatch, a.etcd, hook)
    try:
        outcome: Any = await a.add_and_lock("x", b"state of x", request_id="req-1")
    except (PossibleInconsistentState, SessionExpired) as e:
        outcome = e
    monkeypatch.undo()

    assert dropped == [meanwhile], "the injection did not run"
    print(f"\n{meanwhile}: {outcome!r}")
    written = await b.get("x")
    assert written.request_id == "req-1", "the write itself was applied"
    if meanwhile == "lock-released":  # nothing stands in the way: locked again
        assert outcome == written
        assert await _own_lock_lease(a, "x") == a.session.lease_id, "A holds no lock on x"
        return
    # Marked for removal: no longer lockable. Lease lost: all of A's locks went.
    expected = PossibleInconsistentState if "removal" in meanwhile else SessionExpired
    assert isinstance(outcome, expected), f"A reported success without its lock: {outcome!r}"
    assert await _own_lock_lease(a, "x") is None, "A holds a lock it was refused"


@pytest.mark.parametrize("data", [b"small state", "streamed"], ids=["commit-path", "precheck"])
async def test_add_retried_with_its_request_id_holds_its_lock(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore], data: bytes | str
) -> None:
    """A retry of an add that did succeed (same request id) returns the
    handle, found by the commit txn's else branch (small bytes) or the
    pre-upload read (streamed data). Its lock went meanwhile (released, or
    the first attempt ran on a lease since lost): the retry must hold it
    again. Breaks if the retry returns the handle without taking the lock."""
    a, b, _ = trio

    async def state() -> AsyncIterator[bytes]:
        yield b"streamed state"

    def payload() -> Any:
        return state() if data == "streamed" else data

    h = await a.add_and_lock("x", payload(), request_id="req-1")
    await b.etcd.delete(a.keys.lock("x", a.instance_id))

    again = await a.add_and_lock("x", payload(), request_id="req-1")

    assert again.version == h.version
    assert await _own_lock_lease(a, "x") == a.session.lease_id, "the retry holds no lock"
    assert len(await b.blobs.list_namespace(b.namespace)) == 1, "the retry's blob was kept"


# -- 2c. no instance or session can be the REST reader identity ------------------------


@pytest.mark.parametrize(
    "bad",
    ["reader", "_reader", "_mine", "a/b", "a/locks/b", "", "x" * 129, "é", "a b", "a\n", "-a"],
)
def test_unsafe_or_reserved_instance_ids_are_refused(
    make_config: Callable[..., StoreConfig], bad: str
) -> None:
    """An instance id is a raw segment of every lock key and the REST reader's
    lock-less calls (namespace cleanup) treat locks under their own identity as
    theirs. Breaks if the SDK accepts an id that is, or could be, the reader's,
    or one that is not one safe key segment."""
    with pytest.raises(InvalidArgument, match="instance id"):
        StateHandleStore(make_config(), instance_id=bad)


@pytest.mark.parametrize(
    "good", ["job-42.jm_1", "0123456789abcdef0123456789abcdef", "1a2b-0123456789abcdef"]
)
async def test_safe_instance_ids_are_accepted(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, good: str
) -> None:
    store = await open_store(make_config(), instance_id=good)
    await store.add_and_lock("h", b"x")
    assert await store.holders("h") == [good]


def test_reader_identity_is_no_instance_and_no_session_id() -> None:
    with pytest.raises(InvalidArgument):
        validate_instance_id(READER_ID)
    with pytest.raises(SessionExpired):
        SessionRegistry.lease_of(READER_ID)


async def test_namespace_delete_keeps_a_handle_locked_by_an_instance_named_reader(
    rest_in_process: tuple[httpx.AsyncClient, Service],
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
) -> None:
    """An SDK instance whose id was the REST reader's (``reader``, possible
    before ids were validated, or from an older statestore) holds a lock on
    ``h``; the admin then deletes the namespace over REST. Breaks if the
    reader identity can equal that id: its removal then takes the lock for
    its own and removes a locked handle (invariant 2)."""
    api, _ = rest_in_process
    a, b, _ = trio
    await a.add_and_lock("h", b"state")
    await a.release("h")
    # The lock key such an instance holds, on its lease (b's stands in for it).
    lock = a.keys.lock("h", "reader")
    await b.etcd.put(lock, encode_holder("reader"), lease=b.session.lease_id)

    r = await api.delete(f"/v1/namespaces/{enc(a.namespace)}")

    assert r.status_code == 202, (r.status_code, r.text)
    assert await a.etcd.get(a.keys.handle("h")) is not None, "a locked handle was removed"
    assert await a.etcd.get(lock) is not None, "someone else's lock was deleted"
    await b.etcd.delete(lock)  # that instance lets go: the removal completes
    assert await a.complete_removal("h") is True


# -- 2d. release_all against lock operations in flight ----------------------------------


async def _lease_gone(store: StateHandleStore, lease: int) -> bool:
    return await store.etcd.lease_ttl(lease) == -1


async def _get_and_lock_h(s: StateHandleStore) -> list[str]:
    return [(await s.get_and_lock("h")).name]


@pytest.mark.parametrize(
    "lock", [_get_and_lock_h, _get_all_and_lock], ids=["get_and_lock", "get_all_and_lock"]
)
async def test_lock_landing_on_the_lease_release_all_revokes_is_taken_again(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
    lock: Callable[[StateHandleStore], Awaitable[list[str]]],
) -> None:
    """A's lock txn lands on A's lease; before its answer is back, A's own
    ``release_all`` (fast path: new lease, old one revoked) revokes that
    lease, lock and all. The lock call must not then report a lock A does not
    hold. Breaks if a lock call does not notice a release_all that ran while
    its txn was in flight (it returns, holding nothing)."""
    a, b, _ = trio
    await b.add_and_lock("h", b"state")
    await b.release("h")
    old = a.session.lease_id
    release: list[asyncio.Task[None]] = []

    async def hook(t: Txn, send: Send) -> TxnResult:
        if release or not _puts_lock_of(a, t):
            return await send(t)
        answer = await send(t)  # A's lock is in etcd, on the old lease ...
        release.append(asyncio.create_task(a.release_all()))
        await async_wait_until(lambda: _lease_gone(b, old), timeout=10, interval=0.01)
        return answer  # ... and gone with it before the call returns

    hook_txn(monkeypatch, a.etcd, hook)
    got = await lock(a)
    await asyncio.wait_for(release[0], 10)
    monkeypatch.undo()

    assert got == ["h"]
    assert a.session.lease_id != old
    assert await _own_lock_lease(a, "h") == a.session.lease_id, "A holds no lock on h"


async def test_add_whose_lock_release_all_deletes_takes_it_again(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's add commits (handle and lock); before its answer is back, A's own
    ``release_all`` runs its slow path (a write is in flight, so the lease
    must stay) and deletes that lock. The add must not return "added and
    locked" holding nothing. Breaks if the add does not notice the release_all
    that ran while its commit txn was in flight."""
    a, b, _ = trio
    lock_key = a.keys.lock("x", a.instance_id)
    release: list[asyncio.Task[None]] = []

    async def hook(t: Txn, send: Send) -> TxnResult:
        if release or a.keys.handle("x") not in puts(t):
            return await send(t)
        answer = await send(t)
        release.append(asyncio.create_task(a.release_all()))
        await _wait_gone(b, lock_key)  # deleted by release_all before the add returns
        return answer

    hook_txn(monkeypatch, a.etcd, hook)
    lease = a.session.lease_id
    h = await a.add_and_lock("x", b"state of x")
    await asyncio.wait_for(release[0], 10)
    monkeypatch.undo()

    assert a.session.lease_id == lease, "the slow path keeps the lease"
    assert (await a.get("x")).version == h.version
    assert await _own_lock_lease(a, "x") == lease, "A's add returned without its lock"


async def _wait_gone(store: StateHandleStore, key: bytes) -> None:
    async def gone() -> bool:
        return await store.etcd.get(key) is None

    await async_wait_until(gone, timeout=10, interval=0.01, message=f"{key!r} stays")


async def test_write_starting_while_release_all_takes_a_new_lease_keeps_its_intent(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``release_all`` found no write in flight and asked etcd for a new
    lease; meanwhile an add starts and puts its upload intent on the current
    lease. The fast path would revoke that lease, intent and all, and the add
    fail for a lease it never lost. Breaks if release_all decides on the fast
    path before (not after) its last wait, or swaps the lease under a write."""
    a, b, _ = trio
    await a.add_and_lock("held", b"held before release_all")
    gate = Gate(b"state of x")
    add: list[asyncio.Task[Any]] = []
    original_grant = a.etcd.lease_grant

    async def lease_grant(ttl: int) -> tuple[int, int]:
        if not add:  # release_all's new lease: a write starts meanwhile
            add.append(asyncio.create_task(a.add_and_lock("x", gate)))
            await asyncio.wait_for(gate.started.wait(), 10)  # its intent is in etcd
        return await original_grant(ttl)

    monkeypatch.setattr(a.etcd, "lease_grant", lease_grant)
    await a.release_all()
    monkeypatch.undo()
    assert add, "the injection did not run"
    gate.release.set()
    h = await asyncio.wait_for(add[0], 10)

    assert await _own_lock_lease(a, "held") is None, "a lock taken before release_all stays"
    assert await _own_lock_lease(a, "x") == a.session.lease_id
    assert await b.read("x") == b"state of x" and h.name == "x"


@pytest.mark.parametrize("keeps_lease", ["write-in-flight", "leader"])
async def test_release_all_slow_path_drops_locks_in_every_namespace(
    trio: tuple[StateHandleStore, StateHandleStore, StateHandleStore], keeps_lease: str
) -> None:
    """The slow path (a write in flight, or a leader key: the lease must stay)
    deletes the lock keys one by one. Breaks if it looks only in the store's
    own namespace, while the fast path drops the locks of every namespace
    view at once, or if it drops the write's intent or the leader key."""
    a, b, _ = trio
    other = a.for_namespace(f"{a.namespace}-other")
    await a.add_and_lock("h", b"here")
    await other.add_and_lock("h", b"there")
    gate = Gate(b"in flight")
    write: asyncio.Task[Any] | None = None
    election = LeaderElection(a)
    if keeps_lease == "leader":
        token = await election.campaign(timeout=5)
    else:
        write = asyncio.create_task(a.add_and_lock("w", gate))
        await asyncio.wait_for(gate.started.wait(), 10)
    lease = a.session.lease_id

    await a.release_all()

    assert a.session.lease_id == lease, "the lease must stay"
    assert await _own_lock_lease(a, "h") is None
    assert await _own_lock_lease(other, "h") is None, "a lock in another namespace stays"
    if write is None:
        assert await LeaderElection(b).leader() == (a.instance_id, token)
        return
    gate.release.set()
    await asyncio.wait_for(write, 10)
    assert await _own_lock_lease(a, "w") == lease
    assert await b.get_all_names() == ["h", "w"]
