"""The removal reconciler: deferred removals complete when the last lock goes.

Protocol.md section 3 ("Deferred removal"): a removal requested while others
hold locks is recorded, and completed as soon as the last lock disappears, by
release or by lease expiry. Lease expiry deletes only the keys attached to
the lease, so the reconciler must watch the lock keys themselves, and its
watch must survive compaction (re-list and resume) and etcd restarts.

Every test runs on its own etcd root (or its own etcd member), because the
reconciler scans the whole root. Outcomes are read back raw from etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from helpers import OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig
from statestore.etcd import Compacted
from statestore.keys import prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.maintenance.reconciler import RemovalReconciler

HOLDER_TTL = 2


def unique_root() -> str:
    return f"/t-{uuid.uuid4().hex}"


@contextlib.asynccontextmanager
async def running(reconciler: RemovalReconciler) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``reconciler.run()`` as a task; stop and cancel it on exit."""
    task = asyncio.create_task(reconciler.run())
    try:
        yield task
    finally:
        reconciler.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def check_alive(task: asyncio.Task[None]) -> None:
    """Fail at once (with its error) if the reconciler task ended."""
    if task.done():
        exc = task.exception() if not task.cancelled() else None
        raise AssertionError(f"the reconciler task ended: {exc!r}")


async def stop_keepalive(store: StateHandleStore) -> None:
    """Stop refreshing the store's lease, so it expires by its TTL (a hung or
    crashed instance, as etcd sees it)."""
    task = store.session._task  # type: ignore[attr-defined]
    assert task is not None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def raw_handle_and_locks(store: StateHandleStore, name: str) -> tuple[bool, list[bytes]]:
    """(handle key present, lock keys) read at ONE revision."""
    hkey = store.keys.handle(name)
    kvs, _ = await store.etcd.range_all(hkey, prefix_end(hkey), keys_only=True)
    return any(kv.key == hkey for kv in kvs), [kv.key for kv in kvs if kv.key != hkey]


async def raw_exists(store: StateHandleStore, key: bytes) -> bool:
    return await store.etcd.get(key) is not None


