"""``GET /v1/namespaces/{ns}/watch`` (rest-v1.md, "For job managers" / "Watch")
against real ``statestore serve`` processes on real etcd.

Every row of the section: answered as soon as a matching change exists, all
of them in revision order, at most 1000 without splitting a revision;
timeouts answer no events and a revision within ``timeout`` + 2 s; handle
events for add, replace and removal and no event for locks or other keys;
leader events when leadership changes hands, ends or its info changes (not
when a candidate joins or leaves behind the leader); 410 ``compacted`` with
``compact_revision``; list-then-watch exact under concurrent writers (a
property test); prefix and kinds filters; auth; 1,000 polls held by one
process. Then the service's own machinery: the shared feed's gap reads, its
reconnection after etcd restarts, its reset after its position was
compacted, its idle stop, and the bound on how long a poll is held when
etcd does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import async_wait_until, handle_record, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest import assert_problem, client, enc, hpath, lpath, new_session, sess
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.config import DEFAULT_ROOT
from statestore.etcd import EtcdClient, Txn
from statestore.keys import Layout, prefix_end
from statestore.local.etcd_process import EtcdProcess
from statestore.local.faultproxy import FaultProxy
from statestore.records import LeaderInfo, encode_holder

EVENT_FIELDS = {"kind", "type", "name", "revision", "handle"}


def wpath(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/watch"


def poll(c: httpx.Client, ns: str, **params: Any) -> dict[str, Any]:
    r = c.get(wpath(ns), params={k: v for k, v in params.items() if v is not None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"events", "revision"}, body
    return body


def collect(
    c: httpx.Client, ns: str, since: int, count: int, timeout: float = 20, **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Poll from ``since`` until ``count`` events came; (events, last revision).
    Checks each answer's events are newer than its ``since``, in order."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events: {events}"
        body = poll(c, ns, since=since, timeout=2, **params)
        revisions = [e["revision"] for e in body["events"]]
        assert revisions == sorted(revisions) and all(r > since for r in revisions), body
        assert body["revision"] >= since
        events += body["events"]
        since = body["revision"]
    return events, since


def quiet(c: httpx.Client, ns: str, since: int, **params: Any) -> int:
    """Assert no matching change after ``since`` (a 1 s poll); its revision."""
    body = poll(c, ns, since=since, timeout=1, **params)
    assert body["events"] == [], body
    return int(body["revision"])


def revision_of(c: httpx.Client, ns: str) -> int:
    return int(c.get(lpath(ns)).json()["revision"])


def put(c: httpx.Client, ns: str, name: str, sid: str, version: int | None = None) -> Any:
    headers = sess(sid) if version is None else sess(sid, **{"If-Match": f'"{version}"'})
    r = c.put(hpath(ns, name), content=b"state of " + name.encode(), headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.json()


def remove(c: httpx.Client, ns: str, name: str, sid: str) -> None:
    r = c.delete(hpath(ns, name), headers=sess(sid))
    assert r.status_code == 204, r.text


def without_locks(handle: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in handle.items() if k != "locks"}


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(service.url) as c:
        yield c


@pytest.fixture
async def etcd_client(etcd: EtcdProcess) -> Any:
    client_ = EtcdClient([etcd.endpoint])
    yield client_
    await client_.close()


def lease_of(session_id: str) -> int:
    """A REST session's lease (its id is ``<lease hex>-<random>``)."""
    return int(session_id.split("-", 1)[0], 16)


# -- handle events ----------------------------------------------------------------------


def test_add_replace_and_remove_after_a_listing_each_once(
    api: httpx.Client, namespace: str
) -> None:
    sid = new_session(api)
    since = revision_of(api, namespace)
    added = put(api, namespace, "chk/1 a", sid)
    replaced = put(api, namespace, "chk/1 a", sid, version=added["version"])
    remove(api, namespace, "chk/1 a", sid)
    events, last = collect(api, namespace, since, 3)
    assert [(e["kind"], e["type"], e["name"]) for e in events] == [
        ("handle", "put", "chk/1 a"),
        ("handle", "put", "chk/1 a"),
        ("handle", "delete", "chk/1 a"),
    ]
    assert all(set(e) == EVENT_FIELDS for e in events)
    # The handle as GET shows it, without locks; its version is the event's revision.
    assert events[0]["handle"] == without_locks(added)
    assert events[1]["handle"] == without_locks(replaced)
    assert [e["revision"] for e in events[:2]] == [added["version"], replaced["version"]]
    assert events[2]["handle"] is None and events[2]["revision"] > replaced["version"]
    assert last >= events[2]["revision"]
    quiet(api, namespace, last)


