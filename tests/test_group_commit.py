"""Group commit (``StoreConfig.group_commit``, ``statestore.etcd._TxnBatcher``)
against a real etcd: each caller of a batched txn gets exactly its own
outcome, txns that would not behave as separate ones are never batched, and
the batches keep within etcd's limits.

The batcher sends a txn at once while nothing is in flight; txns arriving
meanwhile queue and go out together. ``asyncio.gather`` starts its
coroutines in order in one loop step, so in ``gather(first, *rest)`` the
first goes alone and the rest queue behind it: which txns can share a
request is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import Gate, OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig
from statestore.election import LeaderElection
from statestore.errors import AlreadyExists, Fenced, SessionExpired, Unavailable
from statestore.etcd import (
    GROUP_COMMIT_MAX_BYTES,
    Ambiguous,
    EtcdClient,
    Txn,
    TxnResult,
    _KeySpans,
    _span,
)
from statestore.keys import prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.local.faultproxy import FaultProxy
from statestore.store import TokenFence


@pytest.fixture
def prefix() -> bytes:
    return f"/gc-test/{uuid.uuid4().hex[:8]}/".encode()


@pytest.fixture
async def batched(etcd: EtcdProcess) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd.endpoint], group_commit=True)
    yield client
    await client.close()


def create(key: bytes, value: bytes = b"v", lease: int = 0) -> Txn:
    """Put ``key`` if absent, else read it."""
    return (
        Txn().compare("create", key, "==", 0).then(Txn.put(key, value, lease)).orelse(Txn.get(key))
    )


def stats(client: EtcdClient) -> Any:
    assert client._batcher is not None
    return client._batcher


async def test_concurrent_txns_get_exactly_their_own_outcomes(
    batched: EtcdClient, prefix: bytes
) -> None:
    taken = [prefix + f"taken-{i}".encode() for i in range(30)]
    fresh = [prefix + f"fresh-{i}".encode() for i in range(30)]
    for k in taken:
        await batched.put(k, b"old " + k)
    txns = [create(k, b"new") for pair in zip(taken, fresh, strict=True) for k in pair]

    results: list[TxnResult] = await asyncio.gather(
        batched.txn(create(prefix + b"first")), *(batched.txn(t) for t in txns)
    )

    for key, res in zip(
        [k for p in zip(taken, fresh, strict=True) for k in p], results[1:], strict=True
    ):
        if key in taken:
            assert not res.succeeded
            assert [(kv.key, kv.value) for kv in res.results[0]] == [(key, b"old " + key)]
        else:
            assert res.succeeded and res.results == [None]
            kv = await batched.get(key)
            assert kv is not None and kv.value == b"new" and kv.mod_revision == res.revision
    assert stats(batched).batches == 1 and stats(batched).batched_txns == 60
    assert len({r.revision for r in results[1:]}) == 1, "one request: one revision"


async def test_txns_reading_what_another_writes_are_never_batched(
    batched: EtcdClient, prefix: bytes
) -> None:
    """etcd evaluates the compares of every nested txn before any write, so
    "put b if a is absent" beside "put a if b is absent" would both succeed in
    one request; sent apart, exactly one does. And two creates of one key in
    one request would be refused whole as a duplicate key."""
    pairs = [(prefix + f"a{i}".encode(), prefix + f"b{i}".encode()) for i in range(20)]
    skew = [
        t
        for a, b in pairs
        for t in (
            Txn().compare("create", a, "==", 0).then(Txn.put(b, b"")),
            Txn().compare("create", b, "==", 0).then(Txn.put(a, b"")),
        )
    ]
    same = [create(prefix + b"same", f"{i}".encode()) for i in range(5)]

    results = await asyncio.gather(
        batched.txn(create(prefix + b"first")), *(batched.txn(t) for t in skew + same)
    )

    won = [r.succeeded for r in results[1:]]
    assert all(won[i] != won[i + 1] for i in range(0, len(skew), 2)), won
    assert sum(won[len(skew) :]) == 1
    assert stats(batched).refused == 0, "etcd refused a batch: a duplicate key was batched"
    assert stats(batched).largest_batch >= 2, "nothing was batched"


async def test_a_put_on_an_expired_lease_fails_alone(batched: EtcdClient, prefix: bytes) -> None:
    lease, _ = await batched.lease_grant(30)
    await batched.lease_revoke(lease)
    keys = [prefix + f"k{i}".encode() for i in range(8)]
    txns = [create(k, lease=lease if i == 3 else 0) for i, k in enumerate(keys)]

    results = await asyncio.gather(
        batched.txn(create(prefix + b"first")),
        *(batched.txn(t) for t in txns),
        return_exceptions=True,
    )

    assert isinstance(results[4], SessionExpired), results[4]
    assert all(isinstance(r, TxnResult) and r.succeeded for i, r in enumerate(results) if i != 4)
    assert stats(batched).refused == 1
    assert [kv.key for kv in (await batched.range_all(prefix, prefix_end(prefix)))[0]] == sorted(
        [prefix + b"first"] + [k for i, k in enumerate(keys) if i != 3]
    )


async def test_batches_keep_within_max_txn_ops_counted_per_level(
    etcd_small_txn: EtcdProcess, prefix: bytes
) -> None:
    """etcd (--max-txn-ops 16) counts the outer txn's nested txns, and each
    nested txn's longest list against what is left: n + m <= 16."""
    client = EtcdClient([etcd_small_txn.endpoint], group_commit=True, max_txn_ops=16)
    try:
        keys = [prefix + f"k{i}".encode() for i in range(40)]
        txns = [
            create(k).then(Txn.put(k + b"/a", b""), Txn.put(k + b"/b", b"")) for k in keys
        ]  # 3 ops each: at most 13 per request
        results = await asyncio.gather(
            client.txn(create(prefix + b"first")), *(client.txn(t) for t in txns)
        )
        assert all(r.succeeded for r in results)
        assert stats(client).refused == 0
        assert stats(client).largest_batch == 13
    finally:
        await client.close()

    # A client told a larger limit than etcd's learns it from the refusal, and
    # every txn of the refused request still gets its own outcome.
    client = EtcdClient([etcd_small_txn.endpoint], group_commit=True, max_txn_ops=128)
    try:
        results = await asyncio.gather(
            client.txn(create(prefix + b"first")), *(client.txn(create(k)) for k in keys)
        )
        assert not results[0].succeeded and not any(r.succeeded for r in results[1:])
        assert [r.results[0][0].key for r in results[1:]] == keys
        assert stats(client).refused == 1 and stats(client).max_ops == 20  # (40 + 1) // 2
    finally:
        await client.close()


