"""Bearer-token auth (rest-v1.md "Conventions") against a real service.

One service with a tokens file serves the whole matrix: no or bad token ->
401, a namespace or role the token is not allowed -> 403, and what a refused
call would have changed is checked to be unchanged. Operations endpoints need
no token. Auth off warns at start; an invalid tokens file stops ``statestore
serve`` with a clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rest import assert_problem, bearer, cpath, hpath, lpath
from service import ServiceProcess, serving_with_tokens

from statestore.local.etcd_process import EtcdProcess, free_port

READER, WRITER, ADMIN = "reader-token-1", "writer-token-1", "admin-token-1"
TOKENS = {
    "tokens": [
        {"token": READER, "namespaces": ["job-*"], "role": "read"},
        {"token": WRITER, "namespaces": ["job-*"], "role": "write"},
        {"token": ADMIN, "namespaces": ["*"], "role": "admin"},
    ]
}


@pytest.fixture(scope="module")
def auth_service(
    etcd: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """What ``service_factory(auth_tokens_file=path)`` starts, shared by this module
    (one process for the whole matrix keeps the suite fast)."""
    with serving_with_tokens(etcd.endpoint, tmp_path_factory.mktemp("auth-service"), TOKENS) as svc:
        yield svc


@pytest.fixture
def api(auth_service: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_service.url, trust_env=False, timeout=30) as c:
        yield c


@pytest.fixture
def ns() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def writer_sid(api: httpx.Client) -> str:
    r = api.post("/v1/sessions", json={"ttl_seconds": 30, "owner": "auth"}, headers=bearer(WRITER))
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


@pytest.fixture
def existing(api: httpx.Client, ns: str, writer_sid: str) -> dict[str, Any]:
    """A handle ``h`` in ``ns``, written and locked by the writer's session."""
    r = api.put(
        hpath(ns, "h"), content=b"data", headers={**bearer(WRITER), "X-Session-Id": writer_sid}
    )
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc


Call = Callable[[httpx.Client, str, dict[str, str]], httpx.Response]

#: Every call of this issue's scope; ``h`` is the existing handle.
CALLS: dict[str, Call] = {
    "POST /v1/sessions": lambda c, ns, h: c.post("/v1/sessions", json={}, headers=h),
    "POST keepalive": lambda c, ns, h: c.post(
        f"/v1/sessions/{h.get('X-Session-Id', 'x')}/keepalive", headers=h
    ),
    "GET /v1/sessions": lambda c, ns, h: c.get("/v1/sessions", headers=h),
    "PUT": lambda c, ns, h: c.put(hpath(ns, "new"), content=b"x", headers=h),
    "PUT If-Match": lambda c, ns, h: c.put(
        hpath(ns, "h"), content=b"x", headers={**h, "If-Match": '"1"'}
    ),
    "GET": lambda c, ns, h: c.get(hpath(ns, "h"), headers=h),
    "GET state": lambda c, ns, h: c.get(hpath(ns, "h", "/state"), headers=h),
    "POST lock": lambda c, ns, h: c.post(hpath(ns, "h", "/lock"), headers=h),
    "DELETE lock": lambda c, ns, h: c.delete(hpath(ns, "h", "/lock"), headers=h),
    "DELETE": lambda c, ns, h: c.delete(hpath(ns, "h"), headers=h),
    "GET listing": lambda c, ns, h: c.get(lpath(ns), headers=h),
    "GET listing lock=true": lambda c, ns, h: c.get(lpath(ns), params={"lock": "true"}, headers=h),
}
WRITES = ["PUT", "PUT If-Match", "POST lock", "DELETE lock", "DELETE", "GET listing lock=true"]
READS = ["GET", "GET state", "GET listing"]


def unchanged(api: httpx.Client, ns: str, existing: dict[str, Any]) -> None:
    r = api.get(hpath(ns, "h"), headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json() == existing
    assert api.get(hpath(ns, "new"), headers=bearer(ADMIN)).status_code == 404


BAD_AUTHORIZATION = {
    "missing": None,
    "unknown token": "Bearer wrong-token-1",
    "bearer without token": "Bearer",
    "no scheme": READER,
    "basic scheme": "Basic cmVhZGVyOnRva2Vu",
    "prefix of a token": "Bearer reader-token",
    "token plus suffix": f"Bearer {ADMIN}x",
}


@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION.values(), ids=BAD_AUTHORIZATION.keys())
@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_missing_or_bad_token_is_401(
    api: httpx.Client,
    ns: str,
    writer_sid: str,
    existing: dict[str, Any],
    call: Call,
    authorization: str | None,
) -> None:
    headers = {"X-Session-Id": writer_sid}
    if authorization is not None:
        headers["Authorization"] = authorization
    r = call(api, ns, headers)
    assert_problem(r, 401, "unauthorized")
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    unchanged(api, ns, existing)


