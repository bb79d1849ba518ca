"""Counters, leadership, checkpoints and namespace cleanup (rest-v1.md).

Each call builds the SDK's coordinator objects on a store acting as the
caller's session, so the HTTP rows behave exactly as the Python ones:
``POST .../leader?wait=s`` is ``LeaderElection.campaign(timeout=s)`` (wait
0, the default, never waits: someone else leading is an immediate 409),
cancelled when the client goes away so that its candidacy is withdrawn;
``PUT``/``DELETE .../leader/info/{key}`` are ``publish_info`` /
``remove_info``; ``GET .../leader`` is ``leadership()`` (one read: never
one leader's token with another's info), and both leadership answers name
the revision they were read at (watch from it: exact); ``GET``/``DELETE
.../counters?prefix=`` are ``counter.list_counters`` / ``delete_counters``;
writes carrying
``X-Fencing-Token`` use a fenced store. Counter writes take no lock, so they
accept the token without ``X-Session-Id``: it is fenced by the leader key
whose create revision the token is.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from statestore.checkpoints import (
    MAX_ID,
    CompletedCheckpoint,
    CompletedCheckpointStore,
    checkpoints_of,
)
from statestore.counter import MAX_VALUE, CheckpointIDCounter, delete_counters, list_counters
from statestore.election import MAX_INFO_VALUE_BYTES, LeaderElection
from statestore.maintenance.cleanup import clear_namespace
from statestore.store import StateHandleStore
from statestore_api.auth import Caller, Role
from statestore_api.problems import ApiError, problem
from statestore_api.routes.handles import BINARY_BODY
from statestore_api.service import (
    FencingHeader,
    IdempotencyHeader,
    Service,
    SessionHeader,
    Svc,
    handle_json,
    json_value_body,
    path_info_key,
    path_name,
    path_namespace,
    state_body,
    unless_client_gone,
)

router = APIRouter(prefix="/v1/namespaces/{ns}", tags=["coordination"])

#: The longest ``POST .../leader?wait=`` (rest-v1.md: 0..60 seconds).
MAX_WAIT_SECONDS = 60


class CounterValue(BaseModel):
    # strict: "5" or true must not silently become a checkpoint id
    value: int = Field(ge=0, le=MAX_VALUE, strict=True)


#: ``revision`` of the leadership answers (an extra field, welcome by rest-v1).
REVISION_DESCRIPTION = (
    "the etcd revision this answer was read at: watch from it (GET .../watch?since=) to see "
    "every later leadership change once and none earlier"
)


class CounterListing(BaseModel):
    counters: dict[str, int] = Field(
        description="name -> value (what the next increment answers), sorted by name"
    )
    revision: int = Field(description="the etcd revision the counters were read at")


class DeletedCounters(BaseModel):
    deleted: list[str] = Field(description="the names of the counters deleted, sorted")


#: ``?prefix=`` of the counter listing and prefix delete.
CounterPrefix = Annotated[
    str,
    Query(
        description="only counters whose names start with this (the name rules: no control "
        "characters, at most 512 bytes); empty: all counters of the namespace"
    ),
]


class Leadership(BaseModel):
    leader: str
    fencing_token: int
    revision: int = Field(description=REVISION_DESCRIPTION)


class LeadershipInfo(Leadership):
    info: dict[str, Any] = Field(
        description="What the leader published (PUT .../leader/info/{key}), by key; "
        "only this leadership's entries"
    )


#: The largest leader info value as a request body (rest-v1.md: 16 KiB).
INFO_BODY = {
    "requestBody": {
        "required": True,
        "description": f"any JSON value of at most {MAX_INFO_VALUE_BYTES} bytes",
        "content": {"application/json": {"schema": {}}},
    }
}


# -- counters ---------------------------------------------------------------------


@router.get("/counters", response_model=CounterListing)
async def list_counters_by_prefix(
    ns: str, request: Request, svc: Svc, prefix: CounterPrefix = ""
) -> CounterListing:
    """Every counter whose name starts with ``prefix``, with its value, sorted
    by name, from one consistent snapshot (read in pages: tens of thousands
    are fine), and the revision it was read at."""
    ns = path_namespace(ns)
    svc.authorize(request, ns, Role.read)
    listing = await list_counters(svc.store(ns), prefix)
    return CounterListing(counters=listing.counters, revision=listing.revision)


@router.delete("/counters", response_model=DeletedCounters)
async def delete_counters_by_prefix(
    ns: str,
    request: Request,
    svc: Svc,
    prefix: CounterPrefix = "",
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
) -> DeletedCounters:
    """Delete every counter whose name starts with ``prefix`` (empty: all), in
    txns of at most ``max_txn_ops`` deletes: 200 ``{"deleted": [names]}``.
    With ``X-Fencing-Token`` every txn carries the leadership compare: a
    stale token is 409 ``fenced`` and nothing is deleted (leadership lost
    midway: 409 after the batches before it). Counters created while the
    call runs may remain: call again."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write)
    store = await _writer(svc, ns, request, caller)
    return DeletedCounters(deleted=await delete_counters(store, prefix))


