"""The usage API and the usage_report tool, with analytics off (figures from the runs table) and on (chDB);
and a fresh start without analytics configuration being quiet about it (incident pattern 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from parley.settings import Settings
from tests.conftest import TEST_JWT_SECRET, SettingsFactory, event_of
from tests.support.clients import Account, error_code, promote_to_admin, register
from tests.support.conversation import Chat
from tests.support.live import LiveServer, ServerProcess, wait_for


def converse(server: LiveServer, account: Account, contents: list[str]) -> list[dict[str, Any]]:
    finals = []
    with Chat(server.ws_url, account) as chat:
        for content in contents:
            chat.send("user_message", {"content": content})
            finals.append(chat.run_to_end()[-1])
    return finals


@pytest.fixture(params=["off", "chdb"])
def server(request: pytest.FixtureRequest, make_settings: SettingsFactory) -> Iterator[LiveServer]:
    live = LiveServer(make_settings(analytics=request.param, builtin_token_delay_s=0,
                                    analytics_flush_interval_s=0.1)).start()
    yield live
    live.stop()


def test_usage_counts_the_callers_runs_from_either_source(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        alice, bob = register(client), register(client)
        converse(server, alice, ["what is 1+1", "what is 2+2", "what time is it?"])
        converse(server, bob, ["what is 3+3"])
        expected_source = "database" if server.settings.analytics == "off" else "chdb"

        def alices_usage() -> dict[str, Any] | None:
            body = client.get("/api/usage?group_by=model", headers=alice.headers).json()
            # Until the embedded engine is up, the answer comes from the database (and says so).
            complete = body["items"] and body["items"][0]["runs"] == 3 and body["source"] == expected_source
            return body if complete else None

        body = wait_for(alices_usage, timeout=15, message="three runs in alice's usage")
        assert body["source"] == expected_source and body["group_by"] == "model"
        item = body["items"][0]
        assert item["key"] == "parley-builtin" and item["cost_usd"] == 0.0
        assert item["input_tokens"] > 0 and item["output_tokens"] > 0
        assert 0 < item["latency_ms_p50"] <= item["latency_ms_p95"]
        by_day = client.get("/api/usage?group_by=day", headers=alice.headers).json()["items"]
        assert sum(i["runs"] for i in by_day) == 3

        def bobs_runs() -> int | None:  # his run may reach the engine in a later flush than alice's last one
            items = client.get("/api/usage?group_by=agent", headers=bob.headers).json()["items"]
            return items[0]["runs"] if items else None

        assert wait_for(bobs_runs, timeout=15, message="bob's run in his usage") == 1

        for bad in ("group_by=user", "group_by=nope", "since=2026-01-02&until=2026-01-01",
                    "since=2020-01-01&until=2026-01-01", "since=yesterday"):
            response = client.get(f"/api/usage?{bad}", headers=alice.headers)
            assert response.status_code == 422 and error_code(response) == "invalid_request", bad
        assert client.get("/api/usage").status_code == 401


def test_admin_usage_spans_users_and_is_hidden_from_others(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        user, admin = register(client), register(client)
        converse(server, user, ["what is 1+1"])
        assert client.get("/api/admin/usage", headers=user.headers).status_code == 404
        admin = promote_to_admin(server.settings, client, admin)
        wait_for(lambda: client.get("/api/admin/usage?group_by=user", headers=admin.headers).json()["items"],
                 timeout=15, message="admin usage")
        items = client.get("/api/admin/usage?group_by=user", headers=admin.headers).json()["items"]
        assert [(i["key"], i["runs"]) for i in items] == [(user.id, 1)]
        only = client.get(f"/api/admin/usage?user_id={admin.id}", headers=admin.headers).json()["items"]
        assert only == []


def test_usage_report_tool_answers_in_chat(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
        converse(server, account, ["what is 6*7", "what is 1+2"])
        if server.settings.analytics != "off":
            wait_for(lambda: [i["runs"] for i in client.get("/api/usage", headers=account.headers).json()["items"]]
                     == [2], timeout=15, message="both runs in ClickHouse")
        with Chat(server.ws_url, account) as chat:
            chat.send("user_message", {"content": "how many tokens did I use this week, and on which model?"})
            messages = chat.run_to_end()
    tool = next(m for m in messages if m["type"] == "tool_completed")["payload"]
    assert tool["tool"] == "usage_report" and tool["ok"] is True
    report = tool["result"]
    assert report["period"] == "week" and report["group_by"] == "model"
    assert report["totals"]["runs"] == 2 and report["items"][0]["key"] == "parley-builtin"
    answer = messages[-1]["payload"]["message"]["content"]
    assert "parley-builtin" in answer and f"{report['totals']['runs']} runs" in answer


def analytics_noise(records: list[Any]) -> list[dict[str, Any]]:
    events = [event_of(r) for r in records]
    return [e for e in events if e["level"] in ("warning", "error", "critical")]


def test_pattern7_no_analytics_configured_is_healthy_and_silent(make_settings: SettingsFactory,
                                                               log_records: list[Any]) -> None:
    server = LiveServer(make_settings(analytics="off")).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            register(client)
            health = client.get("/health")
    finally:
        server.stop()
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert health.json()["components"]["analytics"] == {"status": "disabled", "required": False,
                                                          "detail": "no analytics backend configured"}
    assert analytics_noise(list(log_records)) == []


def test_default_with_chdb_installed_is_embedded_analytics_and_silent(make_settings: SettingsFactory,
                                                                     log_records: list[Any]) -> None:
    settings = make_settings(analytics="auto")
    assert settings.analytics_backend == "chdb"
    server = LiveServer(settings).start()
    try:
        with httpx.Client(base_url=server.url) as client:
            wait_for(lambda: client.get("/health").json()["components"]["analytics"]["status"] == "healthy",
                     timeout=20, message="embedded analytics")
    finally:
        server.stop()
    assert analytics_noise(list(log_records)) == []


def test_fresh_install_without_chdb_or_url_starts_with_analytics_disabled(settings: Settings, tmp_path: Path) -> None:
    hide = tmp_path / "no_chdb"
    hide.mkdir()
    # The interpreter starts with chdb unimportable, as on a machine without the extra.
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['chdb'] = None\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.update({"PYTHONPATH": str(hide), "PARLEY_DATA_DIR": str(settings.data_dir),
                "PARLEY_DATABASE_URL": settings.effective_database_url, "PARLEY_JWT_SECRET": TEST_JWT_SECRET,
                "PARLEY_LOG_FORMAT": "json", "PARLEY_AUTO_MIGRATE": "true"})
    check = subprocess.run([sys.executable, "-c", "from parley.settings import Settings; "
                            "print(Settings().analytics_backend)"], env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "off", check.stderr
    process = ServerProcess(env, tmp_path / "serve.log").start()
    try:
        health = httpx.get(f"{process.url}/health").json()
    finally:
        assert process.terminate() == 0
    assert health["components"]["analytics"]["status"] == "disabled" and health["status"] == "healthy"
    noisy = [line for line in process.log().splitlines()
             if ('"warning"' in line or '"error"' in line or '"critical"' in line)
             and ("analytics" in line.lower() or "clickhouse" in line.lower())]
    assert noisy == []
