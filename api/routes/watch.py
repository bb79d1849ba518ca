"""The watch: ``GET /v1/namespaces/{ns}/watch`` (rest-v1.md, "For job managers").

A long poll answered by the process's shared feed of the namespace
(``statestore_api.watch``). Every watcher polls again after every change,
so what one poll costs the process is multiplied by the watchers: FastAPI's
routing and parameter machinery took most of it (about 0.3 ms per poll, as
much as the answer itself). :class:`WatchShortcut` therefore serves the
path before FastAPI's router, inside the request-id, log and metrics
middleware; the FastAPI route below describes the call in ``/openapi.json``
and serves it the same way should a request reach the router. Both run
:func:`watch_body`, which reads the query itself (the rules the OpenAPI
parameters state). What else a poll costs is cut the same way: 1,000
watchers send the same few query strings and namespaces, so their parsed
forms are remembered (bounded), and the shortcut sends the shared answer
bytes with two raw ASGI messages, no Response object.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from statestore.data import MAX_INT64
from statestore.errors import StateStoreError
from statestore.watch import parse_kinds, parse_prefix
from statestore_api.auth import Role
from statestore_api.problems import ApiError, api_error_response, store_error_response
from statestore_api.service import Service, path_namespace
from statestore_api.watch import MAX_EVENTS, WatchesFull, WatchHub

router = APIRouter(prefix="/v1/namespaces/{ns}", tags=["watch"])

TEMPLATE = "/v1/namespaces/{ns}/watch"
#: The routed path (segment-safe: a namespace is one segment, see paths.py).
_PATH = re.compile(r"^/v1/namespaces/([^/]+)/watch$")
_DIGITS = re.compile(r"^[0-9]+$")
#: Most parsed query strings and namespaces remembered (then forgotten at once).
_REMEMBERED = 1024
_JSON = (b"content-type", b"application/json")


class HandleDoc(BaseModel):
    """A handle as ``GET .../handles/{name}`` shows it, without ``locks``."""

    name: str
    version: int
    size: int
    sha256: str
    created_at: str
    metadata: dict[str, Any]


class HandleEventDoc(BaseModel):
    kind: Literal["handle"]
    type: Literal["put", "delete"]
    name: str
    revision: int
    handle: HandleDoc | None = Field(description="null for a delete")


class LeadershipDoc(BaseModel):
    """The ``GET .../leader`` body."""

    leader: str
    fencing_token: int
    info: dict[str, Any]


class LeaderEventDoc(BaseModel):
    kind: Literal["leader"]
    revision: int
    leader: LeadershipDoc | None = Field(description="null when nobody leads any more")


class WatchAnswer(BaseModel):
    events: list[Annotated[HandleEventDoc | LeaderEventDoc, Field(discriminator="kind")]] = Field(
        description=f"in revision order, at most {MAX_EVENTS}; empty when the timeout passed"
    )
    revision: int = Field(description="pass it as the next `since`")


def _parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


#: What :func:`_query` accepts, for /openapi.json.
PARAMETERS = [
    _parameter(
        "since",
        {"type": "integer", "minimum": 0, "maximum": MAX_INT64},
        "a revision (a listing's); omitted: the current",
    ),
    _parameter(
        "timeout",
        {"type": "number", "minimum": 1, "maximum": 300, "default": 30},
        "seconds to wait for a change",
    ),
    _parameter("prefix", {"type": "string"}, "only handles whose names start so"),
    _parameter(
        "kinds",
        {"type": "string", "pattern": r"^(handles|leader)(,(handles|leader))*$"},
        "comma list of `handles`, `leader`; default both",
    ),
]


def _bad(name: str, value: str, rule: str) -> ApiError:
    return ApiError(400, "invalid-argument", f"query.{name}: {rule}, got {value!r}")


Query = tuple[int | None, float, frozenset[str], str | None]
_queries: dict[bytes, Query] = {}
_namespaces: dict[str, str] = {}


def _query(raw: bytes) -> Query:
    """(since, timeout, kinds, prefix) from the query string (400 when bad)."""
    if (known := _queries.get(raw)) is not None:
        return known
    q = QueryParams(raw)
    since = None
    if (value := q.get("since")) is not None:
        if not _DIGITS.match(value) or int(value) > MAX_INT64:
            raise _bad("since", value, f"must be a revision, an integer from 0 to {MAX_INT64}")
        since = int(value)
    timeout = 30.0
    if (value := q.get("timeout")) is not None:
        try:
            timeout = float(value)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and 1 <= timeout <= 300):
            raise _bad("timeout", value, "must be a number of seconds from 1 to 300")
    parsed = since, timeout, parse_kinds(q.get("kinds")), parse_prefix(q.get("prefix"))
    _remember(_queries, raw, parsed)
    return parsed


def _namespace(segment: str) -> str:
    """The namespace of a path segment (400 when it is not one)."""
    if (known := _namespaces.get(segment)) is None:
        known = path_namespace(segment)
        _remember(_namespaces, segment, known)
    return known


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= _REMEMBERED:
        memo.clear()  # (a bound, not a cache policy: the polls repeat a few values)
    memo[key] = value


async def watch_body(request: Request, ns: str) -> bytes:
    """The 200 body of one poll of namespace segment ``ns``."""
    namespace = _namespace(ns)
    svc: Service = request.app.state.service
    svc.authorize(request, namespace, Role.read)
    since, timeout, kinds, prefix = _query(request.scope["query_string"])
    hub: WatchHub = request.app.state.watches
    return await hub.poll(namespace, since=since, timeout=timeout, kinds=kinds, prefix=prefix)


def error_response(e: StateStoreError | ApiError) -> Response:
    """The problem answer of a poll that failed (``Retry-After`` when the
    process was at its watch limits)."""
    if isinstance(e, ApiError):
        return api_error_response(e)
    response = store_error_response(e, reading=True)
    if isinstance(e, WatchesFull):
        response.headers["Retry-After"] = str(e.retry_after)
    return response


async def watch_response(request: Request, ns: str) -> Response:
    """The answer to one poll of namespace segment ``ns``, errors included."""
    try:
        body = await watch_body(request, ns)
    except (StateStoreError, ApiError) as e:
        return error_response(e)
    return Response(body, media_type="application/json")


@router.get(
    "/watch",
    response_class=Response,
    openapi_extra={"parameters": PARAMETERS},
    responses={
        200: {"model": WatchAnswer, "description": "changes after `since`, or none by `timeout`"},
        410: {
            "description": "compacted: `since` is older than etcd's compaction "
            "(`compact_revision` is the oldest revision kept); re-list, then watch from the "
            "listing's revision"
        },
    },
)
async def watch(ns: str, request: Request) -> Response:
    """Long poll: the namespace's changes after revision ``since``, answered as
    soon as one matches (all of them, in revision order, at most 1000), or no
    change when ``timeout`` passes. ``revision`` is the next ``since``; a
    listing's ``revision`` followed by watches yields every later change once."""
    return await watch_response(request, ns)


class WatchShortcut:
    """ASGI middleware: ``GET .../watch`` straight to :func:`watch_body`,
    past FastAPI's router (errors become the same problem responses as the
    exception handlers give). Install it inside ``EncodedSegments`` and
    ``RequestContext``: it sets ``scope["route"]`` so the request's log line
    and metrics name the route as for any other."""

    _route = SimpleNamespace(path=TEMPLATE)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _PATH.match(scope["path"]) if scope["type"] == "http" else None
        if found is None or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route
        try:
            body = await watch_body(Request(scope, receive), found.group(1))
        except (StateStoreError, ApiError) as e:
            await error_response(e)(scope, receive, send)
            return
        headers = [_JSON, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
