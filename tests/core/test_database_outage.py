"""The database going away mid-traffic: 503 `database_unavailable` with Retry-After, never 500, and recovery
without a restart (incident pattern 1's root cause was a session problem turning into 500s)."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.support.clients import error_code, register
from tests.support.live import LiveServer, wait_for
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    tcp = TcpProxy("127.0.0.1", 5432)
    yield tcp
    tcp.close()


class Traffic:
    """Clients that keep listing threads in the background and count the statuses they see."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.statuses: Counter[int] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(3)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                self.statuses[client.get("/api/threads?limit=20&offset=0", headers=self.headers).status_code] += 1

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


@pytest.mark.only_on("postgresql")
def test_database_outage_gives_503_and_recovers_without_restart(make_settings: SettingsFactory,
                                                                database_url: str, proxy: TcpProxy) -> None:
    proxied = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    server = LiveServer(make_settings(database_url=proxied, database_connect_timeout_s=2,
                                      database_pool_timeout_s=2)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            account = register(client)
            client.post("/api/threads", json={"title": "before"}, headers=account.headers)
            with Traffic(server.url, account.headers) as traffic:
                wait_for(lambda: traffic.statuses[200] >= 10, message="traffic flowing")
                proxy.cut()
                wait_for(lambda: traffic.statuses[503] >= 10, message="503s during the outage")

                down = client.get("/api/threads", headers=account.headers)
                assert down.status_code == 503 and error_code(down) == "database_unavailable"
                assert int(down.headers["Retry-After"]) >= 1
                assert down.headers["x-content-type-options"] == "nosniff"
                health = client.get("/health")
                assert health.status_code == 503
                assert health.json()["components"]["database"]["status"] == "unhealthy"
                assert client.get("/health/ready").status_code == 503
                assert client.get("/health/live").status_code == 200

                proxy.restore()
                wait_for(lambda: client.get("/api/threads", headers=account.headers).status_code == 200,
                         timeout=20, message="recovery")
                recovered_at = traffic.statuses[200]
                wait_for(lambda: traffic.statuses[200] >= recovered_at + 10, message="traffic after recovery")
            assert set(traffic.statuses) <= {200, 503}, traffic.statuses  # never a 500
            assert client.get("/health").json()["components"]["database"]["status"] == "healthy"
            assert client.get("/health/ready").status_code == 200
            titles = [t["title"] for t in client.get("/api/threads", headers=account.headers).json()["items"]]
            assert titles == ["before"]
    finally:
        server.stop()


@pytest.mark.only_on("sqlite")
def test_locked_sqlite_gives_503_and_recovers(make_settings: SettingsFactory, database_url: str) -> None:
    server = LiveServer(make_settings(database_busy_timeout_s=0.2)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            account = register(client)
            locker = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                response = client.post("/api/threads", json={}, headers=account.headers)
                assert response.status_code == 503 and error_code(response) == "database_unavailable"
                assert "Retry-After" in response.headers
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            assert client.post("/api/threads", json={}, headers=account.headers).status_code == 201
    finally:
        server.stop()


@pytest.mark.only_on("sqlite")
def test_a_message_sent_while_the_database_is_locked_gets_503_in_time_and_is_never_stored_later(
        make_settings: SettingsFactory, database_url: str) -> None:
    """A new message waits for the database at most PARLEY_DATABASE_STATEMENT_TIMEOUT_S, then 503; while the
    event log keeps failing, the next is refused at once. Neither is stored once the database is back, so a
    client that retries has its message once."""
    server = LiveServer(make_settings(database_busy_timeout_s=0.1, database_statement_timeout_s=1)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            account = register(client)
            thread_id = client.post("/api/threads", json={}, headers=account.headers).json()["id"]
            path = f"/api/threads/{thread_id}/messages"
            locker = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                first = client.post(path, json={"content": "first try"}, headers=account.headers)
                assert first.status_code == 503 and error_code(first) == "database_unavailable"
                assert first.elapsed.total_seconds() < 10
                second = client.post(path, json={"content": "second try"}, headers=account.headers)
                assert second.status_code == 503 and error_code(second) == "database_unavailable"
                assert second.elapsed.total_seconds() < 1  # refused at once: the log is failing
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            wait_for(lambda: client.post(path, json={"content": "after"}, headers=account.headers).status_code
                     == 202, timeout=20, message="messages accepted again")
            history = client.get(f"/api/threads/{thread_id}/messages", headers=account.headers).json()["items"]
            assert [m["content"] for m in history if m["role"] == "user"] == ["after"]
    finally:
        server.stop()
