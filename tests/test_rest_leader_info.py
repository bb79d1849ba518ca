"""rest-v1.md "Leadership with info, and waiting for it", against real
``statestore serve`` processes and the session etcd.

Every call goes over real HTTP. Where "nothing written" or "withdrawn"
matters, the election and info keys are read straight from etcd. Waits are
deadline-bound; "within a second" is measured from an event the test itself
observes (the DELETE's answer, or etcd's deletion of the leader key seen by
a watch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import async_wait_until, wait_until
from rest import (
    assert_problem,
    bearer,
    client,
    enc,
    leader_path,
    leadership_body,
    new_session,
    sess,
)
from service import ServiceProcess, serving_with_tokens

from statestore import StateHandleStore, StoreConfig
from statestore.etcd import KV
from statestore.keys import prefix_end
from statestore.local.etcd_process import EtcdProcess

#: rest-v1.md: a value of at most 16 KiB.
LIMIT = 16 * 1024
#: Keys that must round-trip exactly (URL-encoded as one path segment).
ODD_KEYS = ["address", "a/b", "/lead", "a%2Fb", "x y/ü ✓", "..", "info", "a?b#c", "a/../../x"]


def info_path(ns: str, key: str) -> str:
    return f"{leader_path(ns)}/info/{enc(key)}"


def put_info(c: httpx.Client, ns: str, sid: str, key: str, value: Any) -> httpx.Response:
    return c.put(
        info_path(ns, key),
        content=json.dumps(value),
        headers=sess(sid, **{"Content-Type": "application/json"}),
    )


def campaign(c: httpx.Client, ns: str, sid: str, **params: Any) -> int:
    r = c.post(leader_path(ns), params=params, headers=sess(sid))
    assert r.status_code == 200, r.text
    assert r.json()["leader"] == sid, r.text
    return int(r.json()["fencing_token"])


def without_revision(body: dict[str, Any]) -> dict[str, Any]:
    """A leadership answer (GET or POST) less its ``revision``, an int it must hold."""
    rest = dict(body)
    revision = rest.pop("revision")
    assert isinstance(revision, int) and not isinstance(revision, bool) and revision > 0, body
    return rest


def leadership(c: httpx.Client, ns: str) -> dict[str, Any] | None:
    """``GET .../leader`` less its revision; None when nobody leads."""
    body = leadership_body(c, ns)
    if body is None:
        return None
    assert set(body) == {"leader", "fencing_token", "info", "revision"}, body
    return without_revision(body)


@asynccontextmanager
async def raw_store(etcd: EtcdProcess, ns: str) -> AsyncIterator[StateHandleStore]:
    """A store on the session etcd, for reading and watching keys raw (no lease)."""
    cfg = StoreConfig(etcd_endpoints=[etcd.endpoint], namespace=ns, blob_root="memory://raw")
    store = StateHandleStore(cfg)
    try:
        yield store
    finally:
        await store.backend.close()


async def candidates(store: StateHandleStore) -> list[KV]:
    lp = store.keys.leader_prefix
    kvs, _ = await store.etcd.range_all(lp, prefix_end(lp))
    return sorted(kvs, key=lambda kv: kv.create_revision)


def line(etcd: EtcdProcess, ns: str) -> list[str]:
    """The session ids in the namespace's election line, oldest first."""

    async def read() -> list[str]:
        async with raw_store(etcd, ns) as store:
            return [kv.value.decode() for kv in await candidates(store)]

    return asyncio.run(read())


def raw_info_keys(etcd: EtcdProcess, ns: str) -> list[bytes]:
    async def read() -> list[bytes]:
        async with raw_store(etcd, ns) as store:
            ip = store.keys.leader_info_prefix
            kvs, _ = await store.etcd.range_all(ip, prefix_end(ip), keys_only=True)
            return [kv.key for kv in kvs]

    return asyncio.run(read())


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(service.url) as c:
        yield c


# -- publish, read, remove ----------------------------------------------------------------


