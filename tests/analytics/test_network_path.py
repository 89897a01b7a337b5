"""Analytics over the network to a ClickHouse that goes down, comes back, is slow or cannot keep up: users never
notice, `/health` and the log say what is happening (once per outage), and the backlog arrives afterwards, newest
first when the queue's bound was hit. ClickHouse here is `ClickHouseHTTP`: chDB behind ClickHouse's HTTP API."""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import pytest

from parley.analytics.clickhouse import ClickHouseStore
from parley.analytics.records import RequestRecord
from parley.settings import Settings
from tests.conftest import SettingsFactory, event_of
from tests.support.clickhouse_http import ClickHouseHTTP
from tests.support.clients import register
from tests.support.conversation import Chat
from tests.support.live import LiveServer, wait_for

FINISHED = {"completed", "failed", "cancelled", "interrupted"}
QUESTION = "what is 2+2"  # the built-in assistant answers it with one calculator call


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[ClickHouseHTTP]:
    server = ClickHouseHTTP(tmp_path / "clickhouse").start()
    yield server
    server.stop()


def analytics_settings(make_settings: SettingsFactory, clickhouse: ClickHouseHTTP, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"analytics": "clickhouse", "clickhouse_url": clickhouse.url,
                              "analytics_flush_interval_s": 0.2, "analytics_retry_max_s": 0.5,
                              "builtin_token_delay_s": 0}
    return make_settings(**{**values, **overrides})


class User:
    """One account talking to a live server over HTTP; keeps the status of every answer it got."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.statuses: Counter[int] = Counter()
        self.account = register(self.http)
        self.statuses[201] += 1

    @property
    def id(self) -> str:
        return self.account.id

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, headers=self.account.headers, **kwargs)
        self.statuses[response.status_code] += 1
        return response

    def list_threads(self, times: int) -> list[float]:
        """Lists threads `times` times; the latency of each, in seconds."""
        latencies = []
        for _ in range(times):
            started = time.perf_counter()
            self.call("GET", "/api/threads?limit=20")
            latencies.append(time.perf_counter() - started)
        return latencies

    def run(self, content: str = QUESTION) -> str:
        """Asks the assistant in a new thread and waits for the run to finish; its id."""
        thread = self.call("POST", "/api/threads", json={"title": "analytics"}).json()
        run_id = str(self.call("POST", f"/api/threads/{thread['id']}/messages", json={"content": content})
                     .json()["run"]["id"])
        wait_for(lambda: self.call("GET", f"/api/runs/{run_id}").json()["status"] in FINISHED, 20,
                 message=f"run {run_id} to finish")
        return run_id

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = self.call("GET", "/health").json()
        return body

    def analytics(self) -> dict[str, Any]:
        component: dict[str, Any] = self.health()["components"]["analytics"]
        return component

    def failures(self) -> dict[int, int]:
        """Answers that were not a success: none is expected while ClickHouse misbehaves."""
        return {status: count for status, count in self.statuses.items() if status >= 400}

    def close(self) -> None:
        self.http.close()


def migrated(clickhouse: ClickHouseHTTP) -> None:
    wait_for(lambda: clickhouse.rows_inserted("parley.schema_migrations") > 0, 20, message="parley's tables")


def count(clickhouse: ClickHouseHTTP, table: str, where: str = "1", **parameters: Any) -> int:
    rows = clickhouse.query(f"SELECT count() AS n FROM parley.{table} WHERE {where}", parameters)
    return int(rows[0]["n"])


def array(values: list[str]) -> str:
    """A bound `Array(String)` parameter's value (ids only: no quotes to escape)."""
    return "[" + ",".join(f"'{value}'" for value in values) + "]"


def run_ids_in(clickhouse: ClickHouseHTTP, table: str, run_ids: list[str]) -> set[str]:
    rows = clickhouse.query(f"SELECT DISTINCT run_id FROM parley.{table} WHERE has({{ids:Array(String)}}, run_id)",
                            {"ids": array(run_ids)})
    return {row["run_id"] for row in rows}


def listings_arrived(clickhouse: ClickHouseHTTP, user: User) -> int:
    return count(clickhouse, "http_requests", "route = '/api/threads' AND method = 'GET' AND user_id = {u:String}",
                 u=user.id)


