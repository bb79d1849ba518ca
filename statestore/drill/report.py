"""Results of a drill: one :class:`ScenarioResult` per scenario, as JSON and a table.

``passed`` means the scenario ran to the end and found no violation. A
scenario the drill cannot run against this target (no controllable blob
store, no local cluster) is reported with ``skipped: true`` and the reason;
it found no violation, so it does not fail the drill. A scenario that could
not finish (the deployment failed in a way the scenario did not inject) has
``error`` set and fails the drill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table


@dataclass
class ScenarioResult:
    name: str
    violation_details: list[str] = field(default_factory=list)
    recovery_seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    reason: str | None = None
    error: str | None = None
    duration_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.violation_details and self.error is None

    def violation(self, message: str) -> None:
        self.violation_details.append(message)

    def timing(self, what: str, seconds: float) -> float:
        self.timings[what] = round(seconds, 3)
        return seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "violations": len(self.violation_details),
            "violation_details": self.violation_details,
            "recovery_seconds": (
                None if self.recovery_seconds is None else round(self.recovery_seconds, 3)
            ),
            "timings": self.timings,
            "details": self.details,
            "skipped": self.skipped,
            "reason": self.reason,
            "error": self.error,
            "duration_seconds": round(self.duration_seconds, 3),
        }


@dataclass
class DrillReport:
    target: dict[str, Any]
    scenarios: list[ScenarioResult] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    duration_seconds: float = 0.0
    cleanup: str = "not run"

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.scenarios)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "target": self.target,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
            "duration_seconds": round(self.duration_seconds, 3),
            "cleanup": self.cleanup,
            "scenarios": [s.to_json() for s in self.scenarios],
        }

    def table(self) -> Table:
        table = Table(title=f"statestore drill: {self.target.get('description', '')}")
        table.add_column("scenario")
        table.add_column("result")
        table.add_column("violations", justify="right")
        table.add_column("recovery s", justify="right")
        table.add_column("notes")
        for s in self.scenarios:
            if s.skipped:
                result = "[yellow]skipped[/yellow]"
            elif s.passed:
                result = "[green]passed[/green]"
            else:
                result = "[red]FAILED[/red]"
            notes = s.reason or s.error or "; ".join(s.violation_details[:3]) or _summary(s)
            recovery = "" if s.recovery_seconds is None else f"{s.recovery_seconds:.2f}"
            table.add_row(s.name, result, str(len(s.violation_details)), recovery, notes)
        return table


def _summary(s: ScenarioResult) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in list(s.timings.items())[:3])
