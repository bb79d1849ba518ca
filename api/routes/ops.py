"""Operations: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from statestore.errors import StateStoreError, Unavailable
from statestore_api.problems import problem
from statestore_api.service import Svc

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"content": {"application/problem+json": {}}}})
async def readyz(svc: Svc) -> JSONResponse:
    """200 only when etcd answers without alarms and the blob store takes a write
    (a probe object under ``<blob_root>/_probe/``, written and deleted), each
    within 2 s."""
    checks: dict[str, str] = {}

    async def etcd() -> None:
        # etcd answers Status even under its NOSPACE alarm, when every write
        # fails: an alarm means not ready.
        alarms = await svc.backend.client.alarms()
        if alarms:
            raise Unavailable(
                f"etcd has active alarm(s) {', '.join(alarms)}: writes are refused; see "
                "docs/operations.md (NOSPACE: compact, defrag, alarm disarm)"
            )

    async def blobs() -> None:
        await svc.backend.blobs.ping()

    for what, probe in (("etcd", etcd), ("blobs", blobs)):
        try:
            await asyncio.wait_for(probe(), timeout=2.0)
            checks[what] = "ok"
        except (StateStoreError, TimeoutError) as e:
            checks[what] = str(e) or "timed out"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", **checks})
    failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    return problem(503, "unavailable", f"not ready: {failing}", checks=checks)


@router.get("/metrics", response_class=Response)
async def metrics(svc: Svc) -> Response:
    """Prometheus text format."""
    try:
        svc.metrics.sessions.set(await svc.sessions.count())
    except StateStoreError:
        pass  # report what we have; readyz says etcd is down
    m = svc.maintenance
    if m is not None:
        svc.metrics.pending_removals.set(m.reconciler.stats.pending)
        svc.metrics.blobs_reclaimed.set(m.blobs_reclaimed)
        svc.metrics.orphans_found.set(m.orphans_found)
        if m.compactor is not None:
            svc.metrics.compactions.set(m.compactor.state.compactions)
            svc.metrics.last_compaction.set(m.compactor.state.last_compacted)
        svc.metrics.maintenance_leader.set(1 if m.leading else 0)
        svc.metrics.lease_lost.set(m.lease_losses)
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