def test_without_since_only_later_changes(api: httpx.Client, namespace: str) -> None:
    sid = new_session(api)
    put(api, namespace, "before", sid)
    now = quiet(api, namespace, None)  # omitted since: the current revision
    put(api, namespace, "after", sid)
    events, _ = collect(api, namespace, now, 1)
    assert [e["name"] for e in events] == ["after"]


def test_timeout_answers_no_events_and_a_current_revision_in_time(
    api: httpx.Client, namespace: str
) -> None:
    sid = new_session(api)
    put(api, namespace, "x", sid)
    since = revision_of(api, namespace)
    started = time.monotonic()
    body = poll(api, namespace, since=since, timeout=1)
    took = time.monotonic() - started
    assert body["events"] == []
    assert 1 <= took <= 3, took
    # R: at least since, never past what etcd has (no change of ours after since).
    assert since <= body["revision"] <= revision_of(api, namespace)


def test_locks_and_other_keys_are_no_events(api: httpx.Client, namespace: str) -> None:
    owner, other = new_session(api), new_session(api)
    put(api, namespace, "a", owner)
    since = revision_of(api, namespace)
    # Lock keys, a counter, a deferred removal's marker: none is an event.
    assert api.post(hpath(namespace, "a", "/lock"), headers=sess(other)).status_code == 200
    assert api.delete(hpath(namespace, "a", "/lock"), headers=sess(other)).status_code == 204
    assert api.post(hpath(namespace, "a", "/lock"), headers=sess(other)).status_code == 200
    counter = f"/v1/namespaces/{enc(namespace)}/counters/ids/increment"
    assert api.post(counter).status_code == 200
    r = api.delete(hpath(namespace, "a"), params={"deferred": "true"}, headers=sess(owner))
    assert r.status_code == 202, r.text
    quiet(api, namespace, since)
    # The last lock goes: the deferred removal completes, which is an event.
    assert api.delete(hpath(namespace, "a", "/lock"), headers=sess(other)).status_code == 204
    events, _ = collect(api, namespace, since, 1)
    assert [(e["type"], e["name"]) for e in events] == [("delete", "a")]


def test_prefix_and_kinds_filters(api: httpx.Client, namespace: str) -> None:
    sid = new_session(api)
    since = revision_of(api, namespace)
    put(api, namespace, "a/1", sid)
    put(api, namespace, "b/1", sid)
    assert api.post(f"/v1/namespaces/{enc(namespace)}/leader", headers=sess(sid)).status_code == 200
    everything, last = collect(api, namespace, since, 3)
    assert [e["kind"] for e in everything] == ["handle", "handle", "leader"]

    def seen(**params: Any) -> list[str]:
        body = poll(api, namespace, since=since, timeout=1, **params)
        assert body["revision"] == last, body  # nothing else happened: the same position
        return [e.get("name", e["kind"]) for e in body["events"]]

    assert seen(prefix="a/") == ["a/1", "leader"]  # prefix filters handles only
    assert seen(kinds="handles") == ["a/1", "b/1"]
    assert seen(kinds="leader") == ["leader"]
    assert seen(kinds="handles,leader", prefix="b") == ["b/1", "leader"]
    assert seen(kinds="handles", prefix="c") == []


@pytest.mark.parametrize(
    "params",
    [
        {"timeout": 0},
        {"timeout": 301},
        {"timeout": "soon"},
        {"since": -1},
        {"since": "yesterday"},
        {"kinds": "handles,events"},
        {"kinds": ""},
        {"prefix": "bad\x01"},
    ],
)
def test_bad_query_is_400(api: httpx.Client, namespace: str, params: dict[str, Any]) -> None:
    assert_problem(api.get(wpath(namespace), params=params), 400, "invalid-argument")


