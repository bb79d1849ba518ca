"""Namespace cleanup for globally terminal jobs: leave nothing behind (FLINK-20695).

``clear_namespace(store)`` is idempotent and makes progress on every call:

1. every handle is released and removed; handles still locked by live
   sessions are marked for deferred removal and go when they are let go
   (invariant 2 is never bypassed);
2. counters and leader election keys are deleted (one range delete each);
3. blobs queued under ``gc/`` that are past the grace period are deleted,
   then their entries; blobs no key names any more (a crashed writer's)
   are swept.

It returns True when no key remains under ``<root>/<ns>/`` and no blob
under the namespace's blob directory (upload intents of live writers and
not-yet-due gc entries keep it pending), so
callers repeat it (REST: 202 while pending, 204 when done).
"""

from __future__ import annotations

from statestore.keys import prefix_end
from statestore.maintenance.gc import GcReport, collect_due, sweep_orphans
from statestore.store import StateHandleStore


async def clear_namespace(store: StateHandleStore) -> bool:
    await store.clear_entries()
    for prefix in (store.keys.counters_prefix, store.keys.leader_prefix):
        await store.etcd.delete(prefix, prefix_end(prefix))
    await collect_due(store)
    # A crashed writer's blob has no key left once its intent expired; with
    # the job terminal, any unreferenced blob goes now (live intents still
    # protect an upload in progress: see gc.sweep_orphans).
    await sweep_orphans(store, 0.0, GcReport())
    ns = store.keys.ns_prefix
    if await store.etcd.count(ns, prefix_end(ns)) != 0:
        return False
    return not await store.blobs.list_namespace(store.namespace)
