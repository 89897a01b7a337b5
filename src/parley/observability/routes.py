"""`GET /metrics` (Prometheus, unauthenticated like health) and the admin views of SLOs and recent errors."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from parley.errors import InvalidRequest
from parley.http.deps import AdminUser, ServicesDep
from parley.observability.diagnose import parse_since

router = APIRouter(tags=["observability"])


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.telemetry.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/admin/errors")
async def recent_errors(principal: AdminUser, services: ServicesDep,
                        since: Annotated[str | None, Query(max_length=64)] = None) -> dict[str, Any]:
    """This process's recent WARNING and ERROR events as ranked failure patterns (as `parley diagnose`)."""
    try:
        moment = parse_since(since) if since else None
    except ValueError as exc:
        raise InvalidRequest(details=[{"field": "query.since", "type": "invalid", "message": str(exc)}]) from exc
    diagnosis = await asyncio.to_thread(services.recent_errors.diagnosis, moment)  # CPU work, off the loop
    report: dict[str, Any] = diagnosis.as_dict()
    return report


@router.get("/api/admin/slo")
async def slo_status(principal: AdminUser, services: ServicesDep) -> dict[str, Any]:
    return {"slos": [status.as_dict() for status in services.slos.all()],
            "alerts_firing": [transition.as_dict() for transition in services.alerts.firing.values()]}
