"""The FastAPI application: ``create_app(settings)``.

Layers, outside in: request context (request id, log line, metrics) ->
segment-safe paths (names with ``/``) -> the watch and handle shortcuts
(``statestore_api.shortcut``) -> FastAPI routing -> handlers, which
act through one shared :class:`~statestore.store.StoreBackend`; each session
is its own store identity on its own lease (``statestore_api.service``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import statestore
from statestore.maintenance.replica import Maintenance
from statestore.store import StoreBackend
from statestore_api import problems
from statestore_api.auth import Authorizer
from statestore_api.observability import Metrics, RequestContext, configure_logging
from statestore_api.paths import EncodedSegments
from statestore_api.routes import coordination, handles, ops, sessions
from statestore_api.routes import watch as watch_routes
from statestore_api.service import Service
from statestore_api.session_registry import SessionRegistry
from statestore_api.settings import ServiceSettings
from statestore_api.shortcut import DirectRoutes
from statestore_api.watch import WatchHub

log = logging.getLogger("statestore.api")


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    configure_logging(settings.log_level, settings.log_json)
    auth = Authorizer.from_file(settings.auth_tokens_file)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = StoreBackend(settings)
        backend.client.observer = metrics.observe_etcd
        backend.blobs.observer = metrics.observe_blob
        app.state.service = Service(
            settings=settings,
            backend=backend,
            sessions=SessionRegistry(
                backend.client, settings.root, max_ttl=settings.max_session_ttl_seconds
            ),
            auth=auth,
            metrics=metrics,
        )
        maintenance = None
        if settings.maintenance:
            maintenance = Maintenance(
                backend,
                gc_interval=settings.gc_interval_seconds,
                compaction_interval=settings.compaction_interval_seconds,
                orphan_min_age=settings.orphan_min_age_seconds,
            )
            await maintenance.start()
        app.state.service.maintenance = maintenance
        app.state.watches = WatchHub(
            backend.client,
            settings.root,
            buffer_bytes=settings.watch_buffer_bytes,
            idle_seconds=settings.watch_idle_seconds,
        )
        hub = app.state.watches
        metrics.watch_polls.set_function(lambda: sum(f.waiters for f in hub.feeds.values()))
        if not auth.enabled:
            log.warning(
                "AUTH IS OFF: no STATESTORE_AUTH_TOKENS_FILE is configured, so anyone who can "
                "reach this port can read, write and delete every namespace"
            )
        # Everything built so far (modules, gRPC, pydantic and FastAPI's
        # models) lives as long as the process: leave it out of the cyclic
        # GC, whose full collections otherwise walked it all (50-130 ms
        # pauses, every few seconds under 1,000 long polls, found nothing).
        gc.freeze()
        log.info(
            "statestore %s serving: etcd %s, blobs %s",
            statestore.__version__,
            ",".join(settings.etcd_endpoints),
            settings.blob_root,
        )
        try:
            yield
        finally:
            await app.state.watches.close()
            if maintenance is not None:
                await maintenance.stop()
            await backend.close()

    app = FastAPI(
        title="statestore",
        version=statestore.__version__,
        description="Checkpoint metadata store: handles in etcd, state blobs through fsspec "
        "(rest-v1.md).",
        lifespan=lifespan,
    )
    problems.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.include_router(sessions.router)
    app.include_router(handles.list_router)
    app.include_router(handles.router)
    app.include_router(coordination.router)
    app.include_router(coordination.ns_router)
    app.include_router(watch_routes.router)
    app.include_router(ops.router)
    # Both shortcuts inside the two below; the handle routes, which every
    # checkpoint calls, skip FastAPI's routing and parameter solving.
    app.add_middleware(DirectRoutes, routers=[handles.router])
    app.add_middleware(watch_routes.WatchShortcut)
    app.add_middleware(EncodedSegments)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker builds its own app)."""
    return create_app(ServiceSettings())


# Problem statuses each kind of operation can answer (rest-v1.md); FastAPI's
# default 422 is never sent (validation errors are 400 problem+json).
_V1_ERRORS = ("400", "401", "403", "404", "409", "410", "412", "413", "502", "503")
_DESCRIPTIONS = {
    "400": "invalid-argument or integrity",
    "401": "unauthorized",
    "403": "forbidden",
    "404": "not-found",
    "409": "already-exists, locked, fenced or not-leader",
    "410": "session-expired (or compacted: a revision etcd no longer has)",
    "412": "version-conflict",
    "413": "too-large",
    "502": "integrity: the blob store returned bytes that do not match",
    "503": "unavailable: etcd or the blob store did not answer",
}
_HEADERS = {
    "ETag": {
        "description": 'The handle version, quoted: "<version>"',
        "schema": {"type": "string"},
    },
    "X-Content-SHA256": {"description": "hex SHA-256 of the state", "schema": {"type": "string"}},
}


def _openapi(app: FastAPI) -> dict[str, object]:
    """The generated document, completed with every problem response, the
    problem schema and the response headers the handlers set."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details; `type` is one of rest-v1.md's words.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "holders": {"type": "array", "items": {"type": "string"}},
            # not-leader: who leads (null when nobody does)
            "leader": {"type": ["string", "null"]},
            # compacted: the oldest revision etcd still keeps
            "compact_revision": {"type": "integer"},
        },
        "additionalProperties": True,
    }
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, operations in doc.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            codes = _V1_ERRORS if path.startswith("/v1/") else ("503",) if path == "/readyz" else ()
            for code in codes:
                # A route's own word for a status (the watch's 410) beats the generic one.
                described = responses.get(code, {}).get("description") or _DESCRIPTIONS[code]
                responses[code] = {"description": described, "content": problem}
            if path.startswith("/v1/namespaces/{ns}/handles/{name}"):
                for code, resp in responses.items():
                    if code.startswith("2") and code != "204":
                        wanted = {
                            k: v
                            for k, v in _HEADERS.items()
                            if k == "ETag" or path.endswith("/state")
                        }
                        resp.setdefault("headers", {}).update(wanted)
    app.openapi_schema = doc
    return doc