def test_leader_info_round_trips_and_is_read_with_its_leadership(
    api: httpx.Client, namespace: str
) -> None:
    a = new_session(api)
    token = campaign(api, namespace, a)
    assert leadership(api, namespace) == {"leader": a, "fencing_token": token, "info": {}}
    values: dict[str, Any] = {
        key: value
        for key, value in zip(
            ODD_KEYS,
            ["jm-1:6123", {"rpc": "jm-1:6123", "ui": [1, 2.5]}, None, [], 0, "é✓", True, -7, ""],
            strict=True,
        )
    }
    for key, value in values.items():
        r = put_info(api, namespace, a, key, value)
        assert r.status_code == 204, (key, r.text)
        assert r.content == b""
    assert leadership(api, namespace) == {"leader": a, "fencing_token": token, "info": values}

    # Replace one, delete two (one never published: 204 too).
    assert put_info(api, namespace, a, "address", "jm-1:7000").status_code == 204
    for key in ("a/b", "never-published"):
        r = api.delete(info_path(namespace, key), headers=sess(a))
        assert r.status_code == 204, r.text
    expected = {k: v for k, v in values.items() if k != "a/b"} | {"address": "jm-1:7000"}
    assert leadership(api, namespace) == {"leader": a, "fencing_token": token, "info": expected}
    # POST .../leader answers as before: no info in it.
    r = api.post(leader_path(namespace), headers=sess(a))
    assert without_revision(r.json()) == {"leader": a, "fencing_token": token}


def test_only_the_leader_writes_info(api: httpx.Client, etcd: EtcdProcess, namespace: str) -> None:
    a, b = new_session(api), new_session(api)
    # Nobody leads: 409 with "leader": null, nothing written.
    body = assert_problem(put_info(api, namespace, b, "address", "b"), 409, "not-leader")
    assert body["leader"] is None
    token = campaign(api, namespace, a)
    assert put_info(api, namespace, a, "address", "a").status_code == 204
    for r in (
        put_info(api, namespace, b, "address", "b"),
        put_info(api, namespace, b, "other", "b"),
        api.delete(info_path(namespace, "address"), headers=sess(b)),
    ):
        body = assert_problem(r, 409, "not-leader")
        assert body["leader"] == a, body
    assert leadership(api, namespace) == {
        "leader": a,
        "fencing_token": token,
        "info": {"address": "a"},
    }
    assert line(etcd, namespace) == [a]  # the refused calls did not line b up
    assert len(raw_info_keys(etcd, namespace)) == 1


def test_info_of_a_deposed_leader_is_refused_and_never_visible(
    api: httpx.Client, etcd: EtcdProcess, namespace: str
) -> None:
    a, b = new_session(api), new_session(api)
    t_a = campaign(api, namespace, a)
    assert put_info(api, namespace, a, "address", "a").status_code == 204
    # Resigning ends the info in the same instant: nobody leads, no info key left.
    assert api.delete(leader_path(namespace), headers=sess(a)).status_code == 204
    assert leadership(api, namespace) is None
    assert raw_info_keys(etcd, namespace) == []

    t_b = campaign(api, namespace, b)
    assert t_b > t_a
    body = assert_problem(put_info(api, namespace, a, "address", "a-zombie"), 409, "not-leader")
    assert body["leader"] == b
    assert_problem(api.delete(info_path(namespace, "address"), headers=sess(a)), 409, "not-leader")
    assert leadership(api, namespace) == {"leader": b, "fencing_token": t_b, "info": {}}
    assert put_info(api, namespace, b, "address", "b").status_code == 204

    # B's session deleted: its info goes with its leadership.
    assert api.delete(f"/v1/sessions/{b}").status_code == 204
    assert leadership(api, namespace) is None
    assert raw_info_keys(etcd, namespace) == []
    t_a2 = campaign(api, namespace, a)
    assert leadership(api, namespace) == {"leader": a, "fencing_token": t_a2, "info": {}}


def test_a_deleted_session_takes_its_info_in_the_same_revision(
    api: httpx.Client, etcd: EtcdProcess, namespace: str
) -> None:
    a = new_session(api)
    campaign(api, namespace, a)
    for key in ("address", "rest/url"):
        assert put_info(api, namespace, a, key, key).status_code == 204

    async def run() -> dict[bytes, int]:
        async with raw_store(etcd, namespace) as store:
            ns = store.keys.ns_prefix
            kvs, revision = await store.etcd.range_all(ns, prefix_end(ns), keys_only=True)
            expect = {kv.key for kv in kvs}
            assert len(expect) == 3, expect  # the leader key and two info keys
            seen: dict[bytes, int] = {}

            async def watch() -> None:
                async for rev, events in store.etcd.watch(
                    ns, prefix_end(ns), start_revision=revision + 1
                ):
                    seen.update({kv.key: rev for kind, kv in events if kind == "delete"})
                    if expect <= set(seen):
                        return

            async with httpx.AsyncClient(base_url=api.base_url, trust_env=False) as c:
                assert (await c.delete(f"/v1/sessions/{a}")).status_code == 204
            await asyncio.wait_for(watch(), 15)
            return seen

    seen = asyncio.run(run())
    assert len(set(seen.values())) == 1, seen


# -- the revision of a leadership answer ---------------------------------------------------


