"""Blob GC: queued blobs after their grace period, orphans of crashed writers.

Protocol.md sections 1 (invariants 1, 4, 5) and 5: a blob is deleted only
after its handle is gone; no blob leaks forever, even when its writer
crashed; a live upload (its ``uploads/<blob-id>`` intent on the writer's
lease) is never swept. Outcomes are checked on the blob store itself (files
on disk, objects and multipart uploads in the moto bucket) and in raw etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from helpers import OpenStore, async_wait_until
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from statestore import StateHandleStore, StoreConfig
from statestore.blobs import new_blob_id
from statestore.errors import AlreadyExists, NotFound, StateStoreError
from statestore.keys import encode, prefix_end
from statestore.maintenance.gc import Sightings, collect_due, gc_pass
from statestore.maintenance.reconciler import RemovalReconciler
from statestore.records import GcEntry

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024  # the smallest streaming chunk: partial blobs reach the disk early


def unique_root() -> str:
    return f"/t-{uuid.uuid4().hex}"


def blob_dir(tmp_path: Path, namespace: str) -> Path:
    """Where ``make_config``'s file:// blob root keeps the namespace's blobs."""
    return tmp_path / "blobs" / encode(namespace)


def blob_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


async def raw_count(store: StateHandleStore, prefix: bytes) -> int:
    return await store.etcd.count(prefix, prefix_end(prefix))


def pattern(i: int) -> bytes:
    return hashlib.shake_256(i.to_bytes(4, "big")).digest(CHUNK)


# -- (a) a writer killed mid-upload -----------------------------------------------

_KILLED_WRITER = """
import asyncio, json, sys
from statestore import StateHandleStore, StoreConfig

async def body():
    for i in range(4):
        yield bytes([i + 1]) * 65536
        await asyncio.sleep(0)
    print("UPLOADING", flush=True)
    await asyncio.Event().wait()

async def main():
    store = await StateHandleStore.open(StoreConfig(**json.loads(sys.argv[1])))
    print("LEASE", store.session.lease_id, flush=True)
    await store.add_and_lock("chk-killed", body())

