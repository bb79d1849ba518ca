"""etcd failures: unreachable, paused, killed, full (NOSPACE), and lost answers.

Real etcd members (``etcd_factory``) are paused, killed and filled; lost
answers are made by a real TCP proxy (statestore/local/faultproxy.py) between the store
and etcd that forwards requests but drops responses. Every outcome is checked
by reading etcd directly, not through the store under test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Gate, OpenStore, async_wait_until

from statestore import StateHandleStore, StoreConfig
from statestore.errors import (
    AlreadyExists,
    PossibleInconsistentState,
    StateStoreError,
    Unavailable,
)
from statestore.etcd import EtcdClient
from statestore.keys import encode, prefix_end
from statestore.local.etcd_process import EtcdProcess, free_port
from statestore.local.faultproxy import FaultProxy


@pytest.fixture
def proxy(etcd: EtcdProcess) -> Any:
    """A fault proxy in front of the session etcd member."""
    p = FaultProxy("127.0.0.1", etcd.client_port)
    yield p
    p.close()


@pytest.fixture
async def direct(etcd: EtcdProcess) -> AsyncIterator[EtcdClient]:
    """A client straight to the session etcd member (not through any proxy)."""
    client = EtcdClient([etcd.endpoint], timeout=5)
    await client.connect()
    yield client
    await client.close()


async def handle_names(client: EtcdClient, store: StateHandleStore) -> list[str]:
    p = store.keys.handles_prefix
    kvs, _ = await client.range_all(p, prefix_end(p), keys_only=True)
    return sorted(
        name
        for name, holder in map(store.keys.parse_handles_key, (kv.key for kv in kvs))
        if holder is None
    )


async def timed(coro: Awaitable[Any], limit: float) -> tuple[Any, BaseException | None, float]:
    """Run ``coro`` with a hard limit: (result, error, seconds). A hang shows as TimeoutError."""
    start = time.monotonic()
    try:
        return await asyncio.wait_for(coro, limit), None, time.monotonic() - start
    except Exception as e:
        return None, e, time.monotonic() - start


# -- etcd unreachable ---------------------------------------------------------------


async def test_unreachable_etcd_fails_fast(make_config: Callable[..., StoreConfig]) -> None:
    cfg = make_config(etcd_endpoints=[f"127.0.0.1:{free_port()}"], etcd_timeout=2)
    start = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(StateHandleStore.open(cfg), 30)
    elapsed = time.monotonic() - start
    print(f"\nunreachable etcd -> Unavailable after {elapsed:.2f}s")
    assert elapsed < 5, f"open() took {elapsed:.2f}s to report an unreachable etcd"
    assert cfg.etcd_endpoints[0] in info.value.message


async def test_paused_etcd_gives_errors_not_hangs(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    member = etcd_factory()
    timeout = 1.0
    bound = timeout * 3 + 2
    store = await open_store(
        make_config(etcd_endpoints=[member.endpoint], etcd_timeout=timeout, lease_ttl=10)
    )
    before = await store.add_and_lock("before", b"state before")

    member.pause()
    try:
        (_, get_err, get_s), (_, add_err, add_s), (_, all_err, all_s) = await asyncio.gather(
            timed(store.get("before"), bound + 10),
            timed(store.add_and_lock("during", b"state during"), bound + 10),
            timed(store.get_all_and_lock(), bound + 10),
        )
    finally:
        member.resume()
    print(f"\npaused etcd: get {get_s:.2f}s, add_and_lock {add_s:.2f}s, get_all {all_s:.2f}s")
    assert isinstance(get_err, Unavailable), repr(get_err)
    assert isinstance(all_err, Unavailable), repr(all_err)
    assert isinstance(add_err, Unavailable | PossibleInconsistentState), repr(add_err)
    assert get_s <= bound, f"get took {get_s:.2f}s (bound {bound}s)"
    assert all_s <= bound, f"get_all_and_lock took {all_s:.2f}s (bound {bound}s)"
    assert add_s <= bound, (
        f"add_and_lock took {add_s:.2f}s against a paused etcd (bound {bound}s, "
        f"etcd_timeout {timeout}s); raised {add_err!r}"
    )

    # Resumed: the store works again.
    async def works() -> bool:
        return (await store.get("before")).version == before.version

    await async_wait_until(works, timeout=15, ignore=(StateStoreError,))
    after = await async_wait_until(
        lambda: store.add_and_lock("after", b"state after"), timeout=15, ignore=(StateStoreError,)
    )
    assert await store.read(after) == b"state after"
    # Whatever became of "during" (etcd may apply requests buffered while
    # paused), a visible handle must point at its intact blob (invariant 1).
    kv = await store.etcd.get(store.keys.handle("during"))
    if kv is not None:
        assert await store.read("during") == b"state during"


async def test_killed_and_restarted_etcd_store_recovers(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    member = etcd_factory()
    ttl = 3
    store = await open_store(
        make_config(etcd_endpoints=[member.endpoint], etcd_timeout=2, lease_ttl=ttl)
    )
    h = await store.add_and_lock("acked", b"acknowledged state")
    old_lease = store.session.lease_id

    member.kill()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(store.get("acked"), 10)
    await asyncio.to_thread(member.restart)

    async def readable() -> bool:
        return (await store.get("acked")).version == h.version

    await async_wait_until(readable, timeout=15, ignore=(StateStoreError,))

    # The lease keeps working (etcd restores leases on restart) or, if it
    # expired meanwhile, the session replaced it: either way it is alive.
    async def lease_alive() -> bool:
        lease = store.session.lease_id
        return await store.etcd.lease_ttl(lease) > 0 and lease == store.session.lease_id

    await async_wait_until(lease_alive, timeout=ttl + 10, ignore=(StateStoreError,))
    lease = store.session.lease_id
    if lease == old_lease:
        kv = await store.etcd.get(store.keys.lock("acked", store.instance_id))
        assert kv is not None and kv.lease == lease, "lease survived but its lock did not"
    print(f"\netcd killed and restarted: lease {'kept' if lease == old_lease else 'replaced'}")
    assert await store.read("acked") == b"acknowledged state"
    await async_wait_until(
        lambda: store.get_and_lock("acked"), timeout=ttl + 10, ignore=(StateStoreError,)
    )
    lock_key = store.keys.lock("acked", store.instance_id)
    kv = await store.etcd.get(lock_key)
    assert kv is not None and kv.lease == store.session.lease_id
    # The keepalive works against the restarted member: the lock outlives
    # its TTL (checked continuously for TTL + 1 s).
    end = time.monotonic() + ttl + 1
    while time.monotonic() < end:
        kv = await store.etcd.get(lock_key)
        assert kv is not None and kv.lease == lease, "the lock expired: keepalive is not working"
        await asyncio.sleep(0.2)


# -- NOSPACE ----------------------------------------------------------------------------


async def test_nospace_alarm_is_clear_and_writes_nothing(
    etcd_factory: Callable[..., EtcdProcess],
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
) -> None:
    # 4 MiB quota: etcd raises the alarm after about a dozen 1 MiB puts.
    member = etcd_factory("--quota-backend-bytes", str(4 * 1024 * 1024))
    store = await open_store(make_config(etcd_endpoints=[member.endpoint], lease_ttl=10))
    await store.add_and_lock("first", b"fits")

    scratch = store.keys.ns_prefix + b"scratch/"
    value = b"v" * (1024 * 1024)
    for i in range(100):  # bounded: ~13 puts fill a 4 MiB quota
        try:
            await store.etcd.put(scratch + str(i).encode(), value)
        except Unavailable as e:
            assert "NOSPACE" in e.message
            break
    else:
        pytest.fail("etcd never raised NOSPACE after 100 MiB of puts")
    assert "NOSPACE" in await store.etcd.alarms()

    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(store.add_and_lock("second", b"does not fit"), 30)
    msg = info.value.message
    assert "NOSPACE" in msg
    assert "compact" in msg and "defrag" in msg and "alarm disarm" in msg, msg
    assert info.value.http_status == 503
    assert await handle_names(store.etcd, store) == ["first"], "nothing new may become visible"
    assert await store.etcd.get(store.keys.lock("second", store.instance_id)) is None
    up = store.keys.upload("")
    assert (await store.etcd.range_all(up, prefix_end(up)))[0] == []
    blob_dir = tmp_path / "blobs" / encode(store.namespace)
    first = await store.get("first")
    assert sorted(p.name for p in blob_dir.iterdir()) == [first.blob_id], (
        "the refused add left a blob behind"
    )


# -- lost answers (fault proxy) ------------------------------------------------------


async def test_ambiguous_add_resolved_by_request_id(
    proxy: FaultProxy,
    direct: EtcdClient,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    store = await open_store(
        make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=1, lease_ttl=10)
    )
    hkey = store.keys.handle("x")
    gate = Gate(b"payload of x")
    task = asyncio.create_task(store.add_and_lock("x", gate))
    try:
        # The blob is being written: the intent was acknowledged; next comes the txn.
        await asyncio.wait_for(gate.started.wait(), 10)
        proxy.set_mode("drop_responses")
        gate.release.set()
        # The txn reaches etcd and is applied; only its answer is lost.
        await async_wait_until(lambda: direct.get(hkey), timeout=10, interval=0.01)
        assert not task.done(), "add_and_lock returned although etcd's answer was dropped"
        proxy.set_mode("forward", cut=True)
        h = await asyncio.wait_for(task, 20)
    finally:
        proxy.set_mode("forward")
        gate.release.set()
    assert proxy.bytes_dropped > 0

    kv = await direct.get(hkey)
    assert kv is not None
    assert h.name == "x" and h.version == kv.mod_revision
    assert await handle_names(direct, store) == ["x"]
    lp = store.keys.lock_prefix("x")
    locks, _ = await direct.range_all(lp, prefix_end(lp))
    assert [(lk.key, lk.lease) for lk in locks] == [
        (store.keys.lock("x", store.instance_id), store.session.lease_id)
    ]
    assert await store.read("x") == b"payload of x"
    gc = store.keys.gc("")
    assert (await direct.range_all(gc, prefix_end(gc)))[0] == []
    up = store.keys.upload("")
    assert (await direct.range_all(up, prefix_end(up)))[0] == [], "the commit drops the intent"


async def test_ambiguous_add_losing_to_other_writer_never_succeeds(
    proxy: FaultProxy,
    direct: EtcdClient,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
) -> None:
    other = await open_store(make_config(blob_root=f"file://{tmp_path}/other-blobs"))
    store = await open_store(
        make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=1, lease_ttl=10)
    )
    hkey = store.keys.handle("x")
    gate = Gate(b"my state")
    task = asyncio.create_task(store.add_and_lock("x", gate))
    try:
        # Our add has checked that "x" is free and is writing its blob ...
        await asyncio.wait_for(gate.started.wait(), 10)
        # ... when another writer takes the name (straight to etcd).
        theirs = await other.add_and_lock("x", b"their state")
        proxy.set_mode("drop_responses")
        dropped = proxy.bytes_dropped
        gate.release.set()
        # etcd answers our txn (compare failed), and the answer is lost.
        await async_wait_until(
            lambda: task.done() or proxy.bytes_dropped > dropped, timeout=10, interval=0.005
        )
        proxy.set_mode("forward", cut=True)
        _, err, secs = await timed(task, 30)
    finally:
        proxy.set_mode("forward")
        gate.release.set()
    print(f"\nambiguous add losing to another writer: {err!r} after {secs:.2f}s")
    assert isinstance(err, AlreadyExists | PossibleInconsistentState), repr(err)

    kv = await direct.get(hkey)
    assert kv is not None and kv.mod_revision == theirs.version, "their handle was changed"
    assert (await other.get("x")).request_id == theirs.request_id
    assert await other.read("x") == b"their state"
    assert await store.holders("x") == [other.instance_id]
    gc = store.keys.gc("")
    assert (await direct.range_all(gc, prefix_end(gc)))[0] == []


async def test_answers_lost_throughout_never_report_success(
    proxy: FaultProxy,
    direct: EtcdClient,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    tmp_path: Path,
) -> None:
    """Every answer lost from the first request on, over a name another
    instance already holds: the add must fail (it cannot even confirm its
    upload intent, so ``Unavailable`` is right too) and change nothing."""
    other = await open_store(make_config(blob_root=f"file://{tmp_path}/other-blobs"))
    theirs = await other.add_and_lock("x", b"their state")
    timeout = 1.0
    store = await open_store(
        make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=timeout, lease_ttl=10)
    )
    try:
        proxy.set_mode("drop_responses")
        _, err, secs = await timed(store.add_and_lock("x", b"my state"), 30)
    finally:
        proxy.set_mode("forward", cut=True)
    print(f"\nall answers lost: {err!r} after {secs:.2f}s")
    assert proxy.bytes_dropped > 0
    assert isinstance(err, AlreadyExists | PossibleInconsistentState | Unavailable), repr(err)
    assert secs <= 8 * timeout, f"took {secs:.2f}s with etcd_timeout {timeout}s"
    kv = await direct.get(store.keys.handle("x"))
    assert kv is not None and kv.mod_revision == theirs.version
    assert await other.read("x") == b"their state"
    assert await handle_names(direct, store) == ["x"]
    lp = store.keys.lock_prefix("x")
    assert [k.key for k in (await direct.range_all(lp, prefix_end(lp)))[0]] == [
        store.keys.lock("x", other.instance_id)
    ]


async def test_refused_connections_give_unavailable_and_nothing_visible(
    proxy: FaultProxy,
    direct: EtcdClient,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
) -> None:
    timeout = 1.0
    store = await open_store(
        make_config(etcd_endpoints=[proxy.endpoint], etcd_timeout=timeout, lease_ttl=10)
    )
    await store.add_and_lock("warm", b"connection in use")
    try:
        proxy.set_mode("refuse")
        _, err, secs = await timed(store.add_and_lock("y", b"state of y"), 30)
    finally:
        proxy.set_mode("forward")
    print(f"\nrefused connections: {err!r} after {secs:.2f}s")
    assert isinstance(err, Unavailable), repr(err)
    assert secs <= timeout * 3 + 2, f"took {secs:.2f}s"
    assert await handle_names(direct, store) == ["warm"]
    assert await direct.get(store.keys.lock("y", store.instance_id)) is None

    h = await async_wait_until(
        lambda: store.add_and_lock("y", b"state of y"), timeout=15, ignore=(Unavailable,)
    )
    assert await handle_names(direct, store) == ["warm", "y"]
    assert await store.read(h) == b"state of y"


def test_readyz_reports_the_nospace_alarm(
    etcd_factory: Callable[..., EtcdProcess], service_factory: Callable[..., Any]
) -> None:
    """etcd answers Status under NOSPACE while every write fails: /readyz must say 503."""
    import httpx

    member = etcd_factory("--quota-backend-bytes", str(4 * 1024 * 1024))
    svc = service_factory(etcd_endpoints=member.endpoint, maintenance="false")
    with httpx.Client(base_url=svc.url, trust_env=False, timeout=30) as c:
        assert c.get("/readyz").status_code == 200

        async def fill() -> None:
            async with EtcdClient([member.endpoint], timeout=5) as client:
                for i in range(100):  # bounded: ~13 puts of 1 MiB fill a 4 MiB quota
                    try:
                        await client.put(b"/scratch/%d" % i, b"v" * (1024 * 1024))
                    except Unavailable:
                        return
                pytest.fail("etcd never raised NOSPACE")

        asyncio.run(fill())
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["type"] == "unavailable"
        assert "NOSPACE" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
