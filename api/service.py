"""What every request handler needs: the shared backend, sessions, auth, metrics."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar
from urllib.parse import unquote

from fastapi import Depends, Header, Request
from starlette.requests import ClientDisconnect

from statestore.data import MAX_INT64
from statestore.election import fence_for_token, instance_fence
from statestore.errors import SessionExpired
from statestore.handle import Handle, metadata_too_deep
from statestore.keys import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_IDEMPOTENCY_KEY_CHARS,
    validate_info_key,
    validate_name,
    validate_namespace,
)
from statestore.maintenance.replica import Maintenance
from statestore.store import SMALL_DATA, FixedLease, StateHandleStore, StoreBackend
from statestore_api.auth import Authorizer, Caller, Role
from statestore_api.observability import Metrics
from statestore_api.problems import ApiError
from statestore_api.session_registry import SessionInfo, SessionRegistry
from statestore_api.settings import ServiceSettings
from statestore_api.shutdown import LONG_WAITS, ShuttingDown

T = TypeVar("T")

#: Session identities a process keeps (``Service.identity``), least recently used
#: dropped first; each holds only the records of the handles its session locks.
MAX_IDENTITIES = 4096


@dataclass
class Service:
    settings: ServiceSettings
    backend: StoreBackend
    sessions: SessionRegistry
    auth: Authorizer
    metrics: Metrics
    maintenance: Maintenance | None = None
    #: session id -> the session's store identity (see :meth:`identity`).
    identities: OrderedDict[str, StateHandleStore] = field(default_factory=OrderedDict)

    # -- request helpers ---------------------------------------------------------

    def authorize(self, request: Request, namespace: str | None, need: Role) -> Caller:
        """401/403 unless the request's token may act with ``need`` on
        ``namespace``; answers the caller, which :meth:`session` needs."""
        return self.auth.check(request.headers.get("authorization"), namespace, need)

    async def session(self, request: Request, caller: Caller) -> SessionInfo:
        """The session named by ``X-Session-Id``, which ``caller`` must own
        (rest-v1.md "Sessions"): missing -> 400, unknown or expired -> 410,
        another token's -> 403. Every route acting as a session gets it here,
        so none can skip the ownership check; it comes from the record the
        lookup reads anyway (no extra etcd round trip), before any write."""
        sid = request.headers.get("x-session-id")
        if not sid:
            raise ApiError(
                400,
                "invalid-argument",
                "this call takes or drops a lock: send the X-Session-Id header "
                "(create a session with POST /v1/sessions)",
            )
        try:
            return await self.session_by_id(sid.strip(), caller)
        except SessionExpired:
            self.metrics.sessions_expired.inc()
            raise

    async def session_by_id(
        self, sid: str, caller: Caller, *, to_delete: bool = False
    ) -> SessionInfo:
        """The live session ``sid`` if ``caller`` owns it (``to_delete``: or
        manages every session, as a ``*`` admin does); 410 ``SessionExpired``
        when unknown or expired, 403 otherwise."""
        info = await self.sessions.lookup(sid)
        allowed = caller.manages(info.token_id) if to_delete else caller.owns(info.token_id)
        if not allowed:
            whose = (
                "was created while auth was off, so no token may use it or keep it alive"
                if info.token_id is None
                else "belongs to another token: only the token that created a session may "
                "use it, keep it alive or delete it"
            )
            raise ApiError(
                403,
                "forbidden",
                f"session {sid!r} {whose} (an admin whose namespaces include '*' may "
                "delete it); create a session with your own token",
            )
        return info

    def store(
        self, namespace: str, session: SessionInfo | None = None, request: Request | None = None
    ) -> StateHandleStore:
        """A store acting as ``session`` (or as a lock-less reader), fenced when
        the request carries ``X-Fencing-Token`` (by the session's own leader key)."""
        if session is None:
            store = self.backend.reader(namespace)
        else:
            store = self.identity(namespace, session)
        raw = request.headers.get("x-fencing-token") if request is not None else None
        if raw is not None:
            if session is None:
                raise ApiError(
                    400, "invalid-argument", "X-Fencing-Token needs the leader's X-Session-Id"
                )
            store = store.with_fencing(instance_fence(store, fencing_token(raw)))
        return store

    def identity(self, namespace: str, session: SessionInfo) -> StateHandleStore:
        """The store of ``session`` on ``namespace``: one identity per session,
        kept from request to request as an SDK instance keeps its own, so what
        it learns outlives a request: the records of the handles it locks, with
        which its removals take one etcd round trip, not two (``_HeldRecords``
        in statestore/store.py; a stale record costs the read it saves, never a
        wrong outcome). It proves nothing: every call still looks the session
        up first (:meth:`session`). Dropped when the session is deleted here,
        else least recently used first (``MAX_IDENTITIES``); another process
        serving the same session keeps its own."""
        sid = session.session_id
        known = self.identities.get(sid)
        if known is None:  # (a session id names its lease: no other lease can come)
            known = self.backend.store(namespace, sid, FixedLease(session.lease_id))
            self.identities[sid] = known
            while len(self.identities) > MAX_IDENTITIES:
                self.identities.popitem(last=False)
        self.identities.move_to_end(sid)
        return known if known.namespace == namespace else known.for_namespace(namespace)

    async def token_fenced_store(self, namespace: str, raw_token: str) -> StateHandleStore:
        """A lock-less writer fenced by a token sent without ``X-Session-Id``
        (counter writes), by the leader key the token was issued for (see
        :func:`statestore.election.fence_for_token`: no such key -> every
        write raises ``Fenced`` before any txn, so nothing changes)."""
        store = self.backend.reader(namespace)
        return store.with_fencing(await fence_for_token(store, fencing_token(raw_token)))


def fencing_token(raw: str) -> int | None:
    """The value of ``X-Fencing-Token``; ``None`` when it can be no etcd
    revision (so never the current leadership: the write is 409 fenced).
    Not an integer -> 400."""
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400,
            "invalid-argument",
            f"X-Fencing-Token must be an integer (the token returned by "
            f"POST .../leader), got {raw!r}",
        ) from None
    return value if 1 <= value <= MAX_INT64 else None


