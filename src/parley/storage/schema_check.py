"""The start-up schema check: parley's own tables and columns against its models.

A missing table or column stops start-up with the command that fixes it. Tables parley does not own (another
service sharing the database) are reported once, at INFO: they are not parley's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, inspect

from parley.storage.database import Database
from parley.storage.migrate import current_revision, head_revision, known_revisions
from parley.storage.models import Base

ALEMBIC_TABLE = "alembic_version"


class SchemaMismatch(Exception):
    """The database lacks parts of parley's schema; the message names them and the fix."""


@dataclass(frozen=True)
class SchemaReport:
    missing_tables: list[str] = field(default_factory=list)
    missing_columns: dict[str, list[str]] = field(default_factory=dict)
    foreign_tables: list[str] = field(default_factory=list)
    revision: str | None = None
    head: str | None = None
    # True when the database sits at an older revision this parley knows: migrations are pending. An unknown
    # revision (a newer parley migrated it) is accepted as long as every table and column is there.
    behind: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing_tables and not self.missing_columns and not self.behind

    def problem(self) -> str:
        parts: list[str] = []
        if self.missing_tables:
            parts.append("missing tables: " + ", ".join(self.missing_tables))
        for table, columns in self.missing_columns.items():
            parts.append(f"table {table} lacks columns: " + ", ".join(columns))
        if self.behind and not parts:
            parts.append(f"schema revision is {self.revision or 'none'}, this parley needs {self.head}")
        return "; ".join(parts) + ". Fix: run `parley migrate` with the same PARLEY_DATABASE_URL."


def _inspect(connection: Connection) -> tuple[set[str], dict[str, set[str]]]:
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    columns = {
        name: {column["name"] for column in inspector.get_columns(name)}
        for name in Base.metadata.tables
        if name in tables
    }
    return tables, columns


async def check_schema(database: Database) -> SchemaReport:
    async with database.engine.connect() as connection:
        tables, columns = await connection.run_sync(_inspect)
    own = Base.metadata.tables
    missing_columns = {
        name: sorted(set(table.columns.keys()) - columns[name])
        for name, table in own.items()
        if name in columns and set(table.columns.keys()) - columns[name]
    }
    revision = await current_revision(database) if ALEMBIC_TABLE in tables else None
    head = head_revision()
    return SchemaReport(
        missing_tables=sorted(set(own) - tables),
        missing_columns=missing_columns,
        foreign_tables=sorted(tables - set(own) - {ALEMBIC_TABLE}),
        revision=revision,
        head=head,
        behind=revision != head and (revision is None or revision in known_revisions()),
    )
