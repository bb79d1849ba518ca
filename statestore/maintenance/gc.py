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
listing is taken BEFORE etcd is read: a live writer has its intent in etcd
once its upload has run ``intent_after_seconds`` (protocol.md s5, deferred
intent), far less than the minimum age (``StoreConfig`` refuses anything
closer), so any blob in the listing that is old enough is, at the later
etcd read, either still named by a live intent, or committed (a handle, or
a gc entry after a removal), or truly unreferenced. A younger blob may
belong to a quick upload without an intent: it is never old enough. A
writer that was paused (or cut off) past the minimum age can no longer
commit its blob: its intent went with its liveness lease, or its commit's
liveness compare fails (``statestore.store._UploadClaim``). The minimum age
also covers writes whose commit etcd applies late. On S3, multipart uploads
of writers without a live intent are aborted after the same age.

Clocks (protocol.md s5). No age is taken from a time a writer wrote (a gc
entry's ``queued_at``, the timestamp in a blob id): a writer whose clock is
an hour off would otherwise have blobs deleted an hour early, or kept an
hour late.

- A gc entry's age is measured from the sweeper's own first sighting of it
  (:class:`Sightings`, on ``time.monotonic``), which is never before it was
  queued. A restart forgets the sightings: deletion is delayed, never
  hastened.
- An orphan's age is measured on the blob store's clock (its modification
  time; S3's ``LastModified``, a multipart upload's ``Initiated``) and, in a
  sweeper that keeps running (the service's GC), also capped by its own
  first sighting, so neither a skewed blob store clock nor a jump of the
  sweeper's wall clock can make a blob look older than it is.

:func:`gc_pass` does both for every namespace; the service runs it every
``gc_interval_seconds`` on one replica, ``statestore gc`` runs it by hand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from statestore.errors import OutsideBlobRoot, StateStoreError
from statestore.etcd import KV, Txn
from statestore.keys import RootLayout, decode, prefix_end
from statestore.records import GcEntry, MalformedRecord, decode_handle_blob_ref
from statestore.store import StateHandleStore

log = logging.getLogger(__name__)


class Sightings:
    """The sweeper's own clock: when this process first saw each gc entry or
    unreferenced blob, on ``time.monotonic`` (no wall clock, no writer's
    clock: nothing a writer, an NTP step or a skewed host can move).

    Kept per scope (one namespace's gc entries, its orphans, its multipart
    uploads). Every look at a scope names all it holds now, and what it no
    longer holds is forgotten, so the memory is as small as what is pending.
    Forgetting only makes an age start again from 0: it delays deletion,
    never hastens it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first_seen: dict[str, dict[str, float]] = {}

    def ages(self, scope: str, keys: Iterable[str]) -> dict[str, float]:
        """Seconds since this sweeper first saw each of ``keys`` in
        ``scope`` (0 for one seen now). ``keys`` is all the scope holds now:
        the scope's other keys are forgotten."""
        now = self._clock()
        before = self._first_seen.get(scope, {})
        first = {key: before.get(key, now) for key in keys}
        if first:
            self._first_seen[scope] = first
        else:
            self._first_seen.pop(scope, None)
        return {key: now - at for key, at in first.items()}


#: This process's first sightings: what :func:`collect_due` goes by unless
#: given another memory (the namespace cleanup, ``statestore gc``).
PROCESS_SIGHTINGS = Sightings()


@dataclass(slots=True)
class GcPass:
    deleted: int = 0
    #: Entries not yet due (or whose blob could not be deleted this time).
    pending: int = 0


async def collect_due(
    store: StateHandleStore, *, dry_run: bool = False, sightings: Sightings = PROCESS_SIGHTINGS
) -> GcPass:
    """Delete every blob of the store's namespace whose gc entry is due
    (``dry_run``: only count them).

    An entry is due once ``sightings`` has seen it for ``gc_grace_seconds``;
    its ``queued_at`` is the queuing writer's clock and decides nothing. So a
    first look deletes nothing unless the grace period is 0."""
    grace = store.config.gc_grace_seconds
    gp = store.keys.gc_prefix
    kvs, _ = await store.etcd.range_all(gp, prefix_end(gp))
    result = GcPass()
    readable: list[tuple[KV, GcEntry, str]] = []
    for kv in kvs:
        try:
            entry = GcEntry.decode(kv.value)
        except MalformedRecord:
            log.error("unreadable gc entry %r left in place: inspect it with etcdctl", kv.key)
            result.pending += 1
            continue
        # With its create revision: an entry deleted and queued again for the
        # same blob id is a new one, seen afresh.
        readable.append((kv, entry, f"{kv.key.hex()}@{kv.create_revision}"))
    ages = sightings.ages(f"gc {gp.hex()}", (sighting for _, _, sighting in readable))
    for kv, entry, sighting in readable:
        url = entry.blob_url
        if ages[sighting] < grace:
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
    sightings: Sightings | None = None,
) -> None:
    """Find (and unless ``dry_run`` delete) the namespace's orphaned blobs.

    A blob's age is the blob store's: now minus its modification time (a
    multipart upload's: its initiation). ``sightings``, the memory of a
    sweeper that keeps running, also caps each age at how long that sweeper
    has seen it unreferenced; without it (one-shot runs such as ``statestore
    gc``) the blob store's clock alone decides, and a blob the store gives no
    time for is never old enough. ``min_age`` 0 sweeps whatever the ages."""
    now = time.time()
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

    ns_dir = store.blobs.ns_dir(ns)
    orphans = {b.url: b.mtime for b in blobs if b.blob_id not in referenced}
    for url, age in _ages(sightings, f"orphans {ns_dir}", orphans, now).items():
        if min_age > 0 and (age is None or age < min_age):
            continue
        report.orphans_found += 1
        report.orphans.append(url)
        if not dry_run:
            try:
                await store.blobs.delete(url)
            except OutsideBlobRoot as e:  # a symlink in the namespace's directory
                report.errors.append(f"{ns}: {e}")
                continue
            report.orphans_deleted += 1
            log.info(
                "deleted orphaned blob %s (%s old, no handle, entry or intent)",
                url,
                "?" if age is None else f"{age:.0f}s",
            )

    stale = {u[1]: u for u in uploads if u[2] not in referenced}  # by upload id
    started = {upload_id: u[3] or None for upload_id, u in stale.items()}
    for upload_id, age in _ages(sightings, f"uploads {ns_dir}", started, now).items():
        if min_age > 0 and (age is None or age < min_age):
            continue
        if not dry_run:
            await store.blobs.abort_multipart_upload(stale[upload_id][0], upload_id)
        report.uploads_aborted += 1


def _ages(
    sightings: Sightings | None, scope: str, stored_at: dict[str, float | None], now: float
) -> dict[str, float | None]:
    """Each key's age on the blob store's clock (``stored_at``; None when the
    store gave no time), capped by ``sightings`` when given."""
    ages = {key: None if at is None else now - at for key, at in stored_at.items()}
    if sightings is None:
        return ages
    seen = sightings.ages(scope, stored_at)
    return {key: seen[key] if age is None else min(age, seen[key]) for key, age in ages.items()}


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
    sightings: Sightings | None = None,
) -> GcReport:
    """Collect due gc entries and sweep orphans in every namespace
    (``root_keys``: see :func:`namespaces`).

    ``sightings``: the memory of a sweeper that keeps running (the service's
    GC), for gc entries and to cap orphan ages. None (a one-shot run): this
    process's :data:`PROCESS_SIGHTINGS` for gc entries, the blob store's
    clock alone for orphans."""
    report = GcReport()
    all_ns = await namespaces(store, root_keys)
    report.namespaces = len(all_ns)
    for i, ns in enumerate(all_ns):
        if progress is not None:
            progress(ns, i, len(all_ns))
        try:
            view = store.for_namespace(ns)
            due = await collect_due(view, dry_run=dry_run, sightings=sightings or PROCESS_SIGHTINGS)
            report.deleted += due.deleted
            report.pending += due.pending
            await sweep_orphans(view, orphan_min_age, report, dry_run=dry_run, sightings=sightings)
        except StateStoreError as e:
            report.errors.append(f"{ns}: {e}")
            log.warning("gc of namespace %r incomplete: %s", ns, e)
    if progress is not None:
        progress("", len(all_ns), len(all_ns))
    return report
