"""Metrics move with traffic; an SLO alert fires on injected 5xx and resolves, reaching a webhook both times;
admin-only views and the ops agent are invisible to everyone else."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from parley.app import create_app
from parley.settings import Settings
from tests.conftest import SettingsFactory
from tests.support.clients import error_code, promote_to_admin, register
from tests.support.conversation import Chat
from tests.support.live import LiveServer, wait_for


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_exist_and_move_with_traffic(live_server: LiveServer, client: httpx.Client) -> None:
    before = scrape(client)
    account = register(client)
    client.post("/api/threads", json={}, headers=account.headers)
    with Chat(live_server.ws_url, account) as chat:
        chat.send("user_message", {"content": "what is 2 + 2"})
        chat.run_to_end()
        during = scrape(client)
    after = wait_for(lambda: (s := scrape(client)) and value(s, "parley_ws_connections_open") == 0 and s,
                     message="the connection to be counted closed")

    assert value(after, "parley_http_requests_total", route="/api/threads", method="POST", status="201") == \
        value(before, "parley_http_requests_total", route="/api/threads", method="POST", status="201") + 1
    assert value(after, "parley_http_request_duration_seconds_count", route="/api/threads", method="POST") >= 1
    assert value(after, "parley_ws_connections_total", outcome="accepted") == \
        value(before, "parley_ws_connections_total", outcome="accepted") + 1
    assert value(during, "parley_ws_connections_open") == 1
    stored = value(after, "parley_run_events_total", outcome="stored") - \
        value(before, "parley_run_events_total", outcome="stored")
    delivered = sum(value(after, "parley_run_events_total", outcome=outcome) -
                    value(before, "parley_run_events_total", outcome=outcome) for outcome in ("sent", "resent"))
    # Everything but the sender's own message_created reached it, live or (stored before the feed went live)
    # replayed.
    assert stored >= 8 and delivered == stored - 1
    assert value(after, "parley_run_events_total", outcome="dropped") == 0
    assert value(after, "parley_runs_total", agent="assistant", status="completed") == 1
    assert value(after, "parley_run_duration_seconds_count", agent="assistant") == 1
    assert value(after, "parley_tool_calls_total", tool="calculator", outcome="ok") == 1
    assert value(after, "parley_db_sessions_total", outcome="opened") > value(before, "parley_db_sessions_total",
                                                                              outcome="opened")
    assert value(after, "parley_llm_tokens_total", model="parley-builtin", direction="output") > 0
    assert value(after, "parley_llm_calls_total", provider="builtin", model="parley-builtin", outcome="ok") == 2
    assert ("parley_analytics_dropped_total", ()) in after
    assert value(after, "parley_slo_alert_firing", slo="api_success") == 0


class WebhookReceiver:
    """A local HTTP endpoint that records JSON bodies POSTed to it; fails the first `fail_first` calls."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.calls = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length))
                receiver.calls += 1
                if receiver.calls <= fail_first:
                    self.send_response(503)
                else:
                    receiver.bodies.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(fail_first=1)  # the first delivery fails: retries must carry it through
    yield receiver
    receiver.close()


def app_with_switchable_failures(settings: Settings) -> tuple[FastAPI, dict[str, bool]]:
    app = create_app(settings)
    switch = {"fail": False}

    @app.get("/api/test/maybe")
    async def maybe() -> dict[str, str]:
        if switch["fail"]:
            raise RuntimeError("injected failure")
        return {"ok": "yes"}

    return app, switch


def test_alert_fires_on_injected_5xx_resolves_and_reaches_the_webhook(make_settings: SettingsFactory,
                                                                      webhook: WebhookReceiver,
                                                                      log_records: list[Any]) -> None:
    settings = make_settings(alert_webhook=webhook.url, alert_eval_interval_s=0.1)
    app, switch = app_with_switchable_failures(settings)
    server = LiveServer(settings, app).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            for _ in range(20):
                assert client.get("/api/test/maybe").status_code == 200
            switch["fail"] = True
            for _ in range(30):
                assert client.get("/api/test/maybe").status_code == 500
            wait_for(lambda: [b["status"] for b in webhook.bodies] == ["firing"], timeout=15,
                     message="the firing notification")
            firing = webhook.bodies[0]
            assert firing["slo"] == "api_success" and firing["severity"] == "critical"
            assert firing["threshold"] == 0.9 and firing["sli"] < 0.9
            assert value(scrape(client), "parley_slo_alert_firing", slo="api_success") == 1
            switch["fail"] = False
            for _ in range(300):  # enough good requests to lift the 5 minute success rate over 90%
                client.get("/api/test/maybe")
            wait_for(lambda: [b["status"] for b in webhook.bodies] == ["firing", "resolved"], timeout=15,
                     message="the resolved notification")
            assert webhook.bodies[1]["sli"] >= 0.9
    finally:
        server.stop()
    events = [r.msg for r in list(log_records) if isinstance(r.msg, dict)]
    assert [e["event"] for e in events if e.get("event") in ("alert_firing", "alert_resolved")] == \
        ["alert_firing", "alert_resolved"]
    assert any(e.get("event") == "alert_webhook_failed" for e in events)  # the failed first try, retried


def test_admin_views_and_ops_agent_are_hidden_from_users(live_server: LiveServer, client: httpx.Client) -> None:
    user, admin = register(client), register(client)
    for path in ("/api/admin/slo", "/api/admin/errors", "/api/admin/usage"):
        response = client.get(path, headers=user.headers)
        assert response.status_code == 404 and error_code(response) == "not_found", path
    assert "ops" not in [a["name"] for a in client.get("/api/agents", headers=user.headers).json()["items"]]
    thread = client.post("/api/threads", json={}, headers=user.headers).json()["id"]
    refused = client.post(f"/api/threads/{thread}/messages", json={"content": "what is failing?", "agent": "ops"},
                          headers=user.headers)
    assert refused.status_code == 404 and error_code(refused) == "agent_not_found"
    with Chat(live_server.ws_url, user) as chat:
        chat.send("start_agent", {"agent": "ops", "input": "what is failing?"}, "x")
        answer = chat.until(lambda m: m["type"] == "error")[-1]
        assert answer["payload"]["code"] == "agent_not_found"

    admin = promote_to_admin(live_server.settings, client, admin)
    slo = client.get("/api/admin/slo", headers=admin.headers).json()
    assert {s["name"] for s in slo["slos"]} == {"api_success", "ws_connection_success", "agent_message_delivery",
                                                "database_session_success"}
    api = next(s for s in slo["slos"] if s["name"] == "api_success")
    assert set(api["windows"]) == {"5m", "1h", "30d"} and api["windows"]["5m"]["good"] > 0
    assert "ops" in [a["name"] for a in client.get("/api/agents", headers=admin.headers).json()["items"]]


def test_ops_agent_answers_what_is_failing(live_server: LiveServer, client: httpx.Client) -> None:
    admin = promote_to_admin(live_server.settings, client, register(client))
    client.get("/api/threads/does-not-matter", headers={"Authorization": "Bearer broken"})
    with Chat(live_server.ws_url, admin) as chat:
        chat.send("start_agent", {"agent": "ops", "input": "What is failing right now?"})
        messages = chat.run_to_end()
    tools = [m["payload"]["tool"] for m in messages if m["type"] == "tool_completed" and m["payload"]["ok"]]
    assert tools == ["error_patterns", "health_report"]
    answer = messages[-1]["payload"]["message"]["content"]
    assert messages[-1]["type"] == "agent_completed" and "healthy" in answer
