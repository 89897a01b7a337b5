"""Service level objectives, with the incident report's alert thresholds, over exact sliding windows.

Each SLO counts good and bad events in per-second buckets (the last hour) and per-minute buckets (the last 30
days); a window's figures are the exact sums of its buckets, so the 5 minute and 1 hour windows slide by the
second and the 30 day window by the minute. Burn rate is the window's error rate over the error budget
(1 - objective); the budget remaining is what the 30 day window has not burnt.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HOUR_S = 3600
MONTH_MIN = 30 * 24 * 60
WINDOWS: dict[str, int] = {"5m": 300, "1h": HOUR_S, "30d": MONTH_MIN * 60}


@dataclass(frozen=True, slots=True)
class SLODefinition:
    name: str
    description: str
    objective: float  # e.g. 0.999
    alert_below: float  # the alert fires when the 5 minute SLI is under this
    severity: str
    min_events: int = 10  # fewer events in the 5 minute window: too little to judge, no alert


# The report's "Alert Thresholds", and the objectives parley holds itself to.
SLOS: tuple[SLODefinition, ...] = (
    SLODefinition("api_success", "HTTP requests answered without a 5xx", 0.999, 0.90, "critical"),
    SLODefinition("ws_connection_success", "WebSocket connections accepted (auth refusals excluded)", 0.995, 0.95,
                  "high"),
    SLODefinition("agent_message_delivery", "Run events delivered live or replayed, not dropped", 0.999, 0.98,
                  "medium"),
    SLODefinition("database_session_success", "Request database sessions that could reach the database", 0.999,
                  0.99, "high"),
)


class WindowedCounter:
    """Good and bad counts per second for an hour and per minute for 30 days, in fixed memory."""

    def __init__(self) -> None:
        self._second_stamp = array("q", [-1] * HOUR_S)
        self._second_good = array("q", [0] * HOUR_S)
        self._second_bad = array("q", [0] * HOUR_S)
        self._minute_stamp = array("q", [-1] * MONTH_MIN)
        self._minute_good = array("q", [0] * MONTH_MIN)
        self._minute_bad = array("q", [0] * MONTH_MIN)

    def add(self, now: float, good: int = 0, bad: int = 0) -> None:
        second = math.floor(now)
        index = second % HOUR_S
        if self._second_stamp[index] != second:
            self._second_stamp[index], self._second_good[index], self._second_bad[index] = second, 0, 0
        self._second_good[index] += good
        self._second_bad[index] += bad
        minute = second // 60
        index = minute % MONTH_MIN
        if self._minute_stamp[index] != minute:
            self._minute_stamp[index], self._minute_good[index], self._minute_bad[index] = minute, 0, 0
        self._minute_good[index] += good
        self._minute_bad[index] += bad

    def totals(self, now: float, window_s: int) -> tuple[int, int]:
        """(good, bad) over the window ending at `now`: by the second up to an hour, by the minute beyond."""
        if window_s <= HOUR_S:
            oldest = math.floor(now) - window_s
            stamps, goods, bads = self._second_stamp, self._second_good, self._second_bad
        else:
            oldest = math.floor(now) // 60 - window_s // 60
            stamps, goods, bads = self._minute_stamp, self._minute_good, self._minute_bad
        good = bad = 0
        for index, stamp in enumerate(stamps):
            if stamp > oldest:
                good += goods[index]
                bad += bads[index]
        return good, bad


@dataclass(frozen=True, slots=True)
class WindowStatus:
    good: int
    bad: int
    sli: float | None  # None: no events
    error_rate: float | None
    burn_rate: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"good": self.good, "bad": self.bad, "total": self.good + self.bad, "sli": self.sli,
                "error_rate": self.error_rate, "burn_rate": self.burn_rate}


def window_status(good: int, bad: int, objective: float) -> WindowStatus:
    total = good + bad
    if total == 0:
        return WindowStatus(0, 0, None, None, None)
    error_rate = bad / total
    return WindowStatus(good, bad, good / total, error_rate, error_rate / (1 - objective))


@dataclass(frozen=True, slots=True)
class SLOStatus:
    definition: SLODefinition
    windows: dict[str, WindowStatus]
    budget_remaining: float | None  # of the 30 day error budget; negative once overspent
    alerting: bool

    def as_dict(self) -> dict[str, Any]:
        d = self.definition
        return {"name": d.name, "description": d.description, "objective": d.objective,
                "alert_below": d.alert_below, "severity": d.severity, "alerting": self.alerting,
                "error_budget_remaining": self.budget_remaining,
                "windows": {name: status.as_dict() for name, status in self.windows.items()}}


class SLOTracker:
    def __init__(self, definitions: tuple[SLODefinition, ...] = SLOS,
                 clock: Callable[[], float] = time.time) -> None:
        self.definitions = {d.name: d for d in definitions}
        self._counters = {d.name: WindowedCounter() for d in definitions}
        self._clock = clock

    def record(self, name: str, good: int = 0, bad: int = 0) -> None:
        self._counters[name].add(self._clock(), good, bad)

    def status(self, name: str) -> SLOStatus:
        definition = self.definitions[name]
        now = self._clock()
        windows = {label: window_status(*self._counters[name].totals(now, seconds), definition.objective)
                   for label, seconds in WINDOWS.items()}
        month = windows["30d"]
        budget = None if month.burn_rate is None else 1 - month.burn_rate
        return SLOStatus(definition, windows, budget, alert_condition(definition, windows["5m"]))

    def all(self) -> list[SLOStatus]:
        return [self.status(name) for name in self.definitions]


def alert_condition(definition: SLODefinition, five_minutes: WindowStatus) -> bool:
    if five_minutes.sli is None or five_minutes.good + five_minutes.bad < definition.min_events:
        return False
    return five_minutes.sli < definition.alert_below
