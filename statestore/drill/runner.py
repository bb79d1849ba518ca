"""Running a drill: the selected scenarios one after another in one
:class:`~statestore.drill.context.Drill`, then cleanup and the report.

A scenario that raises is reported with its ``error`` and the next one runs;
whatever happens, the job manager processes a scenario started are killed
when it ends, and the drill's admin is closed when the run ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from statestore.drill.context import Drill, DrillOptions, StepCallback
from statestore.drill.report import DrillReport, ScenarioResult
from statestore.drill.scenarios import SCENARIOS
from statestore.drill.target import Target

log = logging.getLogger(__name__)


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
