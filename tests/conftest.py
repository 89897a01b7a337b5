"""Fixtures: a real database per test (SQLite or PostgreSQL by PARLEY_TEST_DATABASE) and real servers.

In CI (PARLEY_TEST_REQUIRE_SERVICES=1) a service that does not answer fails the run instead of skipping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from parley.observability.logging import configure_logging
from parley.settings import Settings
from tests.support.clients import Account, register
from tests.support.databases import PostgresDatabases, backend, sqlite_url
from tests.support.live import LiveServer

TEST_JWT_SECRET = "test-secret-" + "x" * 40

# parley's structlog pipeline feeds stdlib logging, so tests can collect every line a server writes.
configure_logging(Settings(_env_file=None, env="test", log_format="json", log_level="INFO"))  # type: ignore[call-arg]


def pytest_report_header(config: pytest.Config) -> str:
    return f"parley test database: {backend()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `only_on("postgresql")` is deselected (and reported so) on the SQLite run, not skipped."""
    selected, deselected = [], []
    for item in items:
        marker = item.get_closest_marker("only_on")
        (deselected if marker and backend() not in marker.args else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases | None]:
    if backend() != "postgresql":
        yield None
        return
    databases = PostgresDatabases()
    databases.setup_template()
    yield databases
    databases.teardown()


@pytest.fixture
def database_url(tmp_path: Path, postgres: PostgresDatabases | None) -> Iterator[str]:
    if postgres is None:
        yield sqlite_url(tmp_path)
        return
    url = postgres.new()
    yield url
    postgres.drop(url)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> SettingsFactory:
    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "env": "test",
            "data_dir": tmp_path / "data",
            "database_url": database_url,
            "auto_migrate": True,
            "jwt_secret": TEST_JWT_SECRET,
            "register_rate_limit": 10_000,
            "login_rate_limit": 10_000,
            "shutdown_deadline_s": 10,
            # Cheap hashes: the suite registers hundreds of accounts; production keeps the default cost.
            "password_hash_memory_kib": 1024,
            "password_hash_time_cost": 1,
            # chDB admits one data path per process; tests about analytics turn it on themselves.
            "analytics": "off",
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return factory


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest.fixture
def live_server(settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        yield http


@pytest.fixture
def account(client: httpx.Client) -> Account:
    return register(client)


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every log record emitted while the test runs, at any level."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(handler)
    root.setLevel(previous)


def event_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured event of a record (parley's own lines carry a dict; libraries' carry text)."""
    if isinstance(record.msg, dict):
        return {**record.msg, "level": record.levelname.lower()}
    return {"event": record.getMessage(), "level": record.levelname.lower(), "logger": record.name}
