"""``CompletedCheckpointStore``: retention (Flink's subsume rules), idempotent
adds, recovery, shutdown.

Everything runs against real etcd with ``file://`` blobs; outcomes are checked
by reading raw keys (handle records, ``/locks/<instance-id>`` keys,
``removals/`` markers, ``gc/`` entries) and the blob directory.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import OpenStore, async_wait_until

from statestore import Handle, StateHandleStore, StoreConfig
from statestore.checkpoints import (
    MAX_ID,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    checkpoint_name,
    to_subsume,
)
from statestore.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound
from statestore.keys import prefix_end

# -- raw readers ----------------------------------------------------------------------


async def raw_handle_names(store: StateHandleStore) -> list[str]:
    """Handle record names (not lock keys), in etcd key order."""
    hp = store.keys.handles_prefix
    kvs, _ = await store.etcd.range_all(hp, prefix_end(hp), keys_only=True)
    return [
        store.keys.parse_handles_key(kv.key)[0] for kv in kvs if store.keys.is_handle_key(kv.key)
    ]


async def raw_lock_count(store: StateHandleStore, instance_id: str) -> int:
    hp = store.keys.handles_prefix
    kvs, _ = await store.etcd.range_all(hp, prefix_end(hp), keys_only=True)
    suffix = b"/locks/" + instance_id.encode()
    return sum(1 for kv in kvs if kv.key.endswith(suffix))


async def raw_gc_urls(store: StateHandleStore) -> list[str]:
    gp = store.keys.gc_prefix
    kvs, _ = await store.etcd.range_all(gp, prefix_end(gp))
    return sorted(json.loads(kv.value)["blob_url"] for kv in kvs)


async def raw_count(store: StateHandleStore, prefix: bytes) -> int:
    return await store.etcd.count(prefix, prefix_end(prefix))


def blob_files(store: StateHandleStore) -> list[Path]:
    """Files in the namespace's blob directory, read from disk."""
    d = Path(store.blobs.ns_dir(store.namespace))
    return sorted(p for p in d.iterdir() if p.is_file()) if d.exists() else []


def ids(checkpoints: list[CompletedCheckpoint]) -> list[int]:
    return [c.checkpoint_id for c in checkpoints]


# -- retention rules ------------------------------------------------------------------


def parse_seq(seq: str) -> list[tuple[int, bool]]:
    """``"1 2 3s"`` -> [(1, False), (2, False), (3, True)]; ``s`` marks a savepoint."""
    return [(int(w.rstrip("s")), w.endswith("s")) for w in seq.split()]


def fake_checkpoint(cid: int, savepoint: bool) -> CompletedCheckpoint:
    h = Handle(
        name=checkpoint_name(cid),
        version=cid,
        size=0,
        sha256="",
        created_at=datetime.now(UTC),
        metadata={"checkpoint_id": cid, "savepoint": savepoint},
        blob_url=f"memory://x/{cid}",
    )
    return CompletedCheckpoint(cid, savepoint, h)


def simulate(retain: int, seq: list[tuple[int, bool]]) -> tuple[list[int], list[list[int]]]:
    """Apply ``to_subsume`` after each add, as the store does: (retained ids,
    subsumed ids per add)."""
    current: list[CompletedCheckpoint] = []
    steps: list[list[int]] = []
    for cid, sp in seq:
        current.append(fake_checkpoint(cid, sp))
        current.sort(key=lambda c: c.checkpoint_id)
        gone = to_subsume(current, retain)
        steps.append(ids(gone))
        current = [c for c in current if c not in gone]
    return ids(current), steps


RETENTION = [
    pytest.param(1, "1 2 3", [3], id="retain-1-plain"),
    pytest.param(3, "1 2 3 4 5 6", [4, 5, 6], id="retain-3-plain"),
    pytest.param(1, "1 2 3s", [2, 3], id="savepoint-newest-keeps-newest-checkpoint"),
    pytest.param(1, "1 2 3s 4s 5s", [2, 5], id="savepoints-in-a-row"),
    pytest.param(2, "1 2 3s 4s 5s", [2, 5], id="retain-2-savepoints-in-a-row"),
    pytest.param(2, "1 2s 3", [2, 3], id="savepoints-count-towards-retain"),
    pytest.param(2, "1s 2 3 4", [3, 4], id="old-savepoint-subsumed"),
    pytest.param(1, "1s 2s 3s", [3], id="only-savepoints"),
    pytest.param(1, "1 2s 3s 4", [4], id="checkpoint-after-savepoints"),
    pytest.param(3, "1 2s 3 4s 5 6", [4, 5, 6], id="retain-3-mixed"),
]


