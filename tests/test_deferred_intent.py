"""Deferred upload intents (protocol.md s5; docs/design.md "Deferred upload intents").

A quick add or replace commits without an upload intent, proving in its
commit txn that the writer's liveness key is the one it started under; a
slow one puts its intent after ``intent_after_seconds``. Invariants 1 and 5
must hold whatever the writer does meanwhile: paused longer than its lease
TTL (SIGSTOP), killed (SIGKILL), running with its clock an hour off either
way, or (the service) losing its own liveness lease while the client keeps
its session alive. Everything here runs against real etcd, real files, real
subprocesses and a real ``statestore serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import OpenStore, async_wait_until
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.errors import InvalidArgument, SessionExpired
from statestore.etcd import EtcdClient
from statestore.keys import RootLayout, encode, prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.maintenance.gc import gc_pass

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024
#: Writer settings of the subprocess tests: the smallest lease, an intent
#: after 0.3 s, and the smallest orphan age the start-up check accepts for
#: them (max(10 x 0.3, 2 x (0.3 + 2)) = 4.6 s, rounded up).
TTL = 2
INTENT_AFTER = 0.3
ORPHAN_AGE = 5.0


def unique_root() -> str:
    return f"/t-{uuid.uuid4().hex}"


def blob_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


async def keys_under(store: StateHandleStore, prefix: bytes) -> list[bytes]:
    kvs, _ = await store.etcd.range_all(prefix, prefix_end(prefix), keys_only=True)
    return [kv.key for kv in kvs]


# -- one round trip ------------------------------------------------------------------


async def test_a_quick_add_is_one_etcd_request_and_a_replace_writes_once(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """Breaks if the intent is put up front again (two requests per add),
    or if a quick replace puts one."""
    store = await open_store(make_config())
    await store.add_and_lock("warm-up", b"w")  # puts the liveness key, once per lease
    calls: list[str] = []
    # Every request etcd answers (keepalives run on their own clock: not the add's).
    store.etcd.observer = lambda what, _: None if what == "lease keepalive" else calls.append(what)
    h = await store.add_and_lock("one", b"s" * 200)
    assert calls == ["add_and_lock"], calls
    calls.clear()
    h2 = await store.replace("one", h.version, b"t" * 200)
    # The read is replace's own (NotFound / VersionConflict before uploading).
    assert calls == ["get", "replace"], calls
    store.etcd.observer = None
    assert await store.read(h2) == b"t" * 200
    assert await store.holders("one") == [store.instance_id]
    assert await keys_under(store, store.keys.uploads_prefix) == []


async def test_an_upload_slower_than_intent_after_puts_its_intent_and_commits(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """Breaks if a slow upload never puts its intent (the sweep could take
    its blob), puts it on another lease, or cannot commit with it."""
    store = await open_store(make_config(intent_after_seconds=0.2))
    up = store.keys.uploads_prefix
    seen: list[Any] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * CHUNK

        async def intent() -> bool:
            kvs, _ = await store.etcd.range_all(up, prefix_end(up))
            seen[:] = kvs
            return bool(kvs)

        await async_wait_until(intent, 10, message="no intent after intent_after")
        yield b"b" * CHUNK

    h = await store.add_and_lock("slow", body())
    (kv,) = seen
    assert kv.key == store.keys.upload(h.blob_id)
    assert kv.lease == store.session.lease_id, "the intent must hang on the liveness lease"
    assert await store.read(h) == b"a" * CHUNK + b"b" * CHUNK
    assert await keys_under(store, up) == [], "the commit deletes the intent"


async def test_a_commit_without_intent_is_refused_once_the_liveness_lease_was_lost(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, tmp_path: Path, namespace: str
) -> None:
    """The upload's liveness lease is lost and renewed mid-upload, well
    before ``intent_after`` (no intent), and a sweep takes the blob: the
    commit must fail the liveness compare (the key was put again, with a new
    create revision) rather than publish the swept blob. Breaks without the
    compare: the lock would go on the new lease and the handle name a blob
    that is gone (invariant 1)."""
    store = await open_store(make_config(intent_after_seconds=60, orphan_min_age_seconds=600))
    await store.add_and_lock("warm-up", b"w")
    directory = tmp_path / "blobs" / encode(namespace)
    before = blob_files(directory)
    resume = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * CHUNK
        await resume.wait()
        yield b"b" * CHUNK

    task = asyncio.create_task(store.add_and_lock("chk", body()))
    try:
        await async_wait_until(lambda: blob_files(directory) - before, 10, message="no upload")
        (blob_id,) = blob_files(directory) - before
        lost = store.session.lost_count
        await store.etcd.lease_revoke(store.session.lease_id)  # = expiry, for etcd
        await async_wait_until(lambda: store.session.lost_count > lost, 10, message="not noticed")
        await store.add_and_lock("meanwhile", b"m")  # puts the liveness key again
        await gc_pass(store, orphan_min_age=0)  # a sweep, as after the orphan age
        assert not (directory / blob_id).exists()
        resume.set()
        with pytest.raises(SessionExpired, match="liveness key"):
            await asyncio.wait_for(task, 10)
    finally:
        resume.set()
        await asyncio.gather(task, return_exceptions=True)
    assert await store.exists("chk") is None
    assert await store.read("meanwhile") == b"m"


def test_orphan_age_too_close_to_intent_after_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="orphan_min_age_seconds"):
        StoreConfig(intent_after_seconds=5, orphan_min_age_seconds=49)
    with pytest.raises(ValueError, match="lease_ttl"):
        StoreConfig(intent_after_seconds=1, lease_ttl=60, orphan_min_age_seconds=100)
    from statestore.config import load_config

    with pytest.raises(InvalidArgument, match="STATESTORE_INTENT_AFTER_SECONDS"):
        load_config(intent_after_seconds=5, orphan_min_age_seconds=10)
    StoreConfig(intent_after_seconds=5, orphan_min_age_seconds=50)
    StoreConfig(intent_after_seconds=0, orphan_min_age_seconds=0)  # intents up front


# -- writers in subprocesses -----------------------------------------------------------

_WRITER = """
import asyncio, json, os, signal, sys, time, types
args = json.loads(sys.argv[1])
from statestore import StateHandleStore, StoreConfig
import statestore.blobs, statestore.records, statestore.session, statestore.store

