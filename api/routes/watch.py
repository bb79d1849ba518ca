"""The watch: ``GET /v1/namespaces/{ns}/watch`` (rest-v1.md, "For job managers").

A long poll answered by the process's shared feed of the namespace
(``statestore_api.watch``); the models below only document the answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from statestore.data import MAX_INT64
from statestore.watch import parse_kinds, parse_prefix
from statestore_api.auth import Role
from statestore_api.service import Svc, path_namespace
from statestore_api.watch import MAX_EVENTS, WatchHub

router = APIRouter(prefix="/v1/namespaces/{ns}", tags=["watch"])


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


@router.get(
    "/watch",
    response_class=Response,
    responses={
        200: {"model": WatchAnswer, "description": "changes after `since`, or none by `timeout`"},
        410: {
            "description": "compacted: `since` is older than etcd's compaction "
            "(`compact_revision` is the oldest revision kept); re-list, then watch from the "
            "listing's revision"
        },
    },
)
async def watch(
    ns: str,
    request: Request,
    svc: Svc,
    since: Annotated[
        int | None,
        Query(ge=0, le=MAX_INT64, description="a revision (a listing's); omitted: the current"),
    ] = None,
    timeout: Annotated[float, Query(ge=1, le=300, description="seconds to wait for a change")] = 30,
    prefix: Annotated[str | None, Query(description="only handles whose names start so")] = None,
    kinds: Annotated[
        str | None, Query(description="comma list of `handles`, `leader`; default both")
    ] = None,
) -> Response:
    """Long poll: the namespace's changes after revision ``since``, answered as
    soon as one matches (all of them, in revision order, at most 1000), or no
    change when ``timeout`` passes. ``revision`` is the next ``since``; a
    listing's ``revision`` followed by watches yields every later change once."""
    ns = path_namespace(ns)
    svc.authorize(request, ns, Role.read)
    hub: WatchHub = request.app.state.watches
    body = await hub.poll(
        ns, since=since, timeout=timeout, kinds=parse_kinds(kinds), prefix=parse_prefix(prefix)
    )
    return Response(body, media_type="application/json")
