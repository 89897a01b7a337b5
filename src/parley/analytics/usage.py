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

from sqlalchemy import ColumnElement, Select, SQLColumnExpression, extract, func, or_, select

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
        """The same figures, computed by the database: one GROUP BY for the totals, and one ranking of
        durations that returns only the ranks the percentiles need, so no request moves a user's whole run
        history into the server. Durations are exact to the microsecond on PostgreSQL and to the millisecond
        on SQLite (its date arithmetic's resolution)."""
        dialect = self.database.dialect
        key = _database_key(group_by, dialect)
        conditions = [Run.status.in_(FINISHED), Run.finished_at >= since, Run.finished_at < until]
        if user_id is not None:
            conditions.append(Run.user_id == user_id)
        totals_query: Select[Any, int, int, int, float] = (
            select(key.label("key"), func.count(), func.sum(Run.input_tokens), func.sum(Run.output_tokens),
                   func.sum(Run.cost_usd))
            .where(*conditions).group_by(key).order_by(key))
        runs = select(key.label("key"), _database_duration(dialect).label("duration")).where(*conditions).subquery()
        ranked = select(
            runs.c.key, runs.c.duration,
            (func.row_number().over(partition_by=runs.c.key, order_by=runs.c.duration) - 1).label("rank"),
            func.count().over(partition_by=runs.c.key).label("n"),
        ).subquery()
        last = ranked.c.n - 1
        lows = [last * percent // 100 for percent in _PERCENTS]
        ranks_query = select(ranked.c.key, ranked.c.rank, ranked.c.duration).where(
            or_(*(ranked.c.rank == low for low in lows), *(ranked.c.rank == low + 1 for low in lows)))
        async with self.database.session() as session:
            totals = (await session.execute(totals_query)).all()
            durations: dict[str, dict[int, float]] = defaultdict(dict)
            for key_value, rank, duration in await session.execute(ranks_query):
                durations[str(key_value)][int(rank)] = float(duration or 0.0)
        items = []
        for key_value, runs_count, tokens_in, tokens_out, cost in totals:
            at_rank = durations[str(key_value)]
            p50, p95 = (_interpolated(at_rank, int(runs_count), percent) for percent in _PERCENTS)
            items.append(UsageItem(key=str(key_value), runs=int(runs_count), input_tokens=int(tokens_in or 0),
                                   output_tokens=int(tokens_out or 0), cost_usd=round(float(cost or 0.0), 10),
                                   latency_ms_p50=p50, latency_ms_p95=p95))
        return items


_PERCENTS = (50, 95)


def _database_key(group_by: GroupBy, dialect: str) -> SQLColumnExpression[Any]:
    if group_by == "day":  # the UTC date the run finished
        if dialect == "sqlite":
            return func.date(Run.finished_at)  # stored as UTC text
        return func.to_char(func.timezone("UTC", Run.finished_at), "YYYY-MM-DD")
    return {"model": func.coalesce(Run.model, ""), "agent": Run.agent, "user": Run.user_id}[group_by]


def _database_duration(dialect: str) -> ColumnElement[Any]:
    """A run's duration in ms (0 for a run that never started)."""
    elapsed: ColumnElement[Any]
    if dialect == "sqlite":  # julianday has millisecond resolution; rounding removes its floating-point noise
        elapsed = func.round((func.julianday(Run.finished_at) - func.julianday(Run.started_at)) * 86_400_000.0)
    else:
        elapsed = extract("epoch", Run.finished_at - Run.started_at) * 1000
    return func.coalesce(elapsed, 0.0)


def _interpolated(at_rank: dict[int, float], count: int, percent: int) -> float | None:
    """`percentile` over the ranks the query returned: the same linear interpolation, in exact arithmetic."""
    if count == 0:
        return None
    low = (count - 1) * percent // 100
    high = min(low + 1, count - 1)
    fraction = ((count - 1) * percent - low * 100) / 100
    return at_rank[low] + (at_rank[high] - at_rank[low]) * fraction


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def _float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number