@pytest.mark.parametrize(("retain", "seq", "expected"), RETENTION)
def test_to_subsume_rules(retain: int, seq: str, expected: list[int]) -> None:
    retained, _ = simulate(retain, parse_seq(seq))
    assert retained == expected


@pytest.mark.parametrize(
    ("retain", "seq", "subsumed"),
    [
        (2, "1 2 3 4 5", [1, 2, 3]),
        (5, "1 2 3", []),
        (1, "1 2 3s", [1]),
        (1, "1s 2 3s 4s", [1, 3]),
        (2, "1s 2s 3 4s", [1, 2]),
        (1, "1", []),
    ],
)
def test_to_subsume_of_a_whole_list(retain: int, seq: str, subsumed: list[int]) -> None:
    checkpoints = [fake_checkpoint(cid, sp) for cid, sp in parse_seq(seq)]
    assert ids(to_subsume(checkpoints, retain)) == subsumed


@pytest.mark.parametrize(("retain", "seq", "expected"), RETENTION)
async def test_retention_in_the_store(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    retain: int,
    seq: str,
    expected: list[int],
) -> None:
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=retain)
    pairs = parse_seq(seq)
    _, expected_steps = simulate(retain, pairs)
    urls: dict[int, str] = {}
    steps = []
    for cid, sp in pairs:
        cp, subsumed = await cps.add_checkpoint_and_subsume(cid, f"state-{cid}".encode(), sp)
        assert (cp.checkpoint_id, cp.savepoint) == (cid, sp)
        urls[cid] = cp.handle.blob_url
        steps.append(subsumed)
    assert steps == expected_steps

    flags = dict(pairs)
    retained = await cps.get_all()
    assert ids(retained) == expected
    assert [c.savepoint for c in retained] == [flags[i] for i in expected]
    latest = await cps.get_latest()
    assert latest is not None and latest.checkpoint_id == expected[-1]
    # Raw: exactly the retained handles exist; every subsumed one is gone with
    # its blob queued for deletion.
    assert await raw_handle_names(store) == [checkpoint_name(i) for i in expected]
    subsumed_ids = sorted(i for step in steps for i in step)
    assert subsumed_ids == sorted(set(flags) - set(expected))
    assert await raw_gc_urls(store) == sorted(urls[i] for i in subsumed_ids)
    for i in expected:
        assert await store.read(checkpoint_name(i)) == f"state-{i}".encode()


# -- subsumption of a checkpoint someone else still reads ------------------------------


async def test_subsumed_checkpoint_locked_by_reader_goes_when_released(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    reader = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=1)
    first, _ = await cps.add_checkpoint_and_subsume(1, b"one")
    name1 = checkpoint_name(1)
    await reader.get_and_lock(name1)

    _, subsumed = await cps.add_checkpoint_and_subsume(2, b"two")
    assert subsumed == [1]
    assert ids(await cps.get_all()) == [2]
    # Pending: the record is still there (invariant 2), marked for removal, and
    # the store's own lock on it is released.
    assert await raw_handle_names(store) == [name1, checkpoint_name(2)]
    assert await store.etcd.get(store.keys.removal(name1)) is not None
    assert await store.holders(name1) == [reader.instance_id]
    assert await reader.read(name1) == b"one"
    assert await raw_gc_urls(store) == []
    with pytest.raises(NotFound):
        await store.get_and_lock(name1)  # nobody new may lock it

    # A pending checkpoint is not counted or subsumed again.
    _, subsumed = await cps.add_checkpoint_and_subsume(3, b"three")
    assert subsumed == [2]
    assert ids(await cps.get_all()) == [3]

    await reader.release(name1)

    async def gone() -> bool:
        return await store.etcd.get(store.keys.handle(name1)) is None

    await async_wait_until(gone, timeout=10, message="subsumed checkpoint outlived its reader")
    assert await store.etcd.get(store.keys.removal(name1)) is None
    assert first.handle.blob_url in await raw_gc_urls(store)
    assert await raw_handle_names(store) == [checkpoint_name(3)]


# -- idempotent add (FLINK-24543) and bad ids ------------------------------------------


