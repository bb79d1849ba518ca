"""rest-v1.md "Bulk calls", against a real ``statestore serve`` on real etcd:
``DELETE .../handles?prefix=``, ``DELETE .../locks?prefix=`` and
``DELETE .../counters/{name}``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import wait_until
from rest import assert_problem, client, cpath, enc, hpath, leader_path, lpath, new_session, sess
from service import ServiceProcess

from statestore.local.etcd_process import EtcdProcess


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(service.url) as c:
        yield c


def locks_path(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/locks"


def add(c: httpx.Client, ns: str, sid: str, *names: str) -> None:
    for name in names:
        r = c.put(hpath(ns, name), content=name.encode(), headers=sess(sid))
        assert r.status_code == 201, r.text


def names(c: httpx.Client, ns: str) -> list[str]:
    return [h["name"] for h in c.get(lpath(ns)).json()["handles"]]


def locks(c: httpx.Client, ns: str, name: str) -> list[str]:
    return list(c.get(hpath(ns, name)).json()["locks"])


# -- DELETE .../handles?prefix= -----------------------------------------------------------


def test_removal_by_prefix_reports_what_another_session_still_locks(
    api: httpx.Client, namespace: str
) -> None:
    sid, other = new_session(api), new_session(api)
    add(api, namespace, sid, "job/a", "job/b", "job/c", "keep")
    assert api.post(hpath(namespace, "job/b", "/lock"), headers=sess(other)).status_code == 200

    r = api.delete(lpath(namespace), params={"prefix": "job/"}, headers=sess(sid))

    assert (r.status_code, r.json()) == (200, {"removed": ["job/a", "job/c"], "locked": ["job/b"]})
    assert names(api, namespace) == ["job/b", "keep"]
    assert locks(api, namespace, "job/b") == [other], "own lock released, theirs kept"
    assert locks(api, namespace, "keep") == [sid]


def test_deferred_removal_by_prefix_completes_when_the_other_session_ends(
    api: httpx.Client, namespace: str
) -> None:
    sid, other = new_session(api), new_session(api)
    add(api, namespace, sid, "a", "b")
    api.post(hpath(namespace, "b", "/lock"), headers=sess(other))

    r = api.delete(lpath(namespace), params={"prefix": "", "deferred": "true"}, headers=sess(sid))

    assert (r.status_code, r.json()) == (200, {"removed": ["a"], "pending": ["b"]})
    assert_problem(api.post(hpath(namespace, "b", "/lock"), headers=sess(sid)), 404, "not-found")
    assert api.delete(f"/v1/sessions/{other}").status_code == 204
    wait_until(lambda: names(api, namespace) == [], timeout=15, message="b not removed")


def test_an_empty_or_missing_prefix_is_every_handle(api: httpx.Client, namespace: str) -> None:
    sid = new_session(api)
    add(api, namespace, sid, "x", "y/z", "ü")
    r = api.delete(lpath(namespace), params={"prefix": ""}, headers=sess(sid))
    assert r.json() == {"removed": ["x", "y/z", "ü"], "locked": []}
    add(api, namespace, sid, "again")
    assert api.delete(lpath(namespace), headers=sess(sid)).json()["removed"] == ["again"]
    assert names(api, namespace) == []


def test_removal_by_prefix_needs_a_session_and_a_valid_prefix(
    api: httpx.Client, namespace: str
) -> None:
    assert_problem(api.delete(lpath(namespace), params={"prefix": "a"}), 400, "invalid-argument")
    r = api.delete(lpath(namespace), params={"prefix": "x" * 600}, headers=sess(new_session(api)))
    assert_problem(r, 400, "invalid-argument")


def test_removal_by_prefix_of_more_handles_than_max_txn_ops(
    service_factory: Callable[..., ServiceProcess], etcd_small_txn: EtcdProcess, namespace: str
) -> None:
    """300 handles on an etcd that refuses txns of more than 16 operations:
    the service, told the limit, batches within it."""
    svc = service_factory(etcd_endpoints=etcd_small_txn.endpoint, max_txn_ops=16)
    with client(svc.url) as c:
        sid, other = new_session(c), new_session(c)
        all_names = [f"h{i:03d}" for i in range(300)]

        def put(name: str) -> int:
            with client(svc.url) as own:
                return own.put(hpath(namespace, name), content=b"x", headers=sess(sid)).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(put, all_names)) == {201}
        c.post(hpath(namespace, "h123", "/lock"), headers=sess(other))

        r = c.delete(lpath(namespace), params={"prefix": "h"}, headers=sess(sid))

        assert r.status_code == 200, r.text
        assert r.json() == {"removed": [n for n in all_names if n != "h123"], "locked": ["h123"]}
        assert names(c, namespace) == ["h123"]
    assert "too many operations" not in svc.log_tail(400)


def test_removal_by_prefix_with_a_stale_fencing_token_removes_nothing(
    api: httpx.Client, namespace: str
) -> None:
    sid, other = new_session(api), new_session(api)
    add(api, namespace, sid, "a", "b")
    token = api.post(leader_path(namespace), headers=sess(sid)).json()["fencing_token"]
    api.delete(leader_path(namespace), headers=sess(sid))
    new = api.post(leader_path(namespace), headers=sess(other)).json()["fencing_token"]
    assert new > token

    stale = sess(sid, **{"X-Fencing-Token": str(token)})
    assert_problem(
        api.delete(lpath(namespace), params={"prefix": ""}, headers=stale), 409, "fenced"
    )
    assert names(api, namespace) == ["a", "b"]
    assert locks(api, namespace, "a") == [sid]

    api.delete(leader_path(namespace), headers=sess(other))
    token = api.post(leader_path(namespace), headers=sess(sid)).json()["fencing_token"]
    current = sess(sid, **{"X-Fencing-Token": str(token)})
    r = api.delete(lpath(namespace), params={"prefix": ""}, headers=current)
    assert r.json() == {"removed": ["a", "b"], "locked": []}


# -- DELETE .../locks?prefix= --------------------------------------------------------------


def test_lock_release_by_prefix_leaves_other_sessions_and_other_prefixes(
    api: httpx.Client, namespace: str
) -> None:
    sid, other = new_session(api), new_session(api)
    add(api, namespace, sid, "job/a", "job/b", "other")
    api.post(hpath(namespace, "job/a", "/lock"), headers=sess(other))

    r = api.delete(locks_path(namespace), params={"prefix": "job/"}, headers=sess(sid))

    assert r.status_code == 204 and r.content == b""
    assert locks(api, namespace, "job/a") == [other]
    assert locks(api, namespace, "job/b") == []
    assert locks(api, namespace, "other") == [sid]
    assert names(api, namespace) == ["job/a", "job/b", "other"]
    r = api.post(f"/v1/sessions/{sid}/keepalive")
    assert r.status_code == 200, "the session stays alive"
    assert api.delete(locks_path(namespace), headers=sess(sid)).status_code == 204
    assert locks(api, namespace, "other") == []
    assert_problem(api.delete(locks_path(namespace)), 400, "invalid-argument")


# -- DELETE .../counters/{name} -------------------------------------------------------------


def test_a_deleted_counter_reads_1_again(api: httpx.Client, namespace: str) -> None:
    assert api.delete(cpath(namespace, "ids")).status_code == 204  # absent: fine
    for want in (1, 2):
        assert api.post(cpath(namespace, "ids", "/increment")).json() == {"value": want}
    assert api.delete(cpath(namespace, "ids")).status_code == 204
    assert api.get(cpath(namespace, "ids")).json() == {"value": 1}
    assert api.post(cpath(namespace, "ids", "/increment")).json() == {"value": 1}


def test_a_counter_delete_with_a_stale_fencing_token_is_refused(
    api: httpx.Client, namespace: str
) -> None:
    sid, other = new_session(api), new_session(api)
    token = api.post(leader_path(namespace), headers=sess(sid)).json()["fencing_token"]
    assert api.put(cpath(namespace, "ids"), json={"value": 9}).status_code == 200
    api.delete(f"/v1/sessions/{sid}")
    api.post(leader_path(namespace), headers=sess(other))

    r = api.delete(cpath(namespace, "ids"), headers={"X-Fencing-Token": str(token)})
    assert_problem(r, 409, "fenced")
    assert api.get(cpath(namespace, "ids")).json() == {"value": 9}
