"""What every request handler needs: the shared backend, sessions, auth, metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import Depends, Header, Request

from api.auth import Authorizer, Role
from api.observability import Metrics
from api.problems import ApiError
from api.settings import ServiceSettings
from statestore.errors import SessionExpired
from statestore.handle import Handle
from statestore.keys import Layout, validate_name, validate_namespace
from statestore.maintenance import Maintenance
from statestore.sessions import SessionInfo, SessionRegistry
from statestore.store import FixedLease, StateHandleStore, StoreBackend, TokenFence

#: Identity used for calls that take no lock (reads); never owns a lock key.
READER = "reader"


@dataclass
class Service:
    settings: ServiceSettings
    backend: StoreBackend
    sessions: SessionRegistry
    auth: Authorizer
    metrics: Metrics
    maintenance: Maintenance | None = None

    # -- request helpers ---------------------------------------------------------

    def authorize(self, request: Request, namespace: str | None, need: Role) -> None:
        self.auth.check(request.headers.get("authorization"), namespace, need)

    async def session(self, request: Request) -> SessionInfo:
        sid = request.headers.get("x-session-id")
        if not sid:
            raise ApiError(
                400,
                "invalid-argument",
                "this call takes or drops a lock: send the X-Session-Id header "
                "(create a session with POST /v1/sessions)",
            )
        try:
            return await self.sessions.lookup(sid.strip())
        except SessionExpired:
            self.metrics.sessions_expired.inc()
            raise

    def store(
        self, namespace: str, session: SessionInfo | None = None, request: Request | None = None
    ) -> StateHandleStore:
        """A store acting as ``session`` (or as a lock-less reader), fenced when
        the request carries ``X-Fencing-Token``."""
        if session is None:
            store = self.backend.store(namespace, READER, FixedLease(0))
        else:
            store = self.backend.store(namespace, session.session_id, FixedLease(session.lease_id))
        token = request.headers.get("x-fencing-token") if request is not None else None
        if token is not None:
            if session is None:
                raise ApiError(
                    400, "invalid-argument", "X-Fencing-Token needs the leader's X-Session-Id"
                )
            try:
                value: int | None = int(token)
            except ValueError:
                raise ApiError(
                    400,
                    "invalid-argument",
                    f"X-Fencing-Token must be an integer (the token returned by "
                    f"POST .../leader), got {token!r}",
                ) from None
            if not 1 <= value < 2**63:  # type: ignore[operator]
                value = None  # no etcd revision: never current leadership -> 409 fenced
            leader_key = Layout(self.settings.root, namespace).leader_prefix + (
                session.session_id.encode()
            )
            store = store.with_fencing(TokenFence(leader_key, value))
        return store


async def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


def path_name(raw: str) -> str:
    """A handle name from its path segment (see ``api.paths``)."""
    return validate_name(unquote(raw, errors="strict"))


def path_namespace(raw: str) -> str:
    return validate_namespace(unquote(raw, errors="strict"))


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
