"""`/health/live`, `/health/ready` and `/health` (API.md, Health and monitoring). No auth, by design."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse

from parley import __version__
from parley.health.components import Phase
from parley.http.deps import ServicesDep

router = APIRouter(tags=["health"])

_HEALTHY_STATES = ("healthy", "disabled")


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(services: ServicesDep) -> JSONResponse:
    lifecycle = services.lifecycle
    components = await lifecycle.component_health()
    required_ok = all(c["status"] in _HEALTHY_STATES for c in components.values() if c["required"])
    if lifecycle.phase is Phase.READY and required_ok:
        return JSONResponse({"status": "ready"})
    status = {Phase.STARTING: "starting", Phase.DRAINING: "draining", Phase.STOPPED: "draining"}.get(
        lifecycle.phase, "unhealthy")
    return JSONResponse({"status": status, "components": components}, status_code=503)


@router.get("/health")
async def health(services: ServicesDep) -> JSONResponse:
    lifecycle = services.lifecycle
    components = await lifecycle.component_health()
    body: dict[str, Any] = {
        "status": "healthy",
        "version": __version__,
        "uptime_s": round(time.monotonic() - lifecycle.started_at, 3),
        "phase": lifecycle.phase.value,
        "components": components,
    }
    unhealthy = [c for c in components.values() if c["status"] not in _HEALTHY_STATES]
    if any(c["required"] for c in unhealthy) or lifecycle.phase is Phase.FAILED:
        body["status"] = "unhealthy"
        return JSONResponse(body, status_code=503)
    if unhealthy:
        body["status"] = "degraded"
    return JSONResponse(body)