async def test_at_most_1000_events_and_never_a_split_revision(
    service: ServiceProcess, etcd_client: EtcdClient, namespace: str
) -> None:
    """Records written straight to etcd, 7 per txn: the first answer ends
    before the revision that would cross 1000; the next picks it up whole."""
    keys = Layout(DEFAULT_ROOT, namespace)
    base = (await etcd_client.status()).revision
    per_txn, txns = 7, 150
    for t in range(txns):
        puts = [
            Txn.put(keys.handle(f"h{t:03d}-{i}"), handle_record(f"h{t:03d}-{i}"))
            for i in range(per_txn)
        ]
        await etcd_client.txn(Txn().then(*puts))
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as c:
        first = (await c.get(wpath(namespace), params={"since": base, "timeout": 5})).json()
        assert len(first["events"]) == 1000 // per_txn * per_txn  # 994: revision 143 waits
        by_revision: dict[int, int] = {}
        for e in first["events"]:
            by_revision[e["revision"]] = by_revision.get(e["revision"], 0) + 1
        assert set(by_revision.values()) == {per_txn}  # every revision whole
        assert first["revision"] == first["events"][-1]["revision"]
        rest = (await c.get(wpath(namespace), params={"since": first["revision"]})).json()
        names = [e["name"] for e in first["events"] + rest["events"]]
        assert len(names) == per_txn * txns and len(set(names)) == len(names)
        # One revision with more than 1000 events (a range delete) is answered whole.
        since = rest["revision"]
        await etcd_client.delete(keys.handles_prefix, prefix_end(keys.handles_prefix))
        gone = (await c.get(wpath(namespace), params={"since": since, "timeout": 5})).json()
        assert len(gone["events"]) == per_txn * txns
        assert {e["type"] for e in gone["events"]} == {"delete"}
        assert len({e["revision"] for e in gone["events"]}) == 1


# -- leader events ----------------------------------------------------------------------


