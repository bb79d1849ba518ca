"""Removals in one round trip (issue 14): the records this instance locks.

A store remembers the record of each handle it holds a lock on
(``_HeldRecords``), so ``release_and_try_remove`` sends its txn at once,
comparing that record's version, and reads only when the compare fails.
Every test runs against real etcd and counts the requests the store's own
client sends (its ``observer`` sees each answered request by name). The
point of each: a stale record must never change an outcome, queue the wrong
blob, or delete a replaced handle's new blob.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import OpenStore
from interleave import Send, deletes, hook_txn

from statestore import CompletedCheckpointStore, StateHandleStore, StoreConfig
from statestore.election import LeaderElection
from statestore.errors import Fenced
from statestore.etcd import Ambiguous, Txn, TxnResult
from statestore.keys import prefix_end
from statestore.maintenance.cleanup import clear_namespace
from statestore.records import GcEntry, RemovalMarker
from statestore.store import TokenFence


@contextmanager
def requests_of(store: StateHandleStore) -> Iterator[Counter[str]]:
    """The etcd requests ``store``'s client sends meanwhile, by name (lease
    keepalives, which run on their own, left out)."""
    calls: Counter[str] = Counter()

    def count(what: str, _secs: float) -> None:
        if not what.startswith("lease"):
            calls[what] += 1

    store.etcd.observer = count
    try:
        yield calls
    finally:
        store.etcd.observer = None


async def gc_entries(store: StateHandleStore) -> dict[str, GcEntry]:
    """Blob id -> the ``gc/`` entry queuing it."""
    gp = store.keys.gc_prefix
    kvs, _ = await store.etcd.range_all(gp, prefix_end(gp))
    return {kv.key[len(gp) :].decode(): GcEntry.decode(kv.value) for kv in kvs}


async def lock_holders(store: StateHandleStore, name: str) -> list[str]:
    return await store.holders(name)


@pytest.mark.parametrize("taken_by", ["add_and_lock", "get_and_lock", "get_all_and_lock"])
async def test_removal_of_a_locked_handle_is_one_etcd_request(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, taken_by: str
) -> None:
    """Breaks if the removal reads the handle first although this instance
    holds its record (from the add, the lock or the recovery)."""
    cfg = make_config()
    writer = await open_store(cfg)
    h = await writer.add_and_lock("h", b"state")
    store = writer
    if taken_by != "add_and_lock":
        await writer.release("h")
        store = await open_store(cfg)
        if taken_by == "get_and_lock":
            await store.get_and_lock("h")
        else:
            assert [x.name for x in await store.get_all_and_lock()] == ["h"]

    with requests_of(store) as calls:
        assert await store.release_and_try_remove("h") is True

    assert calls == Counter({"release_and_try_remove": 1}), calls
    assert await store.etcd.get(store.keys.handle("h")) is None
    assert await lock_holders(store, "h") == []
    assert (await gc_entries(store))[h.blob_ref].blob_url == h.blob_url


@pytest.mark.parametrize("then", ["get-only", "release", "release_all", "lease-lost"])
async def test_records_are_held_only_while_locked(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, then: str
) -> None:
    """The bound: reading a handle without its lock holds nothing, and letting
    go of the lock (one, all, or with a lost lease) forgets the record, so
    the removal reads first again. Breaks if reads add records or a release
    keeps them."""
    cfg = make_config()
    writer, store = await open_store(cfg), await open_store(cfg)
    await writer.add_and_lock("h", b"state")
    await writer.release("h")
    if then == "get-only":
        await store.get("h")
    else:
        await store.get_and_lock("h")
        if then == "release":
            await store.release("h")
        elif then == "release_all":
            await store.release_all()
        else:
            await store.session.report_lost(store.session.lease_id, "test: lease gone")

    with requests_of(store) as calls:
        assert await store.release_and_try_remove("h") is True

    assert calls == Counter({"get": 1, "release_and_try_remove": 1}), calls


async def test_subsume_removes_each_checkpoint_in_one_request(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """The checkpoint store's subsume path: checkpoints it added (locked) go
    by one removal txn each, without a read of the handle."""
    store = await open_store(make_config())
    checkpoints = CompletedCheckpointStore(store, max_retained=1)
    await checkpoints.add_checkpoint_and_subsume(1, b"one")
    with requests_of(store) as calls:
        _, subsumed = await checkpoints.add_checkpoint_and_subsume(2, b"two")
    assert subsumed == [1]
    assert calls["release_and_try_remove"] == 1 and calls["get"] == 0, calls
    assert await store.get_all_names() == ["00000000000000000002"]


@pytest.mark.parametrize("b_locks", [False, True], ids=["unlocked", "b-locks-it"])
async def test_handle_replaced_by_another_instance_after_it_was_held(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, b_locks: bool
) -> None:
    """A holds v1's record; B replaces the handle (v2, a new blob). A's
    removal must decide on v2: remove it with a gc entry naming v2's blob
    (v1's was queued by the replace), or, when B locks it, keep it and queue
    nothing. Breaks if the txn does not compare the held version (v2 would
    be deleted with v1's blob queued: v2's blob leaked, v1's queued twice),
    or if the gc entry is built from the held record instead of the one the
    txn compares."""
    cfg = make_config()
    a, b = await open_store(cfg), await open_store(cfg)
    v1 = await a.add_and_lock("h", b"v1")
    if b_locks:
        await b.get_and_lock("h")
    v2 = await b.replace("h", v1.version, b"v2")
    assert v2.blob_ref != v1.blob_ref

    with requests_of(a) as calls:
        outcome = await a.try_remove("h")

    entries = await gc_entries(a)
    assert entries[v1.blob_ref].reason == "replaced"
    if b_locks:
        assert outcome.removed is False and outcome.holders == [b.instance_id], outcome
        assert await a.get("h") == v2 and await a.read("h") == b"v2"
        assert v2.blob_ref not in entries, "the live handle's blob was queued for deletion"
        assert await lock_holders(a, "h") == [b.instance_id], "A's lock must be released"
    else:
        assert outcome.removed is True and outcome.holders == [], outcome
        assert await a.etcd.get(a.keys.handle("h")) is None
        assert entries[v2.blob_ref].blob_url == v2.blob_url
        assert entries[v2.blob_ref].reason == "removed"
        assert await lock_holders(a, "h") == []
    # No read: the else branch showed v2 (and B's lock). Removing v2 costs
    # one more txn; keeping it needs none (B's lock was seen at v2).
    expected = 1 if b_locks else 2
    assert calls == Counter({"release_and_try_remove": expected}), calls


async def test_another_holder_keeps_the_handle_and_our_lock_goes_in_one_request(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    a, b = await open_store(cfg), await open_store(cfg)
    h = await a.add_and_lock("h", b"state")
    await b.get_and_lock("h")

    with requests_of(a) as calls:
        outcome = await a.try_remove("h")

    assert outcome.removed is False and outcome.holders == [b.instance_id], outcome
    assert outcome.pending is False
    assert calls == Counter({"release_and_try_remove": 1}), calls
    assert await lock_holders(a, "h") == [b.instance_id]
    assert await a.get("h") == h
    assert h.blob_ref not in await gc_entries(a)
    # The record is no longer held (our lock went): the next try reads.
    with requests_of(a) as calls:
        assert await a.release_and_try_remove("h") is False
    assert calls["get"] == 1, calls


async def test_held_handle_removed_by_namespace_cleanup_counts_as_removed(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A's lock vanished without A noticing (as on an expiry it has not yet
    seen), then a cleanup removed the handle: A's removal says True and
    writes nothing."""
    cfg = make_config()
    a, b = await open_store(cfg), await open_store(cfg)
    await a.add_and_lock("h", b"state")
    await a.etcd.delete(a.keys.lock("h", a.instance_id))
    await clear_namespace(b)
    assert await b.get_all_names() == []

    ns = a.keys.ns_prefix
    before, _ = await a.etcd.range_all(ns, prefix_end(ns))

    assert await a.release_and_try_remove("h") is True

    after, _ = await a.etcd.range_all(ns, prefix_end(ns))
    assert after == before, "the removal wrote something"


async def test_deferred_removal_with_a_stale_record_marks_the_current_version(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A holds v1; B locks and replaces it (v2). A's deferred removal must
    mark v2 (the version it finds), and complete on B's release with v2's
    blob queued. Breaks if the marker is put for the held version v1 (it
    would remove nothing: the marker would be dropped as stale)."""
    cfg = make_config()
    a, b = await open_store(cfg), await open_store(cfg)
    v1 = await a.add_and_lock("h", b"v1")
    await b.get_and_lock("h")
    v2 = await b.replace("h", v1.version, b"v2")

    outcome = await a.try_remove("h", deferred=True)

    assert outcome.pending and not outcome.removed and outcome.holders == [b.instance_id]
    marker = await a.etcd.get(a.keys.removal("h"))
    assert marker is not None and RemovalMarker.decode(marker.value).applies_to(v2.version)
    assert await lock_holders(a, "h") == [b.instance_id]
    await b.release("h")
    assert await a.etcd.get(a.keys.handle("h")) is None
    assert (await gc_entries(a))[v2.blob_ref].blob_url == v2.blob_url


async def test_fenced_removal_of_a_held_record_changes_nothing(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    election = LeaderElection(store)
    token = await election.campaign(timeout=5)
    leader = store.with_fencing(election)
    h = await leader.add_and_lock("h", b"state")
    await election.resign()
    stale = store.with_fencing(TokenFence(store.keys.leader(store.instance_id), token))
    before = (await store.etcd.status()).revision

    with requests_of(store) as calls, pytest.raises(Fenced):
        await stale.release_and_try_remove("h")

    assert calls == Counter({"release_and_try_remove": 1}), calls
    assert (await store.etcd.status()).revision == before, "something was written"
    assert await store.get("h") == h
    assert await lock_holders(store, "h") == [store.instance_id]


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
async def test_ambiguous_removal_of_a_held_record_resolves_as_before(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
    applied: bool,
) -> None:
    """The answer to the one-trip txn is lost. Applied: B writes the handle
    again (unlocked) before A re-reads; A must say True and leave B's later
    write alone. Breaks if the re-read takes the new handle for the one
    asked for (the held record's generation must count as first seen).
    Not applied: the re-read finds the held handle and removes it."""
    cfg = make_config()
    a, b = await open_store(cfg), await open_store(cfg)
    held = await a.add_and_lock("h", b"v1")
    hkey = a.keys.handle("h")
    later: list[Any] = []

    async def hook(t: Txn, send: Send) -> TxnResult:
        if later or hkey not in deletes(t):
            return await send(t)
        if applied:
            await send(t)
            later.append(await b.add_and_lock("h", b"a later write"))
            await b.release("h")
        else:
            later.append(None)
        raise Ambiguous("injected: the answer to the removal txn was lost")

    hook_txn(monkeypatch, a.etcd, hook)
    assert await a.release_and_try_remove("h") is True
    monkeypatch.undo()

    assert later, "the injection did not run"
    kv = await a.etcd.get(hkey)
    entries = await gc_entries(a)
    assert entries[held.blob_ref].blob_url == held.blob_url
    if applied:
        assert kv is not None and kv.mod_revision == later[0].version, "the later write was lost"
        assert later[0].blob_ref not in entries
    else:
        assert kv is None


async def test_randomized_interference_never_changes_the_outcome(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A adds handles (holding their records); B then does one random thing
    to each: nothing, replace, lock, replace and lock, remove and add again
    (locked), or an operator's delete by hand. A's removal must answer what
    a removal that reads first answers, and every gc entry A wrote must name
    the blob of the record it deleted."""
    cfg = make_config()
    a, b = await open_store(cfg), await open_store(cfg)
    rng = random.Random(1414)
    actions = ["none", "replace", "lock", "replace+lock", "re-add", "delete"]
    plan = {f"h{i:02d}": rng.choice(actions) for i in range(24)}
    added = {name: await a.add_and_lock(name, name.encode()) for name in plan}
    current = dict(added)
    for name, action in plan.items():
        if action in ("lock", "replace+lock"):
            await b.get_and_lock(name)
        if action in ("replace", "replace+lock"):
            current[name] = await b.replace(name, added[name].version, b"new " + name.encode())
        if action == "re-add":
            # A's lock went (as with an expiry A has not seen), B removed and wrote again.
            await a.etcd.delete(a.keys.lock(name, a.instance_id))
            assert await b.release_and_try_remove(name)
            current[name] = await b.add_and_lock(name, b"again")
        if action == "delete":
            hk = a.keys.handle(name)
            await a.etcd.txn(
                Txn().then(Txn.delete(hk), Txn.delete(hk + b"/", prefix_end(hk + b"/")))
            )
    gc_before = await gc_entries(a)

    for name, action in plan.items():
        outcome = await a.try_remove(name)
        kept = action in ("lock", "replace+lock", "re-add")
        assert outcome.removed is not kept, (name, action, outcome)
        assert outcome.holders == ([b.instance_id] if kept else []), (name, action)
        assert a.instance_id not in await lock_holders(a, name)
        kv = await a.etcd.get(a.keys.handle(name))
        if kept:
            assert kv is not None and kv.mod_revision == current[name].version, (name, action)
        else:
            assert kv is None, (name, action)

    new = {k: v for k, v in (await gc_entries(a)).items() if k not in gc_before}
    removed = {n for n, act in plan.items() if act in ("none", "replace")}
    assert {e.handle for e in new.values()} == removed
    for name in removed:
        assert new[current[name].blob_ref].blob_url == current[name].blob_url, name
