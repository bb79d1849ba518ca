"""Namespace cleanup for globally terminal jobs: leave nothing behind (FLINK-20695).

``clear_namespace(store)`` is idempotent and makes progress on every call:

1. every handle is released and removed; handles still locked by live
   sessions are marked for deferred removal and go when they are let go
   (invariant 2 is never bypassed);
2. counters, leader election keys, leader info and idempotency records
   are deleted, in ONE txn of range deletes (the info goes in the revision
   its leadership goes);
3. blobs queued under ``gc/`` that are past the grace period are deleted,
   then their entries; blobs no key names any more (a crashed writer's)
   are swept.

It returns True when no key remains under ``<root>/<ns>/`` and no blob
under the namespace's blob directory (upload intents of live writers and
not-yet-due gc entries keep it pending), so
callers repeat it (REST: 202 while pending, 204 when done).
"""

from __future__ import annotations

from statestore.etcd import Txn
from statestore.keys import prefix_end
from statestore.maintenance.gc import GcReport, collect_due, sweep_orphans
from statestore.store import StateHandleStore


async def clear_namespace(store: StateHandleStore) -> bool:
    await store.clear_entries()
    keys = store.keys
    prefixes = (
        keys.counters_prefix,
        keys.leader_prefix,
        keys.leader_info_prefix,
        keys.idempotency_prefix,
    )
    await store.etcd.txn(
        Txn().then(*(Txn.delete(p, prefix_end(p)) for p in prefixes)), what="clear namespace"
    )
    await collect_due(store)
    # A crashed writer's blob has no key left once its intent expired; with
    # the job terminal, any unreferenced blob goes now (live intents still
    # protect an upload in progress: see gc.sweep_orphans).
    await sweep_orphans(store, 0.0, GcReport())
    ns = store.keys.ns_prefix
    if await store.etcd.count(ns, prefix_end(ns)) != 0:
        return False
    return not await store.blobs.list_namespace(store.namespace)