asyncio.run(main())
"""


async def test_killed_writers_blob_is_reclaimed_after_its_lease_expires(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    ttl = 2
    root = unique_root()
    reader = await open_store(make_config(root=root))
    # The intent before the first byte (intent_after 0): this test follows it.
    child_cfg = make_config(root=root, lease_ttl=ttl, blob_chunk_size=CHUNK, intent_after_seconds=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["PYTHONPATH"] = str(REPO)
    stderr_path = tmp_path / "writer.stderr"
    with stderr_path.open("wb") as err:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-c", _KILLED_WRITER, child_cfg.model_dump_json()],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            env=env,
        )
    try:
        assert proc.stdout is not None
        lines: list[bytes] = []
        for _ in range(2):
            try:
                line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            except TimeoutError:
                raise AssertionError(f"writer silent: {stderr_path.read_text()}") from None
            lines.append(line)
        assert lines[0].startswith(b"LEASE") and lines[1].startswith(b"UPLOADING"), (
            lines,
            stderr_path.read_text(),
        )
        lease = int(lines[0].split()[1])
        directory = blob_dir(tmp_path, namespace)
        files = blob_files(directory)
        assert len(files) == 1, files
        blob_id = files.pop()
        blob_path = directory / blob_id
        assert blob_path.stat().st_size > 0, "no partial blob on disk"
        intent = await reader.etcd.get(reader.keys.upload(blob_id))
        assert intent is not None and intent.lease == lease, intent

        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        killed = time.monotonic()

        # The dead writer's intent still lives on its lease: the blob is protected.
        report = await gc_pass(reader, orphan_min_age=0)
        assert blob_path.exists(), "swept a blob whose writer's intent was still live"
        assert report.orphans == [] and report.orphans_deleted == 0, report
        assert await reader.etcd.get(reader.keys.upload(blob_id)) is not None, (
            "the intent expired before the check ran: the test proved nothing"
        )

        async def intent_gone() -> bool:
            return await reader.etcd.get(reader.keys.upload(blob_id)) is None

        await async_wait_until(intent_gone, ttl + 5, message="intent did not expire")
        expired = time.monotonic() - killed
        report = await gc_pass(reader, orphan_min_age=0)
        reclaimed = time.monotonic() - killed
        print(
            f"\nkilled writer (lease TTL {ttl}s): intent expired {expired:.2f}s after SIGKILL, "
            f"blob reclaimed {reclaimed:.2f}s after it"
        )
        assert not blob_path.exists(), "the crashed writer's blob was not reclaimed"
        assert report.orphans_deleted == 1 and len(report.orphans) == 1, report
        assert report.orphans[0].endswith(f"/{blob_id}"), report.orphans
        assert report.errors == []
        assert await reader.etcd.get(reader.keys.handle("chk-killed")) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- (b) a slow live upload -------------------------------------------------------


async def test_slow_live_upload_older_than_min_age_is_never_swept(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    min_age, chunks, pause = 1.0, 30, 0.1  # ~3 s of upload, three times the minimum age
    root = unique_root()
    writer = await open_store(make_config(root=root, blob_chunk_size=CHUNK))
    gc_store = await open_store(make_config(root=root))
    directory = blob_dir(tmp_path, namespace)

    async def slow_body() -> AsyncIterator[bytes]:
        for i in range(chunks):
            yield pattern(i)
            await asyncio.sleep(pause)

    expected = b"".join(pattern(i) for i in range(chunks))
    started = time.monotonic()
    add = asyncio.create_task(writer.add_and_lock("chk-slow", slow_body()))
    passes = old_passes = 0
    blob_path: Path | None = None
    try:
        while not add.done():
            report = await gc_pass(gc_store, orphan_min_age=min_age)
            passes += 1
            assert report.orphans == [] and report.errors == [], report
            if blob_path is None:
                files = blob_files(directory)
                if files:
                    assert len(files) == 1, files
                    blob_path = directory / files.pop()
            if blob_path is not None and not add.done():
                assert blob_path.exists(), "the GC deleted a live upload's blob"
                if time.monotonic() - started > min_age + 0.2:
                    old_passes += 1
            await asyncio.sleep(0.05)
        h = await add
    finally:
        if not add.done():
            add.cancel()
            await asyncio.gather(add, return_exceptions=True)
    took = time.monotonic() - started
    print(f"\nupload took {took:.2f}s; {passes} gc passes, {old_passes} past the min age")
    assert took > 2 * min_age, "the upload was not slow enough to prove anything"
    assert old_passes >= 5, old_passes
    assert blob_path is not None and blob_path.name == h.blob_id
    assert await writer.read("chk-slow") == expected
    assert await raw_count(gc_store, gc_store.keys.uploads_prefix) == 0
    # Committed now: even with no minimum age the sweeper leaves it alone.
    report = await gc_pass(gc_store, orphan_min_age=0)
    assert report.orphans == [] and blob_path.exists()


# -- a writer whose lease was lost mid-upload ------------------------------------


@pytest.mark.parametrize("op", ["add", "replace"])
async def test_writer_that_lost_its_lease_mid_upload_cannot_commit_a_swept_blob(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    op: str,
) -> None:
    """The writer's lease expires mid-upload (a long pause or partition): its
    intent is gone, so the GC may sweep the partial blob. The writer must then
    not commit a handle naming that blob (invariant 1): a visible handle's
    blob always exists and verifies."""
    root = unique_root()
    # The intent before the first byte (tests/test_deferred_intent.py has
    # the same for a writer that defers it).
    writer = await open_store(
        make_config(root=root, lease_ttl=3, blob_chunk_size=CHUNK, intent_after_seconds=0)
    )
    gc_store = await open_store(make_config(root=root))
    directory = blob_dir(tmp_path, namespace)
    old = None
    if op == "replace":
        old = await writer.add_and_lock("chk", b"old state")
        await writer.release("chk")
    resume = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield pattern(0)
        await asyncio.sleep(0)
        await resume.wait()
        yield pattern(1)

    if old is None:
        task = asyncio.create_task(writer.add_and_lock("chk", body()))
    else:
        task = asyncio.create_task(writer.replace("chk", old.version, body()))
    try:

        def new_blob() -> set[str]:
            return blob_files(directory) - ({old.blob_id} if old else set())

        await async_wait_until(new_blob, 10, message="upload did not start")
        (blob_id,) = new_blob()
        assert await gc_store.etcd.get(gc_store.keys.upload(blob_id)) is not None
        lost_before = writer.session.lost_count
        await writer.etcd.lease_revoke(writer.session.lease_id)  # = expiry, for etcd
        # The writer's keepalive notices and takes a new lease.
        await async_wait_until(
            lambda: writer.session.lost_count > lost_before, 10, message="loss not noticed"
        )
        report = await gc_pass(gc_store, orphan_min_age=0)
        swept = not (directory / blob_id).exists()
        print(f"\nintent gone with the lease; GC swept the partial blob: {swept} ({report})")
        resume.set()
        try:
            result = await asyncio.wait_for(task, 10)
            outcome = f"committed version {result.version}"
        except StateStoreError as e:
            outcome = f"refused: {type(e).__name__}: {e}"
    finally:
        resume.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    print(f"{op} after the lease loss: {outcome}")
    kv = await gc_store.etcd.get(gc_store.keys.handle("chk"))
    if kv is not None:
        h = await gc_store.get("chk")
        assert h.blob_id != blob_id or (directory / blob_id).exists(), (
            f"invariant 1 broken: {op} committed handle 'chk' naming blob {blob_id}, which the "
            f"GC had already swept (the writer's lease, and with it its upload intent, was "
            f"gone before the commit). Outcome: {outcome}"
        )
        await gc_store.read(h)


# -- (c) the grace period of queued blobs ----------------------------------------


async def test_collect_due_waits_for_the_grace_period(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    grace = 1.5
    store = await open_store(make_config(root=unique_root(), gc_grace_seconds=grace))
    directory = blob_dir(tmp_path, namespace)
    first = await store.add_and_lock("chk", b"first")
    second = await store.replace("chk", first.version, b"second")
    entry_kv = await store.etcd.get(store.keys.gc(first.blob_id))
    assert entry_kv is not None
    entry = json.loads(entry_kv.value)
    due_at = float(entry["queued_at"]) + grace
    assert entry["blob_url"] == first.blob_url

    # A dry run counts what is due on its sweeper's clock, and deletes nothing.
    clock = [0.0]
    sweeper = Sightings(lambda: clock[0])
    assert (await collect_due(store, dry_run=True, sightings=sweeper)).deleted == 0
    clock[0] += grace
    dry = await collect_due(store, dry_run=True, sightings=sweeper)
    assert dry.deleted == 1 and (directory / first.blob_id).exists(), "dry run deleted"

    passes = 0
    while True:
        passes += 1
        result = await collect_due(store)
        after = time.time()
        if result.deleted:
            assert after >= due_at, f"deleted {due_at - after:.2f}s before its grace period ended"
            break
        assert result.pending == 1, result
        assert (directory / first.blob_id).exists(), "queued blob gone without collect_due"
        assert after < due_at + 5, "the queued blob was never collected"
        await asyncio.sleep(0.05)
    print(f"\nqueued blob collected after {passes} passes, grace {grace}s")
    assert passes > 1, "the first pass already collected it: the grace period was not honoured"
    assert not (directory / first.blob_id).exists()
    assert await store.etcd.get(store.keys.gc(first.blob_id)) is None, "gc entry left behind"
    # The handle's current blob is never touched, however often the GC runs.
    for _ in range(3):
        clock[0] += 3600
        assert (await collect_due(store, sightings=sweeper)).deleted == 0
    assert (directory / second.blob_id).exists()
    assert await store.read("chk") == b"second"

    # Removal queues the last blob the same way.
    assert await store.release_and_try_remove("chk")
    assert (await collect_due(store)).deleted == 0
    assert (directory / second.blob_id).exists()

    async def collected() -> bool:
        return (await collect_due(store)).deleted == 1

    await async_wait_until(collected, grace + 5, interval=0.1, message="removed blob kept")
    assert blob_files(directory) == set()


# -- (c') ages run on clocks the writer does not control (protocol.md s5) ------------

#: A writer whose clock is an hour off writes its times an hour off.
WRITER_SKEW = pytest.mark.parametrize(
    "skew", [-3600.0, 3600.0], ids=["written-1h-in-the-past", "written-1h-in-the-future"]
)


@WRITER_SKEW
async def test_grace_period_runs_on_the_sweepers_clock_not_the_writers(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    skew: float,
) -> None:
    """The gc entry's ``queued_at`` is an hour off: the blob is still deleted
    no earlier than the grace period after the sweeper first saw the entry,
    and no later than a few passes after that."""
    grace = 1.5
    store = await open_store(make_config(root=unique_root(), gc_grace_seconds=grace))
    directory = blob_dir(tmp_path, namespace)
    first = await store.add_and_lock("chk", b"first")
    await store.replace("chk", first.version, b"second")
    key = store.keys.gc(first.blob_id)
    kv = await store.etcd.get(key)
    assert kv is not None
    entry = GcEntry.decode(kv.value)
    await store.etcd.put(key, dataclasses.replace(entry, queued_at=entry.queued_at + skew).encode())

    watching_since = time.monotonic()  # the sweeper's first sighting is after this
    while True:
        result = await collect_due(store)
        watched = time.monotonic() - watching_since
        if result.deleted:
            break
        assert (directory / first.blob_id).exists(), "queued blob gone without collect_due"
        assert watched < grace + 5, f"not collected {watched:.1f}s after the sweeper saw it"
        await asyncio.sleep(0.05)
    assert watched >= grace, (
        f"deleted {watched:.2f}s after the sweeper first saw its entry, before the {grace}s "
        f"grace period: the writer's queued_at ({skew:+.0f}s) decided"
    )
    assert not (directory / first.blob_id).exists()
    assert await store.etcd.get(key) is None


async def test_a_restarted_sweeper_starts_the_grace_period_again(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    """Sightings live in the sweeper's memory: a new sweeper (a restart) has
    seen nothing yet, so it waits a whole grace period (later, never sooner)."""
    grace = 60.0
    store = await open_store(make_config(root=unique_root(), gc_grace_seconds=grace))
    first = await store.add_and_lock("chk", b"first")
    await store.replace("chk", first.version, b"second")
    clock = [1000.0]
    before_restart = Sightings(lambda: clock[0])
    assert (await collect_due(store, sightings=before_restart)).pending == 1
    clock[0] += grace - 1
    after_restart = Sightings(lambda: clock[0])
    for sweeper in (before_restart, after_restart):
        assert (await collect_due(store, sightings=sweeper)).deleted == 0
    clock[0] += 1  # the first sweeper has now watched it for the grace period
    assert (await collect_due(store, sightings=after_restart)).deleted == 0
    assert (blob_dir(tmp_path, namespace) / first.blob_id).exists()
    clock[0] += grace
    assert (await collect_due(store, sightings=after_restart)).deleted == 1


def skewed_blob_id(skew: float) -> str:
    """A blob id as a writer whose clock is ``skew`` seconds off makes it."""
    return f"{int((time.time() + skew) * 1000):013d}-{uuid.uuid4().hex}"


@WRITER_SKEW
async def test_orphan_age_runs_on_the_blob_stores_clock_not_the_blob_id(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    skew: float,
) -> None:
    """An orphan whose id says it was started an hour off: a one-shot sweep
    (no sightings) goes by the blob store's modification time, so the blob is
    swept once it is ``min_age`` old there, not before and not an hour late."""
    min_age = 1.5
    store = await open_store(make_config(root=unique_root()))
    await store.add_and_lock("chk", b"state")
    orphan = blob_dir(tmp_path, namespace) / skewed_blob_id(skew)
    written = time.monotonic()
    orphan.write_bytes(b"nobody's")
    while True:
        report = await gc_pass(store, orphan_min_age=min_age)
        age = time.monotonic() - written
        if not orphan.exists():
            break
        assert report.orphans == [], report
        assert age < min_age + 5, f"orphan not swept {age:.1f}s after it was written"
        await asyncio.sleep(0.05)
    assert age >= min_age, (
        f"swept {age:.2f}s after it was written, before the minimum age of {min_age}s: "
        f"the timestamp in its id ({skew:+.0f}s) decided"
    )
    assert report.orphans_deleted == 1 and report.orphans[0].endswith(orphan.name), report
    assert await store.read("chk") == b"state"


async def test_a_running_sweeper_caps_orphan_ages_at_its_own_sightings(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    """The blob store's clock says an hour (its clock, or the sweeper's wall
    clock, jumped): a sweeper that keeps sightings still waits ``min_age``
    from its first sighting of the orphan."""
    min_age = 1.5
    store = await open_store(make_config(root=unique_root()))
    await store.add_and_lock("chk", b"state")
    orphan = blob_dir(tmp_path, namespace) / skewed_blob_id(-3600)
    orphan.write_bytes(b"nobody's")
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    sweeper = Sightings()
    watching_since = time.monotonic()
    while orphan.exists():
        watched = time.monotonic() - watching_since
        assert watched < min_age + 5, "orphan never swept"
        await gc_pass(store, orphan_min_age=min_age, sightings=sweeper)
        await asyncio.sleep(0.05)
    assert time.monotonic() - watching_since >= min_age, "swept before the sweeper saw it age"


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"[]", b'{"blob_url": "file:///elsewhere"}'],
    ids=["not-json", "json-array", "no-queued-at"],
)
async def test_an_unreadable_gc_entry_stays_and_the_others_are_collected(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
    garbage: bytes,
) -> None:
    """An entry the GC cannot read might name any blob: it is left in place
    (counted pending, logged for an operator) and the readable entries are
    collected as usual. Breaks if a malformed entry stops the pass, is deleted,
    or has a blob deleted for it."""
    store = await open_store(make_config(root=unique_root(), gc_grace_seconds=0))
    first = await store.add_and_lock("chk", b"first")
    await store.replace("chk", first.version, b"second")
    unreadable = store.keys.gc(new_blob_id())
    await store.etcd.put(unreadable, garbage)

    result = await collect_due(store)
    assert (result.deleted, result.pending) == (1, 1), result
    assert not (blob_dir(tmp_path, namespace) / first.blob_id).exists()
    assert await store.etcd.get(store.keys.gc(first.blob_id)) is None
    kv = await store.etcd.get(unreadable)
    assert kv is not None and kv.value == garbage


async def test_sweep_keeps_the_blob_of_a_record_without_blob_id(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    """``parse_record`` accepts a record without ``blob_id`` (the store then
    goes by ``blob_url``, as ``try_remove``/``replace`` do with
    ``blob_id_of(url)``): such a handle is visible and readable, so the orphan
    sweep must count its blob as referenced too."""
    store = await open_store(make_config(root=unique_root()))
    h = await store.add_and_lock("chk", b"state")
    key = store.keys.handle("chk")
    kv = await store.etcd.get(key)
    assert kv is not None
    record = json.loads(kv.value)
    del record["blob_id"]
    await store.etcd.put(key, json.dumps(record).encode())
    assert await store.read("chk") == b"state"  # visible and readable

    report = await gc_pass(store, orphan_min_age=0)
    assert (blob_dir(tmp_path, namespace) / h.blob_id).exists(), (
        f"the sweep deleted the blob of visible handle 'chk' ({report})"
    )
    assert await store.read("chk") == b"state"


# -- (d) a property test over random histories -------------------------------------

NAMES = ("a", "a", "b")  # "a" twice: most operations meet on one handle
KINDS = ("add", "add", "lock", "lock", "lock", "replace", "release", "remove", "remove", "crash")
#: (kind, instance, name, deferred): removals are mostly deferred.
OPS = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 2),
    st.sampled_from(NAMES),
    st.sampled_from((True, True, False)),
)


class Model:
    """What the store must look like after each operation."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.locks: dict[str, set[int]] = {}
        self.pending: set[str] = set()

    def drop_lock(self, i: int, name: str) -> None:
        self.locks.get(name, set()).discard(i)

    def remove(self, name: str) -> None:
        self.data.pop(name, None)
        self.locks.pop(name, None)
        self.pending.discard(name)


