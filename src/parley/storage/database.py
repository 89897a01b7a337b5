"""The database: one async engine per process, sessions made per request or per task, and a measured ping.

Works on SQLite (aiosqlite) and PostgreSQL (asyncpg). `is_database_unavailable` tells an outage (connection
refused, timed out, locked, dropped) from a bug, so the edges can answer 503 instead of 500 and let the pool heal.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import SingletonThreadPool

from parley.settings import Settings

# SQLSTATE classes that mean "the server cannot serve you right now": connection exceptions, insufficient
# resources, operator intervention (shutdown, cannot connect now, statement timeout).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")
_SQLITE_UNAVAILABLE_WORDS = ("locked", "busy", "unable to open", "disk i/o")


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# JSON columns (event payloads, metadata) through orjson: several times faster than the stdlib json module.
JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def is_database_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached or cannot serve now (a 503), not a bug (a 500)."""
    if isinstance(exc, PoolTimeoutError | OSError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = _sqlstate(exc)
        if sqlstate is not None:
            return sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASSES)
        if isinstance(exc, OperationalError | InterfaceError):
            message = str(exc.orig).lower()
            if exc.orig is not None and type(exc.orig).__module__.startswith("sqlite3"):
                return any(word in message for word in _SQLITE_UNAVAILABLE_WORDS)
            return True
    return False


def is_invalid_data(exc: BaseException) -> bool:
    """True when the database refused a value itself (SQLSTATE class 22: a NUL byte, an out-of-range number):
    the client's input, so a 422, never a 500."""
    return isinstance(exc, DBAPIError) and (_sqlstate(exc) or "").startswith("22")


def _sqlstate(exc: DBAPIError) -> str | None:
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str) and code:
            return code
    return None


def _engine_options(settings: Settings, pool_size: int | None, max_overflow: int | None) -> tuple[str, dict[str, Any]]:
    url = settings.effective_database_url
    sizes = {"pool_size": pool_size or settings.database_pool_size,
             "max_overflow": settings.database_max_overflow if max_overflow is None else max_overflow}
    if settings.is_sqlite:
        timeout = settings.database_busy_timeout_s
        return url, {"connect_args": {"timeout": timeout}, "pool_pre_ping": False, **sizes}
    statement_ms = int(settings.database_statement_timeout_s * 1000)
    return url, {
        **sizes,
        "pool_timeout": settings.database_pool_timeout_s,
        "pool_pre_ping": True,
        "pool_recycle": 1800,
        "connect_args": {
            "timeout": settings.database_connect_timeout_s,
            "command_timeout": settings.database_statement_timeout_s + 5,
            "server_settings": {"application_name": "parley", "statement_timeout": str(statement_ms)},
        },
    }


class Database:
    """Owns an engine (a connection pool) and its session factory.

    The process has one for requests and tasks, and a small one of its own for the event log writer, so the
    writer can always get a connection even when every pooled one waits for it."""

    def __init__(self, settings: Settings, *, pool_size: int | None = None, max_overflow: int | None = None) -> None:
        url, options = _engine_options(settings, pool_size, max_overflow)
        self.url = make_url(url)
        self.dialect = self.url.get_backend_name()
        self.engine: AsyncEngine = create_async_engine(url, **options, **JSON_CODEC)
        self._settings = settings
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine.sync_engine, settings)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)

    def sync_engine(self) -> Engine:
        """A synchronous engine on the same SQLite file (pysqlite, one connection), for work that is cheapest
        done in one trip to a thread of its own: the event log's batches."""
        if self.dialect != "sqlite":
            raise ValueError("a synchronous engine is only made for SQLite")
        url = self.url.set(drivername="sqlite")
        engine = create_engine(url, connect_args={"timeout": self._settings.database_busy_timeout_s,
                                                  "check_same_thread": False},
                               poolclass=SingletonThreadPool, pool_size=1, **JSON_CODEC)
        _configure_sqlite(engine, self._settings)
        return engine

    @property
    def display_url(self) -> str:
        """The URL without its password, for logs and `parley doctor`."""
        return self.url.render_as_string(hide_password=True)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session for work outside a request (agent runs, maintenance); closed on every path."""
        async with self.sessionmaker() as session:
            yield session

    async def ping(self) -> float:
        """One real round trip; returns its latency in milliseconds or raises."""
        started = time.perf_counter()
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return (time.perf_counter() - started) * 1000

    async def dispose(self) -> None:
        await self.engine.dispose()


def _configure_sqlite(engine: Engine, settings: Settings) -> None:
    busy_ms = int(settings.database_busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers proceed while one writer commits; NORMAL sync is durable across process crashes.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()
