"""Helpers shared by the REST tests: paths, problem checks, sessions."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from helpers import wait_until

from statestore.local.faultproxy import FaultProxy

T = TypeVar("T")

HANDLE_FIELDS = {"name", "version", "size", "sha256", "created_at", "metadata", "locks"}
#: The problem ``type`` words of rest-v1.md.
PROBLEM_TYPES = {
    "already-exists", "not-found", "version-conflict", "locked", "fenced", "not-leader",
    "session-expired", "invalid-argument", "integrity", "too-large", "unauthorized",
    "forbidden", "unavailable", "compacted",
}  # fmt: skip


def enc(name: str) -> str:
    """A name as one URL path segment. Names made only of dots are sent as
    ``%2E`` so no client or server treats them as dot segments."""
    if name and set(name) == {"."}:
        return "%2E" * len(name)
    return quote(name, safe="")


def hpath(ns: str, name: str, sub: str = "") -> str:
    return f"/v1/namespaces/{enc(ns)}/handles/{enc(name)}{sub}"


def lpath(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/handles"


def cpath(ns: str, name: str, sub: str = "") -> str:
    return f"/v1/namespaces/{enc(ns)}/counters/{enc(name)}{sub}"


def leader_path(ns: str) -> str:
    return f"/v1/namespaces/{enc(ns)}/leader"


def leadership_body(c: httpx.Client, ns: str) -> dict[str, Any] | None:
    """``GET .../leader``: the 200 body, or None when nobody leads (checked
    to be a 404 ``not-found`` problem)."""
    r = c.get(leader_path(ns))
    if r.status_code == 404:
        assert_problem(r, 404, "not-found")
        return None
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def ckpath(ns: str, sub: str = "") -> str:
    return f"/v1/namespaces/{enc(ns)}/checkpoints{sub}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(r: httpx.Response, status: int, type_: str | None) -> dict[str, Any]:
    """Assert an RFC 9457 problem with ``status`` and ``type_`` (``None``: any
    type word of the spec); returns the body."""
    assert r.status_code == status, (r.status_code, r.text)
    ctype = r.headers.get("content-type", "")
    assert ctype.split(";")[0].strip() == "application/problem+json", ctype
    body = r.json()
    assert isinstance(body, dict), body
    assert body.get("type") in PROBLEM_TYPES, body
    if type_ is not None:
        assert body["type"] == type_, body
    assert body["status"] == status, body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert "Traceback" not in r.text
    return body


def new_session(c: httpx.Client, ttl: int = 30, owner: str = "tests") -> str:
    r = c.post("/v1/sessions", json={"ttl_seconds": ttl, "owner": owner})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


def sess(sid: str, **extra: str) -> dict[str, str]:
    return {"X-Session-Id": sid, **extra}


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, trust_env=False, timeout=30)


def answer_lost(proxy: FaultProxy, call: Callable[[], T]) -> T:
    """``call()``, a call through ``proxy`` to a service, while the service's
    answers are dropped; once it has answered (bytes dropped), the connection
    is cut and the proxy forwards again. So the request took effect and its
    answer never arrived: returns what ``call`` returns (a client that
    resends on its own), or raises what it raises (a broken connection)."""
    dropped = proxy.bytes_dropped
    proxy.set_mode("drop_responses")
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)
            wait_until(lambda: proxy.bytes_dropped > dropped, timeout=20, message="no answer")
            proxy.set_mode("forward", cut=True)
            return future.result(timeout=30)
    finally:
        proxy.set_mode("forward")
