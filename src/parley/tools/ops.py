"""Operator tools (admins only): the components' health, the SLO state, and the ranked recent error patterns."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from parley.agents.context import UserExecutionContext
from parley.clock import utcnow
from parley.health.components import Lifecycle
from parley.observability.alerts import AlertManager
from parley.observability.slo import SLOTracker


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthReportTool:
    name: ClassVar[str] = "health_report"
    description: ClassVar[str] = "The measured health of every component of the service, and which are unhealthy."
    Params: ClassVar[type[BaseModel]] = _NoParams
    timeout_s: ClassVar[float] = 10.0
    admin_only: ClassVar[bool] = True

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        components = await self.lifecycle.component_health()
        bad = {name: c for name, c in components.items() if c["status"] not in ("healthy", "disabled")}
        status = "unhealthy" if any(c["required"] for c in bad.values()) else "degraded" if bad else "healthy"
        return {"status": status, "phase": self.lifecycle.phase.value, "unhealthy": sorted(bad),
                "components": components}


class SLOStatusTool:
    name: ClassVar[str] = "slo_status"
    description: ClassVar[str] = ("Each service level objective over 5 minutes, 1 hour and 30 days: success rate, "
                                  "burn rate, error budget left, and the alerts firing.")
    Params: ClassVar[type[BaseModel]] = _NoParams
    timeout_s: ClassVar[float] = 10.0
    admin_only: ClassVar[bool] = True

    def __init__(self, tracker: SLOTracker, alerts: AlertManager) -> None:
        self.tracker = tracker
        self.alerts = alerts

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        return {"slos": [status.as_dict() for status in self.tracker.all()],
                "alerts_firing": sorted(self.alerts.firing)}


class Diagnoses(Protocol):
    def diagnosis(self, since: Any = None) -> Any: ...


class ErrorPatternsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hours: float = Field(default=24.0, gt=0, le=24 * 30)
    limit: int = Field(default=5, ge=1, le=20)


class ErrorPatternsTool:
    name: ClassVar[str] = "error_patterns"
    description: ClassVar[str] = ("The distinct failure patterns among this process's recent warnings and errors, "
                                  "ranked by count, with routes, users and a sample.")
    Params: ClassVar[type[BaseModel]] = ErrorPatternsParams
    timeout_s: ClassVar[float] = 10.0
    admin_only: ClassVar[bool] = True

    def __init__(self, recent: Diagnoses) -> None:
        self.recent = recent

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        diagnosis = self.recent.diagnosis(since=utcnow() - timedelta(hours=params.hours))
        report: dict[str, Any] = diagnosis.as_dict()
        report["patterns"] = report.get("patterns", [])[: params.limit]
        report["hours"] = params.hours
        return report
