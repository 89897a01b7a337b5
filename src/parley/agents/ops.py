"""The `ops` agent (admins only): answers "what is failing?" from health, SLOs and recent error patterns."""

from __future__ import annotations

from typing import ClassVar

from parley.agents.assistant import Assistant


class OpsAgent(Assistant):
    name: ClassVar[str] = "ops"
    description: ClassVar[str] = ("For operators: the service's health, its SLOs and error budgets, and the "
                                  "distinct failure patterns in recent errors.")
    tool_names: ClassVar[tuple[str, ...]] = ("health_report", "slo_status", "error_patterns")
    admin_only: ClassVar[bool] = True
    system_prompt: ClassVar[str] = (
        "You are parley's operations assistant, talking to an administrator. Use health_report for component "
        "health, slo_status for service level objectives, alerts and error budgets, and error_patterns for what "
        "is failing. Lead with what is broken and how badly; be precise with numbers."
    )
