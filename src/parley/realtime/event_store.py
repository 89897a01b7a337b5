"""The event log's SQL: one transaction per batch reserves each thread's seq numbers, inserts events, messages
and runs, and applies run changes. Written once, as synchronous SQLAlchemy Core, and run the same on both
databases: on SQLite as a single trip to a thread of its own, on PostgreSQL through asyncpg via `run_sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, DateTime, Dialect, Engine, Table, bindparam, insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from parley.clock import rfc3339
from parley.realtime.events import StoredEvent
from parley.storage.database import Database
from parley.storage.models import Message, Run, RunEvent, Thread
from parley.storage.types import UTCDateTime

if TYPE_CHECKING:
    from parley.realtime.event_log import WriteRequest

T = TypeVar("T")
ThreadKey = tuple[str, str | None]  # (thread id, the owner the write claims)


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


THREADS, RUNS, MESSAGES, EVENTS = _table(Thread), _table(Run), _table(Message), _table(RunEvent)

# Built once: a statement per shape, compiled once and then only given new values.
_RESERVE = (update(THREADS).where(THREADS.c.id == bindparam("b_thread"))
            .values(last_seq=THREADS.c.last_seq + bindparam("b_events")).returning(THREADS.c.last_seq))
_RESERVE_OWNED = _RESERVE.where(THREADS.c.user_id == bindparam("b_owner"))
_RESERVE_WITH_MESSAGES = _RESERVE.values(message_count=THREADS.c.message_count + bindparam("b_messages"),
                                         last_message_at=bindparam("b_now"), updated_at=bindparam("b_now"))
_RESERVE_OWNED_WITH_MESSAGES = _RESERVE_WITH_MESSAGES.where(THREADS.c.user_id == bindparam("b_owner"))
_SET_LAST_SEQ = update(THREADS).where(THREADS.c.id == bindparam("b_thread")).values(last_seq=bindparam("b_last"))
_INSERT_EVENTS, _INSERT_MESSAGES, _INSERT_RUNS = insert(EVENTS), insert(MESSAGES), insert(RUNS)


class _SqliteStatement:
    """A statement compiled once for the engine's SQLite dialect and run on the DB-API cursor, its values bound
    by the column types' own bind processors (the same text, JSON and timestamps SQLAlchemy would send). This
    skips SQLAlchemy's per-execution parameter machinery, which was most of the event-store thread's time."""

    __slots__ = ("keys", "processors", "sql")

    def __init__(self, statement: Any, dialect: Dialect, keys: tuple[str, ...] | None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
        self.sql = str(compiled)
        self.keys: tuple[str, ...] = tuple(compiled.positiontup or ())
        if keys is not None and not set(self.keys) <= set(keys):  # a column default SQLAlchemy would fill in
            raise ValueError(f"rows lack {sorted(set(self.keys) - set(keys))} for {self.sql}")
        # (position, processor, is a timestamp) for each value that has a processor: the processor of the type's
        # implementation for this dialect, as SQLAlchemy itself binds (sqlite's DATETIME text, the JSON codec).
        self.processors = tuple(
            (index, process, isinstance(compiled.binds[key].type, DateTime | UTCDateTime))
            for index, key in enumerate(self.keys)
            if (process := compiled.binds[key].type.dialect_impl(dialect).bind_processor(dialect)) is not None)

    def rows(self, params: Sequence[dict[str, Any]]) -> list[list[Any]]:
        keys = self.keys
        return self.bind([[row[key] for key in keys] for row in params])

    def bind(self, rows: list[list[Any]]) -> list[list[Any]]:
        """Binds, in place, rows of values already in `keys` order."""
        processors = self.processors
        stamps: dict[datetime, str] = {}  # a batch shares one timestamp: each distinct one is bound once
        for values in rows:
            for index, process, is_time in processors:
                value = values[index]
                if is_time and value is not None:
                    stamp = stamps.get(value)
                    if stamp is None:
                        stamp = stamps[value] = process(value)
                    values[index] = stamp
                else:
                    values[index] = process(value)
        return rows


class _Executor:
    """Runs the batch's statements: on SQLite through `_SqliteStatement`s (each compiled once per row shape),
    elsewhere through SQLAlchemy Core."""

    # Per statement and row shape. Every SQLite engine parley makes binds alike (one JSON codec, JSON_CODEC), so
    # the first engine's compilation serves them all.
    _compiled: dict[tuple[int, tuple[str, ...] | None], _SqliteStatement] = {}

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.sqlite = connection.dialect.name == "sqlite"
        self._cursor: Any = None

    def _prepared(self, statement: Any, keys: tuple[str, ...] | None) -> _SqliteStatement:
        cache_key = (id(statement), keys)  # statements are module constants (or cached): ids are stable
        prepared = self._compiled.get(cache_key)
        if prepared is None:
            prepared = self._compiled[cache_key] = _SqliteStatement(statement, self.connection.dialect, keys)
        return prepared

    def _raw(self) -> Any:
        if self._cursor is None:
            self._cursor = self.connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        return self._cursor

    def scalar(self, statement: Any, params: dict[str, Any]) -> Any:
        """The first column of the first row the statement returns (None when it returns none)."""
        if not self.sqlite:
            return self.connection.execute(statement, params).scalar_one_or_none()
        prepared = self._prepared(statement, None)
        values = prepared.rows([params])[0]
        with self._translated(prepared.sql, values, many=False):
            row = self._raw().execute(prepared.sql, values).fetchone()
        return None if row is None else row[0]

    def many(self, statement: Any, rows: Sequence[dict[str, Any]], keys: tuple[str, ...] | None = None) -> None:
        """`statement` once per row; on SQLite `keys` names the columns of an INSERT (all rows have them)."""
        if not self.sqlite:
            self.connection.execute(statement, list(rows))
            return
        prepared = self._prepared(statement, keys)
        values = prepared.rows(rows)
        with self._translated(prepared.sql, values, many=True):
            self._raw().executemany(prepared.sql, values)

    def many_values(self, statement: Any, keys: tuple[str, ...], rows: list[list[Any]]) -> None:
        """An INSERT of rows given as values in `keys` order (the table's column order): SQLite only."""
        prepared = self._prepared(statement, keys)
        if prepared.keys != keys:
            raise ValueError(f"values must come in the order {prepared.keys}")
        values = prepared.bind(rows)
        with self._translated(prepared.sql, values, many=True):
            self._raw().executemany(prepared.sql, values)

    @contextlib.contextmanager
    def _translated(self, sql: str, values: Any, *, many: bool) -> Iterator[None]:
        """The driver's own errors, as SQLAlchemy would raise them (`IntegrityError`, `OperationalError`...):
        what callers catch, and what tells a locked or unreachable database (retried, a 503) from a bug."""
        dialect = self.connection.dialect
        try:
            yield
        except dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(sql, values, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
                                      dialect=dialect, ismulti=many) from exc

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: list[list[StoredEvent] | None]  # per request: its stored events, or None (its thread is gone)


def write_batch(connection: Connection, batch: Sequence[WriteRequest], now: datetime) -> BatchResult:
    """Stores a batch inside the caller's transaction. A request naming a thread that does not exist (or is not
    its claimed owner's) is left out whole and reported as None."""
    executor = _Executor(connection)
    counted = [(request, _thread_counts(request)) for request in batch]
    try:
        bases = _reserve(executor, counted, now)
        gone = {key for key, base in bases.items() if base is None}
        accepted = [(request, counts) for request, counts in counted
                    if not gone or not any((thread_id, request.owner_id) in gone for thread_id in counts)]
        if len(accepted) < len(batch):
            _release_unused(executor, counted, accepted, bases)
        numbered = _number([request for request, _ in accepted], bases, now)
        _insert(executor, [request for request, _ in accepted], numbered)
    finally:
        executor.close()
    by_request = {id(request): events for (request, _), events in zip(accepted, numbered, strict=True)}
    return BatchResult([by_request.get(id(request)) for request in batch])


Counted = Sequence[tuple["WriteRequest", dict[str, int]]]  # each request with its events per thread


def _thread_counts(request: WriteRequest) -> dict[str, int]:
    """The threads a request writes to, with how many events it adds to each (0: only rows)."""
    events = request.events
    if events and len({event.thread_id for event in events}) == 1:  # the usual case
        counts = {events[0].thread_id: len(events)}
    else:
        counts = {}
        for event in events:
            counts[event.thread_id] = counts.get(event.thread_id, 0) + 1
    for row in (*request.messages, *request.runs):
        counts.setdefault(row["thread_id"], 0)
    return counts


def _reserve(executor: _Executor, counted: Counted, now: datetime) -> dict[ThreadKey, int | None]:
    """Moves each touched thread's counters in one UPDATE per thread (and claimed owner), returning the seq
    before this batch; None where the thread does not exist or is not the claimed owner's."""
    events = _event_counts(counted)
    messages: dict[ThreadKey, int] = defaultdict(int)
    for request, _ in counted:
        for row in request.messages:
            messages[row["thread_id"], request.owner_id] += 1
    bases: dict[ThreadKey, int | None] = {}
    for key in sorted(events, key=lambda k: (k[0], k[1] or "")):  # one lock order everywhere: no deadlocks
        thread_id, owner_id = key
        params: dict[str, Any] = {"b_thread": thread_id, "b_events": events[key]}
        if messages[key]:
            params.update(b_messages=messages[key], b_now=now)
            statement = _RESERVE_OWNED_WITH_MESSAGES if owner_id is not None else _RESERVE_WITH_MESSAGES
        else:
            statement = _RESERVE_OWNED if owner_id is not None else _RESERVE
        if owner_id is not None:
            params["b_owner"] = owner_id
        last = executor.scalar(statement, params)
        bases[key] = None if last is None else last - events[key]
    return bases


def _release_unused(executor: _Executor, counted: Counted, accepted: Counted,
                    bases: dict[ThreadKey, int | None]) -> None:
    """A request left out for one thread may have reserved numbers in another (a request spanning threads):
    those are given back, so a thread's seq never skips a number."""
    reserved, used = _event_counts(counted), _event_counts(accepted)
    for key, count in reserved.items():
        base = bases.get(key)
        if base is not None and used.get(key, 0) != count:
            executor.many(_SET_LAST_SEQ, [{"b_thread": key[0], "b_last": base + used.get(key, 0)}])


def _event_counts(counted: Counted) -> dict[ThreadKey, int]:
    """Events per (thread, claimed owner) over the requests; every thread they touch is a key."""
    totals: dict[ThreadKey, int] = defaultdict(int)
    for request, counts in counted:
        for thread_id, count in counts.items():
            totals[thread_id, request.owner_id] += count
    return totals


def _number(batch: Sequence[WriteRequest], bases: dict[ThreadKey, int | None],
            now: datetime) -> list[list[StoredEvent]]:
    next_seq = {key: base for key, base in bases.items() if base is not None}
    ts = rfc3339(now)
    make = StoredEvent.make
    results = []
    for request in batch:
        owner_id = request.owner_id
        stored = []
        for event in request.events:
            key = (event.thread_id, owner_id)
            seq = next_seq[key] = next_seq[key] + 1
            stored.append(make(event.thread_id, seq, event.run_id, event.type, event.payload, now, ts))
        results.append(stored)
    return results


def _insert(executor: _Executor, batch: Sequence[WriteRequest], numbered: list[list[StoredEvent]]) -> None:
    runs = [row for request in batch for row in request.runs]
    if runs:
        _insert_rows(executor, _INSERT_RUNS, runs)
    messages = [row for request in batch for row in request.messages]
    if messages:
        _insert_rows(executor, _INSERT_MESSAGES, messages)
    events = [e for stored in numbered for e in stored]
    if events and executor.sqlite:  # most of what a batch writes: no dict per row
        executor.many_values(_INSERT_EVENTS, _EVENT_COLUMNS, [
            [e.thread_id, e.seq, e.run_id, e.type, e.payload, e.created_at] for e in events])
    elif events:
        executor.many(_INSERT_EVENTS, [
            {"thread_id": e.thread_id, "seq": e.seq, "run_id": e.run_id, "type": e.type, "payload": e.payload,
             "created_at": e.created_at} for e in events])
    changes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for request in batch:
        for change in request.run_changes:
            changes[tuple(sorted(change.values))].append(
                {"b_run_id": change.run_id, **{f"b_{k}": v for k, v in change.values.items()}})
    for columns, params in changes.items():
        executor.many(_run_update(columns), params)


_EVENT_COLUMNS = ("thread_id", "seq", "run_id", "type", "payload", "created_at")


def _insert_rows(executor: _Executor, statement: Any, rows: list[dict[str, Any]]) -> None:
    """Rows of one table, grouped by the columns they give (one executemany per shape)."""
    shapes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        shapes[tuple(sorted(row))].append(row)
    for keys, same in shapes.items():
        executor.many(statement, same, keys)


_RUN_UPDATES: dict[tuple[str, ...], Any] = {}


def _run_update(columns: tuple[str, ...]) -> Any:
    statement = _RUN_UPDATES.get(columns)
    if statement is None:
        statement = _RUN_UPDATES[columns] = (update(RUNS).where(RUNS.c.id == bindparam("b_run_id"))
                                             .values({column: bindparam(f"b_{column}") for column in columns}))
    return statement


class EventStore:
    """Runs the writer's transactions on its own connection: kept between batches (no checkout, ping or
    reset per commit), on SQLite a plain synchronous one on a thread of its own."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._sync_engine: Engine | None = database.sync_engine() if database.dialect == "sqlite" else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-event-store") \
            if self._sync_engine is not None else None
        self._sync_connection: Connection | None = None
        self._async_connection: AsyncConnection | None = None
        # The writer's batches and the sweeper's guarded writes share the one connection: one at a time.
        self._lock = asyncio.Lock()

    async def transaction(self, work: Callable[[Connection], T]) -> T:
        """Runs `work` in one transaction and commits; a failure rolls back and drops the connection."""
        async with self._lock:
            try:
                if self._thread is not None:
                    return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_thread, work)
                connection = await self._connection()
                async with connection.begin():
                    return await connection.run_sync(work)
            except Exception:
                await self._drop_connection()
                raise

    def _in_thread(self, work: Callable[[Connection], T]) -> T:
        assert self._sync_engine is not None
        if self._sync_connection is None or self._sync_connection.closed:
            self._sync_connection = self._sync_engine.connect()
        with self._sync_connection.begin():
            return work(self._sync_connection)

    async def _connection(self) -> AsyncConnection:
        if self._async_connection is None or self._async_connection.closed:
            self._async_connection = await self.database.engine.connect()
        return self._async_connection

    async def _drop_connection(self) -> None:
        if self._thread is not None:
            connection, self._sync_connection = self._sync_connection, None
            if connection is not None:
                with contextlib.suppress(Exception):  # broken already; the pool discards it
                    await asyncio.get_running_loop().run_in_executor(self._thread, connection.invalidate)
            return
        async_connection, self._async_connection = self._async_connection, None
        if async_connection is not None:
            with contextlib.suppress(Exception):
                await async_connection.invalidate()
                await async_connection.close()

    async def close(self) -> None:
        if self._thread is not None:
            connection, self._sync_connection = self._sync_connection, None
            loop = asyncio.get_running_loop()
            if connection is not None:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(self._thread, connection.close)
            if self._sync_engine is not None:
                await loop.run_in_executor(self._thread, self._sync_engine.dispose)
            self._thread.shutdown(wait=False)
        elif self._async_connection is not None:
            with contextlib.suppress(Exception):
                await self._async_connection.close()
            self._async_connection = None
        await self.database.dispose()