def leader_path(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/leader"


async def test_leader_events_when_leadership_changes_hands_ends_or_its_info_changes(
    service: ServiceProcess, etcd_client: EtcdClient, namespace: str
) -> None:
    keys = Layout(DEFAULT_ROOT, namespace)
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as c:

        async def session() -> str:
            r = await c.post("/v1/sessions", json={"ttl_seconds": 30})
            return str(r.json()["session_id"])

        async def next_events(since: int) -> tuple[list[dict[str, Any]], int]:
            body = (await c.get(wpath(namespace), params={"since": since, "timeout": 5})).json()
            return body["events"], body["revision"]

        async def marker(since: int) -> list[dict[str, Any]]:
            """A handle put after whatever went before: the events up to it."""
            await c.put(hpath(namespace, "marker"), content=b"m", headers=sess(first))
            events: list[dict[str, Any]] = []
            while not any(e.get("name") == "marker" for e in events):
                got, since = await next_events(since)
                events += got
            await c.delete(hpath(namespace, "marker"), headers=sess(first))
            return [e for e in events if e["kind"] == "leader"]

        async def put_info(key: str, value: Any, sid: str) -> None:
            r = await c.put(f"{leader_path(namespace)}/info/{key}", json=value, headers=sess(sid))
            assert r.status_code == 204, r.text

        first, second = await session(), await session()
        since = int((await c.get(lpath(namespace))).json()["revision"])
        token = (await c.post(leader_path(namespace), headers=sess(first))).json()["fencing_token"]
        events, since = await next_events(since)
        assert events == [
            {
                "kind": "leader",
                "revision": token,
                "leader": {"leader": first, "fencing_token": token, "info": {}},
            }
        ]
        await put_info("address", {"host": "jm-1", "port": 6123}, first)
        events, since = await next_events(since)
        assert [e["leader"]["info"] for e in events] == [
            {"address": {"host": "jm-1", "port": 6123}}
        ]
        # A candidate joining and leaving behind the leader, and an info entry
        # of another token: the leadership is the same, so no event.
        behind = keys.leader(second)
        await etcd_client.put(behind, encode_holder(second), lease=lease_of(second))
        await etcd_client.delete(behind)
        await etcd_client.put(keys.leader_info("stale"), LeaderInfo(token - 1, "x").encode())
        assert await marker(since) == []
        await etcd_client.delete(keys.leader_info("stale"))
        since = int((await c.get(lpath(namespace))).json()["revision"])
        # Resigning ends the leadership; its info goes in the same revision: one event.
        assert (await c.delete(leader_path(namespace), headers=sess(first))).status_code == 204
        events, since = await next_events(since)
        assert [e["leader"] for e in events] == [None]
        # Another session wins, publishes, and its session is deleted: leadership
        # and info vanish in one revision, one event.
        token2 = (await c.post(leader_path(namespace), headers=sess(second))).json()[
            "fencing_token"
        ]
        await put_info("address", "jm-2:6123", second)
        events, since = await collect_async(next_events, since, 2)
        assert [e["leader"] for e in events] == [
            {"leader": second, "fencing_token": token2, "info": {}},
            {"leader": second, "fencing_token": token2, "info": {"address": "jm-2:6123"}},
        ]
        assert (await c.delete(f"/v1/sessions/{second}")).status_code == 204
        events, since = await next_events(since)
        assert [(e["kind"], e["leader"]) for e in events] == [("leader", None)]
        assert (
            await etcd_client.count(keys.leader_info_prefix, prefix_end(keys.leader_info_prefix))
            == 0
        )


async def collect_async(
    next_events: Callable[[int], Any], since: int, count: int
) -> tuple[list[dict[str, Any]], int]:
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while len(events) < count:
        assert time.monotonic() < deadline, events
        got, since = await next_events(since)
        events += got
    return events, since


# -- compaction ---------------------------------------------------------------------------


async def test_compacted_since_is_410_with_compact_revision_and_a_relist_recovers(
    service: ServiceProcess, etcd_client: EtcdClient, namespace: str
) -> None:
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as c:
        sid = (await c.post("/v1/sessions", json={"ttl_seconds": 30})).json()["session_id"]
        since = int((await c.get(lpath(namespace))).json()["revision"])
        await c.put(hpath(namespace, "a"), content=b"1", headers=sess(sid))
        # The feed runs and its buffer holds since: rest-v1 still answers 410.
        seen = (await c.get(wpath(namespace), params={"since": since, "timeout": 5})).json()
        assert [e["name"] for e in seen["events"]] == ["a"]
        await c.put(hpath(namespace, "b"), content=b"2", headers=sess(sid))
        compacted_at = (await etcd_client.status()).revision
        await etcd_client.compact(compacted_at)
        for stale in (since, seen["revision"]):
            r = await c.get(wpath(namespace), params={"since": stale, "timeout": 5})
            body = assert_problem(r, 410, "compacted")
            assert body["compact_revision"] == compacted_at
        # Re-list and watch from the listing's revision: the next change, once.
        listing = (await c.get(lpath(namespace))).json()
        assert [h["name"] for h in listing["handles"]] == ["a", "b"]
        await c.delete(hpath(namespace, "a"), headers=sess(sid))
        answer = (
            await c.get(wpath(namespace), params={"since": listing["revision"], "timeout": 5})
        ).json()
        assert [(e["type"], e["name"]) for e in answer["events"]] == [("delete", "a")]


# -- list-then-watch under concurrent writers ------------------------------------------

OPS = st.lists(st.sampled_from(["add", "replace", "remove"]), min_size=1, max_size=8)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(programs=st.lists(OPS, min_size=2, max_size=3))
def test_list_then_watch_yields_each_change_once_under_concurrent_writers(
    service: ServiceProcess, make_config: Callable[..., StoreConfig], programs: list[list[str]]
) -> None:
    """Writers (SDK stores on the service's etcd) add, replace and remove
    their own handles concurrently while a REST watcher lists once and then
    loops on the watch: it sees every committed put exactly once, in
    revision order, as many deletes as removals succeeded, and what it
    builds from the listing plus the events is the final listing."""
    ns = f"prop-{time.monotonic_ns()}"
    asyncio.run(run_writers_and_watcher(service.url, make_config(namespace=ns), programs))


async def run_writers_and_watcher(url: str, cfg: StoreConfig, programs: list[list[str]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        ns = cfg.namespace
        listing = (await c.get(lpath(ns))).json()
        state = {h["name"]: h["version"] for h in listing["handles"]}
        since = listing["revision"]
        puts: list[int] = []  # versions the writers were answered
        removals: dict[str, int] = {}
        done = asyncio.Event()

        async def writer(w: int, program: list[str]) -> None:
            async with StateHandleStore.open(cfg) as store:
                for step, op in enumerate(program):
                    name = f"w{w}-{step % 2}"
                    current = await store.exists(name)
                    if op == "add" or current is None:
                        if current is None:
                            puts.append((await store.add_and_lock(name, b"s")).version)
                    elif op == "replace":
                        puts.append((await store.replace(name, current, b"r")).version)
                    elif await store.release_and_try_remove(name):
                        removals[name] = removals.get(name, 0) + 1

        seen_puts: list[int] = []
        seen_deletes: dict[str, int] = {}
        revisions: list[int] = []

        async def watcher() -> None:
            nonlocal since
            while True:
                body = (await c.get(wpath(ns), params={"since": since, "timeout": 1})).json()
                for e in body["events"]:
                    revisions.append(e["revision"])
                    if e["type"] == "put":
                        seen_puts.append(e["revision"])
                        state[e["name"]] = e["revision"]
                    else:
                        seen_deletes[e["name"]] = seen_deletes.get(e["name"], 0) + 1
                        state.pop(e["name"], None)
                since = body["revision"]
                if done.is_set() and not body["events"]:
                    return  # a quiet second after the writers stopped

        watching = asyncio.create_task(watcher())
        await asyncio.gather(*(writer(w, p) for w, p in enumerate(programs)))
        final = (await c.get(lpath(ns))).json()
        want = {h["name"]: h["version"] for h in final["handles"]}
        await async_wait_until(lambda: state == want, 30, message="the events rebuild the listing")
        done.set()
        await asyncio.wait_for(watching, 30)
    assert sorted(seen_puts) == sorted(puts) and len(set(seen_puts)) == len(seen_puts)
    assert seen_deletes == removals
    assert revisions == sorted(revisions)
    assert state == {h["name"]: h["version"] for h in final["handles"]}


# -- auth --------------------------------------------------------------------------------


def test_read_token_watches_and_other_namespaces_are_403(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"token": "reader-token", "namespaces": ["job-*"], "role": "read"},
                    {"token": "writer-token", "namespaces": ["job-*"], "role": "write"},
                ]
            }
        )
    )
    svc = service_factory(auth_tokens_file=tokens)
    ns = f"job-{time.monotonic_ns()}"
    with client(svc.url) as c:
        reader = {"Authorization": "Bearer reader-token"}
        writer = {"Authorization": "Bearer writer-token"}
        r = c.post("/v1/sessions", json={"ttl_seconds": 30}, headers=writer)
        sid = r.json()["session_id"]
        since = int(c.get(lpath(ns), headers=reader).json()["revision"])
        r = c.put(hpath(ns, "a"), content=b"x", headers={**writer, **sess(sid)})
        assert r.status_code == 201
        r = c.get(wpath(ns), params={"since": since, "timeout": 5}, headers=reader)
        assert r.status_code == 200 and [e["name"] for e in r.json()["events"]] == ["a"]
        assert_problem(c.get(wpath("other-ns"), headers=reader), 403, "forbidden")
        assert_problem(c.get(wpath(ns)), 401, "unauthorized")