def assert_delivered(clickhouse: ClickHouseHTTP, user: User, run_ids: list[str], listings: int) -> None:
    """Every run, its LLM and tool calls, and every listing of threads arrive in ClickHouse, each once."""
    migrated(clickhouse)
    tables = ("runs", "llm_calls", "tool_calls")
    # A batch is written a table at a time, so the tables fill in a moment apart: wait for all of them.
    wait_for(lambda: all(run_ids_in(clickhouse, table, run_ids) == set(run_ids) for table in tables), 20,
             message="every run's rows")
    wait_for(lambda: listings_arrived(clickhouse, user) >= listings, 20, message=f"{listings} listings' rows")
    for table in ("runs", "tool_calls"):  # one of each per run
        assert count(clickhouse, table, "has({ids:Array(String)}, run_id)", ids=array(run_ids)) == len(run_ids)
    assert listings_arrived(clickhouse, user) == listings


def assert_connection_recorded(clickhouse: ClickHouseHTTP, connection_id: str) -> None:
    wait_for(lambda: count(clickhouse, "ws_connections", "connection_id = {c:String}", c=connection_id) == 1, 10,
             message=f"WebSocket connection {connection_id}'s row")


def warnings_from(log_records: list[logging.LogRecord], event: str) -> list[dict[str, Any]]:
    return [e for e in map(event_of, log_records) if e.get("event") == event]


def outage_seconds(detail: str) -> int:
    match = re.search(r"unreachable for (\d+) s", detail)
    return int(match.group(1)) if match else -1


# --- the fixture itself ---------------------------------------------------------------------------------------------


def test_clickhouse_connect_sees_a_clickhouse_server_in_the_fixture(clickhouse: ClickHouseHTTP) -> None:
    store = ClickHouseStore(clickhouse.url, "parley_fixture", ttl_days=30)
    assert store.migrate() == [1]
    now = datetime.now(UTC)
    moment = now.replace(microsecond=now.microsecond // 1000 * 1000, tzinfo=None)  # within the TTL, whole ms
    store.insert("http_requests", [RequestRecord(moment, "GET", "/api/threads", 200, 1.5, "it's\tme")])
    rows = store.query("SELECT user_id, toString(ts) AS at FROM parley_fixture.http_requests "
                       "WHERE user_id = {u:String} AND ts = {t:DateTime64(3, 'UTC')}", {"u": "it's\tme", "t": moment})
    assert rows == [{"user_id": "it's\tme", "at": f"{moment:%Y-%m-%d %H:%M:%S.%f}"[:-3]}]
    assert clickhouse.rows_inserted("parley_fixture.http_requests") == 1
    store.close()

    client = clickhouse_connect.get_client(dsn=clickhouse.url, autogenerate_session_id=False)
    assert client.server_version == clickhouse.version
    client.insert("parley_fixture.http_requests", [[moment, "POST", "/x", 201, 2.0, "u"]],  # Native, compressed
                  column_names=["ts", "method", "route", "status", "duration_ms", "user_id"])
    assert client.query("SELECT count() FROM parley_fixture.http_requests").result_rows == [(2,)]
    with pytest.raises(clickhouse_connect.driver.exceptions.DatabaseError) as failure:
        client.command("SELECT * FROM parley_fixture.nowhere")
    assert failure.value.code == 60 and "UNKNOWN_TABLE" in str(failure.value)
    clickhouse.down()
    with pytest.raises(clickhouse_connect.driver.exceptions.OperationalError, match="Connection refused"):
        client.command("SELECT 1")
    clickhouse.up()
    assert client.command("SELECT 1") == 1
    client.close()


# --- outages ----------------------------------------------------------------------------------------------------------


def test_clickhouse_down_at_start_the_server_serves_and_the_backlog_arrives_when_it_returns(
        make_settings: SettingsFactory, clickhouse: ClickHouseHTTP, log_records: list[logging.LogRecord]) -> None:
    clickhouse.down()
    server = LiveServer(analytics_settings(make_settings, clickhouse)).start()  # ready without ClickHouse
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "degraded", 10, message="analytics degraded")
        run_ids = [user.run() for _ in range(3)]
        user.list_threads(20)
        health = user.health()
        assert health["status"] == "degraded"
        analytics = health["components"]["analytics"]
        assert analytics["required"] is False
        assert "unreachable" in analytics["detail"] and "retrying" in analytics["detail"]
        assert len(warnings_from(log_records, "analytics_write_failed")) == 1

        clickhouse.up()
        assert_delivered(clickhouse, user, run_ids, listings=20)
        wait_for(lambda: user.health()["status"] == "healthy", 10, message="healthy again")
        assert user.analytics()["status"] == "healthy"
        assert len(warnings_from(log_records, "analytics_recovered")) == 1
        assert user.failures() == {}
    finally:
        user.close()
        server.stop()


