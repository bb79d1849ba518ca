"""Handles and listing: ``/v1/namespaces/{ns}/handles`` (rest-v1.md).

State bodies are streamed both ways: a PUT's body goes chunk by chunk into
the blob (hashed on the way), and a GET of ``.../state`` streams the blob
back, so memory stays bounded whatever the state's size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from statestore.errors import StateStoreError
from statestore_api.auth import Role
from statestore_api.problems import ApiError, ResponseAborted, problem
from statestore_api.service import (
    SMALL_BODY,
    FencingHeader,
    IdempotencyHeader,
    SessionHeader,
    Svc,
    handle_json,
    parse_metadata,
    path_name,
    path_namespace,
    state_body,
)

log = logging.getLogger("statestore.api")

router = APIRouter(prefix="/v1/namespaces/{ns}/handles", tags=["handles"])

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_ETAG = re.compile(r'^\s*(?:W/)?"?(\d+)"?\s*$')


_HANDLE_EXAMPLE = {
    "name": "chk-17",
    "version": 42,
    "size": 1024,
    "sha256": "0" * 64,
    "created_at": "2026-01-01T00:00:00+00:00",
    "metadata": {},
    "locks": ["1a2b-0123456789abcdef"],
}
_HANDLE = {"content": {"application/json": {"example": _HANDLE_EXAMPLE}}}
_BYTES = {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
}
BINARY_BODY = {
    "requestBody": {
        "required": True,
        **_BYTES,
    }
}


def _etag(version: int) -> dict[str, str]:
    return {"ETag": f'"{version}"'}


@router.put(
    "/{name}",
    status_code=201,
    openapi_extra=BINARY_BODY,
    responses={
        200: {"description": "replaced (If-Match)", **_HANDLE},
        201: {"description": "added and locked", **_HANDLE},
    },
)
async def put_handle(
    ns: str,
    name: str,
    request: Request,
    svc: Svc,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
    if_match: Annotated[str | None, Header(description='"<version>": replace')] = None,
    x_handle_metadata: Annotated[str | None, Header(description="JSON object")] = None,
    x_content_sha256: Annotated[str | None, Header(description="hex SHA-256 of the body")] = None,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse:
    """add_and_lock (201), or replace with ``If-Match`` (200). The body is the raw state.

    With ``Idempotency-Key`` a retry answers the first attempt's result when
    it took effect: the same status and handle (version, sha256, created_at,
    metadata). ``locks`` is read when answering, as for the first answer:
    the session's own for an add, the current holders for a replace."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    metadata = parse_metadata(x_handle_metadata)
    if x_content_sha256 is not None and not _HEX64.match(x_content_sha256.strip()):
        raise ApiError(400, "invalid-argument", "X-Content-SHA256 must be 64 hex digits")
    digest = x_content_sha256.strip().lower() if x_content_sha256 else None
    limit = svc.settings.max_state_bytes
    body = await state_body(request, limit)
    version = None
    if if_match is not None:
        m = _ETAG.match(if_match)
        if m is None:
            raise ApiError(400, "invalid-argument", 'If-Match must be a version: "<integer>"')
        version = int(m.group(1))
    session = await svc.session(request, caller)
    store = svc.store(ns, session, request)
    write = {"expected_sha256": digest, "max_size": limit, "idempotency_key": idempotency_key}
    if version is None:
        h = await store.add_and_lock(name, body, metadata, **write)
        svc.metrics.locks.labels("acquire").inc()
        return JSONResponse(handle_json(h, [session.session_id]), 201, headers=_etag(h.version))
    h = await store.replace(name, version, body, metadata, **write)
    locks = await store.holders(name)
    return JSONResponse(handle_json(h, locks), 200, headers=_etag(h.version))


