"""rest-v1.md "Idempotent retries", against a real ``statestore serve``.

A lost response is made with the project's TCP fault proxy between the
client and the service: the request reaches the service, which commits and
answers; the answer's bytes are dropped and the connection is then cut, so
the client sees the connection break after sending (httpx's
``RemoteProtocolError``). The retry, with the same ``Idempotency-Key``, must
answer the first attempt's result (same status, same body) and the
operation must have been applied once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import wait_until
from rest import answer_lost, assert_problem, ckpath, client, cpath, hpath, new_session, sess
from service import ServiceProcess

from statestore.config import DEFAULT_ROOT
from statestore.etcd import EtcdClient
from statestore.keys import Layout
from statestore.local.etcd_process import EtcdProcess
from statestore.local.faultproxy import FaultProxy


@pytest.fixture(scope="module")
def blob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idem-blobs")


@pytest.fixture(scope="module")
def idem_service(
    etcd: EtcdProcess, blob_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A service whose blobs this module can count."""
    env = {"STATESTORE_ETCD_ENDPOINTS": etcd.endpoint, "STATESTORE_BLOB_ROOT": f"file://{blob_dir}"}
    svc = ServiceProcess(env, tmp_path_factory.mktemp("idem-service") / "service.log")
    svc.wait_ready()
    yield svc
    svc.stop()