@pytest.mark.slow
def test_clickhouse_down_mid_traffic_twice_nothing_fails_and_nothing_is_lost(
        make_settings: SettingsFactory, clickhouse: ClickHouseHTTP, log_records: list[logging.LogRecord]) -> None:
    server = LiveServer(analytics_settings(make_settings, clickhouse)).start()
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        run_ids = [user.run()]
        listings = len(user.list_threads(10))
        for outage in (1, 2):
            clickhouse.down()
            with Chat(server.ws_url, user.account) as chat:  # a WebSocket conversation while ClickHouse is away
                connection_id = chat.connected["payload"]["connection_id"]
                chat.send("user_message", {"content": QUESTION})
                run_ids.append(chat.run_to_end()[-1]["run_id"])
            run_ids.append(user.run())
            listings += len(user.list_threads(10))
            # Long enough for several retries (backoff tops out at 0.5 s) before ClickHouse returns.
            wait_for(lambda: outage_seconds(user.analytics()["detail"]) >= 2, 10, message="a 2 s outage")
            assert user.health()["status"] == "degraded"
            failed = warnings_from(log_records, "analytics_write_failed")
            assert len(failed) == outage and failed[-1]["level"] == "warning"

            clickhouse.up()
            assert_delivered(clickhouse, user, run_ids, listings)
            assert_connection_recorded(clickhouse, connection_id)
            wait_for(lambda: user.health()["status"] == "healthy", 10, message="healthy again")
            recovered = warnings_from(log_records, "analytics_recovered")
            assert len(recovered) == outage and recovered[-1]["level"] == "info"
        assert user.failures() == {}
    finally:
        user.close()
        server.stop()


def test_an_outage_is_one_warning_in_the_log_not_one_per_retry(
        make_settings: SettingsFactory, clickhouse: ClickHouseHTTP, log_records: list[logging.LogRecord]) -> None:
    server = LiveServer(analytics_settings(make_settings, clickhouse)).start()
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        outage_starts = len(log_records)
        clickhouse.down()
        user.list_threads(5)
        wait_for(lambda: outage_seconds(user.analytics()["detail"]) >= 2, 10, message="a 2 s outage")
        clickhouse.up()
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        # Warnings about analytics: parley's, its ClickHouse client's, or any naming the ClickHouse address.
        warnings = [event_of(r) for r in log_records[outage_starts:] if r.levelno >= logging.WARNING and (
            r.name.startswith(("parley.analytics", "clickhouse_connect")) or str(clickhouse.port) in r.getMessage())]
        assert [w["event"] for w in warnings] == ["analytics_write_failed"], warnings
    finally:
        user.close()
        server.stop()


def test_a_table_refusing_writes_delays_its_rows_without_duplicating_the_others(
        make_settings: SettingsFactory, clickhouse: ClickHouseHTTP) -> None:
    server = LiveServer(analytics_settings(make_settings, clickhouse)).start()
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        clickhouse.refuse_inserts_into("runs")  # ClickHouse's "too many parts" on one table
        refused_before = clickhouse.errors
        run_ids = [user.run()]
        user.list_threads(10)
        wait_for(lambda: clickhouse.errors >= refused_before + 3, 10, message="three refused writes")
        assert user.analytics()["status"] == "degraded"

        clickhouse.refuse_inserts_into()
        assert_delivered(clickhouse, user, run_ids, listings=10)  # once each, however many retries there were
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        assert count(clickhouse, "http_requests", "route = '/api/auth/register'") == 1
        assert user.failures() == {}
    finally:
        user.close()
        server.stop()


# --- slow ClickHouse -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slow_clickhouse_does_not_slow_requests(make_settings: SettingsFactory, clickhouse: ClickHouseHTTP) -> None:
    delay_s = 2.0
    server = LiveServer(analytics_settings(make_settings, clickhouse)).start()
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        user.list_threads(5)  # warm up
        baseline = statistics.median(user.list_threads(30))

        clickhouse.slow(delay_s)
        wait_for(lambda: clickhouse.held > 0, 10, message="a write held by the slow ClickHouse")
        held_before = clickhouse.delayed
        latencies = user.list_threads(30)
        assert clickhouse.held > 0 or clickhouse.delayed > held_before  # ClickHouse was slow throughout
        assert statistics.median(latencies) < min(baseline * 5 + 0.05, delay_s / 4), (baseline, latencies)
        assert max(latencies) < delay_s, latencies  # no request waited for ClickHouse

        clickhouse.slow(0)
        wait_for(lambda: listings_arrived(clickhouse, user) == 65, 20, message="every listing's row")
        assert user.failures() == {}
    finally:
        user.close()
        server.stop()


