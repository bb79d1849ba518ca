"""Locks, leases and guarded removal (protocol.md invariant 2, sections 3 and 4).

Everything runs against real etcd; outcomes are checked by reading the raw
keys (handle records, ``/locks/<instance-id>`` keys, ``gc/`` entries).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig
from statestore.keys import prefix_end
from statestore.local.etcd_process import EtcdProcess

REPO = Path(__file__).resolve().parent.parent


# -- raw etcd readers -------------------------------------------------------------


async def raw_holders(store: StateHandleStore, name: str) -> list[str]:
    """Instance ids with a lock key under handle ``name``, read straight from etcd."""
    lp = store.keys.lock_prefix(name)
    kvs, _ = await store.etcd.range_all(lp, prefix_end(lp), keys_only=True)
    return sorted(kv.key[len(lp) :].decode() for kv in kvs)


async def raw_handle(store: StateHandleStore, name: str) -> Any:
    return await store.etcd.get(store.keys.handle(name))


async def raw_gc_keys(store: StateHandleStore) -> list[bytes]:
    p = store.keys.gc("")
    kvs, _ = await store.etcd.range_all(p, prefix_end(p), keys_only=True)
    return [kv.key for kv in kvs]


async def raw_locks_of(
    store: StateHandleStore, instance_id: str, *, revision: int = 0
) -> list[Any]:
    """Every lock key of ``instance_id`` in the namespace (optionally at a revision)."""
    p = store.keys.handles_prefix
    kvs, _ = await store.etcd.range_all(p, prefix_end(p), revision=revision)
    suffix = b"/locks/" + instance_id.encode()
    return [kv for kv in kvs if kv.key.endswith(suffix)]


async def raw_handle_names(store: StateHandleStore) -> list[str]:
    p = store.keys.handles_prefix
    kvs, _ = await store.etcd.range_all(p, prefix_end(p), keys_only=True)
    names = []
    for kv in kvs:
        name, holder = store.keys.parse_handles_key(kv.key)
        if holder is None:
            names.append(name)
    return sorted(names)


async def add_many(store: StateHandleStore, names: list[str], chunk: int = 200) -> None:
    for i in range(0, len(names), chunk):
        await asyncio.gather(
            *(store.add_and_lock(n, f"state of {n}".encode()) for n in names[i : i + chunk])
        )


# -- invariant 2 with several instances ------------------------------------------


async def test_removal_refused_while_other_instance_holds_lock(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    a = await open_store(cfg)
    b = await open_store(cfg)
    h = await a.add_and_lock("chk", b"state")
    got = await b.get_and_lock("chk")
    assert got.version == h.version
    assert await raw_holders(a, "chk") == sorted([a.instance_id, b.instance_id])

    assert await a.release_and_try_remove("chk") is False
    assert await raw_handle(a, "chk") is not None, "handle removed while B held a lock"
    assert await raw_holders(a, "chk") == [b.instance_id], "A's lock must go, B's stay"
    assert await raw_gc_keys(a) == []

    assert await b.release_and_try_remove("chk") is True
    assert await raw_handle(a, "chk") is None
    assert await raw_holders(a, "chk") == []
    assert await raw_gc_keys(a) == [a.keys.gc(h.blob_id)]


async def test_removal_refused_reverse_order(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    a = await open_store(cfg)
    b = await open_store(cfg)
    h = await a.add_and_lock("chk", b"state")
    await b.get_and_lock("chk")

    # B (the one that did not write it) tries first.
    assert await b.release_and_try_remove("chk") is False
    assert await raw_handle(a, "chk") is not None
    assert await raw_holders(a, "chk") == [a.instance_id]
    assert await raw_gc_keys(a) == []

    assert await a.release_and_try_remove("chk") is True
    assert await raw_handle(a, "chk") is None
    assert await raw_holders(a, "chk") == []
    assert await raw_gc_keys(a) == [a.keys.gc(h.blob_id)]


async def test_removal_with_three_instances(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    a, b, c = [await open_store(cfg) for _ in range(3)]
    h = await b.add_and_lock("chk", b"state")
    await a.get_and_lock("chk")
    await c.get_and_lock("chk")
    assert await raw_holders(a, "chk") == sorted(s.instance_id for s in (a, b, c))

    # Whatever the instance ids' sort order, the "others" compare spans both
    # sides of the own lock key: test the one in the middle first.
    ordered = sorted((a, b, c), key=lambda s: s.instance_id)
    middle, first, last = ordered[1], ordered[0], ordered[2]

    assert await middle.release_and_try_remove("chk") is False
    assert await raw_holders(a, "chk") == sorted([first.instance_id, last.instance_id])
    assert await first.release_and_try_remove("chk") is False
    assert await raw_holders(a, "chk") == [last.instance_id]
    assert await raw_handle(a, "chk") is not None
    assert await raw_gc_keys(a) == []

    assert await last.release_and_try_remove("chk") is True
    assert await raw_handle(a, "chk") is None
    assert await raw_gc_keys(a) == [a.keys.gc(h.blob_id)]


async def test_concurrent_removals_exactly_one_wins(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    stores = [await open_store(cfg) for _ in range(4)]
    names = [f"chk-{i:02d}" for i in range(20)]
    handles = await asyncio.gather(*(stores[0].add_and_lock(n, n.encode()) for n in names))
    for s in stores[1:]:
        await asyncio.gather(*(s.get_and_lock(n) for n in names))
    for n in names:
        assert await raw_holders(stores[0], n) == sorted(s.instance_id for s in stores)

    async def remove(s: StateHandleStore, n: str) -> tuple[str, str, bool]:
        return s.instance_id, n, await s.release_and_try_remove(n)

    results = await asyncio.gather(*(remove(s, n) for n in names for s in stores))
    winners = Counter(n for _, n, ok in results if ok)
    # Every holder releases in its own txn; only the txn applied when no other
    # lock remained may remove, so exactly one call per handle reports True.
    assert {n: winners.get(n, 0) for n in names} == dict.fromkeys(names, 1), results

    assert await raw_handle_names(stores[0]) == [], "every handle must be gone"
    for s in stores:
        assert await raw_locks_of(stores[0], s.instance_id) == []
    gc = await raw_gc_keys(stores[0])
    assert sorted(gc) == sorted(stores[0].keys.gc(h.blob_id) for h in handles), (
        "exactly one gc entry per blob"
    )


# -- a crashed (SIGKILLed) store process ------------------------------------------

_CHILD = """
import asyncio, json, sys
from statestore import StateHandleStore, StoreConfig

