"""Every error as ``application/problem+json`` (RFC 9457), with rest-v1.md's type words.

No handler lets a traceback or a framework-shaped error reach a client:
every ``StateStoreError`` class has its status and type word in
:data:`STATUS` (tests check that none is missing), FastAPI's validation errors become
400 ``invalid-argument``, HTTP errors (404 route, 405 method) get a type word,
and anything unexpected becomes a logged 503 ``unavailable`` naming the
request id (answered by ``statestore_api.observability.RequestContext``, so the
connection stays usable), never a 500 with a stack.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from statestore import errors
from statestore.errors import IntegrityError, StateStoreError
from statestore.etcd import Ambiguous, Compacted, ResponseTooLarge, TooManyOps
from statestore.http import Forbidden, Unauthorized
from statestore_api.shutdown import ShuttingDown
from statestore_api.watch import WatchesFull

log = logging.getLogger("statestore.api")

PROBLEM = "application/problem+json"
#: Methods that only read: an integrity error there is the blob store's (502).
READS = frozenset({"GET", "HEAD"})

#: The type words of rest-v1.md, with their titles.
TITLES = {
    "already-exists": "Already exists",
    "not-found": "Not found",
    "version-conflict": "Version conflict",
    "locked": "Locked by other sessions",
    "fenced": "Fenced: leadership is no longer current",
    "not-leader": "Not the leader",
    "session-expired": "Session expired",
    "invalid-argument": "Invalid argument",
    "integrity": "Integrity check failed",
    "too-large": "Too large",
    "unauthorized": "Unauthorized",
    "forbidden": "Forbidden",
    "unavailable": "Unavailable",
    "compacted": "Compacted: the revision is no longer in etcd",
}

#: The answer to each error the store (and its etcd layer) raises: status and
#: type word. Looked up along the class's MRO, but every class is named here
#: on purpose (tests/test_rest_errors.py fails on a new one that is not), so
#: none is answered by accident: nothing is ever a 500.
STATUS: dict[type[StateStoreError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid-argument"),
    errors.TooLarge: (413, "too-large"),
    # The store splits and shrinks its txns; one still refused means etcd's
    # --max-txn-ops is below the store's needs: the service's problem, retryable.
    TooManyOps: (503, "unavailable"),
    errors.AlreadyExists: (409, "already-exists"),
    errors.NotFound: (404, "not-found"),
    errors.VersionConflict: (412, "version-conflict"),
    errors.Locked: (409, "locked"),
    errors.Fenced: (409, "fenced"),
    errors.NotLeader: (409, "not-leader"),
    errors.SessionExpired: (410, "session-expired"),
    errors.IntegrityError: (400, "integrity"),  # 502 when the blob store's bytes are wrong (reads)
    # A record naming a blob outside the blob root: refused, and never the caller's fault.
    errors.OutsideBlobRoot: (502, "integrity"),
    # Outcome unknown: the caller must re-read before retrying.
    errors.PossibleInconsistentState: (503, "unavailable"),
    errors.Unavailable: (503, "unavailable"),
    # This process is at its watch feed or poll limit (with Retry-After).
    WatchesFull: (503, "unavailable"),
    # A long wait ended by a graceful shutdown of the service: retry.
    ShuttingDown: (503, "unavailable"),
    Ambiguous: (503, "unavailable"),
    ResponseTooLarge: (503, "unavailable"),
    # A read or watch below etcd's compaction point (listings re-read by
    # themselves, so this reaches a client only from a revision it named).
    Compacted: (410, "compacted"),
    # The SDK's own, never raised by the service; named so that the table is whole.
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    # A bare StateStoreError is a bug: unavailable, never a 500.
    StateStoreError: (503, "unavailable"),
}

_BY_STATUS = {
    400: "invalid-argument",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    409: "already-exists",
    410: "session-expired",
    412: "version-conflict",
    413: "too-large",
}


class ResponseAborted(Exception):
    """Raised by a response body that found, after its status line went out,
    that it cannot be completed (a state blob that does not match its
    handle). It is already logged and counted where it was raised; letting it
    reach the server is how an ASGI app ends a response as an error: the
    server closes the connection without the missing bytes (with
    ``Content-Length``) or the terminating chunk (chunked encoding), so no
    client can take the partial body for a complete one."""


def problem(
    status: int, type_: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": type_, "title": TITLES.get(type_, type_), "status": status, "detail": detail}
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class ApiError(Exception):
    """An HTTP-only error (auth, bad headers) raised by the API layer."""

    def __init__(self, status: int, type_: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.type, self.detail, self.extra = status, type_, detail, extra


def store_error_response(e: StateStoreError, *, reading: bool = False) -> JSONResponse:
    """The problem answer to a store error (:data:`STATUS`)."""
    status, kind = next(STATUS[c] for c in type(e).__mro__ if c in STATUS)
    if isinstance(e, IntegrityError) and reading:
        status = 502  # the blob store returned bytes that do not match: not the caller's fault
    return problem(status, kind, e.message, **e.details)


def api_error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return problem(e.status, e.type, e.detail, headers=headers, **e.extra)


def install(app: FastAPI) -> None:
    @app.exception_handler(StateStoreError)
    async def _store(request: Request, e: StateStoreError) -> JSONResponse:
        return store_error_response(e, reading=request.method in READS)

    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return api_error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))}
            for err in e.errors()
        ]
        detail = "; ".join(f"{'.'.join(x['loc'])}: {x['msg']}" for x in errors)
        return problem(400, "invalid-argument", detail or "invalid request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = _BY_STATUS.get(e.status_code, "invalid-argument")
        if e.status_code >= 500:
            type_ = "unavailable"
        return problem(e.status_code, type_, str(e.detail), headers=e.headers)


def unexpected(request_id: str) -> JSONResponse:
    """The answer to an exception nothing else handled (see RequestContext)."""
    return problem(
        503,
        "unavailable",
        "the service failed unexpectedly; nothing is known to have changed. Retry, and "
        f"report request id {request_id} if it persists",
        request_id=request_id,
    )