async def test_add_retried_by_same_instance_is_idempotent(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    other = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=3)
    first, subsumed = await cps.add_checkpoint_and_subsume(5, b"five")
    assert subsumed == []
    kv_before = await store.etcd.get(store.keys.handle(checkpoint_name(5)))

    again, subsumed = await cps.add_checkpoint_and_subsume(5, b"five")
    assert again == first
    assert again.handle.version == first.handle.version
    assert again.handle.blob_url == first.handle.blob_url
    assert subsumed == []
    kv_after = await store.etcd.get(store.keys.handle(checkpoint_name(5)))
    assert kv_after == kv_before  # not rewritten
    assert [p.name for p in blob_files(store)] == [first.handle.blob_id]  # retry's blob dropped
    assert await raw_count(store, store.keys.uploads_prefix) == 0

    with pytest.raises(AlreadyExists):
        await CompletedCheckpointStore(other, max_retained=3).add_checkpoint_and_subsume(5, b"five")
    assert await store.etcd.get(store.keys.handle(checkpoint_name(5))) == kv_before
    assert await store.holders(checkpoint_name(5)) == [store.instance_id]
    assert [p.name for p in blob_files(store)] == [first.handle.blob_id]
    assert await store.read(checkpoint_name(5)) == b"five"


async def test_checkpoint_ids_are_64_bit_non_negative(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=5)
    for bad in (-1, MAX_ID + 1, 2**64, 1.5, "3", None):
        with pytest.raises(InvalidArgument):
            await cps.add_checkpoint_and_subsume(bad, b"x")  # type: ignore[arg-type]
    assert await raw_count(store, store.keys.ns_prefix) == 0
    assert blob_files(store) == []

    await cps.add_checkpoint_and_subsume(MAX_ID, b"max")
    await cps.add_checkpoint_and_subsume(0, b"zero")
    assert ids(await cps.get_all()) == [0, MAX_ID]
    assert await raw_handle_names(store) == ["0" * 20, "0" + str(MAX_ID)]
    with pytest.raises(InvalidArgument):
        CompletedCheckpointStore(store, max_retained=0)


async def test_names_are_zero_padded_so_name_order_is_id_order(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=10)
    for cid in (100, 9, 10, 1000000, 11):
        await cps.add_checkpoint_and_subsume(cid, str(cid).encode())
    expected = [9, 10, 11, 100, 1000000]
    assert checkpoint_name(9) == "00000000000000000009"
    assert ids(await cps.get_all()) == expected
    names = [checkpoint_name(i) for i in expected]
    assert await store.get_all_names() == names
    assert await raw_handle_names(store) == names  # etcd's own key order
    latest = await cps.get_latest()
    assert latest is not None and latest.checkpoint_id == 1000000
    other = await open_store(make_config())
    assert ids(await CompletedCheckpointStore(other).recover()) == expected


# -- recovery -------------------------------------------------------------------------


async def test_recover_locks_all_sorted_by_id(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=10)
    for cid, sp in parse_seq("3 1 2s 5 4"):
        await cps.add_checkpoint_and_subsume(cid, f"s{cid}".encode(), sp)
    new = await open_store(make_config())
    assert await CompletedCheckpointStore(new).get_latest() is not None

    recovered = await CompletedCheckpointStore(new, max_retained=10).recover()
    assert ids(recovered) == [1, 2, 3, 4, 5]
    assert [c.savepoint for c in recovered] == [False, True, False, False, False]
    assert await raw_lock_count(new, new.instance_id) == 5
    for c in recovered:
        assert await new.holders(c.handle.name) == sorted([store.instance_id, new.instance_id])
        assert await new.read(c.handle) == f"s{c.checkpoint_id}".encode()
    # Locked by the new leader: the old one cannot remove any of them.
    await store.release_all()
    assert await store.release_and_try_remove(checkpoint_name(1)) is False
    assert checkpoint_name(1) in await raw_handle_names(store)


async def test_recover_refuses_when_a_blob_is_missing(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """FLINK-22502: never fall back silently to an older checkpoint."""
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=10)
    added = {}
    for cid in (1, 2, 3):
        cp, _ = await cps.add_checkpoint_and_subsume(cid, f"s{cid}".encode())
        added[cid] = cp
    await asyncio.to_thread(Path(store.blobs.path_of(added[2].handle.blob_url)).unlink)

    new = await open_store(make_config())
    with pytest.raises(IntegrityError) as info:
        await CompletedCheckpointStore(new).recover()
    assert info.value.details["missing"] == [2]
    assert "[2]" in str(info.value)
    # Nothing was deleted to "repair" it.
    assert await raw_handle_names(new) == [checkpoint_name(i) for i in (1, 2, 3)]
    with pytest.raises(IntegrityError):
        await new.read(checkpoint_name(2))


