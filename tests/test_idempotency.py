"""Idempotency keys in the SDK (``statestore.idempotency``), against real etcd.

Every operation that takes ``idempotency_key`` is called twice with one key:
the second call answers the first one's result and applies nothing (one
handle version, one blob, one counter step, one subsumption). Lost answers
are made with the TCP fault proxy between the store and etcd: the commit txn
reaches etcd and is applied, its answer is dropped, and the store must learn
the outcome from the key's record. Records live on the backend's rotating
idempotency lease, never on the instance's own lease, and go once the window
has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Gate, OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig, SyncStateHandleStore
from statestore.checkpoints import CompletedCheckpointStore
from statestore.counter import CheckpointIDCounter
from statestore.election import LeaderElection
from statestore.errors import AlreadyExists, Fenced, InvalidArgument
from statestore.etcd import EtcdClient
from statestore.keys import prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.local.faultproxy import FaultProxy
from statestore.maintenance.cleanup import clear_namespace
from statestore.records import IdempotencyRecord


@pytest.fixture
def proxy(etcd: EtcdProcess) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", etcd.client_port)
    yield p
    p.close()


async def blobs(store: StateHandleStore) -> int:
    return len(await store.blobs.list_namespace(store.namespace))


async def record(store: StateHandleStore, key: str) -> IdempotencyRecord | None:
    kv = await store.etcd.get(store.keys.idempotency(store.instance_id, key))
    return None if kv is None else IdempotencyRecord.decode(kv.value)


@contextlib.asynccontextmanager
async def answers_dropped_for(
    store: StateHandleStore, proxy: FaultProxy, what: str
) -> AsyncIterator[None]:
    """Drop etcd's answer to the first txn named ``what`` the store sends
    through ``proxy`` (it reaches etcd and is applied), then restore the
    connection once the answer was dropped: the store sees an ambiguous
    outcome for exactly that txn."""
    send = store.etcd.txn

    async def txn(t: Any, *, what: str = "txn", read_only: bool = False) -> Any:
        if what == wanted and not done:
            done.append(True)
            dropped = proxy.bytes_dropped
            proxy.set_mode("drop_responses")
            task = asyncio.ensure_future(send(t, what=what, read_only=read_only))
            await async_wait_until(lambda: proxy.bytes_dropped > dropped, 10, interval=0.005)
            proxy.set_mode("forward", cut=True)
            return await task
        return await send(t, what=what, read_only=read_only)

    wanted, done = what, []
    store.etcd.txn = txn  # type: ignore[method-assign]
    try:
        yield
    finally:
        proxy.set_mode("forward")
        del store.etcd.txn
    assert done, f"no {what!r} txn was sent"


# -- each operation, twice ------------------------------------------------------------


async def test_add_twice_with_one_key_answers_the_first_handle_and_writes_once(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    first = await store.add_and_lock("h", b"state", {"m": 1}, idempotency_key="k-1")
    again = await store.add_and_lock("h", b"state", {"m": 1}, idempotency_key="k-1")

    assert again == first and again.version == first.version == await store.exists("h")
    assert await blobs(store) == 1, "the retry's blob must be dropped"
    assert await store.holders("h") == [store.instance_id]
    stored = await record(store, "k-1")
    assert stored is not None and (stored.op, stored.target) == ("add", "h")
    # Without a key the same call is a second add, refused as always.
    with pytest.raises(AlreadyExists):
        await store.add_and_lock("h", b"state")


async def test_a_streamed_add_retried_is_answered_before_uploading(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    first = await store.add_and_lock("h", iter([b"a", b"b"]), idempotency_key="k")
    gate = Gate(b"never uploaded")
    again = await store.add_and_lock("h", gate, idempotency_key="k")
    assert again == first
    assert not gate.started.is_set(), "a retry found by the pre-read uploads nothing"


async def test_replace_twice_with_one_key_answers_the_first_version(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    h = await store.add_and_lock("h", b"v1")
    first = await store.replace("h", h.version, b"v2", idempotency_key="r")
    again = await store.replace("h", h.version, b"v2", idempotency_key="r")

    assert again == first and again.create_revision == first.create_revision == h.version
    assert await store.exists("h") == first.version
    assert await store.read("h") == b"v2"
    # The old blob is queued for the GC once; only the new one stays live.
    gc = store.keys.gc_prefix
    assert len((await store.etcd.range_all(gc, prefix_end(gc)))[0]) == 1


async def test_checkpoint_twice_with_one_key_subsumes_once(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    checkpoints = CompletedCheckpointStore(store, max_retained=1)
    await checkpoints.add_checkpoint_and_subsume(1, b"one")
    first = await checkpoints.add_checkpoint_and_subsume(2, b"two", idempotency_key="c2")
    # Another checkpoint meanwhile: a retry must not subsume again (it would take 2).
    await checkpoints.add_checkpoint_and_subsume(3, b"three")
    again = await checkpoints.add_checkpoint_and_subsume(2, b"two", idempotency_key="c2")

    assert again == first and first[1] == [1]
    assert [c.checkpoint_id for c in await checkpoints.get_all()] == [3]
    stored = await record(store, "c2")
    assert stored is not None and stored.subsumed == [1]


async def test_a_checkpoint_retry_that_finds_no_subsumed_ids_subsumes_again(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """The first attempt ended between its add and the record of what it
    subsumed: the retry subsumes and records what it removed."""
    store = await open_store(make_config())
    checkpoints = CompletedCheckpointStore(store, max_retained=1)
    await checkpoints.add_checkpoint_and_subsume(1, b"one")
    call = store.idempotent_call("c2", "checkpoint", "00000000000000000002")
    assert call is not None
    await store.add_and_lock_answer(call, "00000000000000000002", b"two", {"checkpoint_id": 2})

    added, subsumed = await checkpoints.add_checkpoint_and_subsume(2, b"two", idempotency_key="c2")
    assert added.checkpoint_id == 2 and subsumed == [1]
    stored = await record(store, "c2")
    assert stored is not None and stored.subsumed == [1]


async def test_a_checkpoint_found_by_its_request_id_under_a_new_key_still_answers(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A streamed checkpoint retried with a key the first attempt did not
    carry is found by its request id before uploading: no record of that key
    exists, and none is filled in."""
    store = await open_store(make_config())
    checkpoints = CompletedCheckpointStore(store, max_retained=1)
    first, _ = await checkpoints.add_checkpoint_and_subsume(2, iter([b"two"]))
    again, subsumed = await checkpoints.add_checkpoint_and_subsume(
        2, iter([b"two"]), idempotency_key="late"
    )
    assert (again, subsumed) == (first, [])
    assert await record(store, "late") is None


