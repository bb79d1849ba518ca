"""Background maintenance of a service replica.

- **Compactor**: on every replica (its CAS makes that about one compaction
  per interval in total; see ``statestore.maintenance.compactor``).
- **Reconciler and blob GC**: on one replica at a time, chosen by a
  maintenance election on ``<root>/_maintenance/leader/`` with the replica's
  own lease. When that replica dies its lease expires, its key goes, and the
  next replica in line takes over. A replica that loses the lease stops both
  at once and campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from statestore.election import LeaderElection
from statestore.errors import StateStoreError
from statestore.keys import RootLayout
from statestore.maintenance.compactor import Compactor
from statestore.maintenance.gc import Sightings, gc_pass
from statestore.maintenance.reconciler import RemovalReconciler
from statestore.session import Session
from statestore.store import StoreBackend

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(
        self,
        backend: StoreBackend,
        *,
        gc_interval: float,
        compaction_interval: float | None,
        orphan_min_age: float,
    ) -> None:
        """``compaction_interval=None``: no compactor here (``statestore drill``
        stands in for a missing maintenance replica without compacting the
        user's etcd)."""
        cfg = backend.cfg
        self._backend = backend
        self._session = Session(backend.client, cfg.lease_ttl)
        self.instance_id = f"maintenance-{uuid.uuid4().hex[:12]}"
        self._store = backend.store(cfg.namespace, self.instance_id, self._session)
        prefix = RootLayout(cfg.root).maintenance_leader_prefix
        self.election = LeaderElection(self._store, prefix=prefix)
        self.reconciler = RemovalReconciler(self._store)
        self.compactor = (
            None
            if compaction_interval is None
            else Compactor(backend.client, cfg.root, compaction_interval)
        )
        self.gc_interval = gc_interval
        self.orphan_min_age = orphan_min_age
        #: The GC's own clock for ages (see gc.py): kept across passes and
        #: leadership changes of this replica, lost (only delaying) on restart.
        self.sightings = Sightings()
        self.blobs_reclaimed = 0
        self.orphans_found = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def lease_losses(self) -> int:
        return self._session.lost_count

    @property
    def leading(self) -> bool:
        return self.election.is_leader

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._lead_loop(), name="statestore-maintenance")]
        if self.compactor is not None:
            self._tasks.append(loop.create_task(self.compactor.run(), name="statestore-compactor"))

    async def _start_session(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._session.start()
                return
            except StateStoreError as e:
                log.warning("maintenance cannot take a lease yet: %s", e)
                await asyncio.sleep(1.0)

    async def _lead_loop(self) -> None:
        await self._start_session()
        while not self._stopping.is_set():
            try:
                await self.election.campaign()
            except StateStoreError as e:
                log.warning("maintenance election failed (retrying): %s", e)
                await asyncio.sleep(1.0)
                continue
            log.info("this replica now runs the reconciler and blob GC")
            work = [
                asyncio.create_task(self.reconciler.run()),
                asyncio.create_task(self._gc_loop()),
            ]
            while self.election.is_leader and not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):  # poll leadership twice a second
                    await asyncio.wait_for(self._stopping.wait(), 0.5)
            self.reconciler.stop()
            for t in work:
                t.cancel()
            await asyncio.gather(*work, return_exceptions=True)
            self.reconciler = RemovalReconciler(self._store)
            if not self._stopping.is_set():
                log.warning("maintenance leadership lost; campaigning again")

    async def _gc_loop(self) -> None:
        while True:
            try:
                # A re-list each round: refreshes the pending-removal count (the
                # watch sees only deletions) and is a safety net for the watch.
                # The GC reuses its listing of the root to find the namespaces.
                _, root_keys = await self.reconciler.resync()
                report = await gc_pass(
                    self._store,
                    orphan_min_age=self.orphan_min_age,
                    root_keys=root_keys,
                    sightings=self.sightings,
                )
                self.blobs_reclaimed += report.deleted + report.orphans_deleted
                self.orphans_found += report.orphans_found
            except StateStoreError as e:
                log.warning("blob GC pass failed (retrying next interval): %s", e)
            except Exception:  # a bug must not end the GC for good: log it, go on
                log.exception("blob GC pass crashed (retrying next interval)")
            await asyncio.sleep(self.gc_interval)

    async def stop(self) -> None:
        self._stopping.set()
        if self.compactor is not None:
            self.compactor.stop()
        self.reconciler.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(StateStoreError):
            await self.election.resign()
        await self._session.close()
