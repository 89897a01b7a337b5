"""`GET /metrics` (Prometheus, unauthenticated like health) and the admin views of SLOs and recent errors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from parley.http.deps import AdminUser, ServicesDep

router = APIRouter(tags=["observability"])


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    return Response(services.telemetry.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/admin/slo")
async def slo_status(principal: AdminUser, services: ServicesDep) -> dict[str, Any]:
    return {"slos": [status.as_dict() for status in services.slos.all()],
            "alerts_firing": [transition.as_dict() for transition in services.alerts.firing.values()]}
