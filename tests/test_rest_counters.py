"""Counters by name prefix against a real ``statestore serve`` on real etcd:
``GET .../counters?prefix=`` (one snapshot, sorted, with its revision) and
``DELETE .../counters?prefix=`` (batches within ``max_txn_ops``, fenced per
batch), through raw HTTP and both faces of ``statestore.http``; the SDK's
``list_counters`` / ``delete_counters`` beneath them on a fenced store.

A write token that lost track of a job's id (Flink cleaning up a job whose id
it no longer has) can list and delete that job's counters with these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from faces import FACES, rest_clients
from interleave import Send, deletes, hook_txn, wire_size
from rest import assert_problem, client, cpath, enc, leader_path, lpath, new_session, sess
from service import ServiceProcess

from statestore.config import StoreConfig
from statestore.counter import CheckpointIDCounter, delete_counters, list_counters
from statestore.election import LeaderElection
from statestore.errors import Fenced, InvalidArgument
from statestore.etcd import Txn, TxnResult
from statestore.local.etcd_process import EtcdProcess
from statestore.store import StateHandleStore


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(service.url) as c:
        yield c


def counters_path(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/counters"


def set_counters(c: httpx.Client, ns: str, values: dict[str, int]) -> None:
    for name, value in values.items():
        r = c.put(cpath(ns, name), json={"value": value})
        assert r.status_code == 200, r.text


def listing(c: httpx.Client, ns: str, prefix: str = "") -> dict[str, int]:
    r = c.get(counters_path(ns), params={"prefix": prefix})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"counters", "revision"} and isinstance(body["revision"], int), body
    assert list(body["counters"]) == sorted(body["counters"]), "sorted by name"
    counters: dict[str, int] = body["counters"]
    return counters


JOBS = {"job-a.checkpoint-id": 7, "job-a.other": 1, "job-ab.checkpoint-id": 3, "z/ü name%": 9}


def test_counters_are_listed_by_prefix_with_the_revision_of_their_snapshot(
    api: httpx.Client, namespace: str
) -> None:
    assert listing(api, namespace) == {}
    set_counters(api, namespace, JOBS)
    before = api.get(lpath(namespace)).json()["revision"]

    r = api.get(counters_path(namespace), params={"prefix": "job-a."})

    assert r.json()["counters"] == {"job-a.checkpoint-id": 7, "job-a.other": 1}
    assert r.json()["revision"] >= before
    assert listing(api, namespace) == JOBS
    assert listing(api, namespace, "job-a") == {k: v for k, v in JOBS.items() if "job-a" in k}
    assert listing(api, namespace, "z/ü") == {"z/ü name%": 9}
    assert listing(api, namespace, "nothing") == {}
    # the revision is exact list-then-watch: an increment after it is no earlier
    api.post(cpath(namespace, "job-a.other", "/increment"))
    assert listing(api, namespace, "job-a.other") == {"job-a.other": 2}


def test_deleting_by_prefix_deletes_those_counters_and_no_other(
    api: httpx.Client, namespace: str
) -> None:
    set_counters(api, namespace, JOBS)

    r = api.delete(counters_path(namespace), params={"prefix": "job-a."})

    assert (r.status_code, r.json()) == (200, {"deleted": ["job-a.checkpoint-id", "job-a.other"]})
    assert listing(api, namespace) == {"job-ab.checkpoint-id": 3, "z/ü name%": 9}
    assert api.get(cpath(namespace, "job-a.checkpoint-id")).json() == {"value": 1}
    assert api.delete(counters_path(namespace), params={"prefix": "job-a."}).json() == {
        "deleted": []
    }
    r = api.delete(counters_path(namespace))  # no prefix: every counter of the namespace
    assert r.json() == {"deleted": ["job-ab.checkpoint-id", "z/ü name%"]}
    assert listing(api, namespace) == {}


@pytest.mark.parametrize(
    "prefix",
    ["\x00", "job\x00a", "a\x1fb", "\x7f", "x" * 600],
    ids=["nul", "nul-in", "us", "del", "long"],
)
def test_a_prefix_breaking_the_name_rules_is_400_and_changes_nothing(
    api: httpx.Client, namespace: str, prefix: str
) -> None:
    set_counters(api, namespace, {"job": 1})
    for method in ("GET", "DELETE"):
        r = api.request(method, counters_path(namespace), params={"prefix": prefix})
        assert_problem(r, 400, "invalid-argument")
    assert listing(api, namespace) == {"job": 1}


@pytest.mark.parametrize("ns", ["..", "_probe", "a\x01b", "é" * 200])
def test_namespace_rules_hold_for_the_prefix_calls(api: httpx.Client, ns: str) -> None:
    for method in ("GET", "DELETE"):
        r = api.request(method, f"/v1/namespaces/{enc(ns)}/counters")
        assert_problem(r, 400, "invalid-argument")


def test_a_stale_fencing_token_deletes_nothing_even_with_nothing_to_delete(
    api: httpx.Client, namespace: str
) -> None:
    sid, other = new_session(api), new_session(api)
    token = api.post(leader_path(namespace), headers=sess(sid)).json()["fencing_token"]
    set_counters(api, namespace, {"j.a": 2, "j.b": 3})
    api.delete(leader_path(namespace), headers=sess(sid))
    new = api.post(leader_path(namespace), headers=sess(other)).json()["fencing_token"]

    for prefix in ("j.", "absent"):
        r = api.delete(
            counters_path(namespace),
            params={"prefix": prefix},
            headers={"X-Fencing-Token": str(token)},
        )
        assert_problem(r, 409, "fenced")
    assert listing(api, namespace) == {"j.a": 2, "j.b": 3}

    r = api.delete(
        counters_path(namespace), params={"prefix": "j."}, headers={"X-Fencing-Token": str(new)}
    )
    assert r.json() == {"deleted": ["j.a", "j.b"]}


@pytest.mark.parametrize("count", [16, 17, 40])
def test_deleting_more_counters_than_max_txn_ops(
    service_factory: Callable[..., ServiceProcess],
    etcd_small_txn: EtcdProcess,
    namespace: str,
    count: int,
) -> None:
    """On an etcd that refuses txns of more than 16 operations, the service,
    told the limit, deletes in batches within it: exactly one batch, one
    more, and several; with a leader's token, fenced in every batch."""
    svc = service_factory(etcd_endpoints=etcd_small_txn.endpoint, max_txn_ops=16)
    names = [f"job.{i:03d}" for i in range(count)]
    with client(svc.url) as c:
        with ThreadPoolExecutor(8) as pool:
            statuses = pool.map(
                lambda n: c.put(cpath(namespace, n), json={"value": 5}).status_code, names
            )
            assert set(statuses) == {200}
        set_counters(c, namespace, {"keep": 1})
        sid = new_session(c)
        token = c.post(leader_path(namespace), headers=sess(sid)).json()["fencing_token"]
        assert listing(c, namespace, "job.") == dict.fromkeys(names, 5)

        r = c.delete(
            counters_path(namespace),
            params={"prefix": "job."},
            headers={"X-Fencing-Token": str(token)},
        )

        assert (r.status_code, r.json()) == (200, {"deleted": names}), r.text
        assert listing(c, namespace) == {"keep": 1}
    assert "too many operations" not in svc.log_tail(400)


