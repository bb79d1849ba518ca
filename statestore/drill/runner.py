"""Running a drill: the target, the scratch namespaces, the job manager
processes, the maintenance stand-in, cleanup and the report.

Every scenario works in its own scratch namespace ``drill-<run>-<scenario>``
and every job manager process is killed when the drill ends, however it
ends. Cleanup removes the namespaces with the same code as the REST
namespace cleanup, through the drill's :class:`~statestore.drill.admin.Admin`
(which also stands in for missing maintenance): it waits for blobs queued
for deletion to pass their grace period, then reports ``done``; if that
takes longer than the cleanup deadline the durable ``gc/`` entries are left
to the service's GC and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from statestore.drill.admin import Admin, CannotVerify
from statestore.drill.child import Child
from statestore.drill.jobmanager import JobManager
from statestore.drill.report import DrillReport, ScenarioResult
from statestore.drill.scenarios import SCENARIOS
from statestore.drill.target import Target
from statestore.errors import StateStoreError

log = logging.getLogger(__name__)

#: Called with (scenario, message) for live progress.
StepCallback = Callable[[str, str], None]


@dataclass
class DrillOptions:
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    checkpoints: int = 20
    state_bytes: int = 64 * 1024
    writers: int = 3
    cleanup_timeout: float | None = None


class Drill:
    """What scenarios use: the target, scratch namespaces, job managers and
    the admin (after :meth:`start`)."""

    def __init__(self, target: Target, opts: DrillOptions, on_step: StepCallback) -> None:
        self.target = target
        self.opts = opts
        self.run_id = f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.namespaces: list[str] = []
        self.children: list[Child] = []
        self._on_step = on_step
        self.scenario = ""
        ttl = target.ttl
        #: Slack on top of every timing bound the scenarios assert.
        self.margin = 2.0
        self.call_timeout = 30.0 + 2 * ttl
        self.takeover_timeout = 3 * ttl + 15.0
        self.reconcile_timeout = 15.0 + ttl
        self._admin: Admin | None = None

    # -- for scenarios -----------------------------------------------------------

    @property
    def admin(self) -> Admin:
        if self._admin is None:
            raise RuntimeError("drill not started")
        return self._admin

    def step(self, message: str) -> None:
        self._on_step(self.scenario, message)

    def namespace(self, scenario: str) -> str:
        ns = f"drill-{self.run_id}-{scenario}"
        self.namespaces.append(ns)
        return ns

    async def spawn(self, namespace: str, label: str) -> Child:
        child = await Child.start(self.target.worker_spec(namespace, label), self.call_timeout)
        self.children.append(child)
        return child

    @contextlib.asynccontextmanager
    async def job_manager(
        self, namespace: str, label: str, storage_options: dict[str, Any] | None = None
    ) -> AsyncIterator[JobManager]:
        jm = self.target.job_manager(namespace, label, storage_options)
        await jm.open()
        try:
            yield jm
        finally:
            await jm.close()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._admin = self.target.admin(f"drill-{self.run_id}")
        await self._admin.open()

    async def kill_children(self) -> None:
        await asyncio.gather(*(c.kill() for c in self.children), return_exceptions=True)
        self.children.clear()

    async def cleanup(self) -> str:
        """Remove every scratch namespace; "done" or what was left."""
        if self._admin is None:
            return "not run"
        grace = self._admin.blob_grace_seconds
        timeout = self.opts.cleanup_timeout or grace + self.target.ttl + 15.0
        deadline = time.monotonic() + timeout
        pending = list(self.namespaces)
        while pending:
            still = []
            for ns in pending:
                try:
                    done = await self._admin.clear(ns)
                except CannotVerify as e:
                    return f"not done: {e}"
                except StateStoreError as e:
                    done = False
                    self._on_step("cleanup", f"{ns}: {e}")
                if not done:
                    still.append(ns)
            pending = still
            if not pending:
                return "done"
            if time.monotonic() >= deadline:
                return (
                    f"incomplete after {timeout:.0f}s: {pending} still hold blobs queued for "
                    "deletion; the service's GC removes them (their gc/ entries are durable)"
                )
            self._on_step(
                "cleanup", f"{len(pending)} namespace(s) waiting for the blob grace period"
            )
            await asyncio.sleep(1.0)
        return "done"

    async def close(self) -> None:
        await self.kill_children()
        if self._admin is not None:
            with contextlib.suppress(StateStoreError):
                await self._admin.close()


def _quiet_cut_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Connections the drill cuts on purpose (the blob store outage) leave
    HTTP client tasks that died of a reset nobody awaits; they are the
    injected fault, not a failure of the drill: log them quietly."""
    if isinstance(context.get("exception"), ConnectionError):
        log.debug("connection cut by the drill: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


async def run_drill(
    target: Target,
    opts: DrillOptions,
    on_step: StepCallback,
    on_done: Callable[[ScenarioResult], None] = lambda r: None,
) -> DrillReport:
    """Run the selected scenarios one after another, then clean up."""
    report = DrillReport(
        target={"mode": target.mode, "description": target.description, "lease_ttl": target.ttl}
    )
    started = time.monotonic()
    import fsspec.asyn

    # Async blob stores (s3fs) run on fsspec's own loop thread.
    for loop in (asyncio.get_running_loop(), fsspec.asyn.get_loop()):
        loop.set_exception_handler(_quiet_cut_connections)
    drill = Drill(target, opts, on_step)
    try:
        await drill.start()
        for name in opts.scenarios:
            result = ScenarioResult(name)
            drill.scenario = name
            on_step(name, "starting")
            t0 = time.monotonic()
            try:
                await SCENARIOS[name](drill, result)
            except Exception as e:  # report it and go on with the next scenario
                result.error = f"{type(e).__name__}: {e}"
            finally:
                await drill.kill_children()
            result.duration_seconds = time.monotonic() - t0
            report.scenarios.append(result)
            on_done(result)
        drill.scenario = "cleanup"
        report.cleanup = await drill.cleanup()
    finally:
        await drill.close()
    report.duration_seconds = time.monotonic() - started
    return report
