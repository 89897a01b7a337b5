"""SLO windows and burn-rate math on synthetic series with a controlled clock: exact figures."""

from __future__ import annotations

import pytest

from parley.observability.slo import SLODefinition, SLOTracker, WindowedCounter, window_status

API = SLODefinition("api", "test", objective=0.999, alert_below=0.90, severity="critical", min_events=10)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_slide_by_the_second_and_by_the_minute() -> None:
    counter = WindowedCounter()
    start = 1_800_000_000.0  # a multiple of 60
    for second in range(7200):  # two hours, one good event a second and one bad every tenth second
        counter.add(start + second, good=1, bad=1 if second % 10 == 0 else 0)
    now = start + 7199.5
    assert counter.totals(now, 300) == (300, 30)
    assert counter.totals(now, 3600) == (3600, 360)
    # 30 days, by the minute: the two hours are all in it.
    assert counter.totals(now, 30 * 86400) == (7200, 720)
    # A minute later nothing new: the 5 minute window lost exactly 60 seconds of events.
    assert counter.totals(now + 60, 300) == (240, 24)


def test_old_buckets_are_reused_not_double_counted() -> None:
    counter = WindowedCounter()
    counter.add(1000.0, good=5)
    counter.add(1000.0 + 3600, good=7)  # the same second-slot an hour later
    assert counter.totals(1000.0 + 3600, 300) == (7, 0)
    assert counter.totals(1000.0 + 3600, 3600) == (7, 0)
    assert counter.totals(1000.0 + 3600, 30 * 86400) == (12, 0)


def test_burn_rate_and_budget_are_exact() -> None:
    status = window_status(good=9_990, bad=10, objective=0.999)
    assert status.sli == pytest.approx(0.999) and status.error_rate == pytest.approx(0.001)
    assert status.burn_rate == pytest.approx(1.0)  # exactly on budget
    status = window_status(good=950, bad=50, objective=0.999)
    assert status.burn_rate == pytest.approx(50.0)
    assert window_status(0, 0, 0.999).sli is None


def test_tracker_reports_windows_budget_and_alert_condition() -> None:
    clock = Clock()
    tracker = SLOTracker((API,), clock=clock)
    for _ in range(1000):
        tracker.record("api", good=1)
    clock.now += 3000  # fifty minutes later: out of the 5 minute window, inside the hour
    for _ in range(9):
        tracker.record("api", bad=1)  # nine failures: under min_events on their own
    status = tracker.status("api")
    assert status.windows["5m"].good == 0 and status.windows["5m"].bad == 9
    assert status.alerting is False  # too few events to judge
    tracker.record("api", bad=1)
    tracker.record("api", good=1)
    status = tracker.status("api")
    assert status.windows["5m"].sli == pytest.approx(1 / 11)
    assert status.alerting is True
    hour = status.windows["1h"]
    assert (hour.good, hour.bad) == (1001, 10)
    assert hour.burn_rate == pytest.approx((10 / 1011) / 0.001)
    assert status.budget_remaining == pytest.approx(1 - (10 / 1011) / 0.001)
    clock.now += 301
    assert tracker.status("api").alerting is False  # the failures left the 5 minute window


def test_slo_rules_are_valid_prometheus_rule_yaml() -> None:
    import subprocess
    import sys

    import yaml

    result = subprocess.run([sys.executable, "-m", "parley", "slo", "rules"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rules = yaml.safe_load(result.stdout)["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"ParleyApiSuccessBelowThreshold", "ParleyWsConnectionSuccessBelowThreshold",
            "ParleyAgentMessageDeliveryBelowThreshold", "ParleyDatabaseSessionSuccessBelowThreshold"} <= names
    threshold = next(r for r in rules if r["alert"] == "ParleyApiSuccessBelowThreshold")
    assert threshold["labels"]["severity"] == "critical" and threshold["expr"].endswith("< 0.9")
    assert "parley_http_requests_total" in threshold["expr"]
    burn = next(r for r in rules if r["alert"] == "ParleyApiSuccessErrorBudgetBurnFast")
    assert "14.4 * 0.001" in burn["expr"] and "[1h]" in burn["expr"] and "[5m]" in burn["expr"]


def test_diagnose_runs_from_the_command_line(tmp_path: pytest.TempPathFactory) -> None:
    import json
    import subprocess
    import sys

    log = "\n".join([
        '{"event": "database_unavailable", "level": "warning", "route": "/api/threads", '
        '"timestamp": "2026-11-29T10:00:00Z", "user_id": "u1", "reason": "ConnectionRefusedError"}',
        '{"event": "request", "level": "info", "timestamp": "2026-11-29T10:00:01Z"}',
        '{"event": "database_unavailable", "level": "warning", "route": "/api/threads", '
        '"timestamp": "2026-11-29T10:00:02Z", "user_id": "u2", "reason": "ConnectionRefusedError"}',
    ])
    result = subprocess.run([sys.executable, "-m", "parley", "diagnose", "--json", "-"], input=log,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 2 and len(report["patterns"]) == 1
    assert report["patterns"][0]["count"] == 2