async def test_batches_keep_under_the_request_size_limit(
    batched: EtcdClient, prefix: bytes
) -> None:
    """Eight 300 KiB puts would be 2.4 MiB in one request, over etcd's 1.5 MiB."""
    big = b"x" * (300 * 1024)
    keys = [prefix + f"big{i}".encode() for i in range(9)]

    results = await asyncio.gather(*(batched.txn(create(k, big)) for k in keys))

    assert all(r.succeeded for r in results)
    assert stats(batched).refused == 0
    assert 2 <= stats(batched).largest_batch <= 3
    assert stats(batched).largest_batch_bytes <= GROUP_COMMIT_MAX_BYTES
    for k in keys:
        kv = await batched.get(k)
        assert kv is not None and kv.value == big


async def test_a_batch_without_answer_is_ambiguous_for_every_member(
    etcd: EtcdProcess, prefix: bytes
) -> None:
    proxy = FaultProxy("127.0.0.1", etcd.client_port)
    client = EtcdClient([proxy.endpoint], group_commit=True, timeout=1.5)
    direct = EtcdClient([etcd.endpoint])
    keys = [prefix + f"k{i}".encode() for i in range(6)]
    try:
        await client.get(b"warm-up")
        proxy.set_mode("drop_responses")
        results = await asyncio.gather(
            *(client.txn(create(k)) for k in keys), return_exceptions=True
        )
        assert all(isinstance(r, Ambiguous) for r in results), results
        assert "group commit" in results[1].message
        # Every request reached etcd: each caller's re-read finds its own write,
        # the batched ones all at one revision.
        kvs = [await direct.get(k) for k in keys]
        assert all(kv is not None for kv in kvs)
        assert len({kv.mod_revision for kv in kvs[1:] if kv is not None}) == 1
    finally:
        proxy.close()
        await client.close()
        await direct.close()


async def test_closing_fails_queued_txns_as_never_sent(etcd: EtcdProcess, prefix: bytes) -> None:
    proxy = FaultProxy("127.0.0.1", etcd.client_port)
    client = EtcdClient([proxy.endpoint], group_commit=True, timeout=5)
    direct = EtcdClient([etcd.endpoint])
    try:
        await client.get(b"warm-up")
        proxy.set_mode("drop_responses")  # the first txn stays in flight
        keys = [prefix + f"k{i}".encode() for i in range(4)]
        tasks = [asyncio.create_task(client.txn(create(k))) for k in keys]
        await async_wait_until(lambda: len(stats(client)._queue) == 3, timeout=5, interval=0.01)
        await client.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)

        # (the first, sent alone, ends as any call cut by closing the channel)
        for r in results[1:]:
            assert isinstance(r, Unavailable) and not isinstance(r, Ambiguous), r
            assert "closed" in r.message
        assert [await direct.get(k) is None for k in keys[1:]] == [True] * 3
    finally:
        proxy.close()
        await direct.close()


# -- through the store ---------------------------------------------------------------


@pytest.fixture
def gc_config(make_config: Callable[..., StoreConfig]) -> Callable[..., StoreConfig]:
    return lambda **kw: make_config(group_commit=True, **kw)