async def test_increment_twice_with_one_key_advances_once(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    counter = CheckpointIDCounter(store)
    assert await counter.get_and_increment() == 1
    assert await counter.get_and_increment(idempotency_key="i") == 2
    assert await counter.get_and_increment(idempotency_key="i") == 2
    assert await counter.get() == 3
    assert await counter.get_and_increment() == 3


def test_the_sync_twin_passes_the_key(make_config: Callable[..., StoreConfig]) -> None:
    with SyncStateHandleStore.open(make_config()) as store:
        first = store.add_and_lock("h", b"x", idempotency_key="k")
        assert store.add_and_lock("h", b"x", idempotency_key="k") == first
        again = store.replace("h", first.version, b"y", idempotency_key="r")
        assert store.replace("h", first.version, b"y", idempotency_key="r") == again


# -- scope, reuse, duplicates ---------------------------------------------------------


async def test_the_same_key_of_another_instance_is_another_operation(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, b = await open_store(make_config()), await open_store(make_config())
    ha = await a.add_and_lock("a", b"x", idempotency_key="shared")
    hb = await b.add_and_lock("b", b"y", idempotency_key="shared")
    assert (ha.name, hb.name) == ("a", "b")
    ids_a, ids_b = CheckpointIDCounter(a), CheckpointIDCounter(b)
    assert await ids_a.get_and_increment(idempotency_key="n") == 1
    assert await ids_b.get_and_increment(idempotency_key="n") == 2


async def test_a_key_reused_with_other_state_answers_the_stored_result(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """The key names the operation, not its body: the first result wins."""
    store = await open_store(make_config())
    first = await store.add_and_lock("h", b"first", {"v": 1}, idempotency_key="k")
    again = await store.add_and_lock("h", b"second", {"v": 2}, idempotency_key="k")
    assert again == first and await store.read("h") == b"first"


async def test_a_key_reused_for_another_operation_or_name_is_refused(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    h = await store.add_and_lock("h", b"x", idempotency_key="k")
    with pytest.raises(InvalidArgument, match="already used for add of 'h'"):
        await store.add_and_lock("other", b"x", idempotency_key="k")
    with pytest.raises(InvalidArgument, match="already used"):
        await store.replace("h", h.version, b"y", idempotency_key="k")
    with pytest.raises(InvalidArgument, match="already used"):
        await CheckpointIDCounter(store).get_and_increment(idempotency_key="k")
    assert await store.exists("other") is None and await store.exists("h") == h.version


@pytest.mark.parametrize("key", ["", " lead", "trail ", "x" * 129, "tab\there", "é"])
async def test_bad_keys_are_refused_before_anything_is_written(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, key: str
) -> None:
    store = await open_store(make_config())
    with pytest.raises(InvalidArgument, match="idempotency key"):
        await store.add_and_lock("h", b"x", idempotency_key=key)
    assert await store.exists("h") is None and await blobs(store) == 0


async def test_concurrent_duplicates_apply_once(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    adds = await asyncio.gather(
        *(store.add_and_lock("h", b"same", idempotency_key="dup") for _ in range(8))
    )
    assert all(h == adds[0] for h in adds)
    assert await blobs(store) == 1

    counter = CheckpointIDCounter(store)
    values = await asyncio.gather(
        *(counter.get_and_increment(idempotency_key="dup-i") for _ in range(8))
    )
    assert values == [1] * 8 and await counter.get() == 2

    checkpoints = CompletedCheckpointStore(store, max_retained=1)
    await checkpoints.add_checkpoint_and_subsume(1, b"one")
    done = await asyncio.gather(
        *(
            checkpoints.add_checkpoint_and_subsume(2, b"two", idempotency_key="dup-c")
            for _ in range(4)
        )
    )
    assert all(d == done[0] for d in done) and done[0][1] == [1]


# -- lost answers ---------------------------------------------------------------------


async def test_an_add_whose_answer_was_lost_is_resolved_by_its_record(
    proxy: FaultProxy, make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=1))
    async with answers_dropped_for(store, proxy, "add_and_lock"):
        h = await store.add_and_lock("h", b"state", idempotency_key="lost")
    assert await store.exists("h") == h.version and await store.read("h") == b"state"
    assert await blobs(store) == 1
    assert await store.holders("h") == [store.instance_id]
    assert await store.add_and_lock("h", b"state", idempotency_key="lost") == h


async def test_a_lost_answer_to_a_duplicate_that_lost_drops_its_blob(
    proxy: FaultProxy,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
) -> None:
    """Two attempts with one key; the first commits while the second writes
    its blob; the second's commit answer is lost. Its record names the
    first's blob, so the second definitely did not land: its blob goes."""
    cfg = make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=1)
    store = await open_store(cfg)
    gate = Gate(b"second")
    second = asyncio.create_task(store.add_and_lock("h", gate, idempotency_key="k"))
    await asyncio.wait_for(gate.started.wait(), 10)
    first = await store.add_and_lock("h", b"first", idempotency_key="k")
    async with answers_dropped_for(store, proxy, "add_and_lock"):
        gate.release.set()
        assert await asyncio.wait_for(second, 30) == first
    assert await store.read("h") == b"first" and await blobs(store) == 1


async def test_a_replace_whose_answer_was_lost_is_resolved_by_its_record(
    proxy: FaultProxy, make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=1))
    h = await store.add_and_lock("h", b"v1")
    async with answers_dropped_for(store, proxy, "replace"):
        new = await store.replace("h", h.version, b"v2", idempotency_key="lost")
    assert await store.exists("h") == new.version and await store.read("h") == b"v2"
    assert await blobs(store) == 2  # the old one waits for the GC's grace period
    assert await store.replace("h", h.version, b"v2", idempotency_key="lost") == new


async def test_an_increment_whose_answer_was_lost_advances_once(
    proxy: FaultProxy, make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=1))
    counter = CheckpointIDCounter(store)
    async with answers_dropped_for(store, proxy, "counter increment"):
        assert await counter.get_and_increment(idempotency_key="lost") == 1
    assert await counter.get() == 2
    assert await counter.get_and_increment(idempotency_key="lost") == 1


# -- fencing --------------------------------------------------------------------------


async def test_a_deposed_leaders_retry_answers_what_it_wrote_while_leading(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    election = LeaderElection(store)
    await election.campaign(timeout=5)
    fenced = store.with_fencing(election)
    h = await fenced.add_and_lock("h", b"x", idempotency_key="k")
    counter = CheckpointIDCounter(fenced)
    assert await counter.get_and_increment(idempotency_key="i") == 1
    await election.resign()

    assert await fenced.add_and_lock("h", b"x", idempotency_key="k") == h
    assert await counter.get_and_increment(idempotency_key="i") == 1
    with pytest.raises(Fenced):
        await fenced.add_and_lock("h2", b"x", idempotency_key="k2")
    with pytest.raises(Fenced):
        await counter.get_and_increment(idempotency_key="i2")


# -- lifetime -------------------------------------------------------------------------


async def test_records_hang_on_the_rotating_idempotency_lease_not_the_instance_lease(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(idempotency_window_seconds=600))
    await store.add_and_lock("h", b"x", idempotency_key="k")
    kv = await store.etcd.get(store.keys.idempotency(store.instance_id, "k"))
    assert kv is not None and kv.lease not in (0, store.session.lease_id)
    ttl = await store.etcd.lease_ttl(kv.lease)
    assert 600 < ttl <= 900  # window + rotation margin (window / 2)
    await store.release_all()  # the instance's lease may be swapped: records stay
    assert await store.etcd.get(kv.key) is not None


async def test_a_key_older_than_the_window_is_gone_and_a_retry_performs_again(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(idempotency_window_seconds=2))
    counter = CheckpointIDCounter(store)
    assert await counter.get_and_increment(idempotency_key="k") == 1
    key = store.keys.idempotency(store.instance_id, "k")
    # At least the window, at most 1.5 times it (3 s), plus etcd's expiry sweep.
    await async_wait_until(lambda: _gone(store.etcd, key), timeout=15, interval=0.1)
    assert await counter.get_and_increment(idempotency_key="k") == 2


async def _gone(client: EtcdClient, key: bytes) -> bool:
    return await client.get(key) is None


async def test_the_idempotency_lease_is_rotated_every_half_window(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(idempotency_window_seconds=2))
    first = await store.backend.idempotency.current()
    assert await store.backend.idempotency.current() == first
    await async_wait_until(
        lambda: _rotated(store, first), timeout=5, message="no new lease after window / 2"
    )


async def _rotated(store: StateHandleStore, first: int) -> bool:
    return await store.backend.idempotency.current() != first


async def test_namespace_cleanup_deletes_the_records(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(gc_grace_seconds=0))
    h = await store.add_and_lock("h", b"x", idempotency_key="k")
    await store.release_and_try_remove("h")
    assert await record(store, "k") is not None
    await async_wait_until(lambda: clear_namespace(store), timeout=15)
    assert await record(store, "k") is None
    assert h.name == "h"