# The writer's wall clock, an hour off, wherever statestore reads it (gRPC
# keeps the real one: it mixes Python's time.time with its C core's clock).
skewed = types.SimpleNamespace(**vars(time))
skewed.time = lambda: time.clock_gettime(time.CLOCK_REALTIME) + args["skew"]
for name, module in list(sys.modules.items()):
    if name.startswith("statestore") and getattr(module, "time", None) is time:
        module.time = skewed

class SkewedDatetime(statestore.records.datetime):
    @classmethod
    def now(cls, tz=None):
        return super().now(tz) + statestore.records.timedelta(seconds=args["skew"])

statestore.records.timedelta = __import__("datetime").timedelta
statestore.records.datetime = SkewedDatetime

async def body():
    for i in range(4):
        yield bytes([i + 1]) * 65536
        await asyncio.sleep(0)
    if args["mode"] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)  # paused mid-upload, before intent_after
    elif args["mode"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        print("UPLOADING", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
    yield b"end"

async def main():
    store = await StateHandleStore.open(StoreConfig(**args["cfg"]))
    try:
        h = await store.add_and_lock("chk", body())
        print("COMMITTED", h.version, h.blob_id, flush=True)
    except Exception as e:
        print("REFUSED", type(e).__name__, e, flush=True)
    await store.close()

asyncio.run(main())
"""


class Writer:
    """A writer process adding ``chk`` to its namespace (see ``_WRITER``)."""

    def __init__(self, cfg: StoreConfig, mode: str, skew: float, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
        env["PYTHONPATH"] = str(REPO)
        args = {"cfg": json.loads(cfg.model_dump_json()), "mode": mode, "skew": skew}
        self.log = log
        self._err = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            cwd=REPO,
            env=env,
        )

    async def line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        except TimeoutError:
            raise AssertionError(f"writer silent: {self.log.read_text()}") from None
        assert raw, f"writer exited: {self.log.read_text()}"
        return raw.decode().strip()

    def state(self) -> str:
        """The process state letter from /proc (``T``: stopped)."""
        try:
            return Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "?"

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self._err.close()


@pytest.fixture
def writers(tmp_path: Path) -> Iterator[Callable[[StoreConfig, str, float], Writer]]:
    started: list[Writer] = []

    def start(cfg: StoreConfig, mode: str, skew: float = 0.0) -> Writer:
        started.append(Writer(cfg, mode, skew, tmp_path / f"writer-{len(started)}.err"))
        return started[-1]

    yield start
    for w in started:
        w.close()


def writer_config(make_config: Callable[..., StoreConfig], root: str, ns: str) -> StoreConfig:
    return make_config(
        root=root,
        namespace=ns,
        lease_ttl=TTL,
        intent_after_seconds=INTENT_AFTER,
        orphan_min_age_seconds=ORPHAN_AGE,
        blob_chunk_size=CHUNK,
    )


async def test_writer_paused_longer_than_its_ttl_mid_upload_never_commits_a_swept_blob(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    writers: Callable[..., Writer],
    tmp_path: Path,
) -> None:
    """The writer stops itself mid-upload before ``intent_after`` (no intent
    yet), stays stopped past its lease TTL and the orphan age, and the GC
    sweeps its blob. Resumed, it must not commit (invariant 1). Breaks
    without the liveness compare and the intent deadline."""
    root, ns = unique_root(), f"p-{uuid.uuid4().hex[:8]}"
    gc_store = await open_store(make_config(root=root, namespace=ns))
    w = writers(writer_config(make_config, root, ns), "stop")
    await async_wait_until(lambda: w.state() == "T", 30, message="writer never stopped")
    directory = tmp_path / "blobs" / encode(ns)
    (blob_id,) = blob_files(directory)
    assert await keys_under(gc_store, gc_store.keys.uploads_prefix) == [], (
        "an intent was put before the pause: this test covers the deferred path"
    )
    live = RootLayout(root).live_prefix
    assert await keys_under(gc_store, live), "no liveness key while uploading"
    await async_wait_until(
        lambda: _none(keys_under(gc_store, live)), 15, message="liveness lease outlived TTL"
    )

    async def swept() -> bool:
        await gc_pass(gc_store, orphan_min_age=ORPHAN_AGE)
        return not (directory / blob_id).exists()

    await async_wait_until(swept, 20, interval=0.5, message="GC never swept the blob")
    w.proc.send_signal(signal.SIGCONT)
    outcome = await w.line()
    assert outcome.startswith("REFUSED"), f"committed a swept blob: {outcome}"
    assert await gc_store.etcd.get(gc_store.keys.handle("chk")) is None
    assert await keys_under(gc_store, gc_store.keys.uploads_prefix) == []


async def _none(keys: Any) -> bool:
    return not await keys


async def test_killed_writers_blobs_are_swept_and_live_uploads_kept_whatever_their_clocks(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    writers: Callable[..., Writer],
    tmp_path: Path,
) -> None:
    """Five writers at once, each in its namespace: three SIGKILLed
    mid-upload (clock right, an hour ahead, an hour behind) and two live
    uploads lasting longer than the orphan age (clock an hour ahead,
    behind). The sweep leaves every blob younger than the orphan age, then
    takes the killed writers' blobs (invariant 5) and never a live upload's
    (its intent covers it); the live uploads then commit readable handles.
    Breaks if a writer's clock ages a blob, or a slow upload puts no intent."""
    root = unique_root()
    gc_store = await open_store(make_config(root=root))
    killed = {f"k{i}-{uuid.uuid4().hex[:6]}": skew for i, skew in enumerate((0, 3600, -3600))}
    live = {f"l{i}-{uuid.uuid4().hex[:6]}": skew for i, skew in enumerate((3600, -3600))}
    procs = {
        ns: writers(writer_config(make_config, root, ns), "kill" if ns in killed else "slow", skew)
        for ns, skew in {**killed, **live}.items()
    }
    for ns in live:
        assert await procs[ns].line() == "UPLOADING"
    for ns in killed:
        await asyncio.to_thread(procs[ns].proc.wait, 30)
    blob_of = {}
    for ns in procs:
        (blob_of[ns],) = blob_files(tmp_path / "blobs" / encode(ns))

    def on_disk(ns: str) -> bool:
        return (tmp_path / "blobs" / encode(ns) / blob_of[ns]).exists()

    first = await gc_pass(gc_store, orphan_min_age=ORPHAN_AGE)
    assert first.orphans == [] and all(on_disk(ns) for ns in procs), "swept a young blob"

    async def killed_swept() -> bool:
        await gc_pass(gc_store, orphan_min_age=ORPHAN_AGE)
        return not any(on_disk(ns) for ns in killed)

    await async_wait_until(killed_swept, 30, interval=0.5, message="killed writers' blobs kept")
    for ns in live:
        view = gc_store.for_namespace(ns)
        assert await keys_under(view, view.keys.uploads_prefix), f"{ns}: no intent"
        assert on_disk(ns), f"{ns}: swept a live upload's blob (skew {live[ns]:+} s)"
        procs[ns].proc.stdin.write(b"go\n")  # type: ignore[union-attr]
        procs[ns].proc.stdin.flush()  # type: ignore[union-attr]
    for ns in live:
        outcome = await procs[ns].line()
        assert outcome.startswith("COMMITTED"), outcome
        h = await gc_store.for_namespace(ns).get("chk")
        assert h.blob_id == blob_of[ns]
        data = await gc_store.for_namespace(ns).read(h)
        assert len(data) == 4 * CHUNK + 3
    for ns in killed:
        assert await gc_store.etcd.get(gc_store.for_namespace(ns).keys.handle("chk")) is None


# -- the service -----------------------------------------------------------------------


async def test_service_that_lost_its_liveness_lease_refuses_the_add_of_a_live_session(
    service_factory: Callable[..., ServiceProcess], etcd: EtcdProcess, namespace: str
) -> None:
    """The client's session lease is alive (kept alive through any replica),
    but the service process lost its own liveness lease mid-upload: the
    commit is refused (503), nothing is written, the session still works.
    Breaks if the service proves the upload with the client's lease."""
    root = unique_root()
    svc = service_factory(root=root)
    live = RootLayout(root).live_prefix
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * CHUNK
        await release.wait()
        yield b"y" * CHUNK

    raw = EtcdClient([etcd.endpoint])
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, trust_env=False) as client:
            r = await client.post("/v1/sessions", json={"ttl_seconds": 60})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            url = f"/v1/namespaces/{namespace}/handles/chk"
            put = asyncio.create_task(
                client.put(url, content=body(), headers={"X-Session-Id": sid})
            )
            try:

                async def live_keys() -> list[Any]:
                    kvs, _ = await raw.range_all(live, prefix_end(live))
                    return kvs

                (kv,) = await async_wait_until(live_keys, 10, message="no liveness key")
                await raw.lease_revoke(kv.lease)  # as if the process was stopped past its TTL
            finally:
                release.set()
            r = await put
            assert r.status_code == 503, r.text
            assert r.json()["type"] == "unavailable"
            assert "liveness" in r.json()["detail"]
            assert (await client.get(url)).status_code == 404
            r = await client.post(f"/v1/sessions/{sid}/keepalive")
            assert r.status_code == 200, r.text
            r = await client.put(url, content=b"again", headers={"X-Session-Id": sid})
            assert r.status_code == 201, r.text
    finally:
        await raw.close()
