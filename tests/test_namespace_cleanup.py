"""``clear_namespace``: a globally terminal job leaves nothing behind (FLINK-20695).

Everything runs against real etcd with ``file://`` blobs. "Nothing behind" is
checked literally: a raw range read of ``<root>/<ns>/`` finds zero keys and
the namespace's blob directory holds no file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from helpers import OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig
from statestore.counter import CheckpointIDCounter
from statestore.election import LeaderElection
from statestore.keys import prefix_end
from statestore.maintenance.cleanup import clear_namespace

REPO = Path(__file__).resolve().parent.parent


async def raw_ns_keys(store: StateHandleStore) -> list[bytes]:
    """Every key under ``<root>/<ns>/``, straight from etcd."""
    ns = store.keys.ns_prefix
    kvs, _ = await store.etcd.range_all(ns, prefix_end(ns), keys_only=True)
    return [kv.key for kv in kvs]


async def raw_under(store: StateHandleStore, prefix: bytes) -> list[bytes]:
    kvs, _ = await store.etcd.range_all(prefix, prefix_end(prefix), keys_only=True)
    return [kv.key for kv in kvs]


def blob_files(store: StateHandleStore) -> list[str]:
    """Names of the files in the namespace's blob directory, read from disk."""
    d = Path(store.blobs.ns_dir(store.namespace))
    return sorted(p.name for p in d.rglob("*") if p.is_file()) if d.exists() else []


async def fill(store: StateHandleStore) -> None:
    """Handles (two replaced, so ``gc/`` entries exist), two counters, a
    leader key and a leader info entry."""
    for i in range(4):
        await store.add_and_lock(f"h{i}", b"v0-%d" % i)
    for name, times in (("h0", 1), ("h1", 2)):
        for _ in range(times):
            version = await store.exists(name)
            assert version is not None
            await store.replace(name, version, b"newer")
    counter = CheckpointIDCounter(store)
    assert await counter.get_and_increment() == 1
    await CheckpointIDCounter(store, name="savepoint-id").set_count(7)
    election = LeaderElection(store)
    await election.campaign(timeout=5)
    await election.publish_info("address", "jm-1:6123")

    keys = store.keys
    assert len(await raw_under(store, keys.gc_prefix)) == 3
    assert len(await raw_under(store, keys.ns_prefix + b"counters/")) == 2
    assert len(await raw_under(store, keys.leader_prefix)) == 1
    assert len(await raw_under(store, keys.leader_info_prefix)) == 1
    assert len(await raw_under(store, keys.handles_prefix)) == 8  # 4 records + 4 locks
    assert len(blob_files(store)) == 7


async def clear_until_done(store: StateHandleStore, timeout: float = 20) -> None:
    try:
        await async_wait_until(
            lambda: clear_namespace(store),
            timeout=timeout,
            message="clear_namespace never reported done",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}; keys left: {await raw_ns_keys(store)}") from None


async def test_clear_leaves_zero_keys_and_no_blobs(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, namespace: str
) -> None:
    store = await open_store(make_config(gc_grace_seconds=0))
    await fill(store)
    # A neighbour whose name extends ours must not be touched.
    neighbour = await open_store(make_config(namespace=f"{namespace}-x", gc_grace_seconds=0))
    await neighbour.add_and_lock("keep", b"neighbour")
    await CheckpointIDCounter(neighbour).get_and_increment()
    neighbour_keys = await raw_ns_keys(neighbour)

    await clear_until_done(store)
    assert await raw_ns_keys(store) == []
    assert blob_files(store) == []
    assert await clear_namespace(store) is True  # idempotent

    assert await raw_ns_keys(neighbour) == neighbour_keys
    assert await neighbour.read("keep") == b"neighbour"
    assert len(blob_files(neighbour)) == 1


async def test_handle_locked_by_live_instance_keeps_it_pending(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(gc_grace_seconds=0))
    reader = await open_store(make_config(gc_grace_seconds=0))
    await fill(store)
    held = await reader.get_and_lock("h1")

    for _ in range(2):
        assert await clear_namespace(store) is False
    # Everything else is gone; the locked handle stays, readable, with its blob.
    keys = store.keys
    assert await raw_under(store, keys.handles_prefix) == [
        keys.handle("h1"),
        keys.lock("h1", reader.instance_id),
    ]
    assert await raw_under(store, keys.removals_prefix) == [keys.removal("h1")]
    assert await raw_under(store, keys.gc_prefix) == []
    assert await raw_under(store, keys.leader_prefix) == []
    assert await raw_under(store, keys.ns_prefix + b"counters/") == []
    assert blob_files(store) == [held.blob_id]
    assert await reader.read("h1") == b"newer"

    await reader.release("h1")
    await clear_until_done(store)
    assert await raw_ns_keys(store) == []
    assert blob_files(store) == []


