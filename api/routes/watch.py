"""The watch: ``GET /v1/namespaces/{ns}/watch`` (rest-v1.md, "For job managers").

A long poll answered by the process's shared feed of the namespace
(``statestore_api.watch``). Every watcher polls again after every change,
so what one poll costs the process is multiplied by the watchers: FastAPI's
routing and parameter machinery took most of it (about 0.3 ms per poll, as
much as the answer itself). :class:`WatchShortcut` therefore serves the
path before FastAPI's router, inside the request-id, log and metrics
middleware; the FastAPI route below describes the call in ``/openapi.json``
and serves it the same way should a request reach the router. Both run
:func:`watch_response`, which reads the query itself (the rules the
OpenAPI parameters state).
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from statestore.data import MAX_INT64
from statestore.errors import StateStoreError
from statestore.watch import parse_kinds, parse_prefix
from statestore_api.auth import Role
from statestore_api.problems import ApiError, api_error_response, store_error_response
from statestore_api.service import Service, path_namespace
from statestore_api.watch import MAX_EVENTS, WatchHub

router = APIRouter(prefix="/v1/namespaces/{ns}", tags=["watch"])

TEMPLATE = "/v1/namespaces/{ns}/watch"
#: The routed path (segment-safe: a namespace is one segment, see paths.py).
_PATH = re.compile(r"^/v1/namespaces/([^/]+)/watch$")
_DIGITS = re.compile(r"^[0-9]+$")


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


def _query(request: Request) -> tuple[int | None, float, frozenset[str], str | None]:
    """(since, timeout, kinds, prefix) from the query string (400 when bad)."""
    q = request.query_params
    since = None
    if (raw := q.get("since")) is not None:
        if not _DIGITS.match(raw) or int(raw) > MAX_INT64:
            raise _bad("since", raw, f"must be a revision, an integer from 0 to {MAX_INT64}")
        since = int(raw)
    timeout = 30.0
    if (raw := q.get("timeout")) is not None:
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and 1 <= timeout <= 300):
            raise _bad("timeout", raw, "must be a number of seconds from 1 to 300")
    return since, timeout, parse_kinds(q.get("kinds")), parse_prefix(q.get("prefix"))


async def watch_response(request: Request, ns: str) -> Response:
    """The answer to one poll of namespace segment ``ns``."""
    namespace = path_namespace(ns)
    svc: Service = request.app.state.service
    svc.authorize(request, namespace, Role.read)
    since, timeout, kinds, prefix = _query(request)
    hub: WatchHub = request.app.state.watches
    body = await hub.poll(namespace, since=since, timeout=timeout, kinds=kinds, prefix=prefix)
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
    """ASGI middleware: ``GET .../watch`` straight to :func:`watch_response`,
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
        request = Request(scope, receive)
        response: Response
        try:
            response = await watch_response(request, found.group(1))
        except StateStoreError as e:
            response = store_error_response(e, reading=True)
        except ApiError as e:
            response = api_error_response(e)
        await response(scope, receive, send)
