"""Start-up: schema check (incident pattern 10), declared order and readiness (pattern 8), draining."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from parley.settings import Settings
from parley.storage.database import Database
from tests.conftest import TEST_JWT_SECRET, SettingsFactory, event_of
from tests.support.clients import error_code, register
from tests.support.live import LiveServer, ServerProcess, ready_status, wait_for
from tests.support.tcp_proxy import TcpProxy


def run_sql(settings: Settings, *statements: str) -> None:
    async def go() -> None:
        database = Database(settings)
        try:
            async with database.engine.begin() as connection:
                for statement in statements:
                    await connection.execute(text(statement))
        finally:
            await database.dispose()

    asyncio.run(go())


def migrated(settings: Settings) -> Settings:
    """Starts and stops a server once so the database holds parley's schema."""
    LiveServer(settings).start().stop()
    return settings


def server_env(settings: Settings) -> dict[str, str]:
    return {
        "PARLEY_ENV": "test",
        "PARLEY_DATABASE_URL": settings.effective_database_url,
        "PARLEY_DATA_DIR": str(settings.data_dir),
        "PARLEY_JWT_SECRET": TEST_JWT_SECRET,
        "PARLEY_LOG_FORMAT": "json",
    }


def test_pattern10_foreign_tables_are_listed_once_at_info_never_warned(settings: Settings,
                                                                       log_records: list) -> None:
    migrated(settings)
    run_sql(settings, "CREATE TABLE auth_sessions (id INTEGER PRIMARY KEY, token TEXT)",
            "CREATE TABLE billing_invoices (id INTEGER PRIMARY KEY)")
    log_records.clear()
    for _ in range(2):  # two boots: each lists them once, neither warns
        LiveServer(settings).start().stop()
    events = [event_of(r) for r in list(log_records)]
    noisy = [e for e in events if e["level"] in ("warning", "error", "critical")]
    assert noisy == []
    listed = [e for e in events if e["event"] == "foreign_tables_ignored"]
    assert len(listed) == 2 and all(e["level"] == "info" for e in listed)
    assert listed[0]["tables"] == ["auth_sessions", "billing_invoices"]


def test_missing_own_table_stops_startup_naming_the_fix(settings: Settings, tmp_path: Path) -> None:
    migrated(settings)
    run_sql(settings, "DROP TABLE messages")
    process = ServerProcess({**server_env(settings), "PARLEY_AUTO_MIGRATE": "false"}, tmp_path / "serve.log")
    process.start(wait_ready=False)
    assert process.wait(60) == 1
    log = process.log()
    assert "missing tables: messages" in log and "parley migrate" in log
    assert "Traceback" not in log


def test_missing_column_stops_an_in_process_server_too(settings: Settings) -> None:
    migrated(settings)
    if settings.is_sqlite:
        run_sql(settings, "ALTER TABLE threads DROP COLUMN last_seq")
    else:
        run_sql(settings, "ALTER TABLE threads DROP COLUMN last_seq")
    server = LiveServer(settings)
    server.start(wait_ready=False)
    wait_for(lambda: not server.thread.is_alive(), timeout=30, message="server to stop itself")
    assert server.server.fatal_error is not None
    assert "threads lacks columns: last_seq" in server.server.fatal_error
    server.stop()


def test_pattern8_ready_only_after_every_required_component_started(make_settings: SettingsFactory,
                                                                    database_url: str) -> None:
    """While the database cannot be reached the process answers: live, not ready, API 503 `starting`."""
    if database_url.startswith("sqlite"):
        settings = make_settings(database_busy_timeout_s=0.1)
        holder = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # migrations cannot run while this lock is held
        release = lambda: (holder.execute("ROLLBACK"), holder.close())  # noqa: E731
        proxy = None
    else:
        proxy = TcpProxy("127.0.0.1", 5432)
        proxy.cut()
        settings = make_settings(database_url=database_url.replace(":5432/", f":{proxy.port}/"),
                                 database_connect_timeout_s=1)
        release = proxy.restore
    server = LiveServer(settings)
    try:
        server.start(wait_ready=False)
        with httpx.Client(base_url=server.url) as client:
            time.sleep(0.5)  # give the boot task a few failed attempts
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "starting"
            assert body["components"]["database"]["status"] == "starting"
            assert client.get("/health/live").status_code == 200
            api = client.post("/api/auth/register", json={"email": "a@example.com", "password": "long enough"})
            assert api.status_code == 503 and error_code(api) == "starting"
            assert "Retry-After" in api.headers
            release()
            wait_for(lambda: client.get("/health/ready").status_code == 200, timeout=30, message="ready")
            assert client.get("/health/ready").json() == {"status": "ready"}
            register(client)
    finally:
        server.stop()
        if proxy:
            proxy.close()


def test_health_reports_measured_database_latency(client: httpx.Client) -> None:
    first = client.get("/health").json()
    second = client.get("/health").json()
    assert first["status"] == "healthy" and first["version"]
    database = first["components"]["database"]
    assert database["status"] == "healthy" and database["required"] is True
    assert 0 < database["latency_ms"] < 5000
    assert first["components"]["database"]["latency_ms"] != second["components"]["database"]["latency_ms"] \
        or first["uptime_s"] != second["uptime_s"]


def test_sigterm_drains_then_exits_cleanly(settings: Settings, tmp_path: Path) -> None:
    migrated(settings)
    process = ServerProcess({**server_env(settings), "PARLEY_DRAIN_DELAY_S": "2"}, tmp_path / "serve.log")
    process.start()
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    draining = wait_for(lambda: httpx.get(f"{process.url}/health/ready").json().get("status") == "draining",
                        timeout=5, message="draining")
    assert draining
    assert httpx.get(f"{process.url}/health/live").status_code == 200  # still answering while draining
    assert process.wait(30) == 0
    assert ready_status(process.url) is None
    assert '"event": "draining"' in process.log()


@pytest.mark.parametrize("level", [logging.WARNING])
def test_fresh_start_logs_nothing_alarming(settings: Settings, log_records: list, level: int) -> None:
    LiveServer(settings).start().stop()
    assert [event_of(r) for r in list(log_records) if r.levelno >= level] == []