async def test_lock_lost_with_lease_no_longer_blocks(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(gc_grace_seconds=0))
    reader = await open_store(make_config(gc_grace_seconds=0))
    await store.add_and_lock("a", b"a")
    await reader.get_and_lock("a")
    assert await clear_namespace(store) is False
    assert await store.etcd.get(store.keys.handle("a")) is not None

    # The reader crashes: its lease (and lock) vanish, nobody calls release.
    await store.etcd.lease_revoke(reader.session.lease_id)
    await clear_until_done(store)
    assert await raw_ns_keys(store) == []
    assert blob_files(store) == []


async def test_gc_grace_keeps_it_pending_with_blobs_present(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(gc_grace_seconds=3600))
    await fill(store)
    files = blob_files(store)

    for _ in range(2):
        assert await clear_namespace(store) is False
    keys = store.keys
    left = await raw_ns_keys(store)
    assert left and all(k.startswith(keys.gc_prefix) for k in left), left
    assert len(left) == 7  # 3 replaced + 4 removed blobs wait for the grace period
    queued = set()
    for k in left:
        kv = await store.etcd.get(k)
        assert kv is not None
        queued.add(json.loads(kv.value)["blob_url"].rsplit("/", 1)[-1])
    assert queued == set(files)
    assert blob_files(store) == files  # nothing deleted early

    # Once due (here: a cleaner with no grace), the same call finishes the job.
    cleaner = await open_store(make_config(gc_grace_seconds=0))
    await clear_until_done(cleaner)
    assert await raw_ns_keys(store) == []
    assert blob_files(store) == []


async def test_live_upload_keeps_it_pending(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config(gc_grace_seconds=0))
    writer = await open_store(make_config(gc_grace_seconds=0))
    go_on = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"first part "
        await go_on.wait()
        yield b"last part"

    add = asyncio.create_task(writer.add_and_lock("late", slow()))
    try:

        async def uploading() -> list[bytes]:
            return await raw_under(store, store.keys.uploads_prefix)

        await async_wait_until(uploading, timeout=10, message="upload intent never appeared")
        assert await clear_namespace(store) is False
        assert await raw_under(store, store.keys.uploads_prefix)
        go_on.set()
        handle = await asyncio.wait_for(add, 10)
    finally:
        go_on.set()
        add.cancel()
        with contextlib.suppress(BaseException):
            await add
    assert await store.read("late") == b"first part last part"
    await writer.release_all()

    await clear_until_done(store)
    assert await raw_ns_keys(store) == []
    assert handle.blob_id not in blob_files(store)
    assert blob_files(store) == []


_CRASHING_WRITER = """
import asyncio, json, sys
from statestore import StateHandleStore, StoreConfig

async def main():
    cfg = StoreConfig(**json.loads(sys.argv[1]))
    store = await StateHandleStore.open(cfg)

    async def data():
        yield b"first part"
        print("UPLOADING", store.session.lease_id, flush=True)
        await asyncio.Event().wait()

    await store.add_and_lock("never-committed", data())

asyncio.run(main())
"""


async def test_blob_of_a_crashed_writer_is_not_left_behind(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path
) -> None:
    """A writer is SIGKILLed mid-upload: its intent expires with its lease and
    its partial blob has no handle. A namespace reported clean must not keep it."""
    ttl = 2
    store = await open_store(make_config(gc_grace_seconds=0))
    await store.add_and_lock("done", b"committed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env["PYTHONPATH"] = str(REPO)
    stderr = tmp_path / "writer.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [
                sys.executable,
                "-c",
                _CRASHING_WRITER,
                make_config(lease_ttl=ttl, intent_after_seconds=0).model_dump_json(),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith(b"UPLOADING"), (line, stderr.read_text())
        assert len(await raw_under(store, store.keys.uploads_prefix)) == 1
        assert len(blob_files(store)) == 2  # the committed blob and the partial one
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    async def intent_expired() -> bool:
        return not await raw_under(store, store.keys.uploads_prefix)

    await async_wait_until(intent_expired, timeout=ttl + 10, message="intent outlived the lease")
    await clear_until_done(store)
    assert await raw_ns_keys(store) == []
    assert blob_files(store) == [], "clear_namespace reported done but left a blob behind"
