"""Usage figures (runs, tokens, cost, latency percentiles) grouped by day, model, agent or user.

Served from ClickHouse's `runs` table when analytics is on and answering, else from the primary database's
runs; `source` says which. Both compute the same figures: latency is a run's duration, and its percentiles
interpolate linearly between ranks (ClickHouse's `quantileExactInclusive`, and `percentile` below).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select

from parley.analytics.sink import AnalyticsSink, AnalyticsUnavailable
from parley.observability.logging import get_logger
from parley.storage.database import Database
from parley.storage.models import Run

log = get_logger("parley.analytics")

GroupBy = Literal["day", "model", "agent", "user"]
FINISHED = ("completed", "failed", "cancelled", "interrupted")
_CLICKHOUSE_KEYS: dict[str, str] = {
    "day": "toString(toDate(ts))", "model": "model", "agent": "agent", "user": "user_id",
}


@dataclass(frozen=True, slots=True)
class UsageItem:
    key: str
    runs: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms_p50: float | None
    latency_ms_p95: float | None


def percentile(values: list[float], level: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default; ClickHouse's quantileExactInclusive)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * level
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class UsageService:
    def __init__(self, database: Database, sink: AnalyticsSink, database_name: str = "parley") -> None:
        self.database = database
        self.sink = sink
        self.database_name = database_name

    async def usage(self, user_id: str | None, since: datetime, until: datetime,
                    group_by: GroupBy) -> tuple[list[UsageItem], str]:
        """The caller's (or, with `user_id` None, everyone's) usage; and where it came from."""
        if self.sink.enabled:
            try:
                return await self._from_clickhouse(user_id, since, until, group_by), self.sink.backend
            except AnalyticsUnavailable as exc:
                log.info("usage_from_database", reason=str(exc)[:200])
        return await self._from_database(user_id, since, until, group_by), "database"

    async def _from_clickhouse(self, user_id: str | None, since: datetime, until: datetime,
                               group_by: GroupBy) -> list[UsageItem]:
        where = "ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}"
        parameters: dict[str, Any] = {"since": _naive_utc(since), "until": _naive_utc(until)}
        if user_id is not None:
            where += " AND user_id = {user_id:String}"
            parameters["user_id"] = user_id
        # Only fixed expressions and the validated database name are interpolated; values are bound parameters.
        sql = (f"SELECT {_CLICKHOUSE_KEYS[group_by]} AS key, count() AS runs, sum(input_tokens) AS input_tokens, "  # noqa: S608
               "sum(output_tokens) AS output_tokens, sum(cost_usd) AS cost_usd, "
               "quantileExactInclusive(0.5)(duration_ms) AS p50, quantileExactInclusive(0.95)(duration_ms) AS p95 "
               f"FROM {self.database_name}.runs WHERE {where} GROUP BY key ORDER BY key")
        rows = await self.sink.query(sql, parameters)
        return [UsageItem(key=str(row["key"]), runs=int(row["runs"]), input_tokens=int(row["input_tokens"]),
                          output_tokens=int(row["output_tokens"]), cost_usd=round(float(row["cost_usd"]), 10),
                          latency_ms_p50=_float(row["p50"]), latency_ms_p95=_float(row["p95"]))
                for row in rows]

    async def _from_database(self, user_id: str | None, since: datetime, until: datetime,
                             group_by: GroupBy) -> list[UsageItem]:
        query = select(Run.user_id, Run.agent, Run.model, Run.started_at, Run.finished_at, Run.input_tokens,
                       Run.output_tokens, Run.cost_usd).where(
            Run.status.in_(FINISHED), Run.finished_at >= since, Run.finished_at < until)
        if user_id is not None:
            query = query.where(Run.user_id == user_id)
        totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        durations: dict[str, list[float]] = defaultdict(list)
        async with self.database.session() as session:
            result = await session.stream(query.execution_options(yield_per=2000))
            async for user, agent, model, started, finished, tokens_in, tokens_out, cost in result:
                assert finished is not None  # the query asks for finished runs only
                key = {"day": finished.date().isoformat(), "model": model or "", "agent": agent,
                       "user": user}[group_by]
                entry = totals[key]
                entry[0] += 1
                entry[1] += tokens_in
                entry[2] += tokens_out
                entry[3] += cost
                durations[key].append(((finished - started).total_seconds() * 1000) if started else 0.0)
        return [UsageItem(key=key, runs=int(entry[0]), input_tokens=int(entry[1]), output_tokens=int(entry[2]),
                          cost_usd=round(entry[3], 10), latency_ms_p50=percentile(durations[key], 0.5),
                          latency_ms_p95=percentile(durations[key], 0.95))
                for key, entry in sorted(totals.items())]


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number
