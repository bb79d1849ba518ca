"""``StateHandleStore.watch`` and the decoder it shares with the REST watch
(statestore/watch.py), against real etcd.

The decoder from etcd changes to events (pure, from hand-made key-values);
the SDK stream's events for handles and leadership; its resumption where a
cut connection broke it (through ``FaultProxy``), with every change once;
its re-listing after its position was compacted, with synthetic events for
what changed meanwhile; and its refusals (compacted or future ``since``,
unknown kinds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import async_wait_until, handle_record

from statestore import LeaderElection, StoreConfig
from statestore.election import Leadership
from statestore.errors import Compacted, InvalidArgument
from statestore.etcd import KV
from statestore.keys import Layout, prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.local.faultproxy import FaultProxy
from statestore.records import LeaderInfo, encode_holder
from statestore.watch import (
    EventDecoder,
    HandleEvent,
    LeaderEvent,
    WatchEvent,
    parse_kinds,
    watch_range,
)

OpenStore = Callable[..., Any]
KEYS = Layout("/r", "ns")


def kv(key: bytes, value: bytes, rev: int, create: int | None = None, lease: int = 0) -> KV:
    return KV(key, value, create or rev, rev, 1, lease)


# -- the decoder ------------------------------------------------------------------------


def test_decoder_handle_events_and_no_lock_events() -> None:
    d = EventDecoder(KEYS, [], [])
    events = d.decode(
        [
            ("put", kv(KEYS.handle("a/b"), handle_record("a/b"), 5)),
            ("put", kv(KEYS.lock("a/b", "i1"), b"i1", 5)),
            ("put", kv(KEYS.lock("a/b", "i2"), b"i2", 6)),
            ("delete", kv(KEYS.lock("a/b", "i1"), b"", 7)),
            ("delete", kv(KEYS.handle("a/b"), b"", 8)),
            ("put", kv(KEYS.handle("bad"), b"not a record", 9)),
        ]
    )
    assert [(e.type, e.name, e.revision) for e in events if isinstance(e, HandleEvent)] == [
        ("put", "a/b", 5),
        ("delete", "a/b", 8),
        ("put", "bad", 9),
    ]
    put = events[0]
    assert isinstance(put, HandleEvent) and put.handle is not None
    assert put.handle.version == 5 and put.handle.metadata == {"k": 1}
    assert events[1].handle is None and events[2].handle is None  # type: ignore[union-attr]
    assert put.to_json() == {
        "kind": "handle",
        "type": "put",
        "name": "a/b",
        "revision": 5,
        "handle": put.handle.to_json(),
    }


def test_decoder_leader_events_only_when_leadership_changes() -> None:
    first = kv(KEYS.leader("i1"), encode_holder("i1"), 10, lease=1)
    d = EventDecoder(KEYS, [first], [])
    assert d.leadership == Leadership("i1", 10, {})
    info = kv(KEYS.leader_info("addr"), LeaderInfo(10, "h:1").encode(), 11, lease=1)
    stale = kv(KEYS.leader_info("old"), LeaderInfo(3, "x").encode(), 12)
    behind = kv(KEYS.leader("i2"), encode_holder("i2"), 13, lease=2)
    events = d.decode(
        [
            ("put", info),  # info of the leader's token: an event
            ("put", stale),  # another token's: none
            ("put", behind),  # a candidate behind the leader: none
            ("delete", kv(behind.key, b"", 14)),  # and leaving: none
            # The leader's lease expires: key and info in one revision, one event.
            ("delete", kv(first.key, b"", 15)),
            ("delete", kv(info.key, b"", 15)),
        ]
    )
    assert events == [
        LeaderEvent(11, Leadership("i1", 10, {"addr": "h:1"})),
        LeaderEvent(15, None),
    ]
    assert events[1].to_json() == {"kind": "leader", "revision": 15, "leader": None}


def test_kinds_and_the_watched_range() -> None:
    assert parse_kinds(None) == parse_kinds("handles,leader") == {"handles", "leader"}
    assert parse_kinds(["leader"]) == {"leader"}
    for bad in ("handles,events", "", ["x"]):
        with pytest.raises(InvalidArgument):
            parse_kinds(bad)
    start, end = watch_range(KEYS, parse_kinds(None), None)
    for key in (KEYS.handle("a"), KEYS.lock("a", "i"), KEYS.leader("i"), KEYS.leader_info("k")):
        assert start <= key < end
    for key in (KEYS.gc("b"), KEYS.upload("b"), KEYS.counter("c"), KEYS.removal("a")):
        assert not start <= key < end
    start, end = watch_range(KEYS, parse_kinds("handles"), "chk/")
    assert start <= KEYS.lock("chk/1", "i") < end and not start <= KEYS.handle("other") < end


# -- the SDK stream --------------------------------------------------------------------


class Collector:
    """``store.watch(...)`` consumed by a task into ``events``."""

    def __init__(self, watch: AsyncIterator[WatchEvent]) -> None:
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self._watch = watch
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self._watch:
                self.events.append(event)
        except Exception as e:
            self.error = e

    async def until(self, count: int, timeout: float = 20) -> list[WatchEvent]:
        await async_wait_until(
            lambda: len(self.events) >= count or self.error, timeout, message=f"{self.events}"
        )
        if self.error is not None:
            raise self.error
        return self.events

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._watch.aclose()  # type: ignore[attr-defined]


@pytest.fixture
async def collectors() -> AsyncIterator[Callable[[AsyncIterator[WatchEvent]], Collector]]:
    made: list[Collector] = []

    def make(watch: AsyncIterator[WatchEvent]) -> Collector:
        made.append(Collector(watch))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def summary(events: list[WatchEvent]) -> list[tuple[str, str | None]]:
    """(type, name) of handle events, ("leader", leader or None) of leader events."""
    return [
        (e.type, e.name)
        if isinstance(e, HandleEvent)
        else ("leader", e.leadership.leader if e.leadership else None)
        for e in events
    ]


async def test_handle_and_leader_events_after_a_snapshot(
    make_config: Callable[..., StoreConfig], open_store: OpenStore, collectors: Any
) -> None:
    store, other = await open_store(make_config()), await open_store(make_config())
    keys = store.keys
    since = (await store.snapshot()).revision
    everything = collectors(store.watch(since))
    leaders = collectors(store.watch(since, kinds="leader"))
    prefixed = collectors(store.watch(since, prefix="chk/", kinds=["handles"]))
    h = await store.add_and_lock("chk/1", b"one")
    await store.add_and_lock("other", b"x")
    election = LeaderElection(store)
    token = await election.campaign()
    await election.publish_info("addr", "jm:1")
    waiting = asyncio.create_task(LeaderElection(other).campaign())  # a candidate behind
    lp = keys.leader_prefix

    async def both_candidates() -> bool:
        return await store.etcd.count(lp, prefix_end(lp)) == 2

    await async_wait_until(both_candidates, 10)
    await store.replace("chk/1", h.version, b"two")
    await store.release_and_try_remove("chk/1")
    await election.resign()  # its info goes with it; the waiting candidate takes over
    await asyncio.wait_for(waiting, 10)
    events = await everything.until(7)
    assert summary(events) == [
        ("put", "chk/1"),
        ("put", "other"),
        ("leader", store.instance_id),
        ("leader", store.instance_id),  # its info changed
        ("put", "chk/1"),
        ("delete", "chk/1"),
        ("leader", other.instance_id),
    ]
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert isinstance(events[3], LeaderEvent) and events[3].leadership == Leadership(
        store.instance_id, token, {"addr": "jm:1"}
    )
    assert events[4].handle is not None and events[4].handle.version == events[4].revision
    assert await leaders.until(3) == [e for e in events if isinstance(e, LeaderEvent)]
    assert summary(await prefixed.until(3)) == [
        ("put", "chk/1"),
        ("put", "chk/1"),
        ("delete", "chk/1"),
    ]


async def test_refusals(make_config: Callable[..., StoreConfig], open_store: OpenStore) -> None:
    store = await open_store(make_config())
    with pytest.raises(InvalidArgument):
        await anext(store.watch(kinds="handles,events"))
    with pytest.raises(InvalidArgument):
        await anext(store.watch((await store.snapshot()).revision + 1000))  # the future
    await store.add_and_lock("a", b"x")
    old = (await store.snapshot()).revision
    await store.add_and_lock("b", b"x")
    now = (await store.etcd.status()).revision
    await store.etcd.compact(now)
    with pytest.raises(Compacted) as caught:
        await anext(store.watch(old))
    assert caught.value.compact_revision == now


@pytest.fixture
def proxy(etcd: EtcdProcess) -> Any:
    p = FaultProxy("127.0.0.1", etcd.client_port)
    yield p
    p.close()


async def test_the_stream_resumes_where_a_cut_broke_it(
    caplog: pytest.LogCaptureFixture,
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    proxy: FaultProxy,
    collectors: Any,
) -> None:
    """The watcher reaches etcd through a proxy cut again and again while
    another instance writes: every change comes once, in order."""
    caplog.set_level(logging.INFO, logger="statestore.watch")
    watcher = await open_store(make_config(etcd_endpoints=[proxy.endpoint]))
    writer = await open_store(make_config())
    since = (await writer.snapshot()).revision
    watch = collectors(watcher.watch(since, kinds="handles"))
    written = []
    for i in range(30):
        written.append((await writer.add_and_lock(f"h{i:02d}", b"x")).version)
        if i % 5 == 4:
            proxy.cut()
    events = await watch.until(30, timeout=30)
    assert [e.revision for e in events] == written
    assert "watch broke" in caplog.text and "resumed" in caplog.text


async def test_after_compaction_it_relists_and_yields_what_changed(
    make_config: Callable[..., StoreConfig],
    open_store: OpenStore,
    proxy: FaultProxy,
    collectors: Any,
) -> None:
    """The watcher's connection is refused while the writer changes things
    and etcd is compacted past the watcher's position: it re-lists and
    yields one synthetic event per difference (at the listing's revision),
    then the changes after it."""
    watcher = await open_store(make_config(etcd_endpoints=[proxy.endpoint], lease_ttl=30))
    writer = await open_store(make_config())
    kept = await writer.add_and_lock("kept", b"x")
    changed = await writer.add_and_lock("changed", b"x")
    await writer.add_and_lock("removed", b"x")
    since = (await writer.snapshot()).revision
    watch = collectors(watcher.watch(since))
    await writer.add_and_lock("first", b"x")
    assert summary(await watch.until(1)) == [("put", "first")]
    proxy.set_mode("refuse")
    changed = await writer.replace("changed", changed.version, b"y")
    await writer.release_and_try_remove("removed")
    await writer.add_and_lock("added", b"x")
    election = LeaderElection(writer)
    token = await election.campaign()
    await writer.etcd.compact((await writer.etcd.status()).revision)
    proxy.set_mode("forward")
    events = await watch.until(5, timeout=30)
    relisted = events[1:]
    at = relisted[0].revision
    assert all(e.revision == at for e in relisted)
    assert summary(relisted) == [
        ("put", "added"),
        ("put", "changed"),
        ("delete", "removed"),
        ("leader", writer.instance_id),
    ]
    assert relisted[1].handle == changed  # type: ignore[union-attr]
    assert relisted[3] == LeaderEvent(at, Leadership(writer.instance_id, token, {}))
    # And on from the listing: the next change once, nothing of before.
    await writer.release_and_try_remove(kept.name)
    more = await watch.until(6)
    assert summary(more[5:]) == [("delete", "kept")]