@pytest.fixture
def api(idem_service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(idem_service.url) as c:
        yield c


@pytest.fixture
def proxy(idem_service: ServiceProcess) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", idem_service.port)
    yield p
    p.close()


@pytest.fixture
def via_proxy(proxy: FaultProxy) -> Iterator[httpx.Client]:
    with client(f"http://{proxy.endpoint}") as c:
        yield c


@pytest.fixture
def sid(api: httpx.Client) -> str:
    return new_session(api, ttl=60)


def keyed(sid: str, key: str, **extra: str) -> dict[str, str]:
    return sess(sid, **{"Idempotency-Key": key}, **extra)


def lose_the_response(proxy: FaultProxy, send: Callable[[], httpx.Response]) -> None:
    """``send()`` through ``proxy``, its answer lost: the client must see the
    connection break (after the service committed), not an answer."""
    with pytest.raises(httpx.TransportError):
        answer_lost(proxy, send)


def blob_count(blob_dir: Path, ns: str) -> int:
    return sum(1 for p in (blob_dir / ns).rglob("*") if p.is_file())


# -- a lost response, then the retry ----------------------------------------------------


def test_a_put_retried_after_a_lost_response_returns_201_with_the_same_handle(
    api: httpx.Client,
    via_proxy: httpx.Client,
    proxy: FaultProxy,
    sid: str,
    namespace: str,
    blob_dir: Path,
) -> None:
    headers = keyed(sid, "put-1", **{"X-Handle-Metadata": '{"n": 1}'})
    lose_the_response(
        proxy, lambda: via_proxy.put(hpath(namespace, "chk/1"), content=b"state", headers=headers)
    )

    retry = via_proxy.put(hpath(namespace, "chk/1"), content=b"state", headers=headers)
    assert retry.status_code == 201, retry.text
    current = api.get(hpath(namespace, "chk/1"))
    assert retry.json() == current.json()  # same version, sha256, created_at, locks
    assert retry.headers["etag"] == current.headers["etag"]
    assert retry.json()["locks"] == [sid]
    assert blob_count(blob_dir, namespace) == 1, "the handle was written once"
    again = api.put(hpath(namespace, "chk/1"), content=b"state", headers=headers)
    assert (again.status_code, again.json()) == (201, retry.json())


def test_a_replace_retried_after_a_lost_response_returns_200_with_the_same_body(
    api: httpx.Client, via_proxy: httpx.Client, proxy: FaultProxy, sid: str, namespace: str
) -> None:
    first = api.put(hpath(namespace, "h"), content=b"v1", headers=sess(sid)).json()
    headers = keyed(sid, "replace-1", **{"If-Match": f'"{first["version"]}"'})
    lose_the_response(
        proxy, lambda: via_proxy.put(hpath(namespace, "h"), content=b"v2", headers=headers)
    )

    retry = via_proxy.put(hpath(namespace, "h"), content=b"v2", headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.json() == api.get(hpath(namespace, "h")).json()
    assert retry.json()["version"] > first["version"]
    again = api.put(hpath(namespace, "h"), content=b"v2", headers=headers)
    assert (again.status_code, again.json()) == (200, retry.json())
    assert api.get(hpath(namespace, "h", "/state")).content == b"v2"


def test_a_checkpoint_retried_after_a_lost_response_subsumes_once(
    api: httpx.Client, via_proxy: httpx.Client, proxy: FaultProxy, sid: str, namespace: str
) -> None:
    assert api.post(ckpath(namespace, "/1"), content=b"one", headers=sess(sid)).status_code == 201
    headers = keyed(sid, "ck-2")
    lose_the_response(
        proxy, lambda: via_proxy.post(ckpath(namespace, "/2"), content=b"two", headers=headers)
    )
    # A checkpoint added meanwhile: a second subsumption would take 2.
    assert api.post(ckpath(namespace, "/3"), content=b"three", headers=sess(sid)).status_code == 201

    retry = via_proxy.post(ckpath(namespace, "/2"), content=b"two", headers=headers)
    assert retry.status_code == 201, retry.text
    body = retry.json()
    assert body["subsumed"] == [1]
    assert (body["checkpoint"]["checkpoint_id"], body["checkpoint"]["locks"]) == (2, [sid])
    assert [c["checkpoint_id"] for c in api.get(ckpath(namespace)).json()["checkpoints"]] == [3]
    again = api.post(ckpath(namespace, "/2"), content=b"two", headers=headers)
    assert (again.status_code, again.json()) == (201, body)


def test_an_increment_retried_after_a_cut_advances_once(
    api: httpx.Client, via_proxy: httpx.Client, proxy: FaultProxy, sid: str, namespace: str
) -> None:
    assert api.post(cpath(namespace, "ids", "/increment")).json() == {"value": 1}
    headers = keyed(sid, "inc-1")
    lose_the_response(
        proxy, lambda: via_proxy.post(cpath(namespace, "ids", "/increment"), headers=headers)
    )

    retry = via_proxy.post(cpath(namespace, "ids", "/increment"), headers=headers)
    assert (retry.status_code, retry.json()) == (200, {"value": 2})
    assert api.get(cpath(namespace, "ids")).json() == {"value": 3}


# -- scope and reuse ----------------------------------------------------------------------


def test_the_same_key_from_another_session_is_performed_independently(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    other = new_session(api, ttl=60)
    a = api.put(hpath(namespace, "a"), content=b"a", headers=keyed(sid, "shared"))
    b = api.put(hpath(namespace, "b"), content=b"b", headers=keyed(other, "shared"))
    assert (a.status_code, b.status_code) == (201, 201)
    assert (a.json()["locks"], b.json()["locks"]) == ([sid], [other])
    path = cpath(namespace, "ids", "/increment")
    assert api.post(path, headers=keyed(sid, "n")).json() == {"value": 1}
    assert api.post(path, headers=keyed(other, "n")).json() == {"value": 2}


def test_a_key_reused_with_another_body_answers_the_first_result(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    """The stored result wins (as Stripe answers the first result): the key
    names the operation, not its body."""
    first = api.put(hpath(namespace, "h"), content=b"first", headers=keyed(sid, "k"))
    second = api.put(hpath(namespace, "h"), content=b"second!", headers=keyed(sid, "k"))
    assert (second.status_code, second.json()) == (201, first.json())
    assert api.get(hpath(namespace, "h", "/state")).content == b"first"


def test_a_key_reused_for_another_name_or_operation_is_400(
    api: httpx.Client, sid: str, namespace: str
) -> None:
    first = api.put(hpath(namespace, "h"), content=b"x", headers=keyed(sid, "k")).json()
    r = api.put(hpath(namespace, "other"), content=b"x", headers=keyed(sid, "k"))
    assert "already used for add of 'h'" in assert_problem(r, 400, "invalid-argument")["detail"]
    r = api.put(
        hpath(namespace, "h"),
        content=b"y",
        headers=keyed(sid, "k", **{"If-Match": f'"{first["version"]}"'}),
    )
    assert_problem(r, 400, "invalid-argument")
    assert_problem(
        api.post(cpath(namespace, "c", "/increment"), headers=keyed(sid, "k")), 400, None
    )
    assert api.get(hpath(namespace, "other")).status_code == 404


@pytest.mark.parametrize("key", ["x" * 129, "tab\there", ""])
def test_a_bad_key_is_400_and_nothing_is_written(
    api: httpx.Client, sid: str, namespace: str, key: str
) -> None:
    r = api.put(
        hpath(namespace, "h"), content=b"x", headers=keyed(sid, "ok") | {"Idempotency-Key": key}
    )
    assert_problem(r, 400, "invalid-argument")
    assert api.get(hpath(namespace, "h")).status_code == 404


def test_a_non_ascii_key_is_400(api: httpx.Client, sid: str, namespace: str) -> None:
    headers = [(b"X-Session-Id", sid.encode()), (b"Idempotency-Key", "clé".encode("latin-1"))]
    r = api.put(hpath(namespace, "h"), content=b"x", headers=headers)
    assert_problem(r, 400, "invalid-argument")


def test_an_increment_with_a_key_needs_a_session(api: httpx.Client, namespace: str) -> None:
    r = api.post(cpath(namespace, "ids", "/increment"), headers={"Idempotency-Key": "k"})
    assert "X-Session-Id" in assert_problem(r, 400, "invalid-argument")["detail"]
    assert api.get(cpath(namespace, "ids")).json() == {"value": 1}


# -- concurrent duplicates ------------------------------------------------------------------


def test_concurrent_duplicates_with_one_key_apply_once(
    api: httpx.Client, idem_service: ServiceProcess, sid: str, namespace: str, blob_dir: Path
) -> None:
    def put(_: int) -> httpx.Response:
        with client(idem_service.url) as c:
            return c.put(hpath(namespace, "h"), content=b"same", headers=keyed(sid, "dup"))

    def increment(_: int) -> httpx.Response:
        with client(idem_service.url) as c:
            return c.post(cpath(namespace, "ids", "/increment"), headers=keyed(sid, "dup-i"))

    with ThreadPoolExecutor(8) as pool:
        puts = list(pool.map(put, range(8)))
        increments = list(pool.map(increment, range(8)))
    assert {r.status_code for r in puts} == {201}
    assert all(r.json() == puts[0].json() for r in puts)
    assert blob_count(blob_dir, namespace) == 1
    assert {r.status_code for r in increments} == {200}
    assert {r.json()["value"] for r in increments} == {1}
    assert api.get(cpath(namespace, "ids")).json() == {"value": 2}


# -- the window ---------------------------------------------------------------------------


def test_a_key_older_than_the_window_is_gone_and_a_retry_performs_again(
    service_factory: Callable[..., ServiceProcess], etcd: EtcdProcess, namespace: str
) -> None:
    svc = service_factory(idempotency_window_seconds=2)
    with client(svc.url) as c:
        sid = new_session(c, ttl=60)
        path = cpath(namespace, "ids", "/increment")
        assert c.post(path, headers=keyed(sid, "k")).json() == {"value": 1}
        assert c.post(path, headers=keyed(sid, "k")).json() == {"value": 1}
        record = Layout(DEFAULT_ROOT, namespace).idempotency(sid, "k")
        # Kept at least the window, at most 1.5 x (3 s), then etcd's expiry sweep.
        wait_until(lambda: read_key(etcd, record) is None, timeout=15, interval=0.2)
        assert c.post(path, headers=keyed(sid, "k")).json() == {"value": 2}


def read_key(etcd: EtcdProcess, key: bytes) -> Any:
    async def read() -> Any:
        etcd_client = EtcdClient([etcd.endpoint])
        try:
            return await etcd_client.get(key)
        finally:
            await etcd_client.close()

    return asyncio.run(read())
