"""REST sessions (rest-v1.md "Sessions") against real service processes.

A session is an etcd lease: these tests check that its locks go with it (at
once on DELETE, on expiry when not kept alive), that calls need and check
``X-Session-Id``, and that two service processes on one etcd serve the same
sessions, also across a restart.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from helpers import wait_until
from rest import assert_problem, client, hpath, lpath, new_session, sess
from service import ServiceProcess

from statestore.errors import StateStoreError
from statestore.etcd import EtcdClient
from statestore.keys import RootLayout
from statestore.local.etcd_process import EtcdProcess
from statestore.records import MalformedRecord
from statestore_api.session_registry import SessionRegistry


def put(c: httpx.Client, ns: str, name: str, sid: str, data: bytes = b"x") -> dict[str, Any]:
    r = c.put(hpath(ns, name), content=data, headers=sess(sid))
    assert r.status_code == 201, (r.status_code, r.text)
    doc: dict[str, Any] = r.json()
    return doc


def locks_of(c: httpx.Client, ns: str, name: str) -> list[str]:
    r = c.get(hpath(ns, name))
    assert r.status_code == 200, r.text
    return list(r.json()["locks"])


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(service.url) as c:
        yield c


# -- create --------------------------------------------------------------------


def test_create_with_body(api: httpx.Client, namespace: str) -> None:
    r = api.post("/v1/sessions", json={"ttl_seconds": 10, "owner": "jm-1"})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"session_id", "ttl_seconds"}
    assert isinstance(body["session_id"], str) and body["session_id"]
    assert body["ttl_seconds"] == 10
    # It is a live session: it can take a lock.
    assert put(api, namespace, "h", body["session_id"])["locks"] == [body["session_id"]]


@pytest.mark.parametrize("kwargs", [{}, {"json": {}}, {"json": {"owner": "jm-2"}}])
def test_create_without_ttl_uses_the_default(
    api: httpx.Client, namespace: str, kwargs: dict[str, Any]
) -> None:
    r = api.post("/v1/sessions", **kwargs)
    assert r.status_code == 201, r.text
    body = r.json()
    assert isinstance(body["session_id"], str) and body["session_id"]
    assert isinstance(body["ttl_seconds"], int) and body["ttl_seconds"] >= 2
    put(api, namespace, "h", body["session_id"])


def test_session_ids_are_distinct(api: httpx.Client) -> None:
    ids = {new_session(api) for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("ttl", [2, 120])  # up to the default max_session_ttl_seconds
def test_ttl_bounds_are_accepted(api: httpx.Client, ttl: int) -> None:
    r = api.post("/v1/sessions", json={"ttl_seconds": ttl})
    assert r.status_code == 201, r.text
    assert r.json()["ttl_seconds"] == ttl
    assert api.delete(f"/v1/sessions/{r.json()['session_id']}").status_code == 204


@pytest.mark.parametrize("ttl", [0, 1, -1, 121, 3601, 100000, "x", 2.5, None, [10]])
def test_ttl_out_of_range_is_400(api: httpx.Client, ttl: object) -> None:
    assert_problem(api.post("/v1/sessions", json={"ttl_seconds": ttl}), 400, "invalid-argument")


# -- keepalive -----------------------------------------------------------------


def test_keepalive(api: httpx.Client) -> None:
    sid = new_session(api, ttl=7)
    r = api.post(f"/v1/sessions/{sid}/keepalive")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session_id"] == sid
    assert body["ttl_seconds"] == 7


def _well_formed_unknown() -> str:
    return f"{secrets.randbits(60):x}-{secrets.token_hex(8)}"


@pytest.mark.parametrize(
    "make_sid",
    [
        pytest.param(lambda real: _well_formed_unknown(), id="well-formed-unknown"),
        pytest.param(lambda real: "not-a-session", id="garbage"),
        pytest.param(lambda real: "%00", id="nul"),
        pytest.param(
            lambda real: real.split("-")[0] + "-" + "0" * 16, id="right-lease-wrong-secret"
        ),
    ],
)
def test_keepalive_of_an_unknown_session_is_410(
    api: httpx.Client, make_sid: Callable[[str], str]
) -> None:
    real = new_session(api)
    bad = make_sid(real)
    assert bad != real
    assert_problem(api.post(f"/v1/sessions/{bad}/keepalive"), 410, "session-expired")
    # The real session is untouched.
    assert api.post(f"/v1/sessions/{real}/keepalive").status_code == 200


# -- delete ----------------------------------------------------------------------


def test_delete_drops_every_lock_of_the_session_at_once(api: httpx.Client, namespace: str) -> None:
    ns2 = namespace + "-second"
    owner = new_session(api)
    victim = new_session(api)
    for ns, name in [(namespace, "a"), (namespace, "b/c"), (ns2, "d")]:
        put(api, ns, name, owner)
        assert api.post(hpath(ns, name, "/lock"), headers=sess(victim)).status_code == 200
    put(api, namespace, "own", victim)
    assert sorted(locks_of(api, namespace, "a")) == sorted([owner, victim])

    r = api.delete(f"/v1/sessions/{victim}")
    assert r.status_code == 204, r.text
    assert r.content == b""
    # At once: no waiting.
    assert locks_of(api, namespace, "a") == [owner]
    assert locks_of(api, namespace, "b/c") == [owner]
    assert locks_of(api, ns2, "d") == [owner]
    assert locks_of(api, namespace, "own") == []
    listing = api.get(lpath(namespace)).json()["handles"]
    assert all(victim not in h["locks"] for h in listing)

    # The session is gone for good.
    assert_problem(api.post(f"/v1/sessions/{victim}/keepalive"), 410, "session-expired")
    assert_problem(api.put(hpath(namespace, "new"), content=b"x", headers=sess(victim)),
                   410, "session-expired")  # fmt: skip
    assert_problem(api.post(hpath(namespace, "a", "/lock"), headers=sess(victim)),
                   410, "session-expired")  # fmt: skip
    assert api.get(hpath(namespace, "new")).status_code == 404
    # Other sessions keep working.
    assert api.post(f"/v1/sessions/{owner}/keepalive").status_code == 200


def test_delete_session_completes_a_removal_it_was_blocking(
    api: httpx.Client, namespace: str
) -> None:
    owner, holder = new_session(api), new_session(api)
    put(api, namespace, "pending", owner)
    assert api.post(hpath(namespace, "pending", "/lock"), headers=sess(holder)).status_code == 200
    r = api.delete(hpath(namespace, "pending"), params={"deferred": "true"}, headers=sess(owner))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending-removal"

    assert api.delete(f"/v1/sessions/{holder}").status_code == 204
    wait_until(
        lambda: api.get(hpath(namespace, "pending")).status_code == 404,
        timeout=10,
        message="removal did not complete when the blocking session was deleted",
    )


# -- expiry ----------------------------------------------------------------------


def test_a_session_not_kept_alive_expires_with_all_its_locks(
    api: httpx.Client, namespace: str
) -> None:
    owner = new_session(api)
    put(api, namespace, "h1", owner)
    put(api, namespace, "h2", owner)
    start = time.monotonic()
    # ``kept`` is created first: without working keepalives it would lapse first.
    kept = new_session(api, ttl=2)
    lapsing = new_session(api, ttl=2)
    for sid in (lapsing, kept):
        for name in ("h1", "h2"):
            assert api.post(hpath(namespace, name, "/lock"), headers=sess(sid)).status_code == 200
    put(api, namespace, "own", lapsing)

    last_keepalive = [0.0]

    def lapsed() -> bool:
        if time.monotonic() - last_keepalive[0] > 0.4:
            r = api.post(f"/v1/sessions/{kept}/keepalive")
            assert r.status_code == 200, r.text
            last_keepalive[0] = time.monotonic()
        return all(lapsing not in locks_of(api, namespace, n) for n in ("h1", "h2", "own"))

    wait_until(lapsed, timeout=15, interval=0.1, message="the session's locks did not expire")
    assert time.monotonic() - start >= 1.5, "locks vanished before the TTL was up"

    # Every lock of the expired session went; the kept-alive one stayed.
    assert sorted(locks_of(api, namespace, "h1")) == sorted([owner, kept])
    assert sorted(locks_of(api, namespace, "h2")) == sorted([owner, kept])
    assert locks_of(api, namespace, "own") == []

    # Every call with the expired session is 410.
    h = sess(lapsing)
    assert_problem(api.post(f"/v1/sessions/{lapsing}/keepalive"), 410, "session-expired")
    assert_problem(api.put(hpath(namespace, "x"), content=b"x", headers=h), 410, "session-expired")
    assert_problem(api.post(hpath(namespace, "h1", "/lock"), headers=h), 410, "session-expired")
    assert_problem(api.delete(hpath(namespace, "h1", "/lock"), headers=h), 410, "session-expired")
    assert_problem(api.delete(hpath(namespace, "h1"), headers=h), 410, "session-expired")
    r = api.get(lpath(namespace), params={"lock": "true"}, headers=h)
    assert_problem(r, 410, "session-expired")
    # ... and changed nothing.
    assert api.get(hpath(namespace, "x")).status_code == 404
    assert sorted(locks_of(api, namespace, "h1")) == sorted([owner, kept])


# -- X-Session-Id on lock-taking calls ------------------------------------------------

LOCK_CALLS: dict[str, Callable[[httpx.Client, str, dict[str, str]], httpx.Response]] = {
    "PUT": lambda c, ns, h: c.put(hpath(ns, "new"), content=b"x", headers=h),
    "PUT If-Match": lambda c, ns, h: c.put(
        hpath(ns, "held"), content=b"x", headers={**h, "If-Match": '"1"'}
    ),
    "POST lock": lambda c, ns, h: c.post(hpath(ns, "held", "/lock"), headers=h),
    "DELETE lock": lambda c, ns, h: c.delete(hpath(ns, "held", "/lock"), headers=h),
    "DELETE": lambda c, ns, h: c.delete(hpath(ns, "held"), headers=h),
    "DELETE deferred": lambda c, ns, h: c.delete(
        hpath(ns, "held"), params={"deferred": "true"}, headers=h
    ),
    "GET lock=true": lambda c, ns, h: c.get(lpath(ns), params={"lock": "true"}, headers=h),
}


@pytest.mark.parametrize(
    ("headers", "status", "type_"),
    [
        pytest.param({}, 400, "invalid-argument", id="missing"),
        pytest.param({"X-Session-Id": ""}, 400, "invalid-argument", id="empty"),
        pytest.param({"X-Session-Id": "garbage"}, 410, "session-expired", id="garbage"),
        pytest.param(
            {"X-Session-Id": _well_formed_unknown()}, 410, "session-expired", id="unknown"
        ),
    ],
)
@pytest.mark.parametrize("call", LOCK_CALLS.values(), ids=LOCK_CALLS.keys())
def test_lock_taking_calls_need_a_live_session(
    api: httpx.Client,
    namespace: str,
    call: Callable[[httpx.Client, str, dict[str, str]], httpx.Response],
    headers: dict[str, str],
    status: int,
    type_: str,
) -> None:
    owner = new_session(api)
    before = put(api, namespace, "held", owner, b"kept")
    assert_problem(call(api, namespace, headers), status, type_)
    # Nothing changed.
    after = api.get(hpath(namespace, "held")).json()
    assert after == before
    assert api.get(hpath(namespace, "new")).status_code == 404
    assert [h["name"] for h in api.get(lpath(namespace)).json()["handles"]] == ["held"]


# -- two service processes on one etcd ---------------------------------------------


def test_two_services_share_sessions_and_survive_a_restart(
    service_factory: Callable[..., ServiceProcess], namespace: str
) -> None:
    svc_a, svc_b = service_factory(), service_factory()
    with client(svc_a.url) as a, client(svc_b.url) as b:
        sid = new_session(a, ttl=20, owner="jm-a")
        doc = put(b, namespace, "shared", sid, b"written through B")
        assert doc["locks"] == [sid]
        r = b.post(f"/v1/sessions/{sid}/keepalive")
        assert r.status_code == 200 and r.json()["session_id"] == sid

        other = new_session(b, ttl=20, owner="jm-b")
        r = a.post(hpath(namespace, "shared", "/lock"), headers=sess(other))
        assert r.status_code == 200, r.text
        listed = b.get(lpath(namespace)).json()["handles"]
        assert [(h["name"], sorted(h["locks"])) for h in listed] == [
            ("shared", sorted([sid, other]))
        ]
        assert a.get(hpath(namespace, "shared", "/state")).content == b"written through B"

        # A goes away; a new process serves the same sessions.
        svc_a.stop()
    svc_c = service_factory()
    with client(svc_c.url) as c, client(svc_b.url) as b:
        r = c.post(f"/v1/sessions/{sid}/keepalive")
        assert r.status_code == 200, r.text
        assert r.json()["session_id"] == sid
        put(c, namespace, "after-restart", sid)
        assert sorted(locks_of(c, namespace, "shared")) == sorted([sid, other])
        assert c.delete(hpath(namespace, "shared", "/lock"), headers=sess(sid)).status_code == 204
        assert locks_of(b, namespace, "shared") == [other]

        # Deleting the session through C drops its locks as seen through B.
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert locks_of(b, namespace, "after-restart") == []
        assert_problem(b.post(f"/v1/sessions/{sid}/keepalive"), 410, "session-expired")
        assert b.post(f"/v1/sessions/{other}/keepalive").status_code == 200


async def test_an_unreadable_session_record_stays_an_unexpected_error(etcd: EtcdProcess) -> None:
    """A session record is the service's own: an unreadable one is no fault
    of the client's, so it surfaces as MalformedRecord, a ValueError and no
    StateStoreError, which the service answers as the unexpected error it is
    (logged, 503 ``unavailable`` with the request id), never as a client error
    (400 ``integrity``, 410). Breaks if the registry maps it to a store error."""
    root = f"/t-{uuid.uuid4().hex}"
    async with EtcdClient([etcd.endpoint]) as etcd_client:
        registry = SessionRegistry(etcd_client, root)
        info = await registry.create(ttl_seconds=5, owner="jm")
        try:
            assert (await registry.lookup(info.session_id)).owner == "jm"
            key = RootLayout(root).session(info.session_id)
            await etcd_client.put(key, b"[]", lease=info.lease_id)
            with pytest.raises(MalformedRecord) as raised:
                await registry.lookup(info.session_id)
            assert not isinstance(raised.value, StateStoreError)
            with pytest.raises(MalformedRecord):
                await registry.list()
        finally:
            await etcd_client.lease_revoke(info.lease_id)


def test_a_deleted_session_is_410_at_once_through_every_service(
    service_factory: Callable[..., ServiceProcess], namespace: str
) -> None:
    """No service keeps a session it has served: deleted through A, it is 410
    at once through B, which used it a moment before, and through A, for the
    calls whose txns never touch the session's lease too (a removal of an
    unlocked handle, a release, a replayed add), so nothing changes.
    docs/design.md, "The session lookup is not cached"."""
    svc_a, svc_b = service_factory(), service_factory()
    with client(svc_a.url) as a, client(svc_b.url) as b:
        sid = new_session(a, ttl=20)
        replayed = sess(sid, **{"Idempotency-Key": f"add-{uuid.uuid4()}"})
        assert b.put(hpath(namespace, "mine"), content=b"x", headers=replayed).status_code == 201
        put(b, namespace, "free", sid)
        assert b.delete(hpath(namespace, "free", "/lock"), headers=sess(sid)).status_code == 204
        before = b.get(lpath(namespace)).json()["handles"]

        assert a.delete(f"/v1/sessions/{sid}").status_code == 204
        for c in (b, a):
            calls = {
                "remove unlocked": c.delete(hpath(namespace, "free"), headers=sess(sid)),
                "release": c.delete(hpath(namespace, "mine", "/lock"), headers=sess(sid)),
                "replayed add": c.put(hpath(namespace, "mine"), content=b"x", headers=replayed),
                "add": c.put(hpath(namespace, "new"), content=b"x", headers=sess(sid)),
                "lock": c.post(hpath(namespace, "free", "/lock"), headers=sess(sid)),
                "keepalive": c.post(f"/v1/sessions/{sid}/keepalive"),
            }
            for what, r in calls.items():
                assert r.status_code == 410, (what, r.status_code, r.text)
                assert_problem(r, 410, "session-expired")
        after = b.get(lpath(namespace)).json()["handles"]
        assert [(h["name"], h["version"]) for h in after] == [
            (h["name"], h["version"]) for h in before
        ]


def _etcd_reads(c: httpx.Client) -> float:
    """How many etcd reads (``get`` and ``range`` requests) the service has
    made, by its /metrics."""
    ops = ('{op="get"}', '{op="range"}')
    lines = c.get("/metrics").text.splitlines()
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.startswith("statestore_etcd_request_seconds_count")
        and line.split()[0].endswith(ops)
    )


def test_a_session_removes_what_it_added_in_one_round_trip(
    service_factory: Callable[..., ServiceProcess], namespace: str
) -> None:
    """A service keeps one store identity per session (docs/design.md, "One
    store identity per session"), so a removal of a handle the session added
    through it sends its txn without reading the handle first: the only read
    is the session lookup. (Maintenance off: no background reads.)"""
    svc = service_factory(maintenance="false")
    with client(svc.url) as c:
        sid = new_session(c)
        put(c, namespace, "added", sid)
        scrape = _etcd_reads(c)
        scrape = _etcd_reads(c) - scrape  # what a scrape itself reads (live sessions)
        before = _etcd_reads(c)
        assert c.delete(hpath(namespace, "added"), headers=sess(sid)).status_code == 204
        assert _etcd_reads(c) - before - scrape == 1
        assert c.get(hpath(namespace, "added")).status_code == 404
        # A handle it did not lock through this service is read first, as before.
        put(c, namespace, "other", new_session(c))
        c.delete(hpath(namespace, "other", "/lock"), headers=sess(sid))
        before = _etcd_reads(c)
        assert c.delete(hpath(namespace, "other"), headers=sess(sid)).status_code == 409
        assert _etcd_reads(c) - before - scrape == 2