async def test_removal_completes_when_last_holders_lease_expires(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    root = unique_root()
    holder = await open_store(make_config(root=root, lease_ttl=HOLDER_TTL))
    remover = await open_store(make_config(root=root))
    reader = await open_store(make_config(root=root))
    h = await holder.add_and_lock("chk-1", b"state of chk-1")

    outcome = await remover.try_remove("chk-1", deferred=True)
    assert outcome.pending and not outcome.removed, outcome
    assert outcome.holders == [holder.instance_id]
    assert await raw_exists(reader, reader.keys.removal("chk-1"))

    reconciler = RemovalReconciler(reader)
    async with running(reconciler) as task:
        # The first re-list saw the pending removal (and could not complete it).
        await async_wait_until(lambda: reconciler.stats.pending == 1, 10, message="no resync")
        assert (await raw_handle_and_locks(reader, "chk-1"))[0]

        await stop_keepalive(holder)
        stopped = time.monotonic()
        lock_gone_at: float | None = None
        while True:  # poll handle and locks at one revision: never removed while locked
            check_alive(task)
            present, locks = await raw_handle_and_locks(reader, "chk-1")
            now = time.monotonic()
            if locks:
                assert present, "the handle was removed while a lock key still existed"
            elif lock_gone_at is None:
                lock_gone_at = now
            if not present:
                break
            assert now - stopped < HOLDER_TTL + 5, (
                f"handle still present {now - stopped:.1f}s after the holder stopped refreshing "
                f"its {HOLDER_TTL}s lease (locks: {locks})"
            )
            await asyncio.sleep(0.02)
        done = time.monotonic()
        assert lock_gone_at is not None
        print(
            f"\nlease TTL {HOLDER_TTL}s: keepalive stopped -> lock expired "
            f"{lock_gone_at - stopped:.2f}s -> removal completed {done - stopped:.2f}s "
            f"(reconciler latency after expiry {done - lock_gone_at:.3f}s)"
        )
        assert done - lock_gone_at < 3.0, "the reconciler was slow to notice the expiry"

    gc_kv = await reader.etcd.get(reader.keys.gc(h.blob_id))
    assert gc_kv is not None, "no gc entry for the removed handle's blob"
    entry = json.loads(gc_kv.value)
    assert entry["blob_url"] == h.blob_url and entry["reason"] == "removed", entry
    assert not await raw_exists(reader, reader.keys.removal("chk-1")), "marker left behind"
    # The watch path completed it, not a second re-list. (Under full-suite load
    # the completing txn's answer can be lost, so ``completed`` may not count it;
    # the removal itself is what is asserted above.)
    assert reconciler.stats.resyncs == 1, reconciler.stats
    assert reconciler.stats.pending == 0


async def test_reconciler_ignores_removals_whose_holders_stay(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """Other locks going away (a second holder releasing) must not complete a
    removal while one holder is left."""
    root = unique_root()
    first = await open_store(make_config(root=root))
    second = await open_store(make_config(root=root))
    reader = await open_store(make_config(root=root))
    await first.add_and_lock("chk", b"x")
    await second.get_and_lock("chk")
    assert (await reader.try_remove("chk", deferred=True)).pending

    reconciler = RemovalReconciler(reader)
    async with running(reconciler) as task:
        await async_wait_until(lambda: reconciler.stats.pending == 1, 10, message="no resync")
        await reader.etcd.delete(first.keys.lock("chk", first.instance_id))  # as if it expired
        # Give the watch time to see and judge the deletion (a poll, not a sleep:
        # it must hold for the whole second).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            check_alive(task)
            present, locks = await raw_handle_and_locks(reader, "chk")
            assert present and locks, (present, locks)
            await asyncio.sleep(0.05)
        assert reconciler.stats.completed == 0, reconciler.stats
        await second.release("chk")  # the last lock: release completes it itself
        assert not (await raw_handle_and_locks(reader, "chk"))[0]


async def test_removal_completes_after_compaction_while_reconciler_was_stopped(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    member = etcd_factory()
    cfg = make_config(etcd_endpoints=[member.endpoint], root=unique_root())
    holder = await open_store(cfg)
    remover = await open_store(cfg)
    reader = await open_store(cfg)

    first = RemovalReconciler(reader)
    async with running(first):
        await async_wait_until(lambda: first.stats.resyncs >= 1, 10, message="no resync")
        watched_from = (await reader.etcd.status()).revision

    h = await holder.add_and_lock("chk", b"payload")
    assert (await remover.try_remove("chk", deferred=True)).pending
    # The holder's lease goes (revocation deletes exactly what expiry deletes).
    await holder.etcd.lease_revoke(holder.session.lease_id)
    present, locks = await raw_handle_and_locks(reader, "chk")
    assert present and not locks, "nothing but a reconciler may complete this removal"

    scratch = f"{cfg.root}/scratch".encode()
    for i in range(50):
        await reader.etcd.put(scratch, str(i).encode())
    current = (await reader.etcd.status()).revision
    await reader.etcd.compact(current)
    with pytest.raises(Compacted):
        await reader.etcd.get(scratch, revision=watched_from + 1)

    second = RemovalReconciler(reader)
    async with running(second) as task:

        async def gone() -> bool:
            check_alive(task)
            return not (await raw_handle_and_locks(reader, "chk"))[0]

        await async_wait_until(gone, 10, message="removal not completed after compaction")
    assert second.stats.completed == 1, second.stats
    assert await raw_exists(reader, reader.keys.gc(h.blob_id))
    assert not await raw_exists(reader, reader.keys.removal("chk"))


async def test_watch_compacted_during_resync_relists_and_completes(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    """Compact etcd while the reconciler is re-listing (many pending removals
    make that slow): its watch then starts at a compacted revision, gets
    ``Compacted``, re-lists (``stats.resyncs`` grows) and still completes
    every removal once the holder's locks go."""
    member = etcd_factory()
    cfg = make_config(
        etcd_endpoints=[member.endpoint],
        root=unique_root(),
        blob_root=f"memory://rec-{uuid.uuid4().hex}",
    )
    holder = await open_store(cfg)
    remover = await open_store(cfg)
    reader = await open_store(cfg)
    n = 150
    sem = asyncio.Semaphore(32)

    async def setup(i: int) -> None:
        async with sem:
            await holder.add_and_lock(f"h{i:03d}", b"s%d" % i)
            assert (await remover.try_remove(f"h{i:03d}", deferred=True)).pending

    await asyncio.gather(*(setup(i) for i in range(n)))
    assert len(await reader.pending_removals()) == n

    scratch = f"{cfg.root}/scratch".encode()
    reconciler = RemovalReconciler(reader)
    compactions = 0
    async with running(reconciler) as task:
        deadline = time.monotonic() + 20
        while reconciler.stats.resyncs < 2:
            check_alive(task)
            assert time.monotonic() < deadline, f"no re-list after compaction: {reconciler.stats}"
            await reader.etcd.put(scratch, b"x")
            rev = (await reader.etcd.status()).revision
            with contextlib.suppress(Compacted):
                await reader.etcd.compact(rev)
                compactions += 1
        print(f"\n{compactions} compaction(s) during the re-list -> stats {reconciler.stats}")
        # Let the reconciler settle into a watch that starts after our last compaction.
        await async_wait_until(
            lambda: reconciler.stats.pending == n, 10, message="second re-list did not finish"
        )

        await holder.etcd.lease_revoke(holder.session.lease_id)  # all n locks go at once
        revoked = time.monotonic()

        async def all_gone() -> bool:
            check_alive(task)
            hp = reader.keys.handles_prefix
            return await reader.etcd.count(hp, prefix_end(hp)) == 0

        await async_wait_until(all_gone, 20, message="removals not completed after compaction")
        print(f"{n} removals completed {time.monotonic() - revoked:.2f}s after the locks went")
    assert reconciler.stats.resyncs >= 2
    assert reconciler.stats.completed == n, reconciler.stats
    gp = reader.keys.gc_prefix
    assert await reader.etcd.count(gp, prefix_end(gp)) == n
    rp = reader.keys.removals_prefix
    assert await reader.etcd.count(rp, prefix_end(rp)) == 0


async def test_reconciler_recovers_from_etcd_restart(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    """The watch breaks when etcd stops; the reconciler re-lists once etcd is
    back and completes removals whose lock went meanwhile (one released while
    etcd was still coming back, one expiring after the restart)."""
    member = etcd_factory()
    cfg = make_config(etcd_endpoints=[member.endpoint], root=unique_root())
    holder = await open_store(cfg.model_copy(update={"lease_ttl": HOLDER_TTL}))
    early = await open_store(cfg)
    remover = await open_store(cfg)
    reader = await open_store(cfg)
    h1 = await holder.add_and_lock("expires", b"one")
    h2 = await early.add_and_lock("revoked", b"two")
    for name in ("expires", "revoked"):
        assert (await remover.try_remove(name, deferred=True)).pending

    reconciler = RemovalReconciler(reader)
    async with running(reconciler) as task:
        await async_wait_until(lambda: reconciler.stats.pending == 2, 10, message="no resync")
        await stop_keepalive(holder)
        await asyncio.to_thread(member.stop)
        # etcd is down: the watch is broken and re-lists fail (and are retried).
        await async_wait_until(
            lambda: reconciler.stats.resyncs >= 2, 15, message="watch break not noticed"
        )
        check_alive(task)
        await asyncio.to_thread(member.restart)
        restarted = time.monotonic()
        # Drop the second lock right away, before the reconciler has a new watch.
        await early.etcd.lease_revoke(early.session.lease_id)

        async def gone(name: str) -> bool:
            check_alive(task)
            return not (await raw_handle_and_locks(reader, name))[0]

        await async_wait_until(lambda: gone("revoked"), 15, message="'revoked' not completed")
        t_revoked = time.monotonic() - restarted
        # etcd renews every lease on restart: the holder's expires TTL after it.
        await async_wait_until(
            lambda: gone("expires"), HOLDER_TTL + 10, message="'expires' not completed"
        )
        t_expired = time.monotonic() - restarted
        print(
            f"\nafter etcd restart: revoked lock's removal completed in {t_revoked:.2f}s, "
            f"expired lock's ({HOLDER_TTL}s TTL) in {t_expired:.2f}s; stats {reconciler.stats}"
        )
    assert reconciler.stats.completed == 2, reconciler.stats
    for h in (h1, h2):
        assert await raw_exists(reader, reader.keys.gc(h.blob_id))