# -- the REST client's faces ------------------------------------------------------


@pytest.fixture(params=FACES)
def face(request: pytest.FixtureRequest, service: ServiceProcess, namespace: str) -> Iterator[Any]:
    with rest_clients(request.param, service.url, namespace=namespace) as make:
        yield make()


def test_both_faces_list_and_delete_counters_by_prefix(face: Any) -> None:
    sid = face.create_session(ttl_seconds=30).session_id
    token = face.campaign(sid).fencing_token
    for name in ("j1.ids", "j1.x", "j2.ids"):
        face.counter_set(name, 4, fencing_token=token)

    counters, revision = face.counter_list("j1.")
    assert counters == {"j1.ids": 4, "j1.x": 4} and revision > 0
    assert list(face.counter_list().counters) == ["j1.ids", "j1.x", "j2.ids"]
    with pytest.raises(InvalidArgument):
        face.counter_list("bad\x00")
    face.resign(sid)
    face.campaign(face.create_session(ttl_seconds=30).session_id)
    with pytest.raises(Fenced):
        face.counter_delete_prefix("j1.", fencing_token=token)
    assert face.counter_delete_prefix("j1.") == ["j1.ids", "j1.x"]
    assert face.counter_list().counters == {"j2.ids": 4}


# -- the SDK beneath -------------------------------------------------------------------


async def test_sdk_deletes_by_prefix_only_while_its_fence_holds(
    open_store: Callable[..., Any], make_config: Callable[..., StoreConfig]
) -> None:
    leader: StateHandleStore = await open_store(make_config())
    election = LeaderElection(leader)
    await election.campaign(timeout=5)
    fenced = leader.with_fencing(election)
    for name in ("a.1", "a.2", "b.1"):
        await CheckpointIDCounter(fenced, name).set_count(3)

    listed = await list_counters(leader, "a.")
    assert listed.counters == {"a.1": 3, "a.2": 3} and listed.revision > 0
    await election.resign()
    with pytest.raises(Fenced):
        await delete_counters(fenced, "a.")
    assert (await list_counters(leader)).counters == {"a.1": 3, "a.2": 3, "b.1": 3}
    assert await delete_counters(leader, "a.") == ["a.1", "a.2"]
    assert (await list_counters(leader)).counters == {"b.1": 3}


async def test_sdk_delete_is_fenced_in_every_batch(
    open_store: Callable[..., Any],
    make_config: Callable[..., StoreConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leadership lost between two batches: the first batch is deleted, the
    second is refused inside etcd (``Fenced``) and its counters stay."""
    store: StateHandleStore = await open_store(make_config())
    other: StateHandleStore = await open_store(make_config())
    store.backend.max_ops = 4
    election = LeaderElection(store)
    await election.campaign(timeout=5)
    names = [f"j.{i}" for i in range(10)]
    for name in names:
        await CheckpointIDCounter(store, name).set_count(2)
    batches: list[list[bytes]] = []

    async def lose_leadership_before_the_second_batch(t: Txn, send: Send) -> TxnResult:
        gone = [k for k in deletes(t) if k.startswith(store.keys.counters_prefix)]
        if gone:
            assert wire_size(t) <= 4, "within max_txn_ops"
            batches.append(gone)
            if len(batches) == 2:
                await other.etcd.delete(election.leader_key)  # as a lease expiry would
        return await send(t)

    hook_txn(monkeypatch, store.etcd, lose_leadership_before_the_second_batch)
    with pytest.raises(Fenced):
        await delete_counters(store.with_fencing(election), "j.")

    assert len(batches) == 2 and len(batches[0]) == 4
    assert list((await list_counters(other, "j.")).counters) == sorted(names)[4:]
