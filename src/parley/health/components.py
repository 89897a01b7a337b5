"""Components and the lifecycle that starts them in a fixed, declared order and reports their measured health.

Start-up runs in the background so the process answers `/health/ready` (503 `starting`) at once; a required
component that cannot start yet is retried with backoff, one that can never start (`FatalStartError`) ends
the process with its message. Shutdown drains, then stops components in reverse order.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from parley.observability.logging import describe, get_logger

log = get_logger("parley.lifecycle")

HealthStatus = Literal["healthy", "degraded", "unhealthy", "disabled", "starting"]
CHECK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ComponentHealth:
    status: HealthStatus
    latency_ms: float | None = None
    detail: str | None = None

    def as_dict(self, required: bool) -> dict[str, object]:
        body: dict[str, object] = {"status": self.status, "required": required}
        if self.latency_ms is not None:
            body["latency_ms"] = round(self.latency_ms, 2)
        if self.detail:
            body["detail"] = self.detail
        return body


class Component(Protocol):
    """A part of the process with a start, a stop and a measured health check."""

    name: str
    required: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> ComponentHealth: ...


class FatalStartError(Exception):
    """A component can never start with this configuration; the message says how to fix it."""


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Lifecycle:
    """Owns the order components start and stop in, and the process phase readiness reports."""

    def __init__(self, components: Sequence[Component], on_fatal: Callable[[str], None] | None = None) -> None:
        names = [component.name for component in components]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate component names: {names}")
        self.components = list(components)
        self.phase = Phase.STARTING
        self.fatal_error: str | None = None
        self._started: set[str] = set()
        self._start_errors: dict[str, str] = {}
        self._on_fatal = on_fatal
        self._last_status: dict[str, HealthStatus] = {}
        self.started_at = time.monotonic()

    # --- start and stop ------------------------------------------------------------------------------------
    def is_started(self, name: str) -> bool:
        return name in self._started

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    async def start(self, retry_initial_s: float = 0.25, retry_max_s: float = 5.0) -> None:
        for component in self.components:
            delay = retry_initial_s
            while self.phase is Phase.STARTING:
                try:
                    await component.start()
                except FatalStartError as exc:
                    self._fail(component.name, str(exc))
                    return
                except Exception as exc:  # a start attempt failed; it is retried or, if optional, skipped
                    reason = public_reason(exc)
                    if self._start_errors.get(component.name) != reason:
                        log.warning("component_start_failed", component=component.name, reason=describe(exc),
                                    required=component.required, retry_in_s=delay)
                    self._start_errors[component.name] = reason
                    if not component.required:
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, retry_max_s)
                    continue
                self._started.add(component.name)
                self._start_errors.pop(component.name, None)
                log.info("component_started", component=component.name)
                break
        if self.phase is Phase.STARTING:
            # Start-up left ~10^5 long-lived objects; frozen, full collections stop rescanning them, which
            # cut p99 latency by half in bench/ (gc pauses of ~80 ms otherwise).
            gc.collect()
            gc.freeze()
            self.phase = Phase.READY
            log.info("ready", components=[c.name for c in self.components],
                     startup_s=round(time.monotonic() - self.started_at, 3))

    def _fail(self, name: str, message: str) -> None:
        self.phase = Phase.FAILED
        self.fatal_error = f"{name}: {message}"
        log.critical("startup_failed", component=name, reason=message)
        if self._on_fatal is not None:
            self._on_fatal(self.fatal_error)

    def begin_drain(self) -> None:
        if self.phase in (Phase.STARTING, Phase.READY):
            self.phase = Phase.DRAINING
            log.info("draining")
            for component in self.components:
                drain = getattr(component, "begin_drain", None)  # optional: stop taking new work
                if callable(drain):
                    drain()

    async def stop(self, deadline_s: float) -> None:
        self.begin_drain()
        for component in reversed(self.components):
            if component.name not in self._started:
                continue
            try:
                async with asyncio.timeout(deadline_s):
                    await component.stop()
            except Exception as exc:  # keep stopping the others; say what went wrong
                log.error("component_stop_failed", component=component.name, reason=describe(exc))
            self._started.discard(component.name)
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPED

    # --- health --------------------------------------------------------------------------------------------
    async def component_health(self) -> dict[str, dict[str, object]]:
        results = await asyncio.gather(*(self._check(component) for component in self.components))
        for component, health in zip(self.components, results, strict=True):
            if self._last_status.get(component.name, health.status) != health.status:
                log.info("component_health_changed", component=component.name, status=health.status,
                         previous=self._last_status[component.name], detail=health.detail)
            self._last_status[component.name] = health.status
        return {c.name: health.as_dict(c.required) for c, health in zip(self.components, results, strict=True)}

    async def _check(self, component: Component) -> ComponentHealth:
        if component.name not in self._started:
            detail = self._start_errors.get(component.name)
            if self.phase is Phase.STARTING and component.required:
                return ComponentHealth("starting", detail=detail)
            return ComponentHealth("unhealthy", detail=detail or "not started")
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                return await component.check()
        except TimeoutError:
            return ComponentHealth("unhealthy", latency_ms=CHECK_TIMEOUT_S * 1000, detail="check timed out")
        except Exception as exc:  # a failing check is an unhealthy component, never a failing endpoint
            log.debug("component_check_failed", component=component.name, reason=describe(exc))
            return ComponentHealth("unhealthy", detail=public_reason(exc))

    def required_names(self) -> set[str]:
        return {c.name for c in self.components if c.required}


def public_reason(exc: BaseException) -> str:
    """What an unauthenticated health probe may learn: the kind of failure, no hosts, names or messages."""
    text = f"{type(exc).__name__} {exc}".lower()
    if isinstance(exc, TimeoutError) or "timed out" in text or "timeout" in text:
        return "timed out"
    if isinstance(exc, OSError) or any(word in text for word in ("connect", "refused", "unreachable")):
        return "unreachable"
    return "failing (see logs)"
