"""Real databases for tests: a fresh SQLite file or a fresh PostgreSQL database per test.

PostgreSQL databases are cloned from a template migrated once per session (CREATE DATABASE ... TEMPLATE),
which takes tens of milliseconds instead of a full migration.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from parley.settings import Settings
from parley.storage.database import Database
from parley.storage.migrate import upgrade

T = TypeVar("T")

PG_ADMIN_DSN = os.environ.get("PARLEY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on a thread of its own: works even where the caller's thread has a running loop
    (Playwright's sync API keeps one)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def backend() -> str:
    value = os.environ.get("PARLEY_TEST_DATABASE", "sqlite")
    if value not in ("sqlite", "postgresql"):
        raise RuntimeError(f"PARLEY_TEST_DATABASE must be sqlite or postgresql, not {value!r}")
    return value


def _pg_url(name: str, dsn: str = PG_ADMIN_DSN) -> str:
    base = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


class PostgresDatabases:
    """Creates a migrated template once, then one clone per test, dropped afterwards."""

    def __init__(self) -> None:
        self.template = f"parley_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.created: list[str] = []

    def setup_template(self) -> None:
        run_async(self._setup_template())

    async def _setup_template(self) -> None:
        await _admin(f'CREATE DATABASE "{self.template}"')
        database = Database(Settings(database_url=_pg_url(self.template), _env_file=None))  # type: ignore[call-arg]
        try:
            await upgrade(database)
        finally:
            await database.dispose()

    def new(self, migrated: bool = True) -> str:
        name = f"parley_t_{uuid.uuid4().hex[:12]}"
        template = f' TEMPLATE "{self.template}"' if migrated else ""
        run_async(_admin(f'CREATE DATABASE "{name}"{template}'))
        self.created.append(name)
        return _pg_url(name)

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        run_async(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def teardown(self) -> None:
        for name in [*self.created, self.template]:
            run_async(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def sqlite_url(directory: Path) -> str:
    return f"sqlite+aiosqlite:///{directory / 'parley.db'}"
