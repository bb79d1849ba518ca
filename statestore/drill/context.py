"""What a scenario works with: :class:`Drill`, one per run, holding the
target, the scratch namespaces, the job manager processes and the admin.

Scenarios (:mod:`~statestore.drill.scenarios`) and the runner
(:mod:`~statestore.drill.runner`) both import this module, and it imports
neither, so imports go one way: runner -> scenarios -> context.

Every scenario works in its own scratch namespace ``drill-<run>-<scenario>``
and every job manager process is killed when the drill ends, however it
ends. Cleanup removes the namespaces through the admin
(:meth:`Admin.clear <statestore.drill.admin.Admin.clear>`, the same code as
the REST namespace cleanup): it waits for blobs queued for deletion to pass
their grace period, then reports ``done``; if that takes longer than the
cleanup deadline the durable ``gc/`` entries are left to the service's GC
and the report says so. An admin that may not clean up (a non-admin token)
ends the cleanup at once with ``not done: <why>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from statestore.drill.admin import Admin, CannotVerify
from statestore.drill.child import Child
from statestore.drill.jobmanager import JobManager
from statestore.drill.report import ScenarioResult
from statestore.drill.target import Target
from statestore.errors import StateStoreError

#: Called with (scenario, message) for live progress.
StepCallback = Callable[[str, str], None]


@dataclass
class DrillOptions:
    """``scenarios``: names in :data:`~statestore.drill.scenarios.SCENARIOS`,
    run in this order."""

    scenarios: list[str]
    checkpoints: int = 20
    state_bytes: int = 64 * 1024
    writers: int = 3
    cleanup_timeout: float | None = None


class Drill:
    """What scenarios use: the target, scratch namespaces, job managers and
    the admin (opened by :meth:`start`)."""

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
        self.admin: Admin = target.admin(f"drill-{self.run_id}")
        self._started = False

    # -- for scenarios -----------------------------------------------------------

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
        await self.admin.open()
        self._started = True

    async def kill_children(self) -> None:
        await asyncio.gather(*(c.kill() for c in self.children), return_exceptions=True)
        self.children.clear()

    async def cleanup(self) -> str:
        """Remove every scratch namespace; "done" or what was left."""
        if not self._started:
            return "not run"
        grace = self.admin.blob_grace_seconds
        timeout = self.opts.cleanup_timeout or grace + self.target.ttl + 15.0
        deadline = time.monotonic() + timeout
        pending = list(self.namespaces)
        while pending:
            still = []
            for ns in pending:
                try:
                    done = await self.admin.clear(ns)
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
        with contextlib.suppress(StateStoreError):
            await self.admin.close()


#: A scenario: injects one failure through the drill and records what it saw.
Scenario = Callable[[Drill, ScenarioResult], Awaitable[None]]
