"""Completes deferred removals when the last lock goes, by release or expiry.

Lease expiry deletes the lock keys attached to the lease and touches no
other key (the zetcd lesson), so no counter or marker can say "the last lock
went". The reconciler therefore derives the state from the lock keys:

1. **resync**: list every removal marker under ``<root>/*/removals/`` at one
   revision R and try to complete each (``complete_removal`` is one txn that
   succeeds only when no lock key remains and the handle is at the version
   the marker names; a stale marker is dropped, its handle kept);
2. **watch** deletions under ``<root>/`` from R + 1 (filtered in etcd: no
   puts), and for every deleted lock key whose handle has a removal marker,
   try to complete that removal;
3. if the watch breaks (etcd unreachable) or its revision was compacted away
   (``Compacted``), go back to 1: the re-list catches every removal whose
   lock went while we were not watching, so none is missed.

``complete_removal`` is idempotent and guarded by its own compares, so a
second reconciler (two replicas during a maintenance hand-over) or a
``release`` that completes the same removal at the same time is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from statestore.errors import StateStoreError
from statestore.etcd import KV, Compacted, Txn
from statestore.keys import RootLayout, decode, prefix_end
from statestore.store import StateHandleStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReconcilerStats:
    resyncs: int = 0
    completed: int = 0
    pending: int = 0


class RemovalReconciler:
    """Watches lock deletions across every namespace under the store's root."""

    def __init__(self, store: StateHandleStore) -> None:
        self._store = store
        self._roots = RootLayout(store.config.root)
        self.stats = ReconcilerStats()
        self._stop = asyncio.Event()

    async def _complete(self, ns_segment: bytes, name_segment: bytes) -> bool:
        """``complete_removal`` of an (encoded) namespace and name."""
        ns, name = decode(ns_segment.decode()), decode(name_segment.decode())
        view = self._store.for_namespace(ns)
        try:
            done = await view.complete_removal(name)
        except StateStoreError as e:
            log.warning("could not complete removal of %r in %r yet: %s", name, ns, e)
            return False
        if done:
            self.stats.completed += 1
            log.info("completed deferred removal of %r in namespace %r", name, ns)
        return done

    async def resync(self) -> tuple[int, list[KV]]:
        """Try every pending removal; returns the revision the list was read
        at and the list (every key under the root, keys only)."""
        self.stats.resyncs += 1
        root = self._roots.prefix
        kvs, rev = await self._store.etcd.range_all(root, prefix_end(root), keys_only=True)
        pending = 0
        for kv in kvs:
            found = self._roots.split_removal_key(kv.key)
            if found is not None and not await self._complete(*found):
                pending += 1
        self.stats.pending = pending
        return rev, kvs

    async def _on_deleted(self, keys: list[bytes]) -> None:
        """Complete the removals whose marker exists among the handles whose
        lock keys were deleted. This runs for every lock deletion in the
        cluster, so the markers are derived from the raw keys and read in one
        txn of gets per batch; only actual pending removals cost more."""
        markers: dict[bytes, tuple[bytes, bytes]] = {}
        for key in keys:
            lock = self._roots.split_lock_key(key)
            if lock is not None:
                markers[self._roots.removal_key(*lock)] = lock
        batch = max(1, self._store.backend.max_ops)
        found: list[tuple[bytes, bytes]] = []
        items = list(markers.items())
        for i in range(0, len(items), batch):
            part = items[i : i + batch]
            res = await self._store.etcd.txn(
                Txn().then(*[Txn.get(marker, keys_only=True) for marker, _ in part]),
                what="reconciler marker check",
            )
            found += [segs for (_, segs), kvs in zip(part, res.results, strict=True) if kvs]
        for ns, name in found:
            if await self._complete(ns, name):
                self.stats.pending = max(0, self.stats.pending - 1)

    async def _follow(self, start_revision: int) -> None:
        """Watch deletions from ``start_revision`` and check them in rounds:
        each round takes every deletion that arrived while the previous one's
        marker check ran, so a burst of removals (64 clients removing at once)
        costs a few txns, not one per removal; an idle cluster's lone
        deletion is checked at once, as before. Returns when the watch ends or
        ``stop()`` was called; raises what broke the watch or a check."""
        root = self._roots.prefix
        arrived: asyncio.Queue[list[bytes]] = asyncio.Queue()

        async def receive() -> None:
            async for _, events in self._store.etcd.watch(
                root, prefix_end(root), start_revision=start_revision, deletes_only=True
            ):
                arrived.put_nowait([kv.key for kind, kv in events if kind == "delete"])

        watching = asyncio.create_task(receive())
        first: asyncio.Future[list[bytes]] | None = None
        try:
            while True:
                first = asyncio.ensure_future(arrived.get())
                await asyncio.wait({first, watching}, return_when=asyncio.FIRST_COMPLETED)
                if not first.done():
                    first.cancel()
                    watching.result()  # the watch ended: raise what ended it
                    return
                keys = first.result()
                while not arrived.empty():
                    keys += arrived.get_nowait()
                await self._on_deleted(keys)
                if self._stop.is_set():
                    return
        finally:
            if first is not None:
                first.cancel()
            watching.cancel()
            await asyncio.wait({watching})

    async def run(self) -> None:
        """Resync, then watch; on any break resync again. Runs until ``stop()``."""
        backoff = 0.2
        while not self._stop.is_set():
            try:
                rev, _ = await self.resync()
                backoff = 0.2
                await self._follow(rev + 1)
                if self._stop.is_set():
                    return
            except Compacted as e:
                log.info("reconciler watch compacted (%s): re-listing", e)
            except StateStoreError as e:
                log.warning("reconciler lost its watch (%s): re-listing in %.1fs", e, backoff)
                try:
                    await asyncio.wait_for(self._stop.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0)

    def stop(self) -> None:
        self._stop.set()
