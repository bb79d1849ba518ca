"""REST errors and operations (rest-v1.md "Conventions" and "Operations").

Every error is ``application/problem+json`` with a type word of the spec;
unknown routes and methods too; fencing refusals change nothing; an
unreachable etcd is 503 ``unavailable``, never a 500; every response carries
a request id; ``/healthz``, ``/readyz`` and ``/metrics`` behave as stated.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rest import PROBLEM_TYPES, assert_problem, client, hpath, lpath, new_session
from service import ServiceProcess

from statestore.errors import StateStoreError
from statestore.etcd import Compacted
from statestore_api import problems


@pytest.fixture
def api(service: ServiceProcess) -> Iterator[httpx.Client]:
    with client(service.url) as c:
        yield c


# -- routing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/nope",
        "/v1",
        "/v1/nope",
        "/v1/namespaces/ns-x/unknown",
        "/v1/namespaces/ns-x/handles/a/b/c",
    ],
)
def test_unknown_route_is_404_problem(api: httpx.Client, path: str) -> None:
    assert_problem(api.get(path), 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PATCH", "/v1/namespaces/ns-x/handles/a"),
        ("POST", "/v1/namespaces/ns-x/handles/a"),
        ("PUT", "/v1/sessions"),
        ("DELETE", "/healthz"),
        ("POST", "/v1/namespaces/ns-x/handles"),
        ("PUT", "/v1/namespaces/ns-x/handles/a/state"),
        ("GET", "/v1/namespaces/ns-x/handles/a/lock"),
        ("GET", "/v1/sessions/abc/keepalive"),
    ],
)
def test_wrong_method_is_405_problem(api: httpx.Client, method: str, path: str) -> None:
    r = api.request(method, path)
    assert_problem(r, 405, None)
    assert "allow" in r.headers  # RFC 9110: a 405 names the allowed methods
    assert method not in [m.strip() for m in r.headers["allow"].split(",")]


# -- request bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"{", b'{"ttl_seconds": 10,}', b"[1, 2]", b'"str"', b'{"owner": 5}',
     b'{"owner": "' + b"o" * 257 + b'"}'],
)  # fmt: skip
def test_invalid_session_body_is_400_problem(api: httpx.Client, body: bytes) -> None:
    r = api.post("/v1/sessions", content=body, headers={"Content-Type": "application/json"})
    problem = assert_problem(r, 400, "invalid-argument")
    assert isinstance(problem["detail"], str)  # not FastAPI's {"detail": [...]} shape


# -- fencing -----------------------------------------------------------------------


@pytest.fixture
def fenced_setup(api: httpx.Client, namespace: str) -> dict[str, Any]:
    """Handle ``h`` written and locked by ``owner``; ``other`` is a second session."""
    owner, other = new_session(api), new_session(api)
    r = api.put(hpath(namespace, "h"), content=b"original", headers={"X-Session-Id": owner})
    assert r.status_code == 201, r.text
    return {"owner": owner, "other": other, "doc": r.json()}


Call = Callable[[httpx.Client, str, dict[str, Any], str], httpx.Response]

FENCED_CALLS: dict[str, Call] = {
    "PUT add": lambda c, ns, s, tok: c.put(
        hpath(ns, "new"), content=b"x", headers={"X-Session-Id": s["owner"], "X-Fencing-Token": tok}
    ),
    "PUT replace": lambda c, ns, s, tok: c.put(
        hpath(ns, "h"),
        content=b"replaced",
        headers={
            "X-Session-Id": s["owner"],
            "X-Fencing-Token": tok,
            "If-Match": f'"{s["doc"]["version"]}"',
        },
    ),
    "DELETE": lambda c, ns, s, tok: c.delete(
        hpath(ns, "h"), headers={"X-Session-Id": s["owner"], "X-Fencing-Token": tok}
    ),
    "DELETE deferred": lambda c, ns, s, tok: c.delete(
        hpath(ns, "h"),
        params={"deferred": "true"},
        headers={"X-Session-Id": s["owner"], "X-Fencing-Token": tok},
    ),
    "POST lock": lambda c, ns, s, tok: c.post(
        hpath(ns, "h", "/lock"), headers={"X-Session-Id": s["other"], "X-Fencing-Token": tok}
    ),
}


def assert_unchanged(api: httpx.Client, namespace: str, setup: dict[str, Any]) -> None:
    r = api.get(hpath(namespace, "h"))
    assert r.status_code == 200, r.text
    after, before = r.json(), setup["doc"]
    assert after == before, f"the refused call changed the handle: {before} -> {after}"
    assert api.get(hpath(namespace, "h", "/state")).content == b"original"
    assert api.get(hpath(namespace, "new")).status_code == 404
    assert [h["name"] for h in api.get(lpath(namespace)).json()["handles"]] == ["h"]


@pytest.mark.parametrize("token", ["abc", "1.5", "1e3", "0x10", "--1"])
@pytest.mark.parametrize("call", FENCED_CALLS.values(), ids=FENCED_CALLS.keys())
def test_non_integer_fencing_token_is_400(
    api: httpx.Client, namespace: str, fenced_setup: dict[str, Any], call: Call, token: str
) -> None:
    assert_problem(call(api, namespace, fenced_setup, token), 400, "invalid-argument")
    assert_unchanged(api, namespace, fenced_setup)


# No namespace has a leader here (leadership lands later), so no token is current.
@pytest.mark.parametrize("token", ["1", "0", "-1", "4242424242"])
@pytest.mark.parametrize("call", FENCED_CALLS.values(), ids=FENCED_CALLS.keys())
def test_fencing_token_that_is_not_current_leadership_is_409_fenced(
    api: httpx.Client, namespace: str, fenced_setup: dict[str, Any], call: Call, token: str
) -> None:
    assert_problem(call(api, namespace, fenced_setup, token), 409, "fenced")
    assert_unchanged(api, namespace, fenced_setup)


def test_fencing_token_beyond_64_bits_is_a_client_error(
    api: httpx.Client, namespace: str, fenced_setup: dict[str, Any]
) -> None:
    r = FENCED_CALLS["PUT add"](api, namespace, fenced_setup, "9" * 30)
    wrong = []
    if r.status_code not in (400, 409):
        wrong.append(f"status {r.status_code} (want 400 invalid-argument or 409 fenced): {r.text}")
    if not r.headers.get("x-request-id"):
        wrong.append("no x-request-id header")
    try:  # the keep-alive connection must still be usable
        api.get("/healthz")
    except httpx.TransportError as e:
        wrong.append(f"the next request on the same connection failed: {e!r}")
    assert not wrong, wrong
    assert_problem(r, r.status_code, "invalid-argument" if r.status_code == 400 else "fenced")
    assert_unchanged(api, namespace, fenced_setup)


# -- etcd unreachable --------------------------------------------------------------


def test_unreachable_etcd_is_503_unavailable(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    svc = service_factory(etcd_endpoints="127.0.0.1:1", etcd_timeout=1)
    sid = "1a2b3c-0123456789abcdef"
    h = {"X-Session-Id": sid}
    calls: dict[str, Callable[[httpx.Client], httpx.Response]] = {
        "POST /v1/sessions": lambda c: c.post("/v1/sessions", json={"ttl_seconds": 10}),
        "keepalive": lambda c: c.post(f"/v1/sessions/{sid}/keepalive"),
        "DELETE session": lambda c: c.delete(f"/v1/sessions/{sid}"),
        "GET handle": lambda c: c.get(hpath("ns-x", "h")),
        "GET state": lambda c: c.get(hpath("ns-x", "h", "/state")),
        "GET listing": lambda c: c.get(lpath("ns-x")),
        "GET listing lock": lambda c: c.get(lpath("ns-x"), params={"lock": "true"}, headers=h),
        "PUT": lambda c: c.put(hpath("ns-x", "h"), content=b"x", headers=h),
        "POST lock": lambda c: c.post(hpath("ns-x", "h", "/lock"), headers=h),
        "DELETE": lambda c: c.delete(hpath("ns-x", "h"), headers=h),
        "readyz": lambda c: c.get("/readyz"),
        "healthz": lambda c: c.get("/healthz"),
        "metrics": lambda c: c.get("/metrics"),
    }

    def run(call: Callable[[httpx.Client], httpx.Response]) -> tuple[httpx.Response, float]:
        with client(svc.url) as c:
            start = time.monotonic()
            r = call(c)
            return r, time.monotonic() - start

    with ThreadPoolExecutor(len(calls)) as pool:
        results = dict(zip(calls, pool.map(run, calls.values()), strict=True))

    for what, (r, elapsed) in results.items():
        assert elapsed < 15, f"{what} took {elapsed:.1f}s with etcd down"
        if what in ("healthz", "metrics"):
            assert r.status_code == 200, (what, r.status_code, r.text)
        else:
            assert r.status_code == 503, (what, r.status_code, r.text)
            assert_problem(r, 503, "unavailable")
    # The service is still up and answers.
    with client(svc.url) as c:
        assert c.get("/healthz").status_code == 200


# -- request ids -------------------------------------------------------------------


def test_every_response_has_a_request_id(api: httpx.Client, namespace: str) -> None:
    sid = new_session(api)
    responses = [
        api.get("/healthz"),
        api.get("/readyz"),
        api.get("/metrics"),
        api.put(hpath(namespace, "h"), content=b"x", headers={"X-Session-Id": sid}),
        api.get(hpath(namespace, "h")),
        api.get(hpath(namespace, "h", "/state")),
        api.get(lpath(namespace)),
        api.delete(hpath(namespace, "h", "/lock"), headers={"X-Session-Id": sid}),
        api.get(hpath(namespace, "missing")),
        api.put(hpath(namespace, "h"), content=b"x"),
        api.put(hpath(namespace, "h"), content=b"x", headers={"X-Session-Id": "garbage"}),
        api.get(hpath(namespace, "%FF")),
        api.get("/nope"),
        api.patch(hpath(namespace, "h")),
        api.post("/v1/sessions", content=b"{", headers={"Content-Type": "application/json"}),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), list(zip([r.status_code for r in responses], ids, strict=True))
    assert len(set(ids)) == len(ids), "request ids are not unique"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/healthz"), ("GET", "/nope"), ("POST", "/v1/sessions/x/keepalive")],
)
def test_a_sent_request_id_is_echoed(api: httpx.Client, method: str, path: str) -> None:
    rid = f"req-{time.monotonic_ns()}"
    r = api.request(method, path, headers={"X-Request-Id": rid})
    assert r.headers.get("x-request-id") == rid


# -- operations ----------------------------------------------------------------------


def test_healthz(api: httpx.Client) -> None:
    assert api.get("/healthz").status_code == 200


def test_readyz_with_etcd_and_blobs_up(api: httpx.Client) -> None:
    r = api.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body.get("etcd") == "ok" and body.get("blobs") == "ok", body


def _samples(text: str, name: str) -> list[Any]:
    return [
        s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name
    ]


def _request_count(text: str, route: str, method: str, status: str) -> float:
    want = {"route": route, "method": method, "status": status}
    return sum(
        s.value
        for s in _samples(text, "statestore_http_requests_total")
        if {k: s.labels.get(k) for k in want} == want
    )


def test_metrics_are_prometheus_text(api: httpx.Client, namespace: str) -> None:
    route = "/v1/namespaces/{ns}/handles/{name}"
    before = api.get("/metrics").text
    for _ in range(3):
        assert api.get(hpath(namespace, "missing")).status_code == 404
    r = api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    after = r.text
    # Parses as the text format, with the request counter labelled by route, method, status.
    assert (
        _request_count(after, route, "GET", "404") - _request_count(before, route, "GET", "404")
        == 3
    )
    assert _request_count(after, "/healthz", "GET", "200") == _request_count(
        before, "/healthz", "GET", "200"
    )
    etcd = _samples(after, "statestore_etcd_request_seconds_count")
    assert etcd and sum(s.value for s in etcd) > 0, "no etcd latency recorded"
    assert _samples(after, "statestore_http_request_seconds_count")


def test_openapi_describes_this_api(api: httpx.Client) -> None:
    r = api.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    want = {
        "/v1/sessions": {"post"},
        "/v1/sessions/{sid}/keepalive": {"post"},
        "/v1/sessions/{sid}": {"delete"},
        "/v1/namespaces/{ns}/handles": {"get"},
        "/v1/namespaces/{ns}/handles/{name}": {"put", "get", "delete"},
        "/v1/namespaces/{ns}/handles/{name}/state": {"get"},
        "/v1/namespaces/{ns}/handles/{name}/lock": {"post", "delete"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in want.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))


# -- every store error has its answer --------------------------------------------------


def _all_store_errors() -> list[type[StateStoreError]]:
    """Every StateStoreError subclass of statestore and the service (all modules imported)."""
    import importlib
    import pkgutil

    import statestore
    import statestore_api

    for pkg in (statestore, statestore_api):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)
    found: list[type[StateStoreError]] = []
    todo: list[type[StateStoreError]] = [StateStoreError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _instance(cls: type[StateStoreError]) -> StateStoreError:
    params = inspect.signature(cls).parameters
    extra = {name: 7 for name, p in params.items() if name != "message" and p.default is p.empty}
    extra = {k: v for k, v in extra.items() if params[k].kind is not params[k].VAR_KEYWORD}
    return cls("what happened", **extra)


def test_every_store_error_has_an_explicit_non_500_status() -> None:
    """Each StateStoreError subclass (statestore/errors.py, statestore/etcd.py,
    the SDK's own) is named in statestore_api.problems.STATUS with a status
    that is not 500 and a type word of rest-v1.md, and answers with it."""
    errors = _all_store_errors()
    assert len(errors) >= 17, [c.__name__ for c in errors]
    for cls in errors:
        assert cls in problems.STATUS, f"{cls.__module__}.{cls.__name__} has no explicit status"
        status, type_ = problems.STATUS[cls]
        assert status != 500 and 400 <= status < 600, (cls, status)
        assert type_ in PROBLEM_TYPES, (cls, type_)
        for reading in (False, True):
            r = problems.store_error_response(_instance(cls), reading=reading)
            body = json.loads(bytes(r.body))
            assert r.status_code != 500 and body["status"] == r.status_code, (cls, body)
            assert body["type"] in PROBLEM_TYPES, (cls, body)
    assert problems.STATUS[Compacted] == (410, "compacted")
    compacted = problems.store_error_response(Compacted("gone", compact_revision=42))
    assert json.loads(bytes(compacted.body))["compact_revision"] == 42
