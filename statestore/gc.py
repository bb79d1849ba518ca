"""Blob garbage collection: delete blobs queued under ``gc/`` once due.

A ``gc/<blob-id>`` entry is written in the same txn that makes its blob
unreferenced (replace, removal), so a queued blob can never be lost track of.
It becomes due ``gc_grace_seconds`` after it was queued: a reader whose lock
silently expired may still be streaming it.

Ordering for one entry: delete the blob (idempotent), THEN delete the entry
with a txn comparing its mod_revision. A crash between the two leaves the
entry, so the next pass deletes the (already absent) blob again and then the
entry: nothing leaks and nothing is deleted twice in a harmful way. A blob
store error leaves the entry for the next pass.

The background worker, orphan sweeps and multipart clean-up build on this
(see the maintenance issue); namespace cleanup calls :func:`collect_due`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from statestore.errors import StateStoreError
from statestore.etcd import Txn
from statestore.keys import prefix_end
from statestore.store import StateHandleStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GcPass:
    deleted: int = 0
    #: Entries not yet due (or whose blob could not be deleted this time).
    pending: int = 0


async def collect_due(store: StateHandleStore, *, now: float | None = None) -> GcPass:
    """Delete every blob of the store's namespace whose gc entry is due."""
    now = time.time() if now is None else now
    grace = store.config.gc_grace_seconds
    gp = store.keys.gc_prefix
    kvs, _ = await store.etcd.range_all(gp, prefix_end(gp))
    result = GcPass()
    for kv in kvs:
        try:
            entry = json.loads(kv.value)
            url, queued = str(entry["blob_url"]), float(entry["queued_at"])
        except (ValueError, KeyError, TypeError):
            log.error("unreadable gc entry %r left in place: inspect it with etcdctl", kv.key)
            result.pending += 1
            continue
        if queued + grace > now:
            result.pending += 1
            continue
        try:
            await store.blobs.delete(url)
        except StateStoreError as e:
            log.warning("could not delete blob %s yet (%s); will retry", url, e)
            result.pending += 1
            continue
        t = Txn().compare("mod", kv.key, "==", kv.mod_revision).then(Txn.delete(kv.key))
        await store.etcd.txn(t, what="gc entry delete")
        result.deleted += 1
    return result