async def check_against(model: Model, store: StateHandleStore, ids: list[str], step: str) -> None:
    hp = store.keys.handles_prefix
    kvs, _ = await store.etcd.range_all(hp, prefix_end(hp), keys_only=True)
    handles: set[str] = set()
    locks: dict[str, set[str]] = {}
    for kv in kvs:
        name, holder = store.keys.parse_handles_key(kv.key)
        if holder is None:
            handles.add(name)
        else:
            locks.setdefault(name, set()).add(holder)
    assert handles == set(model.data), (step, handles, set(model.data))
    for name in set(locks) | set(model.locks):
        want = {ids[i] for i in model.locks.get(name, set())}
        assert locks.get(name, set()) == want, (step, name, locks.get(name), want)
        if locks.get(name):
            assert name in handles, f"{step}: lock keys on removed handle {name!r}"
    assert await store.pending_removals() == model.pending, (step, model.pending)


async def run_history(
    history: list[tuple[Any, ...]], n: int, make_config: Callable[..., StoreConfig], base: Path
) -> None:
    ns = f"p-{uuid.uuid4().hex[:10]}"
    blobs = base / uuid.uuid4().hex
    cfg = make_config(
        root=unique_root(), namespace=ns, blob_root=f"file://{blobs}", gc_grace_seconds=0
    )
    stores = [await StateHandleStore.open(cfg) for _ in range(n)]
    ids = [s.instance_id for s in stores]
    model = Model()
    crashes = deferrals = 0
    try:
        for k, op in enumerate(history):
            kind, i = op[0], op[1] % n
            s = stores[i]
            step = f"#{k} {op}"
            if kind == "add":
                name = op[2]
                data = f"{name}-{k}".encode()
                if name in model.data:
                    with pytest.raises(AlreadyExists):
                        await s.add_and_lock(name, data)
                else:
                    await s.add_and_lock(name, data)
                    model.data[name] = data
                    model.locks[name] = {i}
            elif kind == "replace":
                name = op[2]
                data = f"{name}-{k}".encode()
                version = await s.exists(name)
                if name not in model.data:
                    assert version is None, step
                elif name in model.pending:
                    with pytest.raises(NotFound):
                        await s.replace(name, version or 0, data)
                else:
                    assert version is not None, step
                    await s.replace(name, version, data)
                    model.data[name] = data
            elif kind == "lock":
                name = op[2]
                if name not in model.data or name in model.pending:
                    with pytest.raises(NotFound):
                        await s.get_and_lock(name)
                else:
                    assert (await s.get_and_lock(name)).name == name
                    model.locks[name].add(i)
            elif kind == "release":
                name = op[2]
                await s.release(name)
                model.drop_lock(i, name)
                if name in model.pending and not model.locks.get(name):
                    model.remove(name)  # release completes the deferred removal
            elif kind == "remove":
                name, deferred = op[2], op[3]
                others = (
                    {ids[j] for j in model.locks.get(name, set()) if j != i}
                    if name in model.data
                    else set()
                )
                raw_others = set(await s.holders(name)) - {ids[i]} if name in model.data else set()
                assert raw_others == others, (step, raw_others, others)
                outcome = await s.try_remove(name, deferred=deferred)
                if name not in model.data or not others:
                    assert outcome.removed, (step, outcome)
                    model.remove(name)
                else:
                    # Invariant 2: never removed while another instance holds a lock.
                    assert not outcome.removed, (step, outcome, others)
                    assert set(outcome.holders) == others, (step, outcome)
                    assert outcome.pending == deferred, (step, outcome)
                    model.drop_lock(i, name)
                    if deferred:
                        model.pending.add(name)
                        deferrals += 1
            elif kind == "crash":
                crashes += 1
                lease = s.session.lease_id
                await s.etcd.lease_revoke(lease)  # its keys go exactly as on expiry
                await s.session.report_lost(lease, "test: simulated crash")
                for name in list(model.locks):
                    model.drop_lock(i, name)
            await check_against(model, stores[0], ids, step)

        # Finally the instances crash, the first one last: removals only the
        # others were blocking are left for the reconciler (the first one's
        # locks keep theirs pending), then all of them are.
        reader = stores[0]
        completed = 0
        for crashed in (range(1, n), [0]):
            for i in crashed:
                await stores[i].etcd.lease_revoke(stores[i].session.lease_id)
                for name in list(model.locks):
                    model.drop_lock(i, name)
            reconciler = RemovalReconciler(reader)
            await reconciler.resync()
            completed += reconciler.stats.completed
            for name in list(model.pending):
                if not model.locks.get(name):
                    model.remove(name)
            await check_against(model, reader, ids, f"after crashes of {list(crashed)}")
        assert not model.pending
        event(f"removals completed by the reconciler: {min(completed, 2)}+")
        event(f"crashes: {min(crashes, 2)}+; deferred removals: {min(deferrals, 2)}+")
        report = await gc_pass(reader, orphan_min_age=0)
        assert report.errors == [], report
        event(f"blobs collected by the GC: {min(report.deleted, 3)}+")

        handles = {h.name: h for h in (await reader.snapshot()).handles}
        assert set(handles) == set(model.data)
        for name, h in handles.items():
            assert await reader.read(h) == model.data[name], name  # exists and verifies
        on_disk = blob_files(blobs / encode(ns))
        assert on_disk == {h.blob_id for h in handles.values()}, (
            "blob files without a handle remain (or a handle's blob is gone)",
            on_disk,
            handles,
        )
        assert await raw_count(reader, reader.keys.gc_prefix) == 0
        assert await raw_count(reader, reader.keys.uploads_prefix) == 0
    finally:
        for s in stores:
            with contextlib.suppress(Exception):
                await s.close()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=st.lists(OPS, min_size=10, max_size=40), n=st.integers(2, 3))