# -- 1,000 polls held by one process ---------------------------------------------------


async def test_one_process_holds_1000_polls_and_answers_them_all(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """1,000 concurrent polls on one service process: held idle until their
    timeout, then held while writes go on, every one answered. The polls go
    through 10 httpx clients of 100 connections each (one client's pool
    slows down with the number of its connections); the writes through their
    own client, so that they never queue for a connection behind 100 held
    polls (which then timed out empty: a flake on a loaded machine)."""
    svc = service_factory()
    ns = f"many-{time.monotonic_ns()}"
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=svc.url, timeout=60, limits=httpx.Limits(max_connections=100)
                )
            )
            for _ in range(10)
        ]
        c = await stack.enter_async_context(httpx.AsyncClient(base_url=svc.url, timeout=60))
        sid = (await c.post("/v1/sessions", json={"ttl_seconds": 60})).json()["session_id"]
        since = int((await c.get(lpath(ns))).json()["revision"])

        async def one(i: int, timeout: float) -> dict[str, Any]:
            r = await clients[i % 10].get(wpath(ns), params={"since": since, "timeout": timeout})
            assert r.status_code == 200, r.text
            return dict(r.json())

        # Idle: all held, all answered empty at their timeout.
        idle = await asyncio.gather(*(one(i, 2) for i in range(1000)))
        assert all(a["events"] == [] and a["revision"] >= since for a in idle)
        # Waiting while writes go on: every poll gets the first write.
        polls = [asyncio.create_task(one(i, 25)) for i in range(1000)]
        first: dict[str, Any] | None = None
        n = 0
        while not all(p.done() for p in polls):
            r = await c.put(hpath(ns, f"h{n}"), content=b"x", headers=sess(sid))
            first = first or r.json()
            n += 1
            await asyncio.wait(polls, timeout=0.1)
        answers = [p.result() for p in polls]
        assert first is not None
        assert all(a["events"][0]["revision"] == first["version"] for a in answers)