# -- shutdown -------------------------------------------------------------------------


async def test_shutdown_globally_terminal_removes_all(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=5)
    urls = []
    for cid in (1, 2, 3):
        cp, _ = await cps.add_checkpoint_and_subsume(cid, b"x")
        urls.append(cp.handle.blob_url)
    await cps.shutdown(globally_terminal=True)
    assert await raw_handle_names(store) == []
    assert await raw_count(store, store.keys.handles_prefix) == 0  # no lock keys either
    assert await raw_gc_urls(store) == sorted(urls)
    assert await cps.get_all() == []


async def test_shutdown_globally_terminal_defers_what_others_lock(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    reader = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=5)
    for cid in (1, 2, 3):
        await cps.add_checkpoint_and_subsume(cid, b"x")
    await reader.get_and_lock(checkpoint_name(2))

    await cps.shutdown(globally_terminal=True)
    assert await raw_handle_names(store) == [checkpoint_name(2)]  # invariant 2
    assert await store.holders(checkpoint_name(2)) == [reader.instance_id]
    assert await cps.get_all() == []  # pending removal: no longer a checkpoint
    assert await reader.read(checkpoint_name(2)) == b"x"

    await reader.release(checkpoint_name(2))

    async def all_gone() -> bool:
        return await raw_count(store, store.keys.handles_prefix) == 0

    await async_wait_until(all_gone, timeout=10, message="checkpoint 2 outlived its reader")
    assert await raw_count(store, store.keys.removals_prefix) == 0
    assert len(await raw_gc_urls(store)) == 3


async def test_shutdown_not_terminal_keeps_checkpoints_and_releases_locks(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    cps = CompletedCheckpointStore(store, max_retained=5)
    for cid in (1, 2, 3):
        await cps.add_checkpoint_and_subsume(cid, f"s{cid}".encode())
    assert await raw_lock_count(store, store.instance_id) == 3

    await cps.shutdown(globally_terminal=False)
    names = [checkpoint_name(i) for i in (1, 2, 3)]
    assert await raw_handle_names(store) == names
    assert await raw_lock_count(store, store.instance_id) == 0
    assert await raw_gc_urls(store) == []
    other = await open_store(make_config())
    assert ids(await CompletedCheckpointStore(other).recover()) == [1, 2, 3]
    # Released for real: the next leader can remove them.
    await other.release_all()
    assert await other.release_and_try_remove(names[0]) is True


# -- recovery at scale ----------------------------------------------------------------


async def test_recover_10k_checkpoints(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    n, chunk = 10_000, 500
    # Not a lease-expiry test: 500 concurrent adds can starve the keepalive
    # task on a loaded 2-core machine for longer than the 5 s test default,
    # which once lost the lease mid-run. A long TTL takes timing out of it.
    cfg = make_config(lease_ttl=60)
    writer = await open_store(cfg)
    started = time.perf_counter()
    for lo in range(1, n + 1, chunk):
        await asyncio.gather(
            *(
                writer.add_and_lock(
                    checkpoint_name(i), b"s%d" % i, {"checkpoint_id": i, "savepoint": False}
                )
                for i in range(lo, min(lo + chunk, n + 1))
            )
        )
    write_s = time.perf_counter() - started
    assert len(blob_files(writer)) == n
    await writer.close()  # the old leader is gone: its locks with it

    store2 = await open_store(cfg)
    hp = store2.keys.handles_prefix
    started = time.perf_counter()
    kvs, _ = await store2.etcd.range_all(hp, prefix_end(hp))
    raw_s = time.perf_counter() - started
    assert len(kvs) == n

    started = time.perf_counter()
    recovered = await CompletedCheckpointStore(store2, max_retained=1).recover()
    recover_s = time.perf_counter() - started

    timing = (
        f"{n} checkpoints: written in {write_s:.2f}s; raw etcd range read {raw_s * 1000:.0f} ms; "
        f"recover() (read, lock in batches, list blobs) {recover_s * 1000:.0f} ms "
        f"({recover_s / raw_s:.1f}x the raw read)"
    )
    print("\n" + timing)
    assert ids(recovered) == list(range(1, n + 1)), timing
    assert [c.handle.name for c in recovered] == [checkpoint_name(i) for i in range(1, n + 1)]
    assert await raw_lock_count(store2, store2.instance_id) == n, timing
