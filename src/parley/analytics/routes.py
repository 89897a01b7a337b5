"""`GET /api/usage` (the caller's) and `GET /api/admin/usage` (everyone's, admins only)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel

from parley.analytics.usage import GroupBy, UsageItem
from parley.clock import utcnow
from parley.errors import InvalidRequest
from parley.http.deps import AdminUser, CurrentUser, ServicesDep

router = APIRouter(tags=["usage"])

MAX_WINDOW = timedelta(days=366)


class UsageOut(BaseModel):
    items: list[UsageItem]
    source: str
    since: datetime
    until: datetime
    group_by: str


def _window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    until = _aware(until) if until else utcnow()
    since = _aware(since) if since else until - timedelta(days=30)
    if since >= until:
        raise InvalidRequest(details=[{"field": "query.since", "type": "range",
                                       "message": "since must be before until"}])
    if until - since > MAX_WINDOW:
        raise InvalidRequest(details=[{"field": "query.since", "type": "range",
                                       "message": "the window is at most 366 days"}])
    return since, until


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _out(items: list[UsageItem], source: str, since: datetime, until: datetime, group_by: str) -> UsageOut:
    return UsageOut(items=items, source=source, since=since, until=until, group_by=group_by)


@router.get("/api/usage")
async def usage(
    principal: CurrentUser,
    services: ServicesDep,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: Literal["day", "model", "agent"] = "day",
) -> UsageOut:
    window = _window(since, until)
    items, source = await services.usage.usage(principal.user_id, *window, group_by)
    return _out(items, source, *window, group_by)


@router.get("/api/admin/usage")
async def admin_usage(
    principal: AdminUser,
    services: ServicesDep,
    since: datetime | None = None,
    until: datetime | None = None,
    group_by: Literal["day", "model", "agent", "user"] = "day",
    user_id: Annotated[str | None, Query(max_length=64)] = None,
) -> UsageOut:
    window = _window(since, until)
    grouping: GroupBy = group_by
    items, source = await services.usage.usage(user_id, *window, grouping)
    return _out(items, source, *window, group_by)
