"""Prometheus series, on a registry of this app's own (no process-global registry).

With several worker processes set `PROMETHEUS_MULTIPROC_DIR` (an empty directory, the same for every worker):
each process then writes its samples there and `/metrics` aggregates them all.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        # In multiprocess mode the samples live in files; a registry is built per scrape instead.
        self.registry = CollectorRegistry(auto_describe=True)
        registry = None if self.multiprocess_dir else self.registry
        self.http_requests = Counter("parley_http_requests_total", "HTTP requests answered.",
                                     ["route", "method", "status"], registry=registry)
        self.http_duration = Histogram("parley_http_request_duration_seconds", "HTTP request latency.",
                                       ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ws_connections = Counter("parley_ws_connections_total",
                                      "WebSocket connection attempts by outcome (accepted, rejected_auth, "
                                      "rejected_not_ready, rejected_rate_limited, error).", ["outcome"],
                                      registry=registry)
        self.ws_open = Gauge("parley_ws_connections_open", "WebSocket connections open now.",
                             multiprocess_mode="livesum", registry=registry)
        self.run_events = Counter("parley_run_events_total",
                                  "Run events: stored in the log, sent live, resent from the log (replays), "
                                  "dropped (a receiver too slow or gone).", ["outcome"], registry=registry)
        self.runs = Counter("parley_runs_total", "Runs ended, by agent and final status.", ["agent", "status"],
                            registry=registry)
        self.run_duration = Histogram("parley_run_duration_seconds", "Run duration from start to end.", ["agent"],
                                      buckets=RUN_BUCKETS, registry=registry)
        self.tool_calls = Counter("parley_tool_calls_total", "Tool calls by tool and outcome (ok, error).",
                                  ["tool", "outcome"], registry=registry)
        self.db_sessions = Counter("parley_db_sessions_total", "Request database sessions, opened and failed.",
                                   ["outcome"], registry=registry)
        self.llm_tokens = Counter("parley_llm_tokens_total", "LLM tokens by model and direction (input, output).",
                                  ["model", "direction"], registry=registry)
        self.llm_calls = Counter("parley_llm_calls_total", "LLM calls by provider, model and outcome.",
                                 ["provider", "model", "outcome"], registry=registry)
        self.analytics_dropped = Counter("parley_analytics_dropped_total",
                                         "Analytics records dropped because the queue was full.", registry=registry)
        self.alerts_firing = Gauge("parley_slo_alert_firing", "1 while the SLO's alert is firing.", ["slo"],
                                   multiprocess_mode="max", registry=registry)

    def exposition(self) -> bytes:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
