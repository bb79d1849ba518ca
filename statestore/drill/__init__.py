"""``statestore drill``: failover recovery drills against a real deployment.

Modules: :mod:`~statestore.drill.scenarios` (what is injected and checked),
:mod:`~statestore.drill.jobmanager` (job managers over the SDK or REST),
:mod:`~statestore.drill.worker` / :mod:`~statestore.drill.child` (a job
manager in a process the drill can kill or pause),
:mod:`~statestore.drill.target` (the deployment and its controllable faults),
:mod:`~statestore.drill.runner` (namespaces, cleanup) and
:mod:`~statestore.drill.report` (results, JSON, table).
"""

from statestore.drill.report import DrillReport, ScenarioResult
from statestore.drill.runner import DrillOptions, run_drill
from statestore.drill.scenarios import SCENARIOS
from statestore.drill.target import Target, open_target

__all__ = [
    "SCENARIOS",
    "DrillOptions",
    "DrillReport",
    "ScenarioResult",
    "Target",
    "open_target",
    "run_drill",
]