# Always covered: a removal the reconciler completes after a crash, one still
# locked by the survivor, a replaced blob, a release completing a removal.
@example(
    history=[
        ("add", 0, "a", True),
        ("lock", 1, "a", True),
        ("remove", 0, "a", True),
        ("crash", 1, "a", True),
        ("add", 1, "b", True),
        ("replace", 1, "b", True),
        ("lock", 0, "b", True),
        ("remove", 1, "b", True),
    ],
    n=2,
)
@example(
    history=[
        ("add", 2, "a", True),
        ("lock", 0, "a", True),
        ("lock", 1, "a", True),
        ("remove", 2, "a", False),
        ("remove", 1, "a", True),
        ("release", 0, "a", True),
        ("add", 0, "a", True),
        ("replace", 1, "a", True),
        ("crash", 0, "a", True),
        ("remove", 1, "a", False),
        ("add", 1, "b", True),
    ],
    n=3,
)
def test_random_histories_leave_exactly_the_live_blobs(
    make_config: Callable[..., StoreConfig], tmp_path: Path, history: list[tuple[Any, ...]], n: int
) -> None:
    asyncio.run(run_history(history, n, make_config, tmp_path / "prop"))


# -- (e) S3: stale multipart uploads ----------------------------------------------


@pytest.fixture
def s3(s3_server: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1")


def open_uploads(s3: Any, bucket: str) -> set[str]:
    return {u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}


def start_upload(s3: Any, bucket: str, key: str) -> str:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"p" * 1024)
    return str(upload_id)


