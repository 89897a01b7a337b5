"""SLO alerts: evaluated every few seconds; each transition (firing, resolved) is logged as a structured event,
shown in metrics, and POSTed to `PARLEY_ALERT_WEBHOOK` when set, with retries, never blocking anything."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from parley.clock import rfc3339, utcnow
from parley.health.components import ComponentHealth
from parley.observability.logging import describe, get_logger
from parley.observability.metrics import Metrics
from parley.observability.slo import SLOStatus, SLOTracker

log = get_logger("parley.alerts")

WEBHOOK_QUEUE_MAX = 200
WEBHOOK_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class AlertTransition:
    slo: str
    status: str  # "firing" or "resolved"
    severity: str
    sli: float | None
    threshold: float
    at: str

    def as_dict(self) -> dict[str, Any]:
        return {"service": "parley", "alert": f"slo_{self.slo}", "slo": self.slo, "status": self.status,
                "severity": self.severity, "window": "5m", "sli": self.sli, "threshold": self.threshold,
                "at": self.at}


class AlertManager:
    name = "slo_alerts"
    required = False

    def __init__(self, tracker: SLOTracker, metrics: Metrics, webhook_url: str | None, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tracker = tracker
        self.metrics = metrics
        self.webhook_url = webhook_url
        self.interval_s = interval_s
        self._clock = clock
        self.firing: dict[str, AlertTransition] = {}
        self._outbox: deque[AlertTransition] = deque(maxlen=WEBHOOK_QUEUE_MAX)
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.webhook_failures = 0
        self.webhook_delivered = 0

    def evaluate(self) -> list[AlertTransition]:
        """Compares each SLO's alert condition with what is firing; returns (and acts on) the changes."""
        transitions = []
        for status in self.tracker.all():
            name = status.definition.name
            if status.alerting and name not in self.firing:
                transitions.append(self._transition(status, "firing"))
            elif not status.alerting and name in self.firing:
                transitions.append(self._transition(status, "resolved"))
        return transitions

    def _transition(self, status: SLOStatus, state: str) -> AlertTransition:
        definition = status.definition
        transition = AlertTransition(slo=definition.name, status=state, severity=definition.severity,
                                     sli=status.windows["5m"].sli, threshold=definition.alert_below,
                                     at=rfc3339(utcnow()))
        if state == "firing":
            self.firing[definition.name] = transition
            log.error("alert_firing", **transition.as_dict())
        else:
            self.firing.pop(definition.name, None)
            log.info("alert_resolved", **transition.as_dict())
        self.metrics.alerts_firing.labels(slo=definition.name).set(1 if state == "firing" else 0)
        if self.webhook_url:
            self._outbox.append(transition)
            self._wakeup.set()
        return transition

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._evaluate_forever(), name="parley-slo-alerts")]
        if self.webhook_url:
            self._tasks.append(asyncio.create_task(self._deliver_forever(), name="parley-alert-webhook"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def check(self) -> ComponentHealth:
        if not self._tasks or self._tasks[0].done():
            return ComponentHealth("unhealthy", detail="alert evaluation is not running")
        firing = ", ".join(sorted(self.firing)) or "none"
        if self.webhook_url and self.webhook_failures and len(self._outbox):
            return ComponentHealth("degraded", detail=f"firing: {firing}; webhook failing, "
                                   f"{len(self._outbox)} notifications waiting")
        return ComponentHealth("healthy", detail=f"firing: {firing}")

    async def _evaluate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.evaluate()
            except Exception:  # a bug here must not stop future evaluations
                log.exception("alert_evaluation_failed")

    async def _deliver_forever(self) -> None:
        assert self.webhook_url is not None
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                if not self._outbox:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                transition = self._outbox[0]
                if await self._post(client, transition):
                    self._outbox.popleft()

    async def _post(self, client: httpx.AsyncClient, transition: AlertTransition) -> bool:
        delay = 0.5
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                response = await client.post(self.webhook_url or "", json=transition.as_dict())
                if response.status_code < 300:
                    self.webhook_delivered += 1
                    return True
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = describe(exc)
            self.webhook_failures += 1
            log.warning("alert_webhook_failed", slo=transition.slo, status=transition.status, attempt=attempt,
                        reason=reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        return False  # keep it queued; the next round tries again