def leader_events(c: httpx.Client, ns: str, since: int) -> list[dict[str, Any]]:
    """The leader events after ``since`` (waiting at most a second for one)."""
    params = {"since": since, "kinds": "leader", "timeout": 1}
    r = c.get(f"/v1/namespaces/{enc(ns)}/watch", params=params)
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


def test_leadership_answers_name_the_revision_to_watch_from(
    api: httpx.Client, namespace: str
) -> None:
    """GET and POST .../leader (and the 404 when nobody leads) carry the
    revision they were read at: watching from it yields every later
    leadership change once and none earlier (list-then-watch, as a job
    manager's leader retrieval does it)."""
    a = new_session(api)
    nobody = assert_problem(api.get(leader_path(namespace)), 404, "not-found")["revision"]
    won = api.post(leader_path(namespace), headers=sess(a)).json()

    events = leader_events(api, namespace, nobody)
    assert [e["leader"]["leader"] for e in events] == [a]
    assert nobody < events[0]["revision"] <= won["revision"]
    assert leader_events(api, namespace, won["revision"]) == [], "nothing earlier again"

    assert put_info(api, namespace, a, "address", "jm-a").status_code == 204
    events = leader_events(api, namespace, won["revision"])
    assert [e["leader"]["info"] for e in events] == [{"address": "jm-a"}]
    current = api.get(leader_path(namespace)).json()
    assert current["revision"] >= events[0]["revision"]
    again = api.post(leader_path(namespace), headers=sess(a)).json()  # already leads
    assert again["revision"] >= current["revision"]
    assert leader_events(api, namespace, again["revision"]) == []

    assert api.delete(leader_path(namespace), headers=sess(a)).status_code == 204
    assert [e["leader"] for e in leader_events(api, namespace, current["revision"])] == [None]


# -- bad input ------------------------------------------------------------------------------


def test_info_body_limits_and_bad_input(
    api: httpx.Client, etcd: EtcdProcess, namespace: str
) -> None:
    a = new_session(api)
    campaign(api, namespace, a)
    at_limit = json.dumps("x" * (LIMIT - 2))
    assert len(at_limit) == LIMIT
    r = api.put(info_path(namespace, "big"), content=at_limit, headers=sess(a))
    assert r.status_code == 204, r.text
    over = json.dumps("x" * (LIMIT - 1))
    assert_problem(
        api.put(info_path(namespace, "big2"), content=over, headers=sess(a)), 413, "too-large"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'"'
        yield b"y" * LIMIT
        yield b'"'

    assert_problem(
        api.put(info_path(namespace, "big3"), content=chunks(), headers=sess(a)), 413, "too-large"
    )
    for bad in (b"", b"{", b"NaN", b"[Infinity]", b"\xff\xfe", b"[" * 5000 + b"]" * 5000):
        r = api.put(info_path(namespace, "bad"), content=bad, headers=sess(a))
        assert_problem(r, 400, "invalid-argument")
    deep = b"[" * 40 + b"1" + b"]" * 40
    r = api.put(info_path(namespace, "deep"), content=deep, headers=sess(a))
    assert_problem(r, 400, "invalid-argument")
    for key in ("a%0Ab", "x" * 513):
        r = api.put(f"{leader_path(namespace)}/info/{key}", content=b"1", headers=sess(a))
        assert_problem(r, 400, "invalid-argument")
    # Sessions: missing -> 400, unknown -> 410.
    assert_problem(api.put(info_path(namespace, "k"), content=b"1"), 400, "invalid-argument")
    assert_problem(
        api.put(info_path(namespace, "k"), content=b"1", headers=sess("nope")),
        410,
        "session-expired",
    )
    assert_problem(api.delete(info_path(namespace, "big")), 400, "invalid-argument")
    current = leadership(api, namespace)
    assert current is not None and list(current["info"]) == ["big"]
    assert len(raw_info_keys(etcd, namespace)) == 1


@pytest.mark.parametrize("wait", ["-1", "60.5", "61", "abc", "nan"])
def test_wait_out_of_range_is_400_and_lines_nobody_up(
    api: httpx.Client, etcd: EtcdProcess, namespace: str, wait: str
) -> None:
    a = new_session(api)
    r = api.post(leader_path(namespace), params={"wait": wait}, headers=sess(a))
    assert_problem(r, 400, "invalid-argument")
    assert line(etcd, namespace) == []


# -- waiting for leadership -------------------------------------------------------------------


def test_wait_ends_with_409_when_the_leader_stays(
    api: httpx.Client, etcd: EtcdProcess, namespace: str
) -> None:
    a, b = new_session(api), new_session(api)
    token = campaign(api, namespace, a)
    assert campaign(api, namespace, a, wait=5) == token  # the leader: at once, same token
    for wait in ("0", "0.5"):
        started = time.monotonic()
        r = api.post(leader_path(namespace), params={"wait": wait}, headers=sess(b))
        elapsed = time.monotonic() - started
        body = assert_problem(r, 409, "not-leader")
        assert body["leader"] == a
        assert elapsed >= float(wait)
        assert line(etcd, namespace) == [a]  # b's candidacy withdrawn


def _wait_for_leadership(url: str, ns: str, sid: str, wait: float) -> tuple[httpx.Response, float]:
    """POST .../leader?wait= (in a thread): the answer and when it arrived."""
    with client(url) as c:
        r = c.post(
            leader_path(ns), params={"wait": str(wait)}, headers=sess(sid), timeout=wait + 30
        )
        return r, time.monotonic()


def test_a_waiting_campaign_wins_within_a_second_of_the_leaders_session_delete(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, namespace: str
) -> None:
    a, b = new_session(api), new_session(api)
    t_a = campaign(api, namespace, a)
    assert put_info(api, namespace, a, "address", "a").status_code == 204
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_wait_for_leadership, service.url, namespace, b, 30)
        wait_until(lambda: line(etcd, namespace) == [a, b], 10, message="b never lined up")
        assert not waiting.done()
        assert api.delete(f"/v1/sessions/{a}").status_code == 204
        ended = time.monotonic()
        r, answered = waiting.result(timeout=30)
    assert r.status_code == 200, r.text
    assert answered - ended < 1.0, answered - ended
    t_b = r.json()["fencing_token"]
    assert without_revision(r.json()) == {"leader": b, "fencing_token": t_b} and t_b > t_a
    assert leadership(api, namespace) == {"leader": b, "fencing_token": t_b, "info": {}}