NAMESPACED = [k for k in CALLS if k not in ("POST /v1/sessions", "POST keepalive")]


@pytest.mark.parametrize("token", [READER, WRITER])
@pytest.mark.parametrize("call", [CALLS[k] for k in NAMESPACED if k != "GET /v1/sessions"],
                         ids=[k for k in NAMESPACED if k != "GET /v1/sessions"])  # fmt: skip
def test_namespace_not_allowed_is_403(
    api: httpx.Client, writer_sid: str, call: Call, token: str
) -> None:
    other = f"other-{uuid.uuid4().hex[:8]}"
    # The admin writes with a session of its own: a session belongs to its token.
    r = api.post("/v1/sessions", json={"ttl_seconds": 30}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    admin_sid = r.json()["session_id"]
    r = api.put(
        hpath(other, "h"), content=b"x", headers={**bearer(ADMIN), "X-Session-Id": admin_sid}
    )
    assert r.status_code == 201, r.text
    before = r.json()
    assert_problem(
        call(api, other, {**bearer(token), "X-Session-Id": writer_sid}), 403, "forbidden"
    )
    assert api.get(hpath(other, "h"), headers=bearer(ADMIN)).json() == before
    assert api.get(hpath(other, "new"), headers=bearer(ADMIN)).status_code == 404


@pytest.mark.parametrize("other", ["other-1", "job", "xjob-1", "JOB-1"])
def test_globs_match_exactly(api: httpx.Client, writer_sid: str, other: str) -> None:
    r = api.put(
        hpath(other, "g"), content=b"x", headers={**bearer(WRITER), "X-Session-Id": writer_sid}
    )
    assert_problem(r, 403, "forbidden")
    assert api.get(hpath(other, "g"), headers=bearer(ADMIN)).status_code == 404


@pytest.mark.parametrize("call", [CALLS[k] for k in WRITES], ids=WRITES)
def test_read_role_cannot_write_or_lock(
    api: httpx.Client, ns: str, writer_sid: str, existing: dict[str, Any], call: Call
) -> None:
    r = call(api, ns, {**bearer(READER), "X-Session-Id": writer_sid})
    assert_problem(r, 403, "forbidden")
    unchanged(api, ns, existing)


@pytest.mark.parametrize("token", [READER, WRITER, ADMIN])
@pytest.mark.parametrize("call", [CALLS[k] for k in READS], ids=READS)
def test_every_role_can_read(
    api: httpx.Client, ns: str, existing: dict[str, Any], call: Call, token: str
) -> None:
    r = call(api, ns, bearer(token))
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("application/json"):
        body = r.json()
        assert body.get("name") == "h" or [h["name"] for h in body["handles"]] == ["h"]
    else:
        assert r.content == b"data"


@pytest.mark.parametrize("token", [WRITER, ADMIN])
def test_write_role_writes(api: httpx.Client, ns: str, token: str) -> None:
    r = api.post("/v1/sessions", json={"ttl_seconds": 30}, headers=bearer(token))
    assert r.status_code == 201, r.text
    h = {**bearer(token), "X-Session-Id": r.json()["session_id"]}
    assert api.post(f"/v1/sessions/{h['X-Session-Id']}/keepalive", headers=h).status_code == 200
    r = api.put(hpath(ns, "w"), content=b"v1", headers=h)
    assert r.status_code == 201, r.text
    v = r.json()["version"]
    r = api.put(hpath(ns, "w"), content=b"v2", headers={**h, "If-Match": f'"{v}"'})
    assert r.status_code == 200, r.text
    assert api.post(hpath(ns, "w", "/lock"), headers=h).status_code == 200
    assert api.get(lpath(ns), params={"lock": "true"}, headers=h).status_code == 200
    assert api.delete(hpath(ns, "w", "/lock"), headers=h).status_code == 204
    assert api.delete(hpath(ns, "w"), headers=h).status_code == 204
    assert api.get(hpath(ns, "w"), headers=h).status_code == 404


def test_counters_by_prefix_need_read_to_list_and_write_to_delete(
    api: httpx.Client, ns: str
) -> None:
    """``GET .../counters`` is a read and ``DELETE .../counters`` a write, each
    within the token's namespaces; a refused delete deletes nothing."""
    other = f"other-{uuid.uuid4().hex[:8]}"
    for where, token in ((ns, WRITER), (other, ADMIN)):
        r = api.put(cpath(where, "j.ids"), json={"value": 4}, headers=bearer(token))
        assert r.status_code == 200, r.text
    path = f"/v1/namespaces/{ns}/counters"
    for token in (READER, WRITER, ADMIN):
        assert api.get(path, headers=bearer(token)).json()["counters"] == {"j.ids": 4}
    assert_problem(api.get(path), 401, "unauthorized")
    assert_problem(api.delete(path), 401, "unauthorized")
    assert_problem(api.delete(path, headers=bearer(READER)), 403, "forbidden")
    for token in (READER, WRITER):
        elsewhere = f"/v1/namespaces/{other}/counters"
        assert_problem(api.get(elsewhere, headers=bearer(token)), 403, "forbidden")
        assert_problem(api.delete(elsewhere, headers=bearer(token)), 403, "forbidden")
    assert api.get(path, headers=bearer(READER)).json()["counters"] == {"j.ids": 4}
    r = api.get(f"/v1/namespaces/{other}/counters", headers=bearer(ADMIN))
    assert r.json()["counters"] == {"j.ids": 4}
    r = api.delete(path, params={"prefix": "j."}, headers=bearer(WRITER))
    assert r.json() == {"deleted": ["j.ids"]}


def test_admin_is_allowed_every_namespace(api: httpx.Client) -> None:
    other = f"other-{uuid.uuid4().hex[:8]}"
    r = api.post("/v1/sessions", json={"ttl_seconds": 30}, headers=bearer(ADMIN))
    assert r.status_code == 201
    h = {**bearer(ADMIN), "X-Session-Id": r.json()["session_id"]}
    assert api.put(hpath(other, "a"), content=b"x", headers=h).status_code == 201
    assert api.get(hpath(other, "a"), headers=h).status_code == 200


@pytest.mark.parametrize("token", [READER, WRITER])
def test_session_listing_needs_admin(api: httpx.Client, writer_sid: str, token: str) -> None:
    assert_problem(api.get("/v1/sessions", headers=bearer(token)), 403, "forbidden")


def test_admin_lists_sessions(api: httpx.Client, writer_sid: str) -> None:
    r = api.get("/v1/sessions", headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    ids = [s["session_id"] for s in r.json()["sessions"]]
    assert writer_sid in ids


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_operations_need_no_token(api: httpx.Client, path: str) -> None:
    assert api.get(path).status_code == 200


# -- start-up --------------------------------------------------------------------


def _log_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _auth_warnings(path: Path) -> list[dict[str, Any]]:
    return [
        r
        for r in _log_records(path)
        if r.get("level") in ("warning", "error", "critical") and "auth" in r.get("msg", "").lower()
    ]


def test_auth_off_warns_loudly_at_start(service: ServiceProcess) -> None:
    warnings = _auth_warnings(service.log_file)
    assert warnings, service.log_tail()
    assert any("off" in w["msg"].lower() for w in warnings), warnings


def test_auth_on_does_not_warn(auth_service: ServiceProcess) -> None:
    assert _auth_warnings(auth_service.log_file) == [], auth_service.log_tail()


INVALID_TOKEN_FILES: dict[str, str | None] = {
    "not json": '{"tokens": [',
    "no tokens key": '{"token": "writer-token-1"}',
    "unknown role": '{"tokens": [{"token": "writer-token-1", "role": "superuser"}]}',
    "token too short": '{"tokens": [{"token": "x", "role": "read"}]}',
    "missing file": None,
}


@pytest.mark.parametrize("content", INVALID_TOKEN_FILES.values(), ids=INVALID_TOKEN_FILES.keys())
def test_invalid_tokens_file_stops_serve_with_a_clear_message(
    etcd: EtcdProcess, tmp_path: Path, content: str | None
) -> None:
    tokens = tmp_path / "tokens.json"
    if content is not None:
        tokens.write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATESTORE_")}
    env.update(
        {
            "STATESTORE_ETCD_ENDPOINTS": etcd.endpoint,
            "STATESTORE_BLOB_ROOT": f"file://{tmp_path}/blobs",
            "STATESTORE_AUTH_TOKENS_FILE": str(tokens),
            "COLUMNS": "200",
        }
    )
    cmd = [sys.executable, "-m", "statestore.cli", "serve", "--port", str(free_port())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "tokens.json" in output, output
    assert "Traceback" not in output, (
        "statestore serve printed a traceback instead of a clear error:\n" + output[-1500:]
    )
