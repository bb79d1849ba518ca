"""The FastAPI application: ``create_app(settings)``.

Layers, outside in: request context (request id, log line, metrics) ->
segment-safe paths (names with ``/``) -> FastAPI routing -> handlers, which
act through one shared :class:`~statestore.store.StoreBackend`; each session
is its own store identity on its own lease (``api.service``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import statestore
from api import problems
from api.auth import Authorizer
from api.observability import Metrics, RequestContext, configure_logging
from api.paths import EncodedSegments
from api.routes import handles, ops, sessions
from api.service import Service
from api.settings import ServiceSettings
from statestore.sessions import SessionRegistry
from statestore.store import StoreBackend

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
            sessions=SessionRegistry(backend.client, settings.root),
            auth=auth,
            metrics=metrics,
        )
        if not auth.enabled:
            log.warning(
                "AUTH IS OFF: no STATESTORE_AUTH_TOKENS_FILE is configured, so anyone who can "
                "reach this port can read, write and delete every namespace"
            )
        log.info(
            "statestore %s serving: etcd %s, blobs %s",
            statestore.__version__,
            ",".join(settings.etcd_endpoints),
            settings.blob_root,
        )
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(
        title="statestore",
        version=statestore.__version__,
        description="Checkpoint metadata store: handles in etcd, state blobs through fsspec "
        "(rest-v1.md).",
        lifespan=lifespan,
    )
    problems.install(app)
    app.include_router(sessions.router)
    app.include_router(handles.list_router)
    app.include_router(handles.router)
    app.include_router(ops.router)
    app.add_middleware(EncodedSegments)
    app.add_middleware(RequestContext, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (each worker builds its own app)."""
    return create_app(ServiceSettings())
