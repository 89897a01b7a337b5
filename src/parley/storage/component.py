"""The `database` component: migrates (when configured), checks the schema, then pings for health."""

from __future__ import annotations

from parley.health.components import ComponentHealth, FatalStartError
from parley.observability.logging import get_logger
from parley.settings import Settings
from parley.storage.database import Database, is_database_unavailable
from parley.storage.migrate import upgrade
from parley.storage.schema_check import check_schema

log = get_logger("parley.storage")


class DatabaseComponent:
    name = "database"
    required = True

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings

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

    async def stop(self) -> None:
        await self.database.dispose()

    async def check(self) -> ComponentHealth:
        try:
            latency_ms = await self.database.ping()
        except Exception as exc:
            if is_database_unavailable(exc):
                return ComponentHealth("unhealthy", detail="unreachable")
            raise
        return ComponentHealth("healthy", latency_ms=latency_ms)
