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

Orphans (:func:`sweep_orphans`): a blob no handle, gc entry or upload intent
names, older than ``orphan_min_age`` — left by a writer that crashed after
its lease expired, or kept after an unresolved ambiguous commit. The blob
listing is taken BEFORE etcd is read: a writer puts its intent before its
first byte, so any blob in the listing is, at the later etcd read, either
still named by a live intent, or committed (a handle, or a gc entry after a
removal), or truly unreferenced. The minimum age covers writes whose commit
etcd applies late. On S3, multipart uploads of writers without a live intent
are aborted after the same age.

:func:`gc_pass` does both for every namespace; the service runs it every
``gc_interval_seconds`` on one replica, ``statestore gc`` runs it by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from statestore.blobs import blob_age
from statestore.errors import OutsideBlobRoot, StateStoreError
from statestore.etcd import KV, Txn
from statestore.keys import RootLayout, decode, prefix_end
from statestore.records import GcEntry, MalformedRecord, decode_handle_blob_ref
from statestore.store import StateHandleStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GcPass:
    deleted: int = 0
    #: Entries not yet due (or whose blob could not be deleted this time).
    pending: int = 0


async def collect_due(
    store: StateHandleStore, *, now: float | None = None, dry_run: bool = False
) -> GcPass:
    """Delete every blob of the store's namespace whose gc entry is due
    (``dry_run``: only count them)."""
    now = time.time() if now is None else now
    grace = store.config.gc_grace_seconds
    gp = store.keys.gc_prefix
    kvs, _ = await store.etcd.range_all(gp, prefix_end(gp))
    result = GcPass()
    for kv in kvs:
        try:
            entry = GcEntry.decode(kv.value)
        except MalformedRecord:
            log.error("unreadable gc entry %r left in place: inspect it with etcdctl", kv.key)
            result.pending += 1
            continue
        url = entry.blob_url
        if entry.queued_at + grace > now:
            result.pending += 1
            continue
        if dry_run:
            result.deleted += 1
            continue
        try:
            await store.blobs.delete(url)
        except OutsideBlobRoot:
            # Corrupt or hostile: never deleted, and the entry stays as evidence
            # (the blob store logged it; cleanup of the namespace stays pending).
            result.pending += 1
            continue
        except StateStoreError as e:
            log.warning("could not delete blob %s yet (%s); will retry", url, e)
            result.pending += 1
            continue
        t = Txn().compare("mod", kv.key, "==", kv.mod_revision).then(Txn.delete(kv.key))
        await store.etcd.txn(t, what="gc entry delete")
        result.deleted += 1
    return result


@dataclass(slots=True)
class GcReport:
    namespaces: int = 0
    deleted: int = 0
    pending: int = 0
    orphans_found: int = 0
    orphans_deleted: int = 0
    uploads_aborted: int = 0
    orphans: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def sweep_orphans(
    store: StateHandleStore,
    min_age: float,
    report: GcReport,
    *,
    dry_run: bool = False,
    now: float | None = None,
) -> None:
    """Find (and unless ``dry_run`` delete) the namespace's orphaned blobs."""
    now = time.time() if now is None else now
    ns = store.namespace
    blobs = await store.blobs.list_namespace(ns)  # first: see the module docstring
    uploads = await store.blobs.stale_multipart_uploads(ns)
    keys = store.keys
    hp, gp, up = keys.handles_prefix, keys.gc_prefix, keys.uploads_prefix
    (handles, queued, uploading), _ = await store.etcd.read_ranges(
        [(hp, prefix_end(hp), False), (gp, prefix_end(gp), True), (up, prefix_end(up), True)]
    )
    try:
        referenced = {
            decode_handle_blob_ref(kv.value) for kv in handles if keys.is_handle_key(kv.key)
        }
    except MalformedRecord as e:
        # A record we cannot read might name any blob: sweep nothing here (never guess).
        report.errors.append(f"{ns}: unreadable handle record ({e.reason}); orphan sweep skipped")
        return
    for kvs, blob_id_of_key in ((queued, keys.parse_gc_key), (uploading, keys.parse_upload_key)):
        referenced.update(blob_id_of_key(kv.key) for kv in kvs)
    for b in blobs:
        age = blob_age(b.blob_id, b.mtime, now)
        if b.blob_id in referenced or age is None or age < min_age:
            continue
        report.orphans_found += 1
        report.orphans.append(b.url)
        if not dry_run:
            try:
                await store.blobs.delete(b.url)
            except OutsideBlobRoot as e:  # a symlink in the namespace's directory
                report.errors.append(f"{ns}: {e}")
                continue
            report.orphans_deleted += 1
            log.info("deleted orphaned blob %s (%.0fs old, no handle, entry or intent)", b.url, age)
    for key, upload_id, blob_id, initiated in uploads:
        age = blob_age(blob_id, initiated or None, now)
        if blob_id in referenced or age is None or age < min_age:
            continue
        if not dry_run:
            await store.blobs.abort_multipart_upload(key, upload_id)
        report.uploads_aborted += 1


async def namespaces(store: StateHandleStore, root_keys: list[KV] | None = None) -> list[str]:
    """Every namespace with blobs or keys under the store's root.

    ``root_keys``: a listing of every key under the root the caller already
    has (the maintenance loop's reconciler resync); read here when None."""
    found = {decode(d) for d in await store.blobs.list_namespaces()}
    roots = RootLayout(store.config.root)
    kvs = root_keys
    if kvs is None:
        kvs, _ = await store.etcd.range_all(roots.prefix, prefix_end(roots.prefix), keys_only=True)
    for kv in kvs:
        ns = roots.namespace_of(kv.key)
        if ns is not None:
            found.add(ns)
    return sorted(found)


async def gc_pass(
    store: StateHandleStore,
    *,
    orphan_min_age: float,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    root_keys: list[KV] | None = None,
) -> GcReport:
    """Collect due gc entries and sweep orphans in every namespace
    (``root_keys``: see :func:`namespaces`)."""
    report = GcReport()
    all_ns = await namespaces(store, root_keys)
    report.namespaces = len(all_ns)
    for i, ns in enumerate(all_ns):
        if progress is not None:
            progress(ns, i, len(all_ns))
        try:
            view = store.for_namespace(ns)
            due = await collect_due(view, dry_run=dry_run)
            report.deleted += due.deleted
            report.pending += due.pending
            await sweep_orphans(view, orphan_min_age, report, dry_run=dry_run)
        except StateStoreError as e:
            report.errors.append(f"{ns}: {e}")
            log.warning("gc of namespace %r incomplete: %s", ns, e)
    if progress is not None:
        progress("", len(all_ns), len(all_ns))
    return report
