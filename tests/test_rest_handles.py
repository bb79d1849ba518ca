"""REST handles and listing (rest-v1.md "Handles" and "Listing") against a real service.

Every call goes over real HTTP to a real ``statestore serve`` process; what a
call left behind is read back through the API and, where "nothing stored"
matters, straight from etcd and the blob directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from helpers import nested_metadata, wait_until
from rest import HANDLE_FIELDS, assert_problem, enc, hpath, lpath, new_session, sess
from service import ServiceProcess

from statestore import StateHandleStore, StoreConfig
from statestore.config import DEFAULT_ROOT
from statestore.etcd import EtcdClient
from statestore.handle import MAX_METADATA_DEPTH
from statestore.keys import encode, prefix_end
from statestore.local.etcd_process import EtcdProcess

# -- helpers ---------------------------------------------------------------------


def assert_handle(doc: dict[str, Any], name: str, data: bytes) -> None:
    assert set(doc) == HANDLE_FIELDS, doc
    assert doc["name"] == name
    assert isinstance(doc["version"], int) and doc["version"] > 0
    assert doc["size"] == len(data)
    assert doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert isinstance(doc["metadata"], dict)
    assert isinstance(doc["locks"], list)
    datetime.fromisoformat(doc["created_at"])


def put(c: httpx.Client, ns: str, name: str, data: bytes, sid: str, **headers: str) -> Any:
    r = c.put(hpath(ns, name), content=data, headers=sess(sid, **headers))
    assert r.status_code == 201, (r.status_code, r.text)
    return r.json()


def etcd_keys(endpoint: str, ns: str) -> list[bytes]:
    """Every etcd key of namespace ``ns`` (handles, locks, uploads, gc, removals)."""

    async def read() -> list[bytes]:
        client = EtcdClient([endpoint], timeout=5)
        try:
            prefix = f"{DEFAULT_ROOT}/{encode(ns)}/".encode()
            kvs, _ = await client.range_all(prefix, prefix_end(prefix), keys_only=True)
            return [kv.key for kv in kvs]
        finally:
            await client.close()

    return asyncio.run(read())


def blob_files(svc: ServiceProcess, ns: str) -> list[Path]:
    """Blob files the service wrote for ``ns`` (conftest puts blobs beside the log)."""
    d = svc.log_file.parent / "blobs" / encode(ns)
    return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []


def assert_nothing_stored(c: httpx.Client, svc: ServiceProcess, etcd: EtcdProcess, ns: str) -> None:
    assert etcd_keys(etcd.endpoint, ns) == []
    assert blob_files(svc, ns) == []
    r = c.get(lpath(ns))
    assert r.status_code == 200 and r.json()["handles"] == [], r.text


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, trust_env=False, timeout=30) as c:
        yield c


@pytest.fixture
def sid(api: httpx.Client) -> str:
    return new_session(api)


# -- PUT: add_and_lock -------------------------------------------------------------


def test_put_adds_and_locks_then_get_has_etag(api: httpx.Client, sid: str, namespace: str) -> None:
    data = b"checkpoint state \x00\xff"
    r = api.put(hpath(namespace, "chk-1"), content=data, headers=sess(sid))
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert_handle(doc, "chk-1", data)
    assert doc["locks"] == [sid]
    assert doc["metadata"] == {}

    g = api.get(hpath(namespace, "chk-1"))
    assert g.status_code == 200
    assert g.headers["etag"] == f'"{doc["version"]}"'
    assert g.json() == doc


def test_put_existing_name_is_409_and_keeps_the_original(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    first = put(api, namespace, "dup", b"original", sid)
    other = new_session(api)
    r = api.put(hpath(namespace, "dup"), content=b"intruder", headers=sess(other))
    assert_problem(r, 409, "already-exists")
    g = api.get(hpath(namespace, "dup")).json()
    assert g["version"] == first["version"]
    assert g["locks"] == [sid]
    assert api.get(hpath(namespace, "dup", "/state")).content == b"original"


def test_metadata_round_trips_including_escaped_non_ascii(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    meta = {"job": "jöb-1 ✓", "日本": ["ü", 1, 2.5, True, None], "nested": {"a": {"b": "\u00e9"}}}
    header = json.dumps(meta)  # ensure_ascii: the header carries \\u escapes only
    assert header.isascii()
    doc = put(api, namespace, "m", b"x", sid, **{"X-Handle-Metadata": header})
    assert doc["metadata"] == meta
    assert api.get(hpath(namespace, "m")).json()["metadata"] == meta
    listed = api.get(lpath(namespace)).json()["handles"]
    assert [h["metadata"] for h in listed] == [meta]


#: Metadata nested deeper than the limit; 3,000 levels once made json.loads
#: raise RecursionError, answered as an unexpected 503.
TOO_DEEP = [
    json.dumps(nested_metadata(MAX_METADATA_DEPTH + 1)),
    '{"a":' + "[" * 3000 + "]" * 3000 + "}",
]


@pytest.mark.parametrize("header", ["{not json", "[1, 2]", '"a string"', "42", "null", *TOO_DEEP])
def test_metadata_that_is_not_a_json_object_is_400(
    api: httpx.Client,
    service: ServiceProcess,
    etcd: EtcdProcess,
    sid: str,
    namespace: str,
    header: str,
) -> None:
    r = api.put(
        hpath(namespace, "m"), content=b"x", headers=sess(sid, **{"X-Handle-Metadata": header})
    )
    body = assert_problem(r, 400, "invalid-argument")
    assert_problem(api.get(hpath(namespace, "m")), 404, "not-found")
    assert_nothing_stored(api, service, etcd, namespace)
    if header in TOO_DEEP:
        assert f"{MAX_METADATA_DEPTH} levels" in body["detail"], body
        assert "RecursionError" not in service.log_tail(200)


def test_metadata_nested_to_the_limit_round_trips(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    meta = nested_metadata(MAX_METADATA_DEPTH)
    doc = put(api, namespace, "m", b"x", sid, **{"X-Handle-Metadata": json.dumps(meta)})
    assert doc["metadata"] == meta
    assert api.get(hpath(namespace, "m")).json()["metadata"] == meta


def test_matching_content_sha256_is_accepted(api: httpx.Client, sid: str, namespace: str) -> None:
    data = os.urandom(4096)
    digest = hashlib.sha256(data).hexdigest()
    doc = put(api, namespace, "ok", data, sid, **{"X-Content-SHA256": digest.upper()})
    assert doc["sha256"] == digest
    assert api.get(hpath(namespace, "ok", "/state")).content == data


def test_mismatching_content_sha256_is_integrity_and_stores_nothing(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, sid: str, namespace: str
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    r = api.put(
        hpath(namespace, "bad"),
        content=b"the real bytes",
        headers=sess(sid, **{"X-Content-SHA256": wrong}),
    )
    assert_problem(r, 400, "integrity")
    assert_problem(api.get(hpath(namespace, "bad")), 404, "not-found")
    assert_nothing_stored(api, service, etcd, namespace)


@pytest.mark.parametrize("digest", ["abc", "z" * 64, "0" * 63, "0" * 65, "sha256:" + "0" * 64])
def test_malformed_content_sha256_is_400(
    api: httpx.Client,
    service: ServiceProcess,
    etcd: EtcdProcess,
    sid: str,
    namespace: str,
    digest: str,
) -> None:
    r = api.put(
        hpath(namespace, "x"), content=b"x", headers=sess(sid, **{"X-Content-SHA256": digest})
    )
    assert_problem(r, 400, "invalid-argument")
    assert_nothing_stored(api, service, etcd, namespace)


def test_state_over_the_size_limit_is_413_and_stores_nothing(
    service_factory: Any, etcd: EtcdProcess, namespace: str
) -> None:
    svc = service_factory(max_state_bytes=1000)
    with httpx.Client(base_url=svc.url, trust_env=False, timeout=30) as c:
        s = new_session(c)
        # With Content-Length.
        r = c.put(hpath(namespace, "big"), content=b"x" * 1001, headers=sess(s))
        assert_problem(r, 413, "too-large")
        # Streamed (chunked, no Content-Length): the limit must hold while streaming.
        r = c.put(hpath(namespace, "big"), content=iter([b"y" * 600, b"y" * 401]), headers=sess(s))
        assert "content-length" not in r.request.headers
        assert_problem(r, 413, "too-large")
        assert_nothing_stored(c, svc, etcd, namespace)

        # Exactly at the limit is fine; a replace over it is refused and changes nothing.
        doc = put(c, namespace, "edge", b"z" * 1000, s)
        r = c.put(
            hpath(namespace, "edge"),
            content=b"w" * 1001,
            headers=sess(s, **{"If-Match": f'"{doc["version"]}"'}),
        )
        assert_problem(r, 413, "too-large")
        g = c.get(hpath(namespace, "edge"))
        assert g.json()["version"] == doc["version"]
        assert c.get(hpath(namespace, "edge", "/state")).content == b"z" * 1000
        assert len(blob_files(svc, namespace)) == 1


# -- PUT with If-Match: replace ----------------------------------------------------


def test_replace_with_if_match(api: httpx.Client, sid: str, namespace: str) -> None:
    first = put(api, namespace, "r", b"v1", sid, **{"X-Handle-Metadata": '{"n": 1}'})
    r = api.put(
        hpath(namespace, "r"),
        content=b"version two",
        headers=sess(sid, **{"If-Match": f'"{first["version"]}"', "X-Handle-Metadata": '{"n": 2}'}),
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert_handle(second, "r", b"version two")
    assert second["version"] != first["version"]
    assert second["metadata"] == {"n": 2}
    assert second["locks"] == [sid]

    g = api.get(hpath(namespace, "r"))
    assert g.headers["etag"] == f'"{second["version"]}"'
    assert g.json()["version"] == second["version"]
    assert api.get(hpath(namespace, "r", "/state")).content == b"version two"

    # The old version is stale now: 412, nothing changed.
    r = api.put(
        hpath(namespace, "r"),
        content=b"lost update",
        headers=sess(sid, **{"If-Match": f'"{first["version"]}"'}),
    )
    assert_problem(r, 412, "version-conflict")
    assert api.get(hpath(namespace, "r")).json()["version"] == second["version"]
    assert api.get(hpath(namespace, "r", "/state")).content == b"version two"


def test_replace_of_a_missing_name_is_404(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, sid: str, namespace: str
) -> None:
    r = api.put(hpath(namespace, "ghost"), content=b"x", headers=sess(sid, **{"If-Match": '"7"'}))
    assert_problem(r, 404, "not-found")
    assert_nothing_stored(api, service, etcd, namespace)


# -- GET, state ------------------------------------------------------------------


def test_get_of_a_missing_handle_is_404(api: httpx.Client, namespace: str) -> None:
    assert_problem(api.get(hpath(namespace, "nope")), 404, "not-found")
    assert_problem(api.get(hpath(namespace, "nope", "/state")), 404, "not-found")


@pytest.mark.parametrize("size", [0, 1, 300_000, 5 * 1024 * 1024 + 17])
def test_state_returns_the_exact_bytes(
    api: httpx.Client, sid: str, namespace: str, size: int
) -> None:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    if size > 256:
        data = os.urandom(size)
    doc = put(api, namespace, "s", data, sid)
    r = api.get(hpath(namespace, "s", "/state"))
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-length"] == str(size)
    assert r.headers["x-content-sha256"] == hashlib.sha256(r.content).hexdigest() == doc["sha256"]


# -- lock and release ----------------------------------------------------------------


def test_post_lock_adds_the_session_to_locks(api: httpx.Client, sid: str, namespace: str) -> None:
    put(api, namespace, "l", b"x", sid)
    other = new_session(api)
    r = api.post(hpath(namespace, "l", "/lock"), headers=sess(other))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert_handle(doc, "l", b"x")
    assert sorted(doc["locks"]) == sorted([sid, other])
    assert sorted(api.get(hpath(namespace, "l")).json()["locks"]) == sorted([sid, other])
    # Locking again is idempotent.
    r = api.post(hpath(namespace, "l", "/lock"), headers=sess(other))
    assert r.status_code == 200
    assert sorted(r.json()["locks"]) == sorted([sid, other])


def test_post_lock_of_a_missing_handle_is_404(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, sid: str, namespace: str
) -> None:
    assert_problem(
        api.post(hpath(namespace, "ghost", "/lock"), headers=sess(sid)), 404, "not-found"
    )
    assert_nothing_stored(api, service, etcd, namespace)


def test_delete_lock_releases_and_is_204_when_not_held(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    put(api, namespace, "rl", b"x", sid)
    other = new_session(api)
    assert api.post(hpath(namespace, "rl", "/lock"), headers=sess(other)).status_code == 200
    r = api.delete(hpath(namespace, "rl", "/lock"), headers=sess(sid))
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert api.get(hpath(namespace, "rl")).json()["locks"] == [other]
    # Not held any more, and on a name that never existed: still 204.
    assert api.delete(hpath(namespace, "rl", "/lock"), headers=sess(sid)).status_code == 204
    assert api.delete(hpath(namespace, "never", "/lock"), headers=sess(sid)).status_code == 204
    assert api.get(hpath(namespace, "rl")).json()["locks"] == [other]


# -- DELETE: release_and_try_remove ------------------------------------------------


def test_delete_removes_the_handle(
    api: httpx.Client, etcd: EtcdProcess, sid: str, namespace: str
) -> None:
    put(api, namespace, "d", b"x", sid)
    r = api.delete(hpath(namespace, "d"), headers=sess(sid))
    assert r.status_code == 204, r.text
    assert_problem(api.get(hpath(namespace, "d")), 404, "not-found")
    assert_problem(api.get(hpath(namespace, "d", "/state")), 404, "not-found")
    assert api.get(lpath(namespace)).json()["handles"] == []
    handle_keys = [k for k in etcd_keys(etcd.endpoint, namespace) if b"/handles/" in k]
    assert handle_keys == []
    # The name is free again.
    put(api, namespace, "d", b"again", sid)


def test_delete_of_a_name_that_never_existed_is_204(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, sid: str, namespace: str
) -> None:
    assert api.delete(hpath(namespace, "never"), headers=sess(sid)).status_code == 204
    assert_nothing_stored(api, service, etcd, namespace)


def test_delete_while_another_session_holds_a_lock_is_409_locked(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    put(api, namespace, "held", b"precious", sid)
    other = new_session(api)
    assert api.post(hpath(namespace, "held", "/lock"), headers=sess(other)).status_code == 200

    body = assert_problem(api.delete(hpath(namespace, "held"), headers=sess(sid)), 409, "locked")
    assert body["holders"] == [other]
    doc = api.get(hpath(namespace, "held")).json()
    assert doc["locks"] == [other]  # the caller's own lock was released
    assert api.get(hpath(namespace, "held", "/state")).content == b"precious"

    # The last holder can remove it.
    assert api.delete(hpath(namespace, "held"), headers=sess(other)).status_code == 204
    assert_problem(api.get(hpath(namespace, "held")), 404, "not-found")


def test_deferred_delete_completes_when_the_last_holder_releases(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    put(api, namespace, "dd", b"x", sid)
    holder = new_session(api)
    assert api.post(hpath(namespace, "dd", "/lock"), headers=sess(holder)).status_code == 200

    r = api.delete(hpath(namespace, "dd"), params={"deferred": "true"}, headers=sess(sid))
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending-removal"
    assert api.get(hpath(namespace, "dd")).json()["locks"] == [holder]

    # Not lockable meanwhile.
    third = new_session(api)
    assert_problem(api.post(hpath(namespace, "dd", "/lock"), headers=sess(third)), 404, "not-found")
    assert api.get(hpath(namespace, "dd")).json()["locks"] == [holder]
    # Nor through get_all_and_lock: every handle it returns is locked, so "dd" is not among them.
    put(api, namespace, "other", b"y", sid)
    r = api.get(lpath(namespace), params={"lock": "true"}, headers=sess(third))
    assert r.status_code == 200, r.text
    assert [h["name"] for h in r.json()["handles"]] == ["other"]
    assert api.get(hpath(namespace, "dd")).json()["locks"] == [holder]

    assert api.delete(hpath(namespace, "dd", "/lock"), headers=sess(holder)).status_code == 204
    wait_until(
        lambda: api.get(hpath(namespace, "dd")).status_code == 404,
        timeout=10,
        message="deferred removal did not complete after the last release",
    )
    assert_problem(api.get(hpath(namespace, "dd", "/state")), 404, "not-found")


def test_deferred_delete_without_other_holders_removes_at_once(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    put(api, namespace, "dn", b"x", sid)
    r = api.delete(hpath(namespace, "dn"), params={"deferred": "true"}, headers=sess(sid))
    assert r.status_code == 204, r.text
    assert_problem(api.get(hpath(namespace, "dn")), 404, "not-found")


def test_deferred_delete_completes_when_the_last_holder_expires(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    put(api, namespace, "de", b"x", sid)
    holder = new_session(api, ttl=2)  # never kept alive
    assert api.post(hpath(namespace, "de", "/lock"), headers=sess(holder)).status_code == 200
    r = api.delete(hpath(namespace, "de"), params={"deferred": "true"}, headers=sess(sid))
    assert r.status_code == 202, r.text

    def holder_gone() -> bool:
        g = api.get(hpath(namespace, "de"))
        return g.status_code == 404 or g.json()["locks"] == []

    wait_until(holder_gone, timeout=15, message="the holder's lock did not expire")
    wait_until(
        lambda: api.get(hpath(namespace, "de")).status_code == 404,
        timeout=3,
        message="deferred removal did not complete after the last holder's session expired",
    )


# -- names -------------------------------------------------------------------------

ROUND_TRIP_NAMES = [
    "a/b/c",
    "/leading/and/trailing/",
    "a//b",
    "with space",
    "100%",
    "%2F literally",
    "what?x=1#frag",
    "+plus&amp=eq;semi,comma",
    "ünïcødé ✓ 日本語",
    "emoji 🎉",
    "nbsp\u00a0inside",
    "..",
    ".",
    "\\back\\slash",
    '"quoted" <angle> {brace} |pipe| `tick`',
    "x" * 512,
    "é" * 256,  # 512 bytes of UTF-8
]


@pytest.mark.parametrize("name", ROUND_TRIP_NAMES, ids=range(len(ROUND_TRIP_NAMES)))
def test_names_round_trip_exactly(api: httpx.Client, sid: str, namespace: str, name: str) -> None:
    data = name.encode() + b"|state"
    doc = put(api, namespace, name, data, sid)
    assert doc["name"] == name

    g = api.get(hpath(namespace, name))
    assert g.status_code == 200, g.text
    assert g.json()["name"] == name

    listed = api.get(lpath(namespace)).json()["handles"]
    assert [h["name"] for h in listed] == [name]
    by_prefix = api.get(lpath(namespace), params={"prefix": name}).json()["handles"]
    assert [h["name"] for h in by_prefix] == [name]

    assert api.get(hpath(namespace, name, "/state")).content == data

    other = new_session(api)
    r = api.post(hpath(namespace, name, "/lock"), headers=sess(other))
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name
    assert sorted(r.json()["locks"]) == sorted([sid, other])
    assert api.delete(hpath(namespace, name, "/lock"), headers=sess(other)).status_code == 204
    assert api.get(hpath(namespace, name)).json()["locks"] == [sid]

    assert api.delete(hpath(namespace, name), headers=sess(sid)).status_code == 204
    assert api.get(hpath(namespace, name)).status_code == 404
    assert api.get(lpath(namespace)).json()["handles"] == []


def test_a_and_a_slash_state_and_a_slash_lock_are_distinct_handles(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    names = ["a", "a/state", "a/lock", "a/lock/lock", "a/state/state"]
    for n in names:
        put(api, namespace, n, f"body of {n}".encode(), sid)
    listed = api.get(lpath(namespace)).json()["handles"]
    assert [h["name"] for h in listed] == sorted(names)
    for n in names:
        assert api.get(hpath(namespace, n)).json()["name"] == n
        assert api.get(hpath(namespace, n, "/state")).content == f"body of {n}".encode()

    # The sub-resource of "a" is not the handle "a/state".
    base = f"/v1/namespaces/{enc(namespace)}/handles"
    assert api.get(f"{base}/a/state").content == b"body of a"
    assert api.get(f"{base}/a%2Fstate").json()["name"] == "a/state"
    assert api.get(f"{base}/a%2Fstate/state").content == b"body of a/state"

    # Locking "a/lock" locks only that handle.
    other = new_session(api)
    r = api.post(f"{base}/a%2Flock/lock", headers=sess(other))
    assert r.status_code == 200 and r.json()["name"] == "a/lock"
    locks = {h["name"]: h["locks"] for h in api.get(lpath(namespace)).json()["handles"]}
    assert locks == {n: sorted([sid, other]) if n == "a/lock" else [sid] for n in names}

    # Releasing the lock of "a" is not deleting the handle "a/lock".
    assert api.delete(f"{base}/a/lock", headers=sess(sid)).status_code == 204
    assert api.get(hpath(namespace, "a")).json()["locks"] == []
    assert api.get(hpath(namespace, "a/lock")).status_code == 200

    # Deleting the handle "a/lock" (other holds it) is 409, leaving "a" alone.
    body = assert_problem(api.delete(f"{base}/a%2Flock", headers=sess(sid)), 409, "locked")
    assert body["holders"] == [other]
    assert api.delete(f"{base}/a%2Fstate", headers=sess(sid)).status_code == 204
    remaining = [h["name"] for h in api.get(lpath(namespace)).json()["handles"]]
    assert remaining == sorted(set(names) - {"a/state"})


BAD_NAME_SEGMENTS = {
    "empty": "",
    "513 ascii bytes": "x" * 513,
    "513 utf-8 bytes": quote("é" * 256 + "a", safe=""),
    "newline": "a%0Ab",
    "nul": "%00",
    "del": "a%7F",
    "tab": "a%09b",
    "escape": "%1B[31m",
    "c1 control NEL": "a%C2%85b",
    "not utf-8 FF": "%FF",
    "not utf-8 in the middle": "a%FFb",
    "truncated utf-8": "a%C3",
    "overlong utf-8": "%C0%AF",
}


@pytest.mark.parametrize("segment", BAD_NAME_SEGMENTS.values(), ids=BAD_NAME_SEGMENTS.keys())
def test_invalid_names_are_400(
    api: httpx.Client,
    service: ServiceProcess,
    etcd: EtcdProcess,
    sid: str,
    namespace: str,
    segment: str,
) -> None:
    base = f"/v1/namespaces/{enc(namespace)}/handles/{segment}"
    assert_problem(api.put(base, content=b"x", headers=sess(sid)), 400, "invalid-argument")
    assert_problem(api.get(base), 400, "invalid-argument")
    assert_problem(api.get(base + "/state"), 400, "invalid-argument")
    assert_problem(api.post(base + "/lock", headers=sess(sid)), 400, "invalid-argument")
    assert_problem(api.delete(base + "/lock", headers=sess(sid)), 400, "invalid-argument")
    assert_problem(api.delete(base, headers=sess(sid)), 400, "invalid-argument")
    assert_nothing_stored(api, service, etcd, namespace)


# -- listing -----------------------------------------------------------------------


def test_listing_is_sorted_by_name_with_a_revision(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    empty = api.get(lpath(namespace))
    assert empty.status_code == 200
    assert empty.json()["handles"] == []
    assert isinstance(empty.json()["revision"], int)

    # Chosen so that the percent-encoded keys sort differently from the names.
    names = ["b", "a/x", "a-x", "a0", "a", "A", "ü", "a x", "a%", "a~", "a/"]
    docs = {n: put(api, namespace, n, n.encode(), sid) for n in names}
    r = api.get(lpath(namespace))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"handles", "revision"}
    assert [h["name"] for h in body["handles"]] == sorted(names)
    for h in body["handles"]:
        assert_handle(h, h["name"], h["name"].encode())
        assert h == docs[h["name"]]
    assert isinstance(body["revision"], int)
    assert body["revision"] >= max(d["version"] for d in docs.values())


def test_listing_prefix_filters_names(api: httpx.Client, sid: str, namespace: str) -> None:
    names = ["dir/one", "dir/two", "dir/sub/three", "dir2", "dirx", "di", "other", "dir 1/%?"]
    for n in names:
        put(api, namespace, n, b"x", sid)

    def listed(prefix: str) -> list[str]:
        r = api.get(lpath(namespace), params={"prefix": prefix})
        assert r.status_code == 200, r.text
        return [h["name"] for h in r.json()["handles"]]

    assert listed("dir/") == ["dir/one", "dir/sub/three", "dir/two"]
    assert listed("dir/s") == ["dir/sub/three"]
    assert listed("dir") == sorted(n for n in names if n.startswith("dir"))
    assert listed("dir 1/%") == ["dir 1/%?"]
    assert listed("nomatch") == []
    assert listed("") == sorted(names)


def test_listing_with_lock_locks_every_returned_handle(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    names = ["p/1", "p/2", "p/3", "q/1"]
    for n in names:
        put(api, namespace, n, b"x", sid)
    recoverer = new_session(api)
    r = api.get(lpath(namespace), params={"lock": "true"}, headers=sess(recoverer))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["name"] for h in body["handles"]] == names
    for h in body["handles"]:
        assert sorted(h["locks"]) == sorted([sid, recoverer]), h
    for n in names:
        assert sorted(api.get(hpath(namespace, n)).json()["locks"]) == sorted([sid, recoverer])

    # With a prefix, only the returned handles are locked.
    third = new_session(api)
    r = api.get(lpath(namespace), params={"lock": "true", "prefix": "p/"}, headers=sess(third))
    assert r.status_code == 200, r.text
    assert [h["name"] for h in r.json()["handles"]] == ["p/1", "p/2", "p/3"]
    for h in r.json()["handles"]:
        assert third in h["locks"]
    assert third not in api.get(hpath(namespace, "q/1")).json()["locks"]


def test_listing_of_2000_handles_in_one_call(
    api: httpx.Client, service: ServiceProcess, etcd: EtcdProcess, namespace: str
) -> None:
    names = [f"chk/{i:06d}" for i in range(2000)]

    async def create() -> None:
        cfg = StoreConfig(
            etcd_endpoints=[etcd.endpoint],
            blob_root=f"file://{service.log_file.parent / 'blobs'}",
            namespace=namespace,
            lease_ttl=30,
        )
        async with StateHandleStore.open(cfg) as store:
            sem = asyncio.Semaphore(64)

            async def one(n: str) -> None:
                async with sem:
                    await store.add_and_lock(n, n.encode())

            await asyncio.gather(*(one(n) for n in reversed(names)))

    asyncio.run(create())  # closing the store dropped its locks

    r = api.get(lpath(namespace))
    assert r.status_code == 200
    handles = r.json()["handles"]
    assert [h["name"] for h in handles] == names
    assert all(h["locks"] == [] for h in handles)
    assert api.get(hpath(namespace, names[1234], "/state")).content == names[1234].encode()

    sid = new_session(api)
    r = api.get(lpath(namespace), params={"lock": "true"}, headers=sess(sid))
    assert r.status_code == 200, r.text
    locked = r.json()["handles"]
    assert [h["name"] for h in locked] == names
    assert all(h["locks"] == [sid] for h in locked)
    again = api.get(lpath(namespace)).json()["handles"]
    assert all(h["locks"] == [sid] for h in again)