async def main():
    cfg = StoreConfig(**json.loads(sys.argv[1]))
    store = await StateHandleStore.open(cfg)
    for name in json.loads(sys.argv[2]):
        await store.get_and_lock(name)
    print("LOCKED", store.instance_id, store.session.lease_id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_process_locks_block_removal_until_lease_expires(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path
) -> None:
    ttl = 3
    store = await open_store(make_config())
    names = [f"chk-{i}" for i in range(5)]
    handles = {
        h.name: h for h in await asyncio.gather(*(store.add_and_lock(n, b"x") for n in names))
    }

    child_cfg = make_config(lease_ttl=ttl)
    stderr_path = tmp_path / "child.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["PYTHONPATH"] = str(REPO)
    with stderr_path.open("wb") as err:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-c", _CHILD, child_cfg.model_dump_json(), json.dumps(names)],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            env=env,
        )
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        except TimeoutError:
            proc.kill()
            raise
        assert line.startswith(b"LOCKED"), (line, stderr_path.read_text())
        _, child_id, _lease = line.decode().split()
        for n in names:
            assert child_id in await raw_holders(store, n)

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()

        # Before the TTL has passed: the dead process's locks are still there
        # and protect the handles (a zombie's recovered checkpoints survive).
        assert len(await raw_locks_of(store, child_id)) == 5
        for n in names:
            assert await store.release_and_try_remove(n) is False
            assert await raw_handle(store, n) is not None
            assert await raw_holders(store, n) == [child_id]
        assert await raw_gc_keys(store) == []
        checked_in = time.monotonic() - killed_at
        assert checked_in < ttl - 1, f"checks took {checked_in:.2f}s, too slow to prove anything"

        async def child_locks_gone() -> bool:
            return not await raw_locks_of(store, child_id)

        await async_wait_until(
            child_locks_gone,
            timeout=ttl + 5,
            interval=0.02,
            message="locks of the SIGKILLed process did not expire",
        )
        vanished = time.monotonic() - killed_at
        print(f"\nkill -> lock expiry: {vanished:.2f}s (lease TTL {ttl}s)")
        assert vanished <= ttl + 5, f"kill -> lock expiry took {vanished:.2f}s (TTL {ttl}s)"

        for n in names:
            assert await store.release_and_try_remove(n) is True, (
                f"{n}: removal refused after the dead instance's locks expired "
                f"(expired {vanished:.2f}s after kill)"
            )
            assert await raw_handle(store, n) is None
        assert sorted(await raw_gc_keys(store)) == sorted(
            store.keys.gc(h.blob_id) for h in handles.values()
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- get_all_and_lock --------------------------------------------------------------


async def test_get_all_and_lock_3000_learns_small_txn_limit(
    etcd_small_txn: EtcdProcess,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    namespace: str,
) -> None:
    cfg = make_config(
        etcd_endpoints=[etcd_small_txn.endpoint], blob_root=f"memory://statestore/{namespace}"
    )
    assert cfg.max_txn_ops == 128  # the default; etcd allows only 16
    writer = await open_store(cfg)
    names = [f"chk-{i:05d}" for i in range(3000)]
    await add_many(writer, names)

    recovering = await open_store(cfg)
    assert await raw_locks_of(recovering, recovering.instance_id) == []
    calls: Counter[str] = Counter()
    recovering.etcd.observer = lambda what, _secs: calls.update([what])

    got = await recovering.get_all_and_lock()

    assert [h.name for h in got] == names, "all 3000, sorted by name"
    locks = await raw_locks_of(recovering, recovering.instance_id)
    assert len(locks) == 3000
    assert {recovering.keys.parse_handles_key(kv.key)[0] for kv in locks} == set(names)
    assert {kv.lease for kv in locks} == {recovering.session.lease_id}
    # Locks went in txns of at most 16 ops, not one txn per handle: with the
    # limit learned (16) and two compares per handle (its version, no removal
    # marker), 3000 handles need ceil(3000/8) = 375 txns.
    ideal = math.ceil(3000 / (16 // 2))
    assert calls["get_all_and_lock"] <= ideal + 8, (
        f"{calls['get_all_and_lock']} lock txns for 3000 handles; with the learned "
        f"limit of 16 ops, {ideal} suffice (the limit was over-learned: concurrent "
        "refusals halved it again and again)"
    )


async def test_get_all_and_lock_races_with_removals(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, namespace: str
) -> None:
    blob_root = f"memory://statestore/{namespace}"
    b = await open_store(make_config(blob_root=blob_root))
    # Small batches, one at a time: A's locking takes many sequential txns
    # that B's removals can overtake.
    a = await open_store(make_config(blob_root=blob_root, max_txn_ops=5, lock_concurrency=1))
    names = [f"chk-{i:03d}" for i in range(500)]
    await add_many(b, names)
    # Spread over the whole range: A locks the first ones before B gets to
    # them, B removes later ones between A's snapshot and A's lock txn.
    victims = names[::5]
    assert len(victims) == 100

    calls: Counter[str] = Counter()
    a.etcd.observer = lambda what, _secs: calls.update([what])
    task = asyncio.create_task(a.get_all_and_lock())

    async def a_started() -> bool:
        return task.done() or a.instance_id in await raw_holders(b, names[0])

    # A has read its snapshot once it holds its first lock.
    await async_wait_until(a_started, timeout=20, interval=0.005)

    async def remove(n: str) -> tuple[str, bool]:
        return n, await b.release_and_try_remove(n)

    outcomes = dict(await asyncio.gather(*(remove(n) for n in victims)))
    got = await asyncio.wait_for(task, 60)

    returned = [h.name for h in got]
    removed = {n for n, ok in outcomes.items() if ok}
    print(
        f"\nremovals won: {len(removed)}, lost to A's lock: {len(victims) - len(removed)}, "
        f"re-reads: {calls['get_all_and_lock re-read']}"
    )
    assert returned == sorted(returned)
    assert len(returned) == len(set(returned))
    assert not removed & set(returned), "a handle A returned (and locked) was removed"
    # Every handle that was not removed is returned and locked by A.
    assert set(returned) == set(names) - removed
    assert await raw_handle_names(b) == sorted(set(names) - removed)
    by_name = {h.name: h for h in got}
    for n in returned:
        kv = await raw_handle(b, n)
        assert kv is not None and kv.mod_revision == by_name[n].version
        assert a.instance_id in await raw_holders(b, n), n
    for n in removed:
        assert await raw_holders(b, n) == []
    # B's removals that lost the race released B's lock and left A's.
    for n in set(victims) - removed:
        assert n in by_name
        assert await raw_holders(b, n) == [a.instance_id], n
    assert outcomes[names[0]] is False, "A held names[0] before B tried: B must not remove it"
    assert calls["get_all_and_lock re-read"] >= 1, (
        "the race was not exercised: A never had to re-read a batch"
    )


# -- the lease session --------------------------------------------------------------


async def test_revoked_lease_is_noticed_and_replaced(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    ttl = 2
    store = await open_store(make_config(lease_ttl=ttl))
    other = await open_store(make_config())
    names = ["a", "b", "c"]
    for n in names:
        await store.add_and_lock(n, b"x")
    old = store.session.lease_id
    assert len(await raw_locks_of(store, store.instance_id)) == 3
    assert store.session.lost_count == 0

    await other.etcd.lease_revoke(old)
    assert await raw_locks_of(store, store.instance_id) == [], "revoke drops the lease's keys"

    await async_wait_until(
        lambda: store.session.lost_count == 1 and store.session.lease_id not in (0, old),
        timeout=ttl + 5,
        interval=0.02,
        message="the store did not notice its revoked lease",
    )
    new = store.session.lease_id
    assert await store.etcd.lease_ttl(new) > 0
    assert await raw_locks_of(store, store.instance_id) == []
    assert await raw_handle_names(store) == names, "handles carry no lease and must stay"

    h = await store.get_and_lock("b")
    assert h.name == "b"
    kv = await store.etcd.get(store.keys.lock("b", store.instance_id))
    assert kv is not None and kv.lease == new
    assert store.session.lost_count == 1


async def test_release_all_fast_path(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    cfg = make_config()
    a = await open_store(cfg)
    b = await open_store(cfg)
    names = [f"chk-{i}" for i in range(10)]
    for n in names:
        await a.add_and_lock(n, b"x")
        await b.get_and_lock(n)
    old = a.session.lease_id
    before = await raw_locks_of(a, a.instance_id)
    assert len(before) == 10
    _, rev_before = await a.etcd.range_all(a.keys.handles_prefix, prefix_end(a.keys.handles_prefix))

    await a.release_all()

    assert await raw_locks_of(a, a.instance_id) == []
    assert a.session.lease_id not in (0, old)
    assert await a.etcd.lease_ttl(old) == -1, "the old lease must be revoked"
    for n in names:
        assert await raw_holders(a, n) == [b.instance_id]
    assert await raw_handle_names(a) == names
    # All at once: no revision ever showed some of A's locks without the others.
    _, rev_after = await a.etcd.range_all(a.keys.handles_prefix, prefix_end(a.keys.handles_prefix))
    counts = [
        len(await raw_locks_of(a, a.instance_id, revision=r))
        for r in range(rev_before, rev_after + 1)
    ]
    assert set(counts) == {10, 0} and counts == sorted(counts, reverse=True), counts
    # And the instance locks again on its new lease.
    await a.get_and_lock(names[0])
    kv = await a.etcd.get(a.keys.lock(names[0], a.instance_id))
    assert kv is not None and kv.lease == a.session.lease_id


async def test_listing_and_recovery_with_large_metadata_beyond_one_message(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    """1,200 handles x 60 KB metadata is ~72 MB: more than one gRPC message
    (64 MiB) per page, so paged reads must shrink their page, not fail."""
    member = etcd_factory()
    cfg = make_config(etcd_endpoints=[member.endpoint], blob_root="memory://large-meta")
    writer, reader = await open_store(cfg), await open_store(cfg)
    meta = {"x": "m" * 60_000}
    sem = asyncio.Semaphore(64)

    async def add(i: int) -> None:
        async with sem:
            await writer.add_and_lock(f"h{i:05d}", b"d", meta)

    await asyncio.gather(*(add(i) for i in range(1200)))
    snap = await reader.snapshot()
    assert len(snap.handles) == 1200
    locked = await reader.get_all_and_lock()
    assert [h.name for h in locked] == [f"h{i:05d}" for i in range(1200)]
    assert all(h.metadata == meta for h in locked[:5])
