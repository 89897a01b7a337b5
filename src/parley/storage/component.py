"""The `database` component: migrates (when configured), checks the schema, then pings for health; while it
runs, housekeeping jobs (expired tokens and tickets) run every `HOUSEKEEPING_INTERVAL_S`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from parley.health.components import ComponentHealth, FatalStartError
from parley.observability.logging import describe, get_logger
from parley.settings import Settings
from parley.storage.database import Database, is_database_unavailable
from parley.storage.migrate import upgrade
from parley.storage.schema_check import check_schema

log = get_logger("parley.storage")

HOUSEKEEPING_INTERVAL_S = 3600.0
# Deletes rows nobody needs any more (in the session it is given, committing itself); returns how many went.
HousekeepingJob = Callable[[AsyncSession], Awaitable[int]]


class DatabaseComponent:
    name = "database"
    required = True

    def __init__(self, database: Database, settings: Settings, housekeeping: Sequence[HousekeepingJob] = (),
                 housekeeping_interval_s: float = HOUSEKEEPING_INTERVAL_S) -> None:
        self.database = database
        self.settings = settings
        self.housekeeping = tuple(housekeeping)
        self.housekeeping_interval_s = housekeeping_interval_s
        self._housekeeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.database.ping()  # unreachable: raises, and the lifecycle retries
        if self.settings.should_auto_migrate:
            try:
                before, after = await upgrade(self.database)
            except Exception as exc:
                if is_database_unavailable(exc):
                    raise
                raise FatalStartError(f"migration failed: {exc}") from exc
            if before != after:
                log.info("migrated", database=self.database.display_url, before=before, after=after)
        report = await check_schema(self.database)
        if report.foreign_tables:
            log.info("foreign_tables_ignored", count=len(report.foreign_tables), tables=report.foreign_tables,
                     note="tables parley does not own are left alone")
        if not report.ok:
            raise FatalStartError(report.problem())
        if self.housekeeping:
            self._housekeeper = asyncio.create_task(self._keep_house(), name="parley-db-housekeeping")

    async def _keep_house(self) -> None:
        while True:
            for job in self.housekeeping:
                try:
                    async with self.database.session() as session:
                        removed = await job(session)
                    if removed:
                        log.info("housekeeping_done", job=getattr(job, "__name__", "job"), rows=removed)
                except Exception as exc:  # the database may be down: the next round tries again
                    log.warning("housekeeping_failed", job=getattr(job, "__name__", "job"), reason=describe(exc))
            await asyncio.sleep(self.housekeeping_interval_s)

    async def stop(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        await self.database.dispose()

    async def check(self) -> ComponentHealth:
        try:
            latency_ms = await self.database.ping()
        except Exception as exc:
            if is_database_unavailable(exc):
                return ComponentHealth("unhealthy", detail="unreachable")
            raise
        return ComponentHealth("healthy", latency_ms=latency_ms)