async def test_s3_stale_multipart_upload_aborted_live_one_kept(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    s3_bucket: tuple[str, dict[str, Any]],
    s3: Any,
    namespace: str,
) -> None:
    bucket, options = s3_bucket
    store = await open_store(
        make_config(root=unique_root(), blob_root=f"s3://{bucket}/ckpt", storage_options=options)
    )
    h = await store.add_and_lock("chk", b"committed state")
    prefix = f"ckpt/{encode(namespace)}"
    stale_key = f"{prefix}/{new_blob_id()}"
    live_id = new_blob_id()
    live_key = f"{prefix}/{live_id}"
    start_upload(s3, bucket, stale_key)
    start_upload(s3, bucket, live_key)
    await store.etcd.put(store.keys.upload(live_id), b"{}", lease=store.session.lease_id)
    assert open_uploads(s3, bucket) == {stale_key, live_key}

    dry = await gc_pass(store, orphan_min_age=0, dry_run=True)
    assert dry.uploads_aborted == 1 and open_uploads(s3, bucket) == {stale_key, live_key}

    report = await gc_pass(store, orphan_min_age=0)
    assert report.errors == [], report
    assert report.uploads_aborted == 1, report
    assert open_uploads(s3, bucket) == {live_key}, "wrong multipart upload aborted"
    assert await store.read("chk") == b"committed state"
    objects = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    assert {o["Key"] for o in objects} == {f"{prefix}/{h.blob_id}"}
    # (The minimum age of uploads is not checked here: moto reports every
    # upload as initiated in 2010.)

    # Once the live writer's intent is gone (its lease expired), its upload goes too.
    await store.etcd.delete(store.keys.upload(live_id))
    assert (await gc_pass(store, orphan_min_age=0)).uploads_aborted == 1
    assert open_uploads(s3, bucket) == set()