async def test_concurrent_adds_of_one_name_one_wins(
    gc_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(gc_config())
    names = [f"n{i // 2}" for i in range(40)]  # each name twice

    results = await asyncio.gather(
        *(store.add_and_lock(n, f"{i}".encode()) for i, n in enumerate(names)),
        return_exceptions=True,
    )

    for name in set(names):
        mine = [r for n, r in zip(names, results, strict=True) if n == name]
        assert sum(isinstance(r, AlreadyExists) for r in mine) == 1, mine
        (h,) = [r for r in mine if not isinstance(r, BaseException)]
        assert (await store.get(name)).version == h.version
    assert stats(store._s.client).refused == 0
    assert stats(store._s.client).largest_batch >= 2, "nothing was batched"


async def test_concurrent_adds_and_removals_through_group_commit(
    gc_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store, other = await open_store(gc_config()), await open_store(gc_config())
    names = [f"h{i}" for i in range(24)]
    await asyncio.gather(*(store.add_and_lock(n, b"s") for n in names))
    await asyncio.gather(*(other.get_and_lock(n) for n in names[::2]))  # locked by another

    removed = await asyncio.gather(*(store.release_and_try_remove(n) for n in names))

    assert removed == [i % 2 == 1 for i in range(len(names))]
    assert await store.get_all_names() == sorted(names[::2])
    assert stats(store._s.client).largest_batch >= 2, "nothing was batched"


async def test_a_stale_fence_fails_alone_in_a_batch(
    gc_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """Two views of one backend (one client, one batcher): the leader's adds
    succeed beside the adds of a view holding a resigned leadership's token."""
    store = await open_store(gc_config())
    election = LeaderElection(store)
    old = await election.campaign(timeout=5)
    await election.resign()
    stale = store.with_fencing(TokenFence(store.keys.leader(store.instance_id), old))
    await election.campaign(timeout=5)
    leader: StateHandleStore = store.with_fencing(election)

    results = await asyncio.gather(
        *((leader if i % 2 else stale).add_and_lock(f"f{i}", b"s") for i in range(20)),
        return_exceptions=True,
    )

    assert all(isinstance(r, Fenced) for r in results[::2]), results[::2]
    assert not any(isinstance(r, BaseException) for r in results[1::2]), results[1::2]
    assert await store.get_all_names() == sorted(f"f{i}" for i in range(1, 20, 2))
    assert stats(store._s.client).largest_batch >= 2, "nothing was batched"


async def test_ambiguous_batched_adds_resolve_by_their_own_reread(
    etcd: EtcdProcess, gc_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    proxy = FaultProxy("127.0.0.1", etcd.client_port)
    direct = EtcdClient([etcd.endpoint])
    try:
        store = await open_store(gc_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=2))
        names = [f"a{i}" for i in range(6)]
        gates = [Gate(n.encode()) for n in names]
        release = asyncio.Event()
        for g in gates:
            g.release = release  # every commit txn sent at once, after the cut
        tasks = [
            asyncio.create_task(store.add_and_lock(n, g)) for n, g in zip(names, gates, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(g.started.wait() for g in gates)), 10)
        proxy.set_mode("drop_responses")
        release.set()
        keys = [store.keys.handle(n) for n in names]

        async def all_written() -> bool:
            return all([await direct.get(k) is not None for k in keys])

        await async_wait_until(all_written, timeout=15, interval=0.02)
        proxy.set_mode("forward", cut=True)
        handles = await asyncio.wait_for(asyncio.gather(*tasks), 30)

        assert [h.name for h in handles] == names
        for h in handles:
            assert await store.read(h.name) == h.name.encode()
            assert (await store.get(h.name)).version == h.version
            assert await store.holders(h.name) == [store.instance_id]
        assert len({h.version for h in handles}) < len(names), "nothing was batched"
    finally:
        proxy.close()
        await direct.close()


def test_key_spans_overlap_exactly_as_a_brute_force_check() -> None:
    """The interval union that decides which txns may share a request, against
    the definition: [a, b) and [c, d) overlap iff a < d and c < b (None: no end)."""
    rng = random.Random(14)
    keys = [bytes([c]) * n for c in b"abcdef" for n in (1, 2)]

    def span() -> tuple[bytes, bytes | None]:
        start = rng.choice(keys)
        kind = rng.random()
        if kind < 0.4:
            return _span(start, b"")  # one key
        if kind < 0.5:
            return _span(start, b"\0")  # every key from start on
        return start, rng.choice([k for k in keys if k > start] or [None])

    def meet(x: tuple[bytes, bytes | None], y: tuple[bytes, bytes | None]) -> bool:
        return (y[1] is None or x[0] < y[1]) and (x[1] is None or y[0] < x[1])

    for _ in range(300):
        spans, added = _KeySpans(), []
        for _ in range(rng.randint(1, 8)):
            s = span()
            spans.add(s)
            added.append(s)
        probe = span()
        assert spans.overlaps(probe) == any(meet(probe, a) for a in added), (added, probe)