async def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def path_name(raw: str) -> str:
    """A handle name from its path segment (see ``statestore_api.paths``)."""
    return validate_name(unquote(raw, errors="strict"))


def path_namespace(raw: str) -> str:
    return validate_namespace(unquote(raw, errors="strict"))


def path_info_key(raw: str) -> str:
    """A leader info key from its path segment (the handle name rules)."""
    return validate_info_key(unquote(raw, errors="strict"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def json_value_body(request: Request, limit: int, what: str) -> Any:
    """The request body as one JSON value (any: object, array, string, number,
    boolean, null): 413 ``too-large`` when it is over ``limit`` bytes (by
    ``Content-Length`` before reading, else counted as it arrives, so memory
    stays bounded), 400 when it is not JSON (``NaN`` and ``Infinity`` are not)."""
    length = request.headers.get("content-length")
    too_large = ApiError(
        413, "too-large", f"{what} is over the limit of {limit} bytes of JSON; send less"
    )
    if length and length.isascii() and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(bytes(body), parse_constant=_no_constant)
    except ValueError as e:
        raise ApiError(400, "invalid-argument", f"{what} is not a JSON value: {e}") from None
    except RecursionError:  # the parser recursed past Python's limit (~1,000 levels)
        raise metadata_too_deep(what) from None


async def until_client_gone(request: Request) -> None:
    """Return once the client of ``request`` has disconnected: the ASGI
    server answers ``receive()`` with ``http.disconnect`` then. Only for
    handlers that have read their whole body (or take none)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client disconnects first: ``work`` is
    then cancelled and awaited (so its own cleanup, such as withdrawing a
    candidacy, is done before the handler ends) and ``ClientDisconnect``
    raised (logged as 499). A handler that is cancelled itself cancels
    ``work`` the same way, and so does a graceful shutdown of the server
    (:func:`end_long_waits`), answered 503. For handlers that wait long
    (``POST .../leader?wait=``): the ASGI server does not cancel a handler
    whose client went away, it only notices when the answer is sent."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_client_gone(request))
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    LONG_WAITS.add(stop)
    try:
        await asyncio.wait({task, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        LONG_WAITS.discard(stop)
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        if stop.done():
            raise ShuttingDown(
                "the service is shutting down and ended this wait; retry (another replica, "
                "or this one once it is back)"
            )
        raise ClientDisconnect()
    return task.result()


#: State bodies up to this size (with a declared length) are read whole, larger
#: or unsized ones stream: bytes up to it skip the store's pre-upload existence
#: read, which saves an etcd round trip.
SMALL_BODY = SMALL_DATA


async def state_body(request: Request, limit: int) -> bytes | AsyncIterator[bytes]:
    """The request's state body: 413 when its ``Content-Length`` is over
    ``limit``; a small body with a declared length is read whole (bytes need
    no pre-upload existence check), anything else streams so memory stays
    bounded (the store enforces ``limit`` on the way)."""
    length = request.headers.get("content-length")
    declared = int(length) if length and length.isascii() and length.isdigit() else None
    if declared is not None and declared > limit:
        raise ApiError(
            413, "too-large", f"the state is {length} bytes, over the limit of {limit} bytes"
        )
    if declared is not None and declared <= SMALL_BODY:
        return await request.body()
    return request.stream()


def handle_json(h: Handle, locks: list[str]) -> dict[str, Any]:
    doc = h.to_json()
    doc["locks"] = locks
    return doc


def parse_metadata(header: str | None) -> dict[str, Any] | None:
    if header is None:
        return None
    try:
        value = json.loads(header)
    except ValueError as e:
        raise ApiError(
            400, "invalid-argument", f"X-Handle-Metadata is not valid JSON: {e}"
        ) from None
    except RecursionError:  # the parser recursed past Python's limit (~1,000 levels)
        raise metadata_too_deep() from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid-argument", "X-Handle-Metadata must be a JSON object")
    return value


# Parameter types shared by the routers (they also document the headers in OpenAPI).
Svc = Annotated[Service, Depends(service)]
SessionHeader = Annotated[
    str | None,
    Header(description="The caller's session (lease): needed by calls that take or drop locks."),
]
FencingHeader = Annotated[
    str | None,
    Header(description="Leadership token from POST .../leader; 409 fenced when not current."),
]
IdempotencyHeader = Annotated[
    str | None,
    Header(
        description="1..128 printable ASCII, fresh per operation and the same on each retry "
        "of it: a retry by the same session answers the first attempt's result (same status, "
        "same body) if that attempt took effect, and performs the operation if it did not. "
        "Answers are kept for the idempotency window (idempotency_window_seconds, default "
        "600 s); the same key sent for another operation or name -> 400.",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        pattern=IDEMPOTENCY_KEY_PATTERN,
    ),
]
