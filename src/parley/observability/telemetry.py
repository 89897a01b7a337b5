"""Telemetry: the one place parts of parley report what happened. Each report feeds the Prometheus series, the
SLO windows and, for records, the analytics sink; the reporters never know which of those are listening."""

from __future__ import annotations

import asyncio

from parley.analytics.records import ConnectionRecord, LLMCallRecord, Record, RequestRecord, RunRecord, ToolCallRecord
from parley.analytics.sink import AnalyticsSink
from parley.observability.metrics import Metrics
from parley.observability.slo import SLOTracker

WS_GOOD = frozenset({"accepted"})
WS_BAD = frozenset({"rejected_not_ready", "error"})  # the service's fault; auth and rate refusals are the client's
EVENT_GOOD = frozenset({"sent", "resent"})


class Telemetry:
    def __init__(self, metrics: Metrics, slos: SLOTracker, analytics: AnalyticsSink) -> None:
        self.metrics = metrics
        self.slos = slos
        self.analytics = analytics
        self._event_counters = {outcome: metrics.run_events.labels(outcome=outcome)
                                for outcome in ("stored", "sent", "resent", "dropped")}
        self._pending_events: dict[str, int] = {}

    def record(self, record: Record) -> None:
        self.analytics.record(record)
        metrics = self.metrics
        if isinstance(record, RequestRecord):
            metrics.http_requests.labels(record.route, record.method, str(record.status)).inc()
            metrics.http_duration.labels(record.route, record.method).observe(record.duration_ms / 1000)
            if record.status >= 500:
                self.slos.record("api_success", bad=1)
            else:
                self.slos.record("api_success", good=1)
        elif isinstance(record, RunRecord):
            metrics.runs.labels(record.agent, record.status).inc()
            metrics.run_duration.labels(record.agent).observe(record.duration_ms / 1000)
        elif isinstance(record, ToolCallRecord):
            metrics.tool_calls.labels(record.tool, "ok" if record.ok else "error").inc()
        elif isinstance(record, LLMCallRecord):
            metrics.llm_calls.labels(record.provider, record.model, record.outcome).inc()
            metrics.llm_tokens.labels(record.model, "input").inc(record.input_tokens)
            metrics.llm_tokens.labels(record.model, "output").inc(record.output_tokens)
        elif isinstance(record, ConnectionRecord):
            metrics.ws_open.dec()

    def ws_attempt(self, outcome: str) -> None:
        self.metrics.ws_connections.labels(outcome=outcome).inc()
        if outcome == "accepted":
            self.metrics.ws_open.inc()
        if outcome in WS_GOOD:
            self.slos.record("ws_connection_success", good=1)
        elif outcome in WS_BAD:
            self.slos.record("ws_connection_success", bad=1)

    def run_events(self, outcome: str, count: int = 1) -> None:
        """Counted for every event sent, so tallied here and passed on once per turn of the event loop."""
        pending = self._pending_events
        first = not pending  # since the last flush
        pending[outcome] = pending.get(outcome, 0) + count
        if first:
            try:
                asyncio.get_running_loop().call_soon(self._flush_run_events)
            except RuntimeError:  # no loop (a script, a test): at once
                self._flush_run_events()

    def _flush_run_events(self) -> None:
        pending, self._pending_events = self._pending_events, {}
        for outcome, count in pending.items():
            self._event_counters[outcome].inc(count)
            if outcome in EVENT_GOOD:
                self.slos.record("agent_message_delivery", good=count)
            elif outcome == "dropped":
                self.slos.record("agent_message_delivery", bad=count)

    def db_session(self, ok: bool) -> None:
        self.metrics.db_sessions.labels(outcome="opened" if ok else "failed").inc()
        if ok:
            self.slos.record("database_session_success", good=1)
        else:
            self.slos.record("database_session_success", bad=1)

    def analytics_dropped(self) -> None:
        self.metrics.analytics_dropped.inc()