@router.get("/counters/{name}", response_model=CounterValue)
async def get_counter(ns: str, name: str, request: Request, svc: Svc) -> CounterValue:
    """The counter's value (the next ``increment`` returns it); 1 if never set."""
    ns, name = path_namespace(ns), path_name(name)
    svc.authorize(request, ns, Role.read)
    return CounterValue(value=await CheckpointIDCounter(svc.store(ns), name).get())


@router.post("/counters/{name}/increment", response_model=CounterValue)
async def increment_counter(
    ns: str,
    name: str,
    request: Request,
    svc: Svc,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> CounterValue:
    """Atomically increment; answers the value *before* the increment.

    With ``Idempotency-Key`` (which needs ``X-Session-Id``: keys are per
    session) a retry answers the value the first attempt handed out, and the
    counter advances once."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    if idempotency_key is not None and not request.headers.get("x-session-id"):
        raise ApiError(
            400,
            "invalid-argument",
            "Idempotency-Key needs X-Session-Id: a key is scoped by the session that sends it "
            "(a retry by the same session answers the first result)",
        )
    store = await _writer(svc, ns, request, caller)
    value = await CheckpointIDCounter(store, name).get_and_increment(
        idempotency_key=idempotency_key
    )
    return CounterValue(value=value)


@router.put("/counters/{name}", response_model=CounterValue)
async def set_counter(
    ns: str,
    name: str,
    request: Request,
    svc: Svc,
    body: Annotated[CounterValue, Body()],
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
) -> CounterValue:
    """Set the value (restore from a savepoint)."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    store = await _writer(svc, ns, request, caller)
    await CheckpointIDCounter(store, name).set_count(body.value)
    return body


@router.delete("/counters/{name}", status_code=204)
async def delete_counter(
    ns: str,
    name: str,
    request: Request,
    svc: Svc,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
) -> Response:
    """Delete the counter (204 also when absent): the next read starts again
    at 1. With ``X-Fencing-Token`` a stale token is 409 ``fenced`` and the
    counter is kept."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    store = await _writer(svc, ns, request, caller)
    await CheckpointIDCounter(store, name).delete()
    return Response(status_code=204)


async def _writer(svc: Service, ns: str, request: Request, caller: Caller) -> StateHandleStore:
    """A store for a write that needs no lock: as the session when one is
    given (which ``caller`` must own; fenced by its own leader key with a
    fencing token), else as a lock-less writer, fenced by the leader key a
    token alone names."""
    if request.headers.get("x-session-id"):
        return svc.store(ns, await svc.session(request, caller), request)
    token = request.headers.get("x-fencing-token")
    if token is not None:
        return await svc.token_fenced_store(ns, token)
    return svc.store(ns)


# -- leadership -------------------------------------------------------------------


@router.post("/leader", response_model=Leadership, responses={409: {"description": "not-leader"}})
async def campaign(
    ns: str,
    request: Request,
    svc: Svc,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="seconds to wait for leadership while someone else leads",
        ),
    ] = 0,
    x_session_id: SessionHeader = None,
) -> Leadership:
    """Lead the namespace (also 200 if already leading). When someone else
    leads, wait up to ``wait`` seconds for leadership (watching the
    predecessor in line: granted as soon as it goes), then 409
    ``not-leader``. A client that disconnects while waiting withdraws its
    candidacy, so it can never lead without knowing."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    election = LeaderElection(svc.store(ns, session))
    if wait > 0:
        token = await unless_client_gone(request, election.campaign(timeout=wait))
    else:
        token = await election.campaign(timeout=0)
    assert election.won_at is not None  # a fresh election object that won
    return Leadership(leader=session.session_id, fencing_token=token, revision=election.won_at)


@router.get("/leader", response_model=LeadershipInfo)
async def get_leader(ns: str, request: Request, svc: Svc) -> Any:
    """The current leader, its fencing token and the info it published, from
    one read, with the ``revision`` of that read (list-then-watch: watching
    from it is exact); 404 when nobody leads, its problem also naming
    ``revision``."""
    ns = path_namespace(ns)
    svc.authorize(request, ns, Role.read)
    current, revision = await LeaderElection(svc.store(ns)).leadership()
    if current is None:
        return problem(404, "not-found", f"nobody leads namespace {ns!r}", revision=revision)
    return {**current.to_json(), "revision": revision}


@router.delete("/leader", status_code=204)
async def resign(
    ns: str, request: Request, svc: Svc, x_session_id: SessionHeader = None
) -> Response:
    """Resign (nothing happens when the session does not lead); the info the
    leadership published goes in the same instant."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    await LeaderElection(svc.store(ns, session)).resign()
    return Response(status_code=204)


@router.put(
    "/leader/info/{key}",
    status_code=204,
    openapi_extra=INFO_BODY,
    responses={409: {"description": "not-leader"}, 413: {"description": "too-large"}},
)
async def put_leader_info(
    ns: str, key: str, request: Request, svc: Svc, x_session_id: SessionHeader = None
) -> Response:
    """Publish a JSON value under ``key`` (the name rules; URL-encoded) for
    as long as the session's leadership lasts: 204 when the session leads,
    else 409 ``not-leader`` naming the leader and nothing is written. At
    most 256 entries per leadership, each at most 16 KiB (413)."""
    ns, key = path_namespace(ns), path_info_key(key)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    value = await json_value_body(request, MAX_INFO_VALUE_BYTES, f"leader info {key!r}")
    await LeaderElection(svc.store(ns, session)).publish_info(key, value)
    return Response(status_code=204)


@router.delete(
    "/leader/info/{key}", status_code=204, responses={409: {"description": "not-leader"}}
)
async def delete_leader_info(
    ns: str, key: str, request: Request, svc: Svc, x_session_id: SessionHeader = None
) -> Response:
    """Remove the info entry ``key`` (204 also when absent) when the session
    leads; else 409 ``not-leader`` and nothing is removed."""
    ns, key = path_namespace(ns), path_info_key(key)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    await LeaderElection(svc.store(ns, session)).remove_info(key)
    return Response(status_code=204)


# -- checkpoints ------------------------------------------------------------------


def checkpoint_json(c: CompletedCheckpoint, locks: list[str]) -> dict[str, Any]:
    doc = handle_json(c.handle, locks)
    doc["checkpoint_id"] = c.checkpoint_id
    doc["savepoint"] = c.savepoint
    return doc


@router.post("/checkpoints/{checkpoint_id}", status_code=201, openapi_extra=BINARY_BODY)
async def add_checkpoint(
    ns: str,
    checkpoint_id: Annotated[int, Path(ge=0, le=MAX_ID)],
    request: Request,
    svc: Svc,
    retain: Annotated[int, Query(ge=1, le=10_000, description="checkpoints to retain")] = 1,
    savepoint: Annotated[bool, Query()] = False,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse:
    """Add a completed checkpoint (locked by the session) and subsume older ones
    beyond ``retain``; the newest non-savepoint checkpoint is always kept.

    With ``Idempotency-Key`` a retry answers the first attempt's checkpoint
    and subsumed ids (subsumption applied once)."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    store = svc.store(ns, session, request)
    limit = svc.settings.max_state_bytes
    body = await state_body(request, limit)
    cs = CompletedCheckpointStore(store, max_retained=retain)
    added, subsumed = await cs.add_checkpoint_and_subsume(
        checkpoint_id, body, savepoint=savepoint, max_size=limit, idempotency_key=idempotency_key
    )
    return JSONResponse(
        {"checkpoint": checkpoint_json(added, [session.session_id]), "subsumed": subsumed}, 201
    )


@router.get("/checkpoints")
async def list_checkpoints(
    ns: str,
    request: Request,
    svc: Svc,
    lock: Annotated[bool, Query(description="recover: lock all for the session")] = False,
    x_session_id: SessionHeader = None,
) -> JSONResponse:
    """Retained checkpoints ascending by id; ``?lock=true`` recovers (locks) them all."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write if lock else Role.read)
    if lock:
        session = await svc.session(request, caller)
        store = svc.store(ns, session, request)
        checkpoints, locks = await CompletedCheckpointStore(store).recover_described()
    else:
        checkpoints, locks = await _retained(svc, ns)
    docs = [checkpoint_json(c, sorted(locks.get(c.handle.name, []))) for c in checkpoints]
    return JSONResponse({"checkpoints": docs})


@router.get("/checkpoints/latest")
async def latest_checkpoint(ns: str, request: Request, svc: Svc) -> JSONResponse:
    """The newest retained checkpoint; 404 when there is none."""
    ns = path_namespace(ns)
    svc.authorize(request, ns, Role.read)
    checkpoints, locks = await _retained(svc, ns)
    if not checkpoints:
        return problem(404, "not-found", f"namespace {ns!r} has no checkpoint")
    latest = checkpoints[-1]
    return JSONResponse(checkpoint_json(latest, sorted(locks.get(latest.handle.name, []))))


async def _retained(
    svc: Service, ns: str
) -> tuple[list[CompletedCheckpoint], dict[str, list[str]]]:
    """The retained checkpoints (ascending by id) and every handle's lock
    holders, from ONE snapshot, without locking."""
    snap = await svc.store(ns).snapshot()
    return checkpoints_of(snap.handles, snap.pending_removal), snap.locks


# -- namespace cleanup ------------------------------------------------------------

ns_router = APIRouter(prefix="/v1/namespaces", tags=["coordination"])


@ns_router.delete(
    "/{ns}",
    status_code=204,
    responses={202: {"content": {"application/json": {"example": {"status": "pending"}}}}},
)
async def delete_namespace(ns: str, request: Request, svc: Svc) -> Response:
    """Remove every handle, counter and leadership key and queue the blobs
    for deletion (admin). 202 while handles locked by live sessions (or blobs
    in their grace period) remain: repeat until 204."""
    ns = path_namespace(ns)
    svc.authorize(request, ns, Role.admin)
    if await clear_namespace(svc.store(ns)):
        return Response(status_code=204)
    return JSONResponse({"status": "pending"}, 202)