@router.get(
    "/{name}",
    responses={200: _HANDLE},
)
async def get_handle(ns: str, name: str, request: Request, svc: Svc) -> JSONResponse:
    """The handle record with its lock holders; ``ETag`` is its version."""
    ns, name = path_namespace(ns), path_name(name)
    svc.authorize(request, ns, Role.read)
    h, locks = await svc.store(ns).describe(name)
    return JSONResponse(handle_json(h, locks), headers=_etag(h.version))


@router.get(
    "/{name}/state",
    response_class=StreamingResponse,
    responses={
        200: _BYTES,
    },
)
async def get_state(ns: str, name: str, request: Request, svc: Svc) -> Response:
    """The exact state bytes, with ``Content-Length`` and ``X-Content-SHA256``.

    Up to 1 MiB the state is read and verified before answering (a mismatch
    is a 502 problem). Larger states stream, and the store's ``open_read``
    holds the last chunk back until the whole blob is verified (size and
    SHA-256). So a state of one chunk is still verified before answering (a
    mismatch or missing blob is a 502), and a mismatch found later ends the
    response as an error before its last byte: the connection is dropped,
    the client receives fewer bytes than ``Content-Length`` (and, were the
    body chunked, no terminating chunk), never a complete 200 with wrong
    bytes. Each such abort is logged and counted in
    ``statestore_state_streams_aborted_total``."""
    ns, name = path_namespace(ns), path_name(name)
    svc.authorize(request, ns, Role.read)
    store = svc.store(ns)
    h = await store.get(name)
    headers = {"Content-Length": str(h.size), "X-Content-SHA256": h.sha256, **_etag(h.version)}
    if h.size <= SMALL_BODY:  # verified before answering: a mismatch is a clean 502
        data = await store.read(h)
        return Response(data, media_type="application/octet-stream", headers=headers)
    chunks = store.open_read(h)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def stream() -> AsyncIterator[bytes]:
        sent = 0
        try:
            if first:
                sent += len(first)
                yield first
            async for chunk in chunks:
                sent += len(chunk)
                yield chunk
        except StateStoreError as e:  # the status line is out: all that is left is to abort
            svc.metrics.state_streams_aborted.labels(e.kind).inc()
            log.error(
                "GET state of %r in namespace %r aborted after %d of %d bytes: %s",
                name,
                ns,
                sent,
                h.size,
                e,
                extra={"request_id": request.state.request_id},
            )
            raise ResponseAborted(e.message) from e

    return StreamingResponse(stream(), media_type="application/octet-stream", headers=headers)


@router.post("/{name}/lock", responses={200: _HANDLE})
async def lock_handle(
    ns: str,
    name: str,
    request: Request,
    svc: Svc,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
) -> JSONResponse:
    """get_and_lock: lock the handle for the session and return it."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    store = svc.store(ns, session, request)
    h, locks = await store.get_and_lock_described(name)
    svc.metrics.locks.labels("acquire").inc()
    return JSONResponse(handle_json(h, locks), headers=_etag(h.version))


@router.delete("/{name}/lock", status_code=204)
async def release_lock(
    ns: str, name: str, request: Request, svc: Svc, x_session_id: SessionHeader = None
) -> Response:
    """release: drop the session's lock (204 also when it was not held)."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    await svc.store(ns, session).release(name)
    svc.metrics.locks.labels("release").inc()
    return Response(status_code=204)


@router.delete(
    "/{name}",
    status_code=204,
    responses={202: {"content": {"application/json": {"example": {"status": "pending-removal"}}}}},
)
async def remove_handle(
    ns: str,
    name: str,
    request: Request,
    svc: Svc,
    deferred: Annotated[bool, Query(description="complete the removal when others let go")] = False,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
) -> Response:
    """release_and_try_remove: 204 removed (or never existed); 409 ``locked`` with
    ``holders`` (own lock released, handle kept); with ``?deferred=true`` 202."""
    ns, name = path_namespace(ns), path_name(name)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    outcome = await svc.store(ns, session, request).try_remove(name, deferred=deferred)
    if outcome.removed:
        svc.metrics.locks.labels("remove").inc()
        return Response(status_code=204)
    if outcome.pending:
        svc.metrics.locks.labels("remove_deferred").inc()
        return JSONResponse({"status": "pending-removal", "holders": outcome.holders}, 202)
    svc.metrics.locks.labels("remove_refused").inc()
    return problem(
        409,
        "locked",
        f"handle {name!r} is still locked by {len(outcome.holders)} other session(s); your lock "
        "was released and the handle kept. Retry later or use ?deferred=true",
        holders=outcome.holders,
    )


