"""Leader info and the withdrawal of cancelled campaigns (``LeaderElection``).

Everything runs against real etcd. What a call left behind is read back raw:
the ``leader/`` and ``leader-info/`` keys, their create and mod revisions,
and the revisions a watch of the namespace prefix reports. "In the same
instant" is checked literally: the deletions of the leader key and of its
info arrive in one revision.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from helpers import OpenStore, async_wait_until, running

from statestore import StateHandleStore, StoreConfig
from statestore.election import (
    MAX_INFO_ENTRIES,
    MAX_INFO_VALUE_BYTES,
    LeaderElection,
    leadership_of,
)
from statestore.errors import Fenced, InvalidArgument, NotLeader, TooLarge
from statestore.etcd import KV
from statestore.keys import prefix_end
from statestore.records import LeaderInfo

ODD_KEYS = ["address", "a/b", "/lead", "a%2Fb", "x y/ü ✓", "..", "info/../../leader/x"]


async def raw_kvs(store: StateHandleStore, prefix: bytes) -> list[KV]:
    kvs, _ = await store.etcd.range_all(prefix, prefix_end(prefix))
    return kvs


async def raw_info(store: StateHandleStore) -> dict[str, LeaderInfo]:
    """Every info entry under ``leader-info/``, decoded, straight from etcd."""
    keys = store.keys
    return {
        keys.parse_leader_info_key(kv.key): LeaderInfo.decode(kv.value)
        for kv in await raw_kvs(store, keys.leader_info_prefix)
    }


async def deletions(
    store: StateHandleStore, start_revision: int, expect: set[bytes], timeout: float = 15
) -> dict[bytes, int]:
    """Watch the namespace prefix from ``start_revision`` until every key of
    ``expect`` was deleted: ``{key: revision of its deletion}``."""
    ns = store.keys.ns_prefix
    seen: dict[bytes, int] = {}

    async def watch() -> None:
        async for revision, events in store.etcd.watch(
            ns, prefix_end(ns), start_revision=start_revision
        ):
            for kind, kv in events:
                if kind == "delete":
                    seen[kv.key] = revision
            if expect <= set(seen):
                return

    await asyncio.wait_for(watch(), timeout)
    return seen


async def leading(make_config: Callable[..., StoreConfig], open_store: OpenStore) -> Any:
    store = await open_store(make_config())
    election = LeaderElection(store)
    token = await election.campaign(timeout=5)
    return store, election, token


# -- publish, read, remove ------------------------------------------------------------


async def test_published_info_reads_back_with_its_leadership(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, ea, token = await leading(make_config, open_store)
    values: dict[str, Any] = {
        "address": "jm-1.example:6123",
        "a/b": {"nested": [1, 2.5, None, True, "é"]},
        "/lead": None,
        "a%2Fb": [],
        "x y/ü ✓": 0,
        "..": "dots",
        "info/../../leader/x": "climbs nowhere",
    }
    for key, value in values.items():
        await ea.publish_info(key, value)
    leadership, revision = await ea.leadership()
    assert leadership is not None
    assert (leadership.leader, leadership.fencing_token) == (a.instance_id, token)
    assert leadership.info == values
    assert list(leadership.info) == sorted(values)
    assert leadership.to_json() == {"leader": a.instance_id, "fencing_token": token, "info": values}
    assert revision >= token
    # Raw: one key per entry, each carrying the token and on the leader's lease.
    raw = await raw_kvs(a, a.keys.leader_info_prefix)
    assert len(raw) == len(values)
    assert {kv.lease for kv in raw} == {a.session.lease_id}
    assert {LeaderInfo.decode(kv.value).token for kv in raw} == {token}
    # Keys never alias a candidate key: the line still holds A only.
    assert [kv.key for kv in await raw_kvs(a, a.keys.leader_prefix)] == [ea.leader_key]

    # Replace one, remove two (one of them absent: no error).
    await ea.publish_info("address", "jm-1.example:7000")
    await ea.remove_info("a/b")
    await ea.remove_info("never-published")
    leadership, _ = await ea.leadership()
    assert leadership is not None
    expected = {k: v for k, v in values.items() if k != "a/b"} | {"address": "jm-1.example:7000"}
    assert leadership.info == expected


async def test_nobody_leads_reads_none(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    assert (await LeaderElection(store).leadership())[0] is None


async def test_only_the_leader_publishes_and_removes(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, ea, token = await leading(make_config, open_store)
    b = await open_store(make_config())
    eb = LeaderElection(b)
    await ea.publish_info("address", "a")

    # Not a candidate at all, and a candidate waiting in line: both refused.
    async with running(eb.campaign()):
        for _ in range(2):
            with pytest.raises(NotLeader) as info:
                await eb.publish_info("address", "b")
            assert info.value.details["leader"] == a.instance_id
            assert info.value.details["fencing_token"] == token
            assert a.instance_id in str(info.value) and "nothing was written" in str(info.value)
            with pytest.raises(NotLeader):
                await eb.remove_info("address")
            assert await raw_info(a) == {"address": LeaderInfo(token, "a")}

            async def b_in_line() -> bool:
                return len(await raw_kvs(a, a.keys.leader_prefix)) == 2

            await async_wait_until(b_in_line, 10, message="B never lined up")

    # Nobody leads: NotLeader names no leader.
    await ea.resign()
    with pytest.raises(NotLeader) as info:
        await eb.publish_info("address", "b")
    assert info.value.details["leader"] is None
    assert await raw_info(a) == {}


async def test_another_object_of_the_leading_instance_may_publish(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """The REST service builds one election object per request: one that did
    not win the campaign learns from etcd that its instance leads."""
    a, _, token = await leading(make_config, open_store)
    fresh = LeaderElection(a)
    assert not fresh.is_leader
    await fresh.publish_info("address", "a")
    assert fresh.is_leader and fresh.token == token
    await LeaderElection(a).remove_info("address")
    assert await raw_info(a) == {}


async def test_deposed_leader_still_believing_it_leads_writes_no_info(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A's lease is revoked behind its back (as by a long pause): A's object
    still claims leadership, but etcd refuses its info, and B's leadership
    shows only B's info."""
    a, ea, token_a = await leading(make_config, open_store)
    await ea.publish_info("address", "a-old")
    b = await open_store(make_config())
    await b.etcd.lease_revoke(a.session.lease_id)
    eb = LeaderElection(b)
    token_b = await eb.campaign(timeout=5)
    assert token_b > token_a
    assert await raw_info(b) == {}  # A's info went with A's lease

    with pytest.raises(NotLeader) as info:
        await ea.publish_info("address", "a-zombie")
    assert info.value.details["leader"] == b.instance_id
    assert not ea.is_leader
    with pytest.raises(NotLeader):
        await ea.remove_info("address")
    await eb.publish_info("address", "b")
    leadership, _ = await eb.leadership()
    assert leadership is not None
    assert (leadership.leader, leadership.fencing_token) == (b.instance_id, token_b)
    assert leadership.info == {"address": "b"}
    assert await raw_info(b) == {"address": LeaderInfo(token_b, "b")}
    # Fencing by token is unaffected by info keys: B's fence passes, A's fails.
    fenced_b = b.with_fencing(eb)
    await fenced_b.add_and_lock("h", b"x")
    with pytest.raises(Fenced):
        await a.with_fencing(ea).add_and_lock("zombie", b"x")


