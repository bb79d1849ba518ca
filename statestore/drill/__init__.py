"""``statestore drill``: failover recovery drills against a real deployment.

Modules, each importing only those listed after it:
:mod:`~statestore.drill.runner` (the scenarios in order, cleanup, the
report), :mod:`~statestore.drill.scenarios` (what is injected and checked),
:mod:`~statestore.drill.context` (the run a scenario works with: scratch
namespaces, job managers, the admin, cleanup),
:mod:`~statestore.drill.target` (the deployment and its controllable faults),
:mod:`~statestore.drill.admin` (the drill's administration over the SDK or
REST: orphan sweeps, namespace cleanup, the maintenance stand-in),
:mod:`~statestore.drill.child` / :mod:`~statestore.drill.worker` (a job
manager in a process the drill can kill or pause),
:mod:`~statestore.drill.jobmanager` (job managers over the SDK or REST) and
:mod:`~statestore.drill.report` (results, JSON, table).
"""

from statestore.drill.context import DrillOptions
from statestore.drill.report import DrillReport, ScenarioResult
from statestore.drill.runner import run_drill
from statestore.drill.scenarios import SCENARIOS
from statestore.drill.target import DeploymentSettings, Target, open_target

__all__ = [
    "SCENARIOS",
    "DeploymentSettings",
    "DrillOptions",
    "DrillReport",
    "ScenarioResult",
    "Target",
    "open_target",
    "run_drill",
]
