"""``statestore_api.shortcut.DirectRoutes``: routes served past FastAPI's router
bind their parameters exactly as FastAPI would, and hand FastAPI whatever it
would judge differently.

A small app of its own (no store involved: this is HTTP parameter binding),
driven in-process over ASGI. Its endpoint answers the values it was given and
who called it: FastAPI's router sets ``scope["endpoint"]``, DirectRoutes does
not. Every handle route of the real service goes through DirectRoutes, so the
REST handle tests (tests/test_rest_handles.py and others) run its path
against real etcd.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from statestore.errors import NotFound
from statestore.keys import IDEMPOTENCY_KEY_PATTERN, MAX_IDEMPOTENCY_KEY_CHARS
from statestore_api import problems
from statestore_api.app import create_app
from statestore_api.problems import ApiError
from statestore_api.routes import handles
from statestore_api.settings import ServiceSettings
from statestore_api.shortcut import DirectRoutes


async def _caller(request: Request) -> str:
    return request.headers.get("user-agent", "")


router = APIRouter(prefix="/v1/things/{ns}")


@router.put("/{name}")
async def put_thing(
    ns: str,
    name: str,
    request: Request,
    agent: Annotated[str, Depends(_caller)],
    x_session_id: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[
        str | None,
        Header(min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS, pattern=IDEMPOTENCY_KEY_PATTERN),
    ] = None,
    deferred: Annotated[bool, Query()] = False,
) -> JSONResponse:
    if name == "missing":
        raise NotFound(f"thing {name!r} does not exist")
    if name == "refused":
        raise ApiError(403, "forbidden", "not yours")
    body = await request.body()
    return JSONResponse(
        {
            "via": "router" if "endpoint" in request.scope else "direct",
            "ns": ns,
            "name": name,
            "agent": agent,
            "session": x_session_id,
            "key": idempotency_key,
            "deferred": deferred,
            "body": body.decode(),
        }
    )


def _app() -> FastAPI:
    app = FastAPI()
    problems.install(app)
    app.include_router(router)
    app.add_middleware(DirectRoutes, routers=[router])
    return app


async def _put(path: str, **kw: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.put(path, **kw)


async def test_binds_path_headers_dependency_and_body_like_fastapi() -> None:
    headers = [("X-Session-Id", "s-1"), ("x-session-id", "s-2"), ("Idempotency-Key", "k 1")]
    headers.append(("User-Agent", "jm"))
    direct = await _put("/v1/things/a%20b/n-1", content=b"state", headers=headers)
    # The same request through the router: a query string sends it there.
    routed = await _put("/v1/things/a%20b/n-1?deferred=false", content=b"state", headers=headers)
    assert direct.status_code == routed.status_code == 200
    assert direct.json().pop("via") == "direct"
    assert routed.json().pop("via") == "router"
    assert direct.json() | {"via": 0} == routed.json() | {"via": 0}
    assert direct.json()["session"] == "s-1"  # first value wins, as in FastAPI
    assert direct.json()["deferred"] is False and direct.json()["key"] == "k 1"


async def test_query_string_goes_to_the_router() -> None:
    r = await _put("/v1/things/ns/n?deferred=true")
    assert r.status_code == 200 and r.json()["via"] == "router" and r.json()["deferred"] is True


@pytest.mark.parametrize("key", ["", " padded", "x" * (MAX_IDEMPOTENCY_KEY_CHARS + 1), "clé"])
async def test_header_failing_its_constraints_gets_fastapis_answer(key: str) -> None:
    r = await _put("/v1/things/ns/n", headers=[(b"Idempotency-Key", key.encode("latin-1"))])
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "invalid-argument"
    assert "idempotency-key" in r.json()["detail"]  # FastAPI's validation message


async def test_errors_answer_as_the_exception_handlers_do() -> None:
    missing = await _put("/v1/things/ns/missing")
    assert missing.status_code == 404
    assert missing.json()["type"] == "not-found" and "does not exist" in missing.json()["detail"]
    refused = await _put("/v1/things/ns/refused")
    assert refused.status_code == 403 and refused.json()["type"] == "forbidden"


async def test_other_paths_and_methods_reach_the_router() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/v1/things/ns/n")).status_code == 405
        assert (await c.put("/v1/things/ns/n/deeper")).status_code == 404


async def test_a_missing_required_header_gets_fastapis_answer() -> None:
    strict = APIRouter()

    @strict.get("/s")
    async def needs_header(x_token: Annotated[str, Header()]) -> JSONResponse:
        return JSONResponse({"token": x_token})

    app = FastAPI()
    problems.install(app)
    app.include_router(strict)
    app.add_middleware(DirectRoutes, routers=[strict])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/s", headers={"X-Token": "t"})).json() == {"token": "t"}
        missing = await c.get("/s")
        assert missing.status_code == 400 and "x-token" in missing.json()["detail"]


def _sync_dependency(request: Request) -> str:
    return ""


#: Endpoints DirectRoutes must refuse to bind: FastAPI would read, convert or
#: validate what it would pass on as is.
unbindable = APIRouter()


@unbindable.post("/body")
async def with_body(doc: Annotated[dict[str, Any], Body()]) -> None:
    return None


@unbindable.get("/int/{n}")
async def int_path(n: int) -> None:
    return None


@unbindable.get("/int-header")
async def int_header(x_n: Annotated[int | None, Header()] = None) -> None:
    return None


@unbindable.get("/sync")
async def sync_dependency(v: Annotated[str, Depends(_sync_dependency)]) -> None:
    return None


@pytest.mark.parametrize("route", unbindable.routes, ids=lambda r: r.path)
def test_a_parameter_it_cannot_bind_is_refused_when_built(route: APIRoute) -> None:
    one = APIRouter()
    one.routes.append(route)
    with pytest.raises(TypeError, match="direct route"):
        DirectRoutes(_app(), routers=[one])


def test_the_service_serves_every_handle_route_directly() -> None:
    app = create_app(ServiceSettings(etcd_endpoints=["http://127.0.0.1:1"]))
    direct = [m for m in app.user_middleware if m.cls is DirectRoutes]
    assert len(direct) == 1 and direct[0].kwargs["routers"] == [handles.router]
    # Every handle endpoint binds (a new one that could not would fail here).
    served = DirectRoutes(app, [handles.router]).routes
    assert [r.endpoint for r in served] == [r.endpoint for r in handles.router.routes]