list_router = APIRouter(prefix="/v1/namespaces/{ns}", tags=["handles"])


@list_router.get("/handles")
async def list_handles(
    ns: str,
    request: Request,
    svc: Svc,
    prefix: Annotated[str | None, Query(description="only names starting with this")] = None,
    lock: Annotated[bool, Query(description="get_all_and_lock for the session")] = False,
    x_session_id: SessionHeader = None,
) -> JSONResponse:
    """Every handle, sorted by name, from one consistent snapshot."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write if lock else Role.read)
    body: dict[str, Any]
    if lock:
        session = await svc.session(request, caller)
        handles, locks, rev = await svc.store(ns, session, request).lock_all(prefix)
        svc.metrics.locks.labels("acquire").inc(len(handles))
    else:
        snap = await svc.store(ns).snapshot(prefix)
        handles, locks, rev = snap.handles, snap.locks, snap.revision
    body = {
        "handles": [handle_json(h, sorted(locks.get(h.name, []))) for h in handles],
        "revision": rev,
    }
    return JSONResponse(body)


@list_router.delete(
    "/handles",
    responses={
        200: {
            "description": "what was removed, and what others still lock (with deferred=true: "
            "pending removal)",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["removed"],
                        "properties": {
                            "removed": {"type": "array", "items": {"type": "string"}},
                            "locked": {"type": "array", "items": {"type": "string"}},
                            "pending": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "example": {"removed": ["chk-1", "chk-2"], "locked": ["chk-3"]},
                }
            },
        }
    },
)
async def remove_handles(
    ns: str,
    request: Request,
    svc: Svc,
    prefix: Annotated[str, Query(description="only names starting with this; empty: all")] = "",
    deferred: Annotated[
        bool, Query(description="complete each removal when others let go")
    ] = False,
    x_session_id: SessionHeader = None,
    x_fencing_token: FencingHeader = None,
) -> JSONResponse:
    """release_and_try_remove of every handle whose name starts with ``prefix``:
    200 ``{"removed": [names], "locked": [names]}`` (``"pending"`` instead of
    ``"locked"`` with ``?deferred=true``). With ``X-Fencing-Token`` every txn
    carries the leadership compare: a stale token is 409 ``fenced`` and
    nothing is removed."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    removed, kept = await svc.store(ns, session, request).remove_prefix(prefix, deferred=deferred)
    svc.metrics.locks.labels("remove").inc(len(removed))
    svc.metrics.locks.labels("remove_deferred" if deferred else "remove_refused").inc(len(kept))
    return JSONResponse({"removed": removed, "pending" if deferred else "locked": kept})


@list_router.delete("/locks", status_code=204)
async def release_locks(
    ns: str,
    request: Request,
    svc: Svc,
    prefix: Annotated[str, Query(description="only names starting with this; empty: all")] = "",
    x_session_id: SessionHeader = None,
) -> Response:
    """Release every lock the session holds on handles whose name starts with
    ``prefix``; the session stays alive (204)."""
    ns = path_namespace(ns)
    caller = svc.authorize(request, ns, Role.write)
    session = await svc.session(request, caller)
    released = await svc.store(ns, session).release_prefix(prefix)
    svc.metrics.locks.labels("release").inc(len(released))
    return Response(status_code=204)
