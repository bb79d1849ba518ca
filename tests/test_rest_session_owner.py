"""A session belongs to the token that created it (rest-v1.md "Sessions").

With auth on, another token's keepalive, delete or ``X-Session-Id`` is 403
``forbidden`` and nothing changes: every etcd key of the namespaces involved
and the session record are compared before and after (and, for keepalive,
the lease's remaining TTL), then the owner makes the same call and succeeds.
Session ids are no secret (``locks``, ``holders`` and ``GET .../leader``
show them to read tokens), so this is what stops a token from keeping a
dead job manager's leadership alive or stripping a live one of it.

Admins list and delete only the sessions they may manage: every session for
an admin whose namespaces include ``*``, otherwise only its own token's.
A session created while auth was off has no owner: with auth on nobody may
use it or keep it alive (it expires within its TTL), and only a ``*`` admin
sees and deletes it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from helpers import wait_until
from rest import assert_problem, bearer, ckpath, client, cpath, hpath, leader_path, lpath, sess
from service import ServiceProcess, serving_with_tokens

from statestore.config import DEFAULT_ROOT
from statestore.etcd import EtcdClient
from statestore.keys import encode, prefix_end
from statestore.local.etcd_process import EtcdProcess

A_WRITE = "owner-a-write-token"  # the owner of the sessions under test
A_READ = "owner-a-read-token"
WIDE_WRITE = "owner-wide-write-token"  # another token that may write the owner's namespace
B_WRITE = "owner-b-write-token"
B_ADMIN = "owner-b-admin-token"
ALL_ADMIN = "owner-all-admin-token"
TOKENS = {
    "tokens": [
        {"token": A_WRITE, "namespaces": ["job-a*"], "role": "write"},
        {"token": A_READ, "namespaces": ["job-a*"], "role": "read"},
        {"token": WIDE_WRITE, "namespaces": ["job-*"], "role": "write"},
        {"token": B_WRITE, "namespaces": ["job-b*"], "role": "write"},
        {"token": B_ADMIN, "namespaces": ["job-b*"], "role": "admin"},
        {"token": ALL_ADMIN, "namespaces": ["*"], "role": "admin"},
    ]
}
SESSION_TTL = 30
T = TypeVar("T")


@pytest.fixture(scope="module")
def auth_service(
    etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    with serving_with_tokens(
        etcd.endpoint, tmp_path_factory.mktemp("owner-service"), TOKENS
    ) as svc:
        yield svc


@pytest.fixture
def api(auth_service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(auth_service.url) as c:
        yield c


def new_session(c: httpx.Client, token: str) -> str:
    r = c.post(
        "/v1/sessions",
        json={"ttl_seconds": SESSION_TTL, "owner": "owner-tests"},
        headers=bearer(token),
    )
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def as_session(token: str, sid: str) -> dict[str, str]:
    return {**bearer(token), **sess(sid)}


@dataclass(frozen=True)
class World:
    """``sid`` (token ``A_WRITE``) holds the handle ``h`` of ``ns_a``, leads
    ``ns_a`` and holds checkpoint 1 there; ``ns_b`` has a handle ``h`` held by
    a session of ``B_WRITE``; both have the counter ``n``."""

    sid: str
    ns_a: str
    ns_b: str


@pytest.fixture
def world(api: httpx.Client) -> World:
    tag = uuid.uuid4().hex[:10]
    w = World(new_session(api, A_WRITE), f"job-a-{tag}", f"job-b-{tag}")
    owner = as_session(A_WRITE, w.sid)
    assert api.put(hpath(w.ns_a, "h"), content=b"a", headers=owner).status_code == 201
    r = api.post(leader_path(w.ns_a), headers=owner)
    assert r.status_code == 200 and r.json()["leader"] == w.sid, r.text
    assert api.post(ckpath(w.ns_a, "/1"), content=b"ck1", headers=owner).status_code == 201
    b_session = as_session(B_WRITE, new_session(api, B_WRITE))
    assert api.put(hpath(w.ns_b, "h"), content=b"b", headers=b_session).status_code == 201
    for ns, headers in ((w.ns_a, owner), (w.ns_b, b_session)):  # for the counter calls to keep
        assert api.put(cpath(ns, "n"), json={"value": 3}, headers=headers).status_code == 200
    return w


def read_etcd(etcd: EtcdProcess, read: Callable[[EtcdClient], Awaitable[T]]) -> T:
    """``read(client)`` on a client of our own (not the service's)."""

    async def run() -> T:
        etcd_client = EtcdClient([etcd.endpoint])
        try:
            return await read(etcd_client)
        finally:
            await etcd_client.close()

    return asyncio.run(run())


def session_key(sid: str) -> bytes:
    return f"{DEFAULT_ROOT}/_sessions/{sid}".encode()


def etcd_state(etcd: EtcdProcess, sid: str, *namespaces: str) -> dict[bytes, tuple[int, int]]:
    """``key -> (mod revision, lease)`` of the session record ``sid`` and of every
    key of ``namespaces`` (gc entries aside: the maintenance GC takes them)."""

    async def read(etcd_client: EtcdClient) -> dict[bytes, tuple[int, int]]:
        state: dict[bytes, tuple[int, int]] = {}
        for ns in namespaces:
            prefix = f"{DEFAULT_ROOT}/{encode(ns)}/".encode()
            kvs, _ = await etcd_client.range_all(prefix, prefix_end(prefix))
            state.update(
                (kv.key, (kv.mod_revision, kv.lease))
                for kv in kvs
                if kv.key[len(prefix) :].split(b"/")[0] != b"gc"
            )
        record = await etcd_client.get(session_key(sid))
        assert record is not None, f"session {sid} is gone"
        state[record.key] = (record.mod_revision, record.lease)
        return state

    return read_etcd(etcd, read)


def lease_ttl(etcd: EtcdProcess, sid: str) -> int:
    """The remaining TTL of the session's lease (-1: gone)."""
    lease_id = int(sid.split("-")[0], 16)
    return read_etcd(etcd, lambda etcd_client: etcd_client.lease_ttl(lease_id))


# -- every use of a session id by another token ---------------------------------------

Call = Callable[[httpx.Client, str, dict[str, str]], httpx.Response]


def replace_h(c: httpx.Client, ns: str, headers: dict[str, str]) -> httpx.Response:
    version = c.get(hpath(ns, "h"), headers=headers).json()["version"]
    return c.put(hpath(ns, "h"), content=b"v2", headers={**headers, "If-Match": f'"{version}"'})


@dataclass(frozen=True)
class Use:
    """A call that acts as the ``X-Session-Id`` session: its route (as in the
    OpenAPI document), the call, and what the owner gets for it in ``ns_a``."""

    method: str
    route: str
    call: Call
    owner_status: int


HANDLE = "/v1/namespaces/{ns}/handles/{name}"
NS = "/v1/namespaces/{ns}"
USES = {
    "PUT handle": Use(
        "put", HANDLE, lambda c, ns, h: c.put(hpath(ns, "new"), content=b"x", headers=h), 201
    ),
    "PUT handle If-Match": Use("put", HANDLE, replace_h, 200),
    "POST lock": Use(
        "post", HANDLE + "/lock", lambda c, ns, h: c.post(hpath(ns, "h", "/lock"), headers=h), 200
    ),
    "DELETE lock": Use(
        "delete",
        HANDLE + "/lock",
        lambda c, ns, h: c.delete(hpath(ns, "h", "/lock"), headers=h),
        204,
    ),
    "DELETE handle": Use(
        "delete", HANDLE, lambda c, ns, h: c.delete(hpath(ns, "h"), headers=h), 204
    ),
    "GET handles lock=true": Use(
        "get",
        NS + "/handles",
        lambda c, ns, h: c.get(lpath(ns), params={"lock": "true"}, headers=h),
        200,
    ),
    "POST leader": Use(
        "post", NS + "/leader", lambda c, ns, h: c.post(leader_path(ns), headers=h), 200
    ),
    "DELETE leader": Use(
        "delete", NS + "/leader", lambda c, ns, h: c.delete(leader_path(ns), headers=h), 204
    ),
    "POST leader wait": Use(
        "post",
        NS + "/leader",
        lambda c, ns, h: c.post(leader_path(ns), params={"wait": "1"}, headers=h),
        200,
    ),
    "PUT leader info": Use(
        "put",
        NS + "/leader/info/{key}",
        lambda c, ns, h: c.put(leader_path(ns) + "/info/address", content=b'"jm"', headers=h),
        204,
    ),
    "DELETE leader info": Use(
        "delete",
        NS + "/leader/info/{key}",
        lambda c, ns, h: c.delete(leader_path(ns) + "/info/address", headers=h),
        204,
    ),
    "POST checkpoint": Use(
        "post",
        NS + "/checkpoints/{checkpoint_id}",
        lambda c, ns, h: c.post(ckpath(ns, "/2"), content=b"ck2", headers=h),
        201,
    ),
    "GET checkpoints lock=true": Use(
        "get",
        NS + "/checkpoints",
        lambda c, ns, h: c.get(ckpath(ns), params={"lock": "true"}, headers=h),
        200,
    ),
    "POST counter increment": Use(
        "post",
        NS + "/counters/{name}/increment",
        lambda c, ns, h: c.post(cpath(ns, "n", "/increment"), headers=h),
        200,
    ),
    "PUT counter": Use(
        "put",
        NS + "/counters/{name}",
        lambda c, ns, h: c.put(cpath(ns, "n"), json={"value": 7}, headers=h),
        200,
    ),
    "DELETE counter": Use(
        "delete",
        NS + "/counters/{name}",
        lambda c, ns, h: c.delete(cpath(ns, "n"), headers=h),
        204,
    ),
    "DELETE counters by prefix": Use(
        "delete",
        NS + "/counters",
        lambda c, ns, h: c.delete(
            f"/v1/namespaces/{ns}/counters", params={"prefix": "n"}, headers=h
        ),
        200,
    ),
    "DELETE handles by prefix": Use(
        "delete",
        NS + "/handles",
        lambda c, ns, h: c.delete(lpath(ns), params={"prefix": "h"}, headers=h),
        200,
    ),
    "DELETE locks by prefix": Use(
        "delete",
        NS + "/locks",
        lambda c, ns, h: c.delete(f"/v1/namespaces/{ns}/locks", params={"prefix": ""}, headers=h),
        204,
    ),
}

#: Tokens other than the owner, each with a namespace it may act in: the
#: owner's (``a``), or one of its own (``b``) where it would take locks and
#: leadership on the owner's lease.
FOREIGN = {
    "job-* writer in the owner's namespace": (WIDE_WRITE, "a"),
    "job-b* writer in its namespace": (B_WRITE, "b"),
    "job-b* admin in its namespace": (B_ADMIN, "b"),
    "* admin in the owner's namespace": (ALL_ADMIN, "a"),
}


@pytest.mark.parametrize(("token", "where"), FOREIGN.values(), ids=FOREIGN.keys())
@pytest.mark.parametrize("use", USES.values(), ids=USES.keys())
def test_another_tokens_x_session_id_is_403_and_changes_nothing(
    api: httpx.Client, etcd: EtcdProcess, world: World, use: Use, token: str, where: str
) -> None:
    ns = world.ns_a if where == "a" else world.ns_b

    def leadership() -> Any:  # less the revision it was read at: others write meanwhile
        body = api.get(leader_path(world.ns_a), headers=bearer(A_WRITE)).json()
        return {k: v for k, v in body.items() if k != "revision"}

    before = etcd_state(etcd, world.sid, world.ns_a, world.ns_b)
    leader_before = leadership()

    assert_problem(use.call(api, ns, as_session(token, world.sid)), 403, "forbidden")

    assert etcd_state(etcd, world.sid, world.ns_a, world.ns_b) == before
    assert leadership() == leader_before
    r = use.call(api, world.ns_a, as_session(A_WRITE, world.sid))
    assert r.status_code == use.owner_status, r.text


def test_every_route_that_takes_x_session_id_is_covered(api: httpx.Client) -> None:
    """The matrix above must grow with the API: a new route taking the header
    is a route whose ownership check nobody has tested."""
    doc = api.get("/openapi.json").json()
    taking = {
        (method, path)
        for path, operations in doc["paths"].items()
        for method, op in operations.items()
        if any(
            p["in"] == "header" and p["name"].lower() == "x-session-id"
            for p in op.get("parameters", [])
        )
    }
    assert taking == {(u.method, u.route) for u in USES.values()}


# -- keepalive and delete ---------------------------------------------------------------


@pytest.mark.parametrize(("token", "where"), FOREIGN.values(), ids=FOREIGN.keys())
def test_another_tokens_keepalive_is_403_and_does_not_extend_the_lease(
    api: httpx.Client, etcd: EtcdProcess, world: World, token: str, where: str
) -> None:
    # A keepalive resets the remaining TTL to the full TTL: wait until it has
    # visibly run down, so a keepalive that got through would show.
    run_down = SESSION_TTL - 2
    wait_until(lambda: 0 < lease_ttl(etcd, world.sid) <= run_down, timeout=10)
    before = etcd_state(etcd, world.sid, world.ns_a)

    r = api.post(f"/v1/sessions/{world.sid}/keepalive", headers=bearer(token))
    assert_problem(r, 403, "forbidden")

    assert 0 < lease_ttl(etcd, world.sid) <= run_down
    assert etcd_state(etcd, world.sid, world.ns_a) == before
    r = api.post(f"/v1/sessions/{world.sid}/keepalive", headers=bearer(A_WRITE))
    assert r.status_code == 200, r.text
    assert lease_ttl(etcd, world.sid) > run_down


NOT_MANAGING = {k: v for k, v in FOREIGN.items() if v[0] != ALL_ADMIN}


@pytest.mark.parametrize(("token", "where"), NOT_MANAGING.values(), ids=NOT_MANAGING.keys())
def test_another_tokens_delete_is_403_and_changes_nothing(
    api: httpx.Client, etcd: EtcdProcess, world: World, token: str, where: str
) -> None:
    before = etcd_state(etcd, world.sid, world.ns_a)

    assert_problem(api.delete(f"/v1/sessions/{world.sid}", headers=bearer(token)), 403, "forbidden")

    assert etcd_state(etcd, world.sid, world.ns_a) == before
    assert api.get(hpath(world.ns_a, "h"), headers=bearer(A_WRITE)).json()["locks"] == [world.sid]
    assert api.delete(f"/v1/sessions/{world.sid}", headers=bearer(A_WRITE)).status_code == 204
    assert api.get(hpath(world.ns_a, "h"), headers=bearer(A_WRITE)).json()["locks"] == []
    assert api.get(leader_path(world.ns_a), headers=bearer(A_WRITE)).status_code == 404


def test_a_read_token_that_sees_a_session_id_cannot_use_it(
    api: httpx.Client, etcd: EtcdProcess, world: World
) -> None:
    reader = bearer(A_READ)
    assert api.get(hpath(world.ns_a, "h"), headers=reader).json()["locks"] == [world.sid]
    assert api.get(leader_path(world.ns_a), headers=reader).json()["leader"] == world.sid
    before = etcd_state(etcd, world.sid, world.ns_a)
    for name in ("POST lock", "DELETE handle", "DELETE leader", "GET handles lock=true"):
        r = USES[name].call(api, world.ns_a, as_session(A_READ, world.sid))
        assert_problem(r, 403, "forbidden")
    r = api.post(f"/v1/sessions/{world.sid}/keepalive", headers=reader)
    assert_problem(r, 403, "forbidden")
    assert_problem(api.delete(f"/v1/sessions/{world.sid}", headers=reader), 403, "forbidden")
    assert etcd_state(etcd, world.sid, world.ns_a) == before


# -- admins: listing and deleting --------------------------------------------------------


def listed(c: httpx.Client, token: str) -> set[str]:
    r = c.get("/v1/sessions", headers=bearer(token))
    assert r.status_code == 200, r.text
    return {s["session_id"] for s in r.json()["sessions"]}


def test_an_admin_not_of_every_namespace_lists_and_deletes_only_its_own_sessions(
    api: httpx.Client, etcd: EtcdProcess, world: World
) -> None:
    own = new_session(api, B_ADMIN)
    same_namespaces = new_session(api, B_WRITE)
    seen = listed(api, B_ADMIN)
    assert own in seen
    assert world.sid not in seen and same_namespaces not in seen

    before = etcd_state(etcd, world.sid, world.ns_a)
    for other in (world.sid, same_namespaces):
        assert_problem(
            api.delete(f"/v1/sessions/{other}", headers=bearer(B_ADMIN)), 403, "forbidden"
        )
    assert etcd_state(etcd, world.sid, world.ns_a) == before
    assert (
        api.post(f"/v1/sessions/{same_namespaces}/keepalive", headers=bearer(B_WRITE)).status_code
        == 200
    )

    assert api.delete(f"/v1/sessions/{own}", headers=bearer(B_ADMIN)).status_code == 204
    assert own not in listed(api, B_ADMIN)


def test_an_admin_of_every_namespace_lists_and_deletes_every_session(
    api: httpx.Client, world: World
) -> None:
    others = {world.sid, new_session(api, B_ADMIN), new_session(api, B_WRITE)}
    assert others <= listed(api, ALL_ADMIN)

    assert api.delete(f"/v1/sessions/{world.sid}", headers=bearer(ALL_ADMIN)).status_code == 204
    # Deleting it ended its locks and leadership at once.
    assert api.get(hpath(world.ns_a, "h"), headers=bearer(A_WRITE)).json()["locks"] == []
    assert api.get(leader_path(world.ns_a), headers=bearer(A_WRITE)).status_code == 404
    assert world.sid not in listed(api, ALL_ADMIN)
    r = api.post(f"/v1/sessions/{world.sid}/keepalive", headers=bearer(A_WRITE))
    assert_problem(r, 410, "session-expired")


# -- what the record holds ------------------------------------------------------------------


def test_the_record_holds_a_token_id_never_the_token(api: httpx.Client, etcd: EtcdProcess) -> None:
    sid = new_session(api, A_WRITE)

    kv = read_etcd(etcd, lambda etcd_client: etcd_client.get(session_key(sid)))
    assert kv is not None
    record = kv.value
    assert A_WRITE.encode() not in record
    assert json.loads(record)["token_id"] == hashlib.sha256(A_WRITE.encode()).hexdigest()


# -- sessions from before auth was turned on ------------------------------------------------


def test_a_session_created_with_auth_off_is_only_deleted_by_a_star_admin(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess
) -> None:
    """``service`` (auth off) and ``auth_service`` share etcd and the key root:
    the same deployment before and after a tokens file was configured."""
    ns = f"job-a-{uuid.uuid4().hex[:10]}"
    with client(service.url) as open_api:
        r = open_api.post("/v1/sessions", json={"ttl_seconds": SESSION_TTL, "owner": "old"})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        assert open_api.put(hpath(ns, "h"), content=b"x", headers=sess(sid)).status_code == 201
    before = etcd_state(etcd, sid, ns)

    for token in (A_WRITE, ALL_ADMIN):
        r = api.post(f"/v1/sessions/{sid}/keepalive", headers=bearer(token))
        assert_problem(r, 403, "forbidden")
        r = api.post(hpath(ns, "h", "/lock"), headers=as_session(token, sid))
        assert_problem(r, 403, "forbidden")
    for token in (A_WRITE, B_ADMIN):
        assert_problem(api.delete(f"/v1/sessions/{sid}", headers=bearer(token)), 403, "forbidden")
    assert etcd_state(etcd, sid, ns) == before
    assert sid not in listed(api, B_ADMIN)

    assert sid in listed(api, ALL_ADMIN)
    assert api.delete(f"/v1/sessions/{sid}", headers=bearer(ALL_ADMIN)).status_code == 204
    assert api.get(hpath(ns, "h"), headers=bearer(A_WRITE)).json()["locks"] == []