def test_a_waiting_campaign_wins_within_a_second_of_the_leaders_expiry(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, namespace: str
) -> None:
    a = new_session(api, ttl=3)  # never kept alive
    b = new_session(api)
    campaign(api, namespace, a)

    async def run() -> tuple[httpx.Response, float, float, float]:
        async with raw_store(etcd, namespace) as store:
            head = (await candidates(store))[0]
            assert head.value.decode() == a

            async def a_key_deleted() -> float:
                async for _, events in store.etcd.watch(
                    head.key, head.key + b"\0", start_revision=head.mod_revision + 1
                ):
                    if any(kind == "delete" for kind, _ in events):
                        return time.monotonic()
                raise AssertionError("watch ended")

            deleted = asyncio.create_task(a_key_deleted())
            async with httpx.AsyncClient(base_url=service.url, trust_env=False, timeout=60) as c:
                sent = time.monotonic()
                r = await c.post(leader_path(namespace), params={"wait": "30"}, headers=sess(b))
                answered = time.monotonic()
            return r, sent, await asyncio.wait_for(deleted, 30), answered

    r, sent, deleted, answered = asyncio.run(run())
    assert r.status_code == 200, r.text
    assert r.json()["leader"] == b
    assert sent < deleted <= answered  # b really waited for a's expiry
    assert answered - deleted < 1.0, answered - deleted


def test_a_client_that_gives_up_waiting_withdraws_its_candidacy(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, namespace: str
) -> None:
    """b waits, then its client goes away mid-wait; c waits behind it. When
    a's session ends, c leads, and b never does: its candidacy was
    withdrawn when its request was cancelled."""
    a, b, c = new_session(api), new_session(api), new_session(api)
    t_a = campaign(api, namespace, a)

    async def run() -> None:
        async with raw_store(etcd, namespace) as store:

            async def in_line() -> list[str]:
                return [kv.value.decode() for kv in await candidates(store)]

            def line_is(*expected: str) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return await in_line() == list(expected)

                return check

            async with httpx.AsyncClient(base_url=service.url, trust_env=False, timeout=60) as h:
                params = {"wait": "30"}
                wait_b = asyncio.create_task(
                    h.post(leader_path(namespace), params=params, headers=sess(b))
                )
                await async_wait_until(line_is(a, b), 10, message="b never lined up")
                wait_c = asyncio.create_task(
                    h.post(leader_path(namespace), params=params, headers=sess(c))
                )
                await async_wait_until(line_is(a, b, c), 10, message="c never lined up")
                wait_b.cancel()  # the client goes away: httpx drops the connection
                with contextlib.suppress(asyncio.CancelledError):
                    await wait_b
                await async_wait_until(
                    line_is(a, c),
                    10,
                    message="the cancelled request's candidacy was not withdrawn",
                )
                assert not wait_c.done()
                r = await h.delete(f"/v1/sessions/{a}")
                assert r.status_code == 204, r.text
                r = await asyncio.wait_for(wait_c, 10)
                assert r.status_code == 200, r.text
                assert r.json()["leader"] == c and r.json()["fencing_token"] > t_a
                assert await in_line() == [c]

    asyncio.run(run())
    current = leadership(api, namespace)
    assert current is not None and current["leader"] == c
    body = assert_problem(api.post(leader_path(namespace), headers=sess(b)), 409, "not-leader")
    assert body["leader"] == c
    assert line(etcd, namespace) == [c]


