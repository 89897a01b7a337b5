"""`usage_report`: the caller's own token usage and cost over a recent period, grouped as asked."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from parley.agents.context import UserExecutionContext
from parley.analytics.usage import UsageService
from parley.clock import rfc3339, utcnow

PERIODS = {"today": None, "week": timedelta(days=7), "month": timedelta(days=30), "year": timedelta(days=365)}


class UsageReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    period: Literal["today", "week", "month", "year"] = "week"
    group_by: Literal["model", "agent", "day"] = "model"


class UsageReportTool:
    name: ClassVar[str] = "usage_report"
    description: ClassVar[str] = ("Your own token usage and cost over today, the last 7 days (week), 30 days "
                                  "(month) or 365 days (year), grouped by model, agent or day.")
    Params: ClassVar[type[BaseModel]] = UsageReportParams
    timeout_s: ClassVar[float] = 10.0
    admin_only: ClassVar[bool] = False

    def __init__(self, usage: UsageService) -> None:
        self.usage = usage

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        until = utcnow()
        span = PERIODS[params.period]
        since = until.replace(hour=0, minute=0, second=0, microsecond=0) if span is None else until - span
        items, source = await self.usage.usage(ctx.user_id, since, until, params.group_by)
        rows: list[dict[str, Any]] = [
            {"key": i.key, "runs": i.runs, "input_tokens": i.input_tokens, "output_tokens": i.output_tokens,
             "cost_usd": i.cost_usd} for i in items]
        totals = {"runs": sum(i.runs for i in items), "input_tokens": sum(i.input_tokens for i in items),
                  "output_tokens": sum(i.output_tokens for i in items),
                  "cost_usd": round(sum(i.cost_usd for i in items), 10)}
        return {"period": params.period, "group_by": params.group_by, "since": rfc3339(since),
                "until": rfc3339(until), "source": source, "items": rows, "totals": totals}


