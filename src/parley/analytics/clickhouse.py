"""The one code path to ClickHouse: a server over HTTP or chDB embedded, both through clickhouse-connect,
with the same SQL. Rows go in and results come out as JSONEachRow, which both understand identically.

All methods are blocking; the sink calls them on a thread of its own, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Sequence
from typing import Any

import orjson

from parley.analytics.records import Record
from parley.analytics.schema import MIGRATIONS, MIGRATIONS_TABLE, TABLES
from parley.observability.logging import get_logger

log = get_logger("parley.analytics")


# Timestamps go as RFC 3339 text (orjson's datetime form); ClickHouse reads it with best-effort parsing.
_DATETIME_INPUT = {"date_time_input_format": "best_effort"}


_COLUMNS: dict[type, tuple[str, ...]] = {}


def _columns(record_type: type) -> tuple[str, ...]:
    columns = _COLUMNS.get(record_type)
    if columns is None:
        columns = _COLUMNS[record_type] = tuple(field.name for field in dataclasses.fields(record_type))
    return columns


class ClickHouseStore:
    def __init__(self, dsn: str, database: str, ttl_days: int, *, connect_timeout_s: float = 5.0,
                 timeout_s: float = 15.0) -> None:
        self.dsn = dsn
        self.database = database
        self.ttl_days = ttl_days
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._client: Any = None

    @property
    def backend(self) -> str:
        return "chdb" if self.dsn.startswith("chdb:") else "clickhouse"

    # --- connection and schema -----------------------------------------------------------------------------
    def connect(self) -> None:
        import clickhouse_connect  # imported here: a process with analytics off never loads it

        if self._client is not None:
            return
        if self.backend == "chdb":
            self._client = clickhouse_connect.get_client(dsn=self.dsn)
        else:
            self._client = clickhouse_connect.get_client(
                dsn=self.dsn, connect_timeout=self.connect_timeout_s, send_receive_timeout=self.timeout_s,
                autogenerate_session_id=False)

    def migrate(self) -> list[int]:
        """Creates the database and applies the migrations it lacks; returns the versions applied."""
        self.connect()
        self._command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        self._command(MIGRATIONS_TABLE.format(db=self.database))
        # The database name is a validated identifier (Settings.analytics_database), never user input.
        versions = self.query(f"SELECT version FROM {self.database}.schema_migrations")  # noqa: S608
        done = {int(row["version"]) for row in versions}
        applied = []
        for version, description, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                self._command(statement.format(db=self.database, ttl_days=self.ttl_days))
            self.insert_rows("schema_migrations", [{"version": version, "description": description}])
            applied.append(version)
        self._apply_ttl()
        return applied

    def _apply_ttl(self) -> None:
        wanted = f"toIntervalDay({self.ttl_days})"
        rows = self.query("SELECT name, engine_full FROM system.tables WHERE database = {db:String}",
                          {"db": self.database})
        for row in rows:
            if row["name"] in TABLES and wanted not in row["engine_full"]:
                self._command(f"ALTER TABLE {self.database}.{row['name']} "
                              f"MODIFY TTL toDateTime(ts) + INTERVAL {self.ttl_days} DAY")
                log.info("analytics_ttl_changed", table=row["name"], ttl_days=self.ttl_days)

    # --- data ----------------------------------------------------------------------------------------------
    def insert(self, table: str, records: Sequence[Record]) -> int:
        """Inserts records of one table in one statement (all or none of them).

        Sent column by column (JSONCompactColumns) in one orjson call: several times cheaper than a JSON
        object per row, and this runs in the server process, where its CPU competes with requests."""
        names = _columns(type(records[0]))
        body = orjson.dumps(list(zip(*map(operator.attrgetter(*names), records), strict=True)))
        self._require().raw_insert(f"{self.database}.{table}", list(names), insert_block=body,
                                   fmt="JSONCompactColumns", settings=_DATETIME_INPUT)
        return len(records)

    def insert_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        columns = list(rows[0])
        body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        self._require().raw_insert(f"{self.database}.{table}", columns, insert_block=body, fmt="JSONEachRow")

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        raw = self._require().raw_query(sql, parameters=parameters or {}, fmt="JSONEachRow")
        return [orjson.loads(line) for line in bytes(raw).splitlines() if line]

    def ping(self) -> float:
        started = time.perf_counter()
        self.query("SELECT 1 AS ok")
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _command(self, sql: str) -> None:
        self._require().command(sql)

    def _require(self) -> Any:
        if self._client is None:
            self.connect()
        return self._client