async def test_s3_crashed_first_writers_multipart_upload_is_aborted(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    s3_bucket: tuple[str, dict[str, Any]],
    s3: Any,
) -> None:
    """The very first writer of a namespace crashed mid multipart upload: its
    intent expired, no object was ever completed and no key of the namespace
    is in etcd. The upload must still be aborted (invariant 5: no blob leaks
    forever)."""
    bucket, options = s3_bucket
    store = await open_store(
        make_config(root=unique_root(), blob_root=f"s3://{bucket}/ckpt", storage_options=options)
    )
    other_ns = f"first-{uuid.uuid4().hex[:8]}"
    key = f"ckpt/{encode(other_ns)}/{new_blob_id()}"
    start_upload(s3, bucket, key)
    report = await gc_pass(store, orphan_min_age=0)
    assert report.errors == [], report
    assert open_uploads(s3, bucket) == set(), (
        f"the crashed writer's multipart upload {key} was never aborted: gc_pass scanned "
        f"{report.namespaces} namespace(s) and aborted {report.uploads_aborted}"
    )


# -- (f) the CLI ------------------------------------------------------------------


def gc_cli(cfg: StoreConfig, *args: str) -> subprocess.CompletedProcess[str]:
    """``statestore gc *args`` with ``cfg``'s etcd, roots, grace period and
    no minimum orphan age."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env.update(
        STATESTORE_ETCD_ENDPOINTS=",".join(cfg.etcd_endpoints),
        STATESTORE_BLOB_ROOT=cfg.blob_root,
        STATESTORE_ROOT=cfg.root,
        STATESTORE_ORPHAN_MIN_AGE_SECONDS="0",
        # No minimum age is accepted only with every intent put up front.
        STATESTORE_INTENT_AFTER_SECONDS="0",
        STATESTORE_GC_GRACE_SECONDS=str(cfg.gc_grace_seconds),
        STATESTORE_ALLOW_SHORT_GC_GRACE="true",
        COLUMNS="1000",
        TERM="dumb",
    )
    return subprocess.run(
        [sys.executable, "-m", "statestore.cli", "gc", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_gc_cli_dry_run_then_real_run(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    cfg = make_config(root=unique_root(), gc_grace_seconds=0)
    store = await open_store(cfg)
    directory = blob_dir(tmp_path, namespace)
    first = await store.add_and_lock("chk", b"v1")
    current = await store.replace("chk", first.version, b"v2")  # queues first's blob
    orphan = directory / new_blob_id()  # as left by an unresolved ambiguous commit
    orphan.write_bytes(b"nobody's state")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return gc_cli(cfg, *args)

    dry = await asyncio.to_thread(cli, "--dry-run")
    out = dry.stdout + dry.stderr
    print(f"\n$ statestore gc --dry-run\n{dry.stdout.strip()}")
    assert dry.returncode == 0, out
    assert "Traceback" not in out
    assert "would reclaim 1 queued blob(s) and 1 orphan(s)" in dry.stdout, out
    assert orphan.name in dry.stdout, out
    assert orphan.exists() and (directory / first.blob_id).exists(), "dry run deleted"
    assert await store.etcd.get(store.keys.gc(first.blob_id)) is not None

    real = await asyncio.to_thread(cli)
    out = real.stdout + real.stderr
    print(f"$ statestore gc\n{real.stdout.strip()}")
    assert real.returncode == 0, out
    assert "Traceback" not in out
    assert "reclaimed 1 queued blob(s) and 1 orphan(s)" in real.stdout, out
    assert not orphan.exists(), "orphan not deleted"
    assert not (directory / first.blob_id).exists(), "queued blob not deleted"
    assert await store.etcd.get(store.keys.gc(first.blob_id)) is None
    assert blob_files(directory) == {current.blob_id}
    assert await store.read("chk") == b"v2"


async def test_gc_cli_waits_out_the_grace_period_of_what_it_sees_queued(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
    namespace: str,
) -> None:
    """A one-shot run has seen no gc entry before and trusts no writer's
    ``queued_at``: it waits the grace period once, then deletes the blob."""
    grace = 1.5
    cfg = make_config(root=unique_root(), gc_grace_seconds=grace)
    store = await open_store(cfg)
    first = await store.add_and_lock("chk", b"v1")
    await store.replace("chk", first.version, b"v2")  # queues first's blob
    started = time.monotonic()
    run = await asyncio.to_thread(gc_cli, cfg)
    took = time.monotonic() - started
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "reclaimed 1 queued blob(s) and 0 orphan(s); 0 queued blob(s) still in" in out, out
    assert took >= grace, f"reclaimed after {took:.2f}s, within the {grace}s grace period"
    assert not (blob_dir(tmp_path, namespace) / first.blob_id).exists()
    assert await store.read("chk") == b"v2"
