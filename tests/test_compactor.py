"""The compactor: the Kubernetes apiserver algorithm, about one compaction per
interval however many service replicas run it (protocol.md section 5).

Each test runs on an etcd member of its own: compaction affects the whole
keyspace. Whether etcd compacted is read from etcd itself: a read at a
revision below the compaction point raises ``Compacted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from statestore.errors import InvalidArgument
from statestore.etcd import Compacted, EtcdClient
from statestore.local.etcd_process import EtcdProcess
from statestore.maintenance.compactor import Compactor

INTERVAL = 1.0


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[EtcdProcess], EtcdClient]]:
    made: list[EtcdClient] = []

    def make(member: EtcdProcess) -> EtcdClient:
        client = EtcdClient([member.endpoint])
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def is_compacted(client: EtcdClient, key: bytes, revision: int) -> bool:
    """True when etcd refuses a read at ``revision`` as compacted."""
    try:
        await client.get(key, revision=revision)
    except Compacted:
        return True
    return False


def test_interval_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        Compactor(EtcdClient(["127.0.0.1:1"]), "/x", 0)


async def test_first_round_never_compacts_then_one_compaction_per_round_of_replicas(
    etcd_factory: Callable[..., EtcdProcess], clients: Callable[[EtcdProcess], EtcdClient]
) -> None:
    member = etcd_factory()
    client = clients(member)
    root = f"/t-{uuid.uuid4().hex}"
    key = f"{root}/data".encode()
    first_rev = await client.put(key, b"0")
    for i in range(20):
        await client.put(key, str(i).encode())
    replicas = [Compactor(clients(member), root, INTERVAL) for _ in range(3)]

    # Bootstrap: nobody has seen a revision yet, so nobody compacts.
    assert [await c.round() for c in replicas] == [False, False, False]
    assert all(c.state.compactions == 0 for c in replicas)
    assert not await is_compacted(client, key, first_rev), "compacted on the first round"
    version = (await client.get(f"{root}/_compactor".encode())).version  # type: ignore[union-attr]
    assert version == 1, "exactly one replica won the first CAS"

    # Every later round of the three replicas: exactly one compaction, to the
    # revision the winner saw one round earlier (never the current one).
    last = 0
    for cycle in range(4):
        before = (await client.status()).revision
        results = [await c.round() for c in replicas]
        assert results.count(True) == 1, (cycle, results)
        winner = replicas[results.index(True)]
        target = winner.state.last_compacted
        assert last < target <= before, (cycle, last, target, before)
        assert await is_compacted(client, key, target - 1)
        assert not await is_compacted(client, key, target)
        last = target
        await client.put(key, f"cycle {cycle}".encode())
    assert sum(c.state.compactions for c in replicas) == 4


async def test_concurrent_replicas_compact_about_once_per_interval(
    etcd_factory: Callable[..., EtcdProcess], clients: Callable[[EtcdProcess], EtcdClient]
) -> None:
    member = etcd_factory()
    client = clients(member)
    root = f"/t-{uuid.uuid4().hex}"
    key = f"{root}/data".encode()
    first_rev = await client.put(key, b"start")
    stop_writes = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop_writes.is_set():
            await client.put(key, str(i).encode())
            i += 1
            await asyncio.sleep(0.01)

    replicas = [Compactor(clients(member), root, INTERVAL) for _ in range(3)]
    writes = asyncio.create_task(writer())
    tasks = [asyncio.create_task(c.run()) for c in replicas]
    started = time.monotonic()
    try:
        await asyncio.sleep(3.5)  # the replicas run on their own interval meanwhile
        # The replica doing the compactions dies: the others carry on.
        leader = max(replicas, key=lambda c: c.state.compactions)
        index = replicas.index(leader)
        leader.stop()
        tasks[index].cancel()
        await asyncio.gather(tasks[index], return_exceptions=True)
        at_death = {id(c): c.state.compactions for c in replicas}
        await asyncio.sleep(3.5)
    finally:
        elapsed = time.monotonic() - started
        for c in replicas:
            c.stop()
        for t in tasks:
            t.cancel()
        stop_writes.set()
        await asyncio.gather(*tasks, writes, return_exceptions=True)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                assert t.cancelled() or t.exception() is None, t.exception()

    counts = [c.state.compactions for c in replicas]
    total = sum(counts)
    after_death = total - sum(at_death.values())
    print(
        f"\n3 compactors, interval {INTERVAL}s, {elapsed:.1f}s: compactions per replica "
        f"{counts} (total {total}, {total / (elapsed / INTERVAL):.2f} per interval); "
        f"{after_death} after replica {index} died"
    )
    assert total >= 2, counts
    assert total <= elapsed / INTERVAL + 2, f"{total} compactions in {elapsed:.1f}s: too many"
    assert after_death >= 1, "nobody compacted after the compacting replica died"
    # etcd really compacted, up to the latest target, and not beyond it.
    latest = max(c.state.last_compacted for c in replicas)
    assert latest > first_rev
    assert await is_compacted(client, key, first_rev)
    assert await is_compacted(client, key, latest - 1)
    assert not await is_compacted(client, key, latest)
    # The target is always at least one interval old: never the newest revision.
    assert latest < (await client.status()).revision