# -- auth ---------------------------------------------------------------------------------------

READER, WRITER = "leader-reader-1", "leader-writer-1"


@pytest.fixture(scope="module")
def auth_service(
    etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    tokens = {
        "tokens": [
            {"token": READER, "namespaces": ["job-*"], "role": "read"},
            {"token": WRITER, "namespaces": ["job-*"], "role": "write"},
        ]
    }
    base: Path = tmp_path_factory.mktemp("leader-auth")
    with serving_with_tokens(etcd.endpoint, base, tokens) as svc:
        yield svc


def test_info_writes_need_write_and_reads_need_read(auth_service: ServiceProcess) -> None:
    ns = f"job-{uuid.uuid4().hex[:12]}"
    with client(auth_service.url) as c:
        r = c.post("/v1/sessions", json={"ttl_seconds": 30}, headers=bearer(WRITER))
        sid = r.json()["session_id"]
        writer, reader = sess(sid, **bearer(WRITER)), sess(sid, **bearer(READER))
        r = c.post(leader_path(ns), params={"wait": "1"}, headers=writer)
        assert r.status_code == 200, r.text
        token = r.json()["fencing_token"]
        assert_problem(
            c.post(leader_path(ns), params={"wait": "1"}, headers=reader), 403, "forbidden"
        )
        assert_problem(
            c.put(info_path(ns, "address"), content=b'"x"', headers=reader), 403, "forbidden"
        )
        assert_problem(c.delete(info_path(ns, "address"), headers=reader), 403, "forbidden")
        assert_problem(c.put(info_path(ns, "address"), content=b'"x"'), 401, "unauthorized")
        assert_problem(c.get(leader_path(ns)), 401, "unauthorized")
        r = c.put(info_path(ns, "address"), content=b'"jm-1"', headers=writer)
        assert r.status_code == 204, r.text
        r = c.get(leader_path(ns), headers=bearer(READER))
        assert without_revision(r.json()) == {
            "leader": sid,
            "fencing_token": token,
            "info": {"address": "jm-1"},
        }
        assert c.delete(info_path(ns, "address"), headers=writer).status_code == 204
        assert c.get(leader_path(ns), headers=bearer(READER)).json()["info"] == {}


def test_unreachable_etcd_is_503_for_the_leadership_calls(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory(etcd_endpoints="127.0.0.1:1", etcd_timeout=1)
    h = sess("1a2b3c-0123456789abcdef")
    with client(svc.url) as c:
        for r in (
            c.get(leader_path("ns-x")),
            c.post(leader_path("ns-x"), params={"wait": "5"}, headers=h),
            c.put(info_path("ns-x", "address"), content=b'"x"', headers=h),
            c.delete(info_path("ns-x", "address"), headers=h),
        ):
            assert_problem(r, 503, "unavailable")


def test_shutdown_ends_a_waiting_campaign_with_503_and_withdraws_it(
    service_factory: Callable[..., ServiceProcess], etcd: EtcdProcess, namespace: str
) -> None:
    """SIGTERM while a campaign waits: it is answered 503 at once, its
    candidacy is withdrawn, and the service exits in seconds instead of
    holding its exit up to the 60 s wait (which left the embedded etcd of a
    SIGKILLed service running after the Flink end-to-end tests)."""
    svc = service_factory()
    with client(svc.url) as c:
        a, b = new_session(c), new_session(c)
        campaign(c, namespace, a)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_wait_for_leadership, svc.url, namespace, b, 60)
        wait_until(lambda: line(etcd, namespace) == [a, b], 10, message="b never lined up")
        stopping = time.monotonic()
        svc.proc.send_signal(15)
        svc.proc.wait(timeout=20)
        exited = time.monotonic() - stopping
        r, _ = waiting.result(timeout=30)
    assert_problem(r, 503, "unavailable")
    assert exited < 10, f"the service took {exited:.1f} s to exit with a campaign waiting"
    assert line(etcd, namespace) == [a]  # b's candidacy withdrawn
