"""Bulk calls in the SDK: ``remove_prefix``, ``release_prefix``,
``CheckpointIDCounter.delete`` (rest-v1.md "Bulk calls"), against real etcd.

``remove_prefix`` batches several handles per txn; the tests check the
outcome (removed, kept, pending), that invariant 2 holds for every handle
another instance locks, that no txn exceeds ``--max-txn-ops`` on an etcd
that enforces 16, and that a stale fence removes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from helpers import OpenStore

from statestore import StateHandleStore, StoreConfig
from statestore.counter import CheckpointIDCounter
from statestore.election import LeaderElection
from statestore.errors import Fenced, InvalidArgument
from statestore.etcd import Txn
from statestore.local.etcd_process import EtcdProcess
from statestore.store import TokenFence

MAX_OPS = 16


async def add_all(store: StateHandleStore, names: list[str]) -> None:
    sem = asyncio.Semaphore(16)

    async def add(name: str) -> None:
        async with sem:
            await store.add_and_lock(name, name.encode())

    await asyncio.gather(*(add(n) for n in names))


async def test_remove_prefix_removes_what_nobody_else_locks(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store, other = await open_store(make_config()), await open_store(make_config())
    await add_all(store, ["job/a", "job/b", "job/c", "keep/x"])
    await other.get_and_lock("job/b")

    removed, kept = await store.remove_prefix("job/")

    assert (removed, kept) == (["job/a", "job/c"], ["job/b"])
    assert await store.get_all_names() == ["job/b", "keep/x"]
    assert await store.holders("job/b") == [other.instance_id], "our lock released, theirs kept"
    assert await store.holders("keep/x") == [store.instance_id], "other prefixes untouched"
    assert await store.pending_removals() == set()


async def test_deferred_remove_prefix_leaves_the_locked_pending_until_they_let_go(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store, other = await open_store(make_config()), await open_store(make_config())
    await add_all(store, ["a", "b"])
    await other.get_and_lock("b")

    assert await store.remove_prefix("", deferred=True) == (["a"], ["b"])
    assert await store.pending_removals() == {"b"}
    await other.close()  # its lease goes, and the removal completes
    assert await store.get_all_names() == []


async def test_empty_prefix_is_every_handle(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    names = [f"n{i:02d}" for i in range(20)]
    await add_all(store, names)
    assert await store.remove_prefix() == (names, [])
    assert await store.get_all_names() == []
    assert await store.remove_prefix() == ([], [])


async def test_a_handle_replaced_since_the_read_is_decided_again(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch txn compares every handle's version: one replaced after the
    read fails the batch, whose handles then go one by one (and go)."""
    store = await open_store(make_config())
    await add_all(store, ["a", "b", "c"])
    snapshot = store.snapshot

    async def raced(prefix: str | None = None) -> Any:
        snap = await snapshot(prefix)
        await store.replace("b", snap.handles[1].version, b"newer")
        return snap

    monkeypatch.setattr(store, "snapshot", raced)
    assert await store.remove_prefix() == (["a", "b", "c"], [])
    assert await store.get_all_names() == []


async def test_remove_prefix_keeps_every_txn_within_max_txn_ops(
    etcd_small_txn: EtcdProcess,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 handles on an etcd started with ``--max-txn-ops 16`` (which refuses
    anything larger, so a txn over the limit would fail the call), two of
    them locked by another instance; the store is told the limit."""
    cfg = make_config(etcd_endpoints=[etcd_small_txn.endpoint], max_txn_ops=MAX_OPS)
    store, other = await open_store(cfg), await open_store(cfg)
    names = [f"h{i:03d}" for i in range(300)]
    await add_all(store, names)
    await other.get_and_lock("h007")
    await other.get_and_lock("h250")
    sizes: list[int] = []
    send = store.etcd.txn

    async def counted(t: Txn, **kwargs: Any) -> Any:
        sizes.append(max(len(t.compares), len(t.success), len(t.failure)))
        return await send(t, **kwargs)

    monkeypatch.setattr(store.etcd, "txn", counted)
    removed, kept = await store.remove_prefix("h")

    assert kept == ["h007", "h250"] and removed == [n for n in names if n not in kept]
    assert max(sizes) <= MAX_OPS
    assert sum(1 for s in sizes if s >= 12) >= 290 // 4, "handles were not batched"
    assert await store.get_all_names() == kept


async def test_remove_prefix_under_a_stale_fence_removes_nothing(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    await add_all(store, ["a", "b"])
    election = LeaderElection(store)
    token = await election.campaign(timeout=5)
    await election.resign()
    stale = store.with_fencing(TokenFence(store.keys.leader(store.instance_id), token))

    with pytest.raises(Fenced):
        await stale.remove_prefix()
    with pytest.raises(Fenced):
        await stale.remove_prefix("nothing-here")
    assert await store.get_all_names() == ["a", "b"]
    assert await store.holders("a") == [store.instance_id]

    token = await election.campaign(timeout=5)
    assert await store.with_fencing(election).remove_prefix() == (["a", "b"], [])


async def test_release_prefix_leaves_other_locks_and_other_names(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store, other = await open_store(make_config()), await open_store(make_config())
    await add_all(store, ["job/a", "job/b", "other"])
    await other.get_and_lock("job/a")

    assert await store.release_prefix("job/") == ["job/a", "job/b"]

    assert await store.holders("job/a") == [other.instance_id]
    assert await store.holders("job/b") == []
    assert await store.holders("other") == [store.instance_id]
    assert await store.get_all_names() == ["job/a", "job/b", "other"]
    assert await store.release_prefix("job/") == []
    assert await store.release_prefix() == ["other"]


async def test_release_prefix_completes_removals_it_was_blocking(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store, other = await open_store(make_config()), await open_store(make_config())
    await add_all(store, ["x"])
    await other.get_and_lock("x")
    assert not await other.release_and_try_remove("x", deferred=True)
    await store.release_prefix("")
    assert await store.get_all_names() == []


async def test_release_prefix_batches_within_max_txn_ops(
    etcd_small_txn: EtcdProcess, make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config(etcd_endpoints=[etcd_small_txn.endpoint], max_txn_ops=MAX_OPS)
    store = await open_store(cfg)
    names = [f"h{i:02d}" for i in range(40)]
    await add_all(store, names)
    assert await store.release_prefix("h") == names
    assert all([await store.holders(n) == [] for n in names])


async def test_bad_prefixes_are_refused(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    with pytest.raises(InvalidArgument):
        await store.remove_prefix("bad\x00")
    with pytest.raises(InvalidArgument):
        await store.release_prefix("x" * 600)


# -- counters ----------------------------------------------------------------------


async def test_counter_delete_starts_it_again_at_1(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    counter = CheckpointIDCounter(store)
    await counter.delete()  # absent: fine
    assert await counter.get_and_increment() == 1
    assert await counter.get_and_increment() == 2
    await counter.delete()
    assert await counter.get() == 1
    assert await store.etcd.get(store.keys.counter(counter.name)) is None
    assert await counter.get_and_increment() == 1


async def test_a_stale_fence_cannot_delete_the_counter(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    election = LeaderElection(store)
    await election.campaign(timeout=5)
    counter = CheckpointIDCounter(store.with_fencing(election))
    assert await counter.get_and_increment() == 1
    await election.resign()
    with pytest.raises(Fenced):
        await counter.delete()
    assert await CheckpointIDCounter(store).get() == 2