# -- the shared feed -----------------------------------------------------------------------


def test_polls_older_than_the_buffer_read_their_gap_once(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """A buffer of 2 KB holds a few events: older polls read the rest from
    etcd, and every change still comes exactly once."""
    svc = service_factory(watch_buffer_bytes=2000)
    ns = f"gap-{time.monotonic_ns()}"
    with client(svc.url) as c:
        sid = new_session(c)
        since = revision_of(c, ns)
        quiet(c, ns, since)  # the feed starts at since
        versions = [put(c, ns, f"h{i:02d}", sid)["version"] for i in range(30)]
        events, _ = collect(c, ns, since, 30)
        assert [e["revision"] for e in events] == versions
        # A poll from before the feed started (its floor) reads that gap too.
        older = poll(c, ns, since=since - 3, timeout=5)
        assert older["events"][0]["revision"] == versions[0]


def test_the_feed_survives_an_etcd_restart(
    etcd_factory: Callable[..., EtcdProcess], tmp_path: Path
) -> None:
    member = etcd_factory()
    with service_on(member.endpoint, tmp_path) as svc, client(svc.url) as c:
        sid = new_session(c, ttl=60)
        since = revision_of(c, "ns")
        before = put(c, "ns", "before", sid)["version"]
        events, since = collect(c, "ns", since, 1)
        member.restart()
        wait_until(lambda: c.get("/readyz").status_code == 200, 20, ignore=(httpx.HTTPError,))
        after = c.put(hpath("ns", "after"), content=b"x", headers=sess(sid))
        assert after.status_code == 201, after.text
        more, _ = collect(c, "ns", since, 1, timeout=30)
        assert [e["revision"] for e in events + more] == [before, after.json()["version"]]


async def test_a_feed_whose_position_was_compacted_restarts_and_polls_behind_get_410(
    etcd: EtcdProcess, etcd_client: EtcdClient, tmp_path: Path, namespace: str
) -> None:
    """The service reaches etcd through a proxy that refuses for a while:
    meanwhile changes are made and compacted; when the feed reconnects its
    position is gone, its buffer restarts, and a poll from that position
    gets 410 while a fresh listing's revision works."""
    proxy = FaultProxy("127.0.0.1", etcd.client_port)
    try:
        with service_on(proxy.endpoint, tmp_path) as svc:
            async with httpx.AsyncClient(base_url=svc.url, timeout=30) as c:
                sid = (await c.post("/v1/sessions", json={"ttl_seconds": 60})).json()["session_id"]
                since = int((await c.get(lpath(namespace))).json()["revision"])
                await c.put(hpath(namespace, "a"), content=b"1", headers=sess(sid))
                seen = (await c.get(wpath(namespace), params={"since": since})).json()
                proxy.set_mode("refuse")
                keys = Layout(DEFAULT_ROOT, namespace)
                for name in ("b", "b2"):  # compacted past the feed's next revision
                    await etcd_client.put(keys.handle(name), handle_record(name))
                await etcd_client.compact((await etcd_client.status()).revision)
                proxy.set_mode("forward")
                r = await c.get(wpath(namespace), params={"since": seen["revision"], "timeout": 5})
                assert_problem(r, 410, "compacted")
                await async_wait_until(
                    lambda: "fell behind etcd's compaction" in svc.log_tail(), 20
                )
                listing = (await c.get(lpath(namespace))).json()
                await etcd_client.put(keys.handle("c"), handle_record("c"))
                body = (await c.get(wpath(namespace), params={"since": listing["revision"]})).json()
                assert [e["name"] for e in body["events"]] == ["c"]
    finally:
        proxy.close()


def test_an_idle_feed_stops_its_watch(service_factory: Callable[..., ServiceProcess]) -> None:
    svc = service_factory(watch_idle_seconds=1)
    ns = f"idle-{time.monotonic_ns()}"
    with client(svc.url) as c:
        quiet(c, ns, None)
        wait_until(
            lambda: f"watch feed of namespace '{ns}' stopped" in svc.log_file.read_text(), 15
        )
        quiet(c, ns, None)  # and a new poll starts it again


def test_a_poll_is_never_held_past_timeout_plus_2_when_etcd_stops(
    etcd_factory: Callable[..., EtcdProcess], tmp_path: Path
) -> None:
    member = etcd_factory()
    with service_on(member.endpoint, tmp_path) as svc, client(svc.url) as c:
        since = quiet(c, "running", None)  # this namespace's feed runs
        member.pause()  # SIGSTOP: connections stay open, nothing answers
        try:
            # Without since, a running feed answers from memory; with one, the
            # compaction check needs etcd, and so does a namespace's first poll.
            for ns, params, status in (
                ("running", {}, 200),
                ("running", {"since": since}, 503),
                ("new", {}, 503),
            ):
                started = time.monotonic()
                r = c.get(wpath(ns), params={**params, "timeout": 1})
                took = time.monotonic() - started
                assert took <= 3, (ns, params, took)
                assert r.status_code == status, r.text
        finally:
            member.resume()


@contextlib.contextmanager
def service_on(endpoint: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A service of this test's own on ``endpoint`` (no maintenance)."""
    env = {
        "STATESTORE_ETCD_ENDPOINTS": endpoint,
        "STATESTORE_BLOB_ROOT": f"file://{tmp_path}/blobs",
        "STATESTORE_MAINTENANCE": "false",
    }
    svc = ServiceProcess(env, tmp_path / f"service-{time.monotonic_ns()}.log")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def test_shutdown_answers_waiting_polls_at_once(
    service_factory: Callable[..., ServiceProcess], namespace: str
) -> None:
    """SIGTERM while polls wait: they are answered at once (200, no events)
    and the service exits in seconds, not after their 300 s timeout. (A held
    poll kept a restarting service down past the job managers' session TTL:
    the Flink end-to-end test of a statestore restart found it.)"""
    svc = service_factory()
    answers: list[tuple[int, float]] = []

    def poll() -> None:
        started = time.monotonic()
        with client(svc.url) as api:
            r = api.get(f"/v1/namespaces/{enc(namespace)}/watch", params={"timeout": 300},
                        timeout=320)  # fmt: skip
            answers.append((r.status_code, time.monotonic() - started))
            assert r.json()["events"] == []

    threads = [threading.Thread(target=poll) for _ in range(3)]
    for t in threads:
        t.start()
    with client(svc.url) as api:

        def waiting() -> float:
            for line in api.get("/metrics").text.splitlines():
                if line.startswith("statestore_watch_polls_waiting "):
                    return float(line.split()[1])
            raise AssertionError("no statestore_watch_polls_waiting metric")

        wait_until(lambda: waiting() == 3, 10, message="the polls never all waited")
    stopping = time.monotonic()
    svc.proc.send_signal(15)
    svc.proc.wait(timeout=15)
    exited = time.monotonic() - stopping
    for t in threads:
        t.join(timeout=15)
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert exited < 10, f"the service took {exited:.1f} s to exit with polls waiting"