def test_usage_answers_promptly_while_clickhouse_is_slow(make_settings: SettingsFactory,
                                                         clickhouse: ClickHouseHTTP) -> None:
    delay_s = 3.0
    server = LiveServer(analytics_settings(make_settings, clickhouse)).start()
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        user.run()
        clickhouse.slow(delay_s)
        user.list_threads(5)
        wait_for(lambda: clickhouse.held > 0, 10, message="a write held by the slow ClickHouse")
        started = time.perf_counter()
        usage = user.call("GET", "/api/usage")
        elapsed = time.perf_counter() - started
        assert usage.status_code == 200
        # From ClickHouse if it answers in time, else from the database: either way, not after the delay.
        assert elapsed < delay_s - 1, f"GET /api/usage took {elapsed:.1f} s ({usage.json()['source']})"
    finally:
        clickhouse.slow(0)
        user.close()
        server.stop()


# --- the queue's bound ----------------------------------------------------------------------------------------------


def test_a_full_queue_drops_the_oldest_records_and_counts_them(make_settings: SettingsFactory,
                                                               clickhouse: ClickHouseHTTP) -> None:
    clickhouse.down()
    server = LiveServer(analytics_settings(make_settings, clickhouse, analytics_queue_max=100)).start()
    user = User(server)
    try:
        user.list_threads(150)  # the oldest
        for _ in range(60):  # the newest
            user.call("GET", "/api/agents")
        sink = server.services.analytics
        assert sink.dropped >= 150 + 60 - 100  # type: ignore[attr-defined]
        detail = user.analytics()["detail"]
        assert int(re.search(r"(\d+) dropped", detail).group(1)) >= 110, detail  # type: ignore[union-attr]
        assert int(re.search(r"(\d+) queued", detail).group(1)) <= 100, detail  # type: ignore[union-attr]
        assert user.failures() == {}

        clickhouse.up()
        migrated(clickhouse)
        newest = "route = '/api/agents' AND user_id = {u:String}"
        wait_for(lambda: count(clickhouse, "http_requests", newest, u=user.id) == 60, 20, message="newest rows")
        oldest = listings_arrived(clickhouse, user)
        assert 0 < oldest < 150  # only the most recent listings survived
        assert count(clickhouse, "http_requests", "route = '/health/ready'") == 0  # start-up's polls: the oldest
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
    finally:
        user.close()
        server.stop()


# --- shutdown ---------------------------------------------------------------------------------------------------------


def test_shutdown_flushes_what_is_queued_within_the_deadline(make_settings: SettingsFactory,
                                                             clickhouse: ClickHouseHTTP,
                                                             log_records: list[logging.LogRecord]) -> None:
    flush_s = 5.0  # a writer that would wait 30 s for a batch leaves everything below for shutdown to flush
    settings = analytics_settings(make_settings, clickhouse, analytics_flush_interval_s=30,
                                  analytics_shutdown_flush_s=flush_s)
    server = LiveServer(settings).start()
    user = User(server)
    chat: Chat | None = None
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        run_id = user.run()
        user.list_threads(10)
        chat = Chat(server.ws_url, user.account)  # still open when the server stops
        connection_id = chat.connected["payload"]["connection_id"]
        assert clickhouse.rows_inserted("runs") == clickhouse.rows_inserted("http_requests") == 0

        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < flush_s
    finally:
        if chat is not None:
            chat.close()
        user.close()
        server.stop()
    assert run_ids_in(clickhouse, "runs", [run_id]) == {run_id}
    assert listings_arrived(clickhouse, user) == 10
    assert count(clickhouse, "ws_connections", "connection_id = {c:String}", c=connection_id) == 1
    assert warnings_from(log_records, "analytics_rows_lost_at_shutdown") == []
    assert user.failures() == {}


def test_shutdown_with_a_slow_clickhouse_keeps_to_the_deadline_and_says_what_was_lost(
        make_settings: SettingsFactory, clickhouse: ClickHouseHTTP, log_records: list[logging.LogRecord]) -> None:
    flush_s = 1.0
    settings = analytics_settings(make_settings, clickhouse, analytics_flush_interval_s=30,
                                  analytics_shutdown_flush_s=flush_s)
    server = LiveServer(settings).start()
    user = User(server)
    try:
        wait_for(lambda: user.analytics()["status"] == "healthy", 10, message="analytics healthy")
        user.list_threads(10)
        clickhouse.slow(5)  # the flush at shutdown cannot finish in time
        started = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - started
    finally:
        user.close()
        server.stop()
    assert elapsed < flush_s + 1.5, f"stopping took {elapsed:.1f} s with a {flush_s} s flush deadline"
    lost = warnings_from(log_records, "analytics_rows_lost_at_shutdown")
    assert len(lost) == 1 and lost[0]["rows"] > 0