def test_a_reader_never_pairs_a_token_with_another_leaderships_info() -> None:
    """``leadership_of`` shows only entries written under the leading token
    (however an entry of another token came to be there)."""
    from statestore.keys import Layout

    layout = Layout("/statestore/v1", "ns")
    cand = [KV(layout.leader("b"), b"b", 20, 20, 1, 7), KV(layout.leader("c"), b"c", 30, 30, 1, 8)]
    infos = [
        KV(layout.leader_info("mine"), LeaderInfo(20, "b").encode(), 21, 21, 1, 7),
        KV(layout.leader_info("old"), LeaderInfo(10, "a").encode(), 11, 11, 1, 6),
        KV(layout.leader_info("junk"), b"not json", 12, 12, 1, 6),
    ]
    got = leadership_of(layout, cand, infos)
    assert got is not None
    assert got.to_json() == {"leader": "b", "fencing_token": 20, "info": {"mine": "b"}}
    assert leadership_of(layout, [], infos) is None


# -- limits --------------------------------------------------------------------------


async def test_info_values_and_keys_are_checked_before_anything_is_written(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, ea, _ = await leading(make_config, open_store)
    # Exactly the limit (compact UTF-8 JSON: a string of n bytes is n + 2).
    at_limit = "x" * (MAX_INFO_VALUE_BYTES - 2)
    await ea.publish_info("big", at_limit)
    # Non-ASCII counts by its UTF-8 bytes, not by its \\u escapes.
    await ea.publish_info("wide", "é" * ((MAX_INFO_VALUE_BYTES - 2) // 2))
    with pytest.raises(TooLarge):
        await ea.publish_info("big", at_limit + "x")
    for bad in (float("nan"), float("inf"), (1, 2), {1: "a"}, {"s": {1, 2}}, b"bytes", "\ud800"):
        with pytest.raises(InvalidArgument):
            await ea.publish_info("bad", bad)
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidArgument, match="nested"):
        await ea.publish_info("bad", deep)
    for key in ("", "a\nb", "x" * 513, 5):
        with pytest.raises(InvalidArgument):
            await ea.publish_info(key, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await ea.remove_info(key)  # type: ignore[arg-type]
    info = await raw_info(a)
    assert set(info) == {"big", "wide"} and info["big"].value == at_limit


async def test_the_entry_limit_is_exact_under_concurrent_publishes(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MAX_INFO_ENTRIES == 256  # the documented limit; lowered below to keep this quick
    monkeypatch.setattr("statestore.election.MAX_INFO_ENTRIES", 4)
    a, ea, _ = await leading(make_config, open_store)
    for i in range(3):
        await ea.publish_info(f"k{i}", i)
    # Five new keys race for the one free place: exactly one gets it.
    results = await asyncio.gather(
        *(LeaderElection(a).publish_info(f"new{i}", i) for i in range(5)), return_exceptions=True
    )
    assert sum(r is None for r in results) == 1, results
    assert all(isinstance(r, TooLarge) for r in results if r is not None), results
    assert len(await raw_info(a)) == 4
    # At the limit an existing key may still be replaced, and a removal frees a place.
    await ea.publish_info("k0", "replaced")
    with pytest.raises(TooLarge, match="limit is 4"):
        await ea.publish_info("another", 1)
    await ea.remove_info("k1")
    await ea.publish_info("another", 1)
    assert len(await raw_info(a)) == 4


async def test_an_election_under_another_prefix_publishes_no_info(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    store = await open_store(make_config())
    election = LeaderElection(store, prefix=store.keys.ns_prefix + b"other-election/")
    await election.campaign(timeout=5)
    with pytest.raises(InvalidArgument):
        await election.publish_info("address", "x")
    await election.resign()


# -- the info ends in the same revision as its leadership -----------------------------


async def test_resign_deletes_the_key_and_the_info_in_one_revision(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, ea, _ = await leading(make_config, open_store)
    for key in ("address", "rest/url"):
        await ea.publish_info(key, key)
    start = (await a.etcd.status()).revision + 1
    expect = {ea.leader_key} | {kv.key for kv in await raw_kvs(a, a.keys.leader_info_prefix)}
    await ea.resign()
    seen = await deletions(a, start, expect)
    assert len(set(seen.values())) == 1, seen
    assert await raw_kvs(a, a.keys.leader_info_prefix) == []
    assert (await ea.leadership())[0] is None


async def test_waiting_candidate_resigning_leaves_the_leaders_info(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, ea, token = await leading(make_config, open_store)
    await ea.publish_info("address", "a")
    b = await open_store(make_config())
    eb = LeaderElection(b)
    async with running(eb.campaign()):

        async def b_in_line() -> bool:
            return len(await raw_kvs(a, a.keys.leader_prefix)) == 2

        await async_wait_until(b_in_line, 10, message="B never lined up")
        await eb.resign()
    assert [kv.key for kv in await raw_kvs(a, a.keys.leader_prefix)] == [ea.leader_key]
    assert await raw_info(a) == {"address": LeaderInfo(token, "a")}


async def test_lease_end_deletes_the_key_and_the_info_in_one_revision(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """Revoked (REST: session deleted) and expired (not kept alive) alike:
    etcd deletes every key of the lease in one revision."""
    a, ea, _ = await leading(make_config, open_store)
    await ea.publish_info("address", "a")
    observer = await open_store(make_config())
    start = (await a.etcd.status()).revision + 1
    expect = {ea.leader_key, a.keys.leader_info("address")}
    await observer.etcd.lease_revoke(a.session.lease_id)
    seen = await deletions(observer, start, expect)
    assert len(set(seen.values())) == 1, seen

    # Expiry: a lease nobody keeps alive.
    lease, _ = await observer.etcd.lease_grant(2)
    key = observer.keys.leader("expiring")
    await observer.etcd.put(key, b"expiring", lease=lease)
    info = observer.keys.leader_info("address")
    await observer.etcd.put(info, LeaderInfo(1, "x").encode(), lease=lease)
    start = (await observer.etcd.status()).revision + 1
    seen = await deletions(observer, start, {key, info}, timeout=20)
    assert len(set(seen.values())) == 1, seen


# -- cancelled campaigns withdraw --------------------------------------------------------


async def test_a_cancelled_campaign_withdraws_its_candidacy(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    a, ea, token = await leading(make_config, open_store)
    b, c = await open_store(make_config()), await open_store(make_config())
    eb, ec = LeaderElection(b), LeaderElection(c)
    task_b = asyncio.create_task(eb.campaign())

    async def line_length(n: int) -> bool:
        return len(await raw_kvs(a, a.keys.leader_prefix)) == n

    await async_wait_until(lambda: line_length(2), 10, message="B never lined up")
    async with running(ec.campaign(timeout=30)) as task_c:
        await async_wait_until(lambda: line_length(3), 10, message="C never lined up")
        task_b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task_b
        # Withdrawn before the cancellation reached the caller.
        line = await raw_kvs(a, a.keys.leader_prefix)
        assert sorted(kv.key for kv in line) == sorted([ea.leader_key, ec.leader_key])
        # The leader goes: C, not B, is next.
        await ea.resign()
        token_c = await asyncio.wait_for(task_c, 10)
        assert token_c > token
        assert await ec.leader() == (c.instance_id, token_c)
        assert not eb.is_leader


async def test_a_cancelled_campaign_of_the_leader_keeps_its_leadership(
    make_config: Callable[..., StoreConfig], open_store: OpenStore
) -> None:
    """A campaign that found the instance already leading (another object's
    win) put no key: cancelling it must not resign."""
    a, ea, token = await leading(make_config, open_store)
    await ea.publish_info("address", "a")
    again = asyncio.create_task(LeaderElection(a).campaign(timeout=5))
    assert await again == token
    task = asyncio.create_task(LeaderElection(a).campaign(timeout=5))
    await asyncio.sleep(0)  # started: _enter is on its way
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    leadership, _ = await ea.leadership()
    assert leadership is not None
    assert leadership.to_json() == {
        "leader": a.instance_id,
        "fencing_token": token,
        "info": {"address": "a"},
    }
