"""Sessions: ``/v1/sessions`` (rest-v1.md, "Sessions")."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from statestore.errors import SessionExpired
from statestore.keys import RootLayout, decode
from statestore_api.auth import Role
from statestore_api.service import Svc
from statestore_api.session_registry import MIN_TTL

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


class SessionRequest(BaseModel):
    ttl_seconds: int = Field(
        default=10,
        description=f"Lease TTL in seconds, from {MIN_TTL} to the service's "
        "STATESTORE_MAX_SESSION_TTL_SECONDS (400 above).",
    )
    owner: str | None = Field(default=None, max_length=256, description="Who holds it (free text).")


class SessionOut(BaseModel):
    session_id: str
    ttl_seconds: int


class SessionListing(BaseModel):
    sessions: list[dict[str, object]]


@router.post("", status_code=201, response_model=SessionOut)
async def create_session(
    svc: Svc, request: Request, body: SessionRequest | None = None
) -> SessionOut:
    """Open a session: an etcd lease that every replica of the service can use.
    With auth on it belongs to the calling token (only that token may use it)."""
    caller = svc.authorize(request, None, Role.write)
    body = body or SessionRequest()
    info = await svc.sessions.create(body.ttl_seconds, body.owner, caller.token_id)
    svc.metrics.sessions_created.inc()
    return SessionOut(session_id=info.session_id, ttl_seconds=info.ttl_seconds)


@router.get("", response_model=SessionListing)
async def list_sessions(svc: Svc, request: Request) -> SessionListing:
    """The live sessions this admin may manage: every session for an admin
    whose namespaces include ``*``, else those its own token created."""
    caller = svc.authorize(request, None, Role.admin)
    infos = [i for i in await svc.sessions.list() if caller.manages(i.token_id)]
    return SessionListing(
        sessions=[
            {
                "session_id": i.session_id,
                "ttl_seconds": i.ttl_seconds,
                "owner": i.owner,
                "created_at": i.created_at,
            }
            for i in infos
        ]
    )


@router.post("/{sid}/keepalive", response_model=SessionOut)
async def keepalive(sid: str, svc: Svc, request: Request) -> SessionOut:
    """Refresh the session's lease; 410 when it has already expired, 403 when
    another token created it."""
    caller = svc.authorize(request, None, Role.write)
    info = await svc.sessions.keepalive(await svc.session_by_id(sid, caller))
    return SessionOut(session_id=info.session_id, ttl_seconds=info.ttl_seconds)


@router.delete("/{sid}", status_code=204)
async def delete_session(sid: str, svc: Svc, request: Request) -> Response:
    """End the session: every lock it holds is gone at once. Removals that only
    its locks were blocking are completed right away. 403 unless the caller's
    token created it or is an admin of every namespace (``*``)."""
    caller = svc.authorize(request, None, Role.write)
    try:
        info = await svc.session_by_id(sid, caller, to_delete=True)
    except SessionExpired:  # unknown or expired: already gone, nothing to do
        return Response(status_code=204)
    lock_keys = await svc.sessions.delete(info)
    svc.identities.pop(info.session_id, None)
    roots = RootLayout(svc.settings.root)
    held: dict[str, set[str]] = {}
    for key in lock_keys:
        lock = roots.split_lock_key(key)
        if lock is not None:
            ns, name = (decode(segment.decode()) for segment in lock)
            held.setdefault(ns, set()).add(name)
    for ns, names in held.items():
        store = svc.store(ns)
        for name in sorted(names & await store.pending_removals()):
            await store.complete_removal(name)
    return Response(status_code=204)
