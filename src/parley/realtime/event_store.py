"""The event log's SQL: one transaction per batch reserves each thread's seq numbers, inserts events, messages
and runs, and applies run changes. Written once, as synchronous SQLAlchemy Core, and run the same on both
databases: on SQLite as a single trip to a thread of its own, on PostgreSQL through asyncpg via `run_sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, Table, bindparam, insert, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from parley.clock import rfc3339
from parley.realtime.events import StoredEvent
from parley.storage.database import JSON_CODEC, Database
from parley.storage.models import Message, Run, RunEvent, Thread

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
_EVENT_COLUMNS = ("thread_id", "seq", "run_id", "type", "payload", "created_at")
# Events are most of what a batch writes. On SQLite they go to the DB-API cursor as tuples (one executemany,
# inside the transaction SQLAlchemy began), with the values bound exactly as the column types would bind
# them: the same JSON codec, and the timestamp through the column type's own bind processor once per batch.
# This skips SQLAlchemy's per-row parameter processing, which was half the event-store thread's time.
_SQLITE_EVENTS_COMPILED = _INSERT_EVENTS.compile(dialect=sqlite.dialect(), column_keys=list(_EVENT_COLUMNS))
assert tuple(_SQLITE_EVENTS_COMPILED.positiontup or ()) == _EVENT_COLUMNS  # the tuples' order below
_SQLITE_INSERT_EVENTS = str(_SQLITE_EVENTS_COMPILED)
_json_text: Callable[[Any], str] = JSON_CODEC["json_serializer"]


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: list[list[StoredEvent] | None]  # per request: its stored events, or None (its thread is gone)


def write_batch(connection: Connection, batch: Sequence[WriteRequest], now: datetime) -> BatchResult:
    """Stores a batch inside the caller's transaction. A request naming a thread that does not exist (or is not
    its claimed owner's) is left out whole and reported as None."""
    bases = _reserve(connection, batch, now)
    gone = {key for key, base in bases.items() if base is None}
    accepted = [request for request in batch if not _keys(request) & gone]
    if len(accepted) < len(batch):
        _release_unused(connection, batch, accepted, bases)
    numbered = _number(accepted, bases, now)
    _insert(connection, accepted, numbered)
    by_request = dict(zip(map(id, accepted), numbered, strict=True))
    return BatchResult([by_request.get(id(request)) for request in batch])


def _keys(request: WriteRequest) -> set[ThreadKey]:
    return {(thread_id, request.owner_id) for thread_id in request.thread_ids()}


def _reserve(connection: Connection, batch: Sequence[WriteRequest], now: datetime) -> dict[ThreadKey, int | None]:
    """Moves each touched thread's counters in one UPDATE per thread (and claimed owner), returning the seq
    before this batch; None where the thread does not exist or is not the claimed owner's."""
    events = _event_counts(batch)
    messages: dict[ThreadKey, int] = defaultdict(int)
    keys: set[ThreadKey] = set()
    for request in batch:
        keys.update(_keys(request))
        for row in request.messages:
            messages[row["thread_id"], request.owner_id] += 1
    bases: dict[ThreadKey, int | None] = {}
    for key in sorted(keys, key=lambda k: (k[0], k[1] or "")):  # one lock order everywhere: no deadlocks
        thread_id, owner_id = key
        params: dict[str, Any] = {"b_thread": thread_id, "b_events": events[key]}
        if messages[key]:
            params.update(b_messages=messages[key], b_now=now)
            statement = _RESERVE_OWNED_WITH_MESSAGES if owner_id is not None else _RESERVE_WITH_MESSAGES
        else:
            statement = _RESERVE_OWNED if owner_id is not None else _RESERVE
        if owner_id is not None:
            params["b_owner"] = owner_id
        last = connection.execute(statement, params).scalar_one_or_none()
        bases[key] = None if last is None else last - events[key]
    return bases


def _release_unused(connection: Connection, batch: Sequence[WriteRequest], accepted: Sequence[WriteRequest],
                    bases: dict[ThreadKey, int | None]) -> None:
    """A request left out for one thread may have reserved numbers in another (a request spanning threads):
    those are given back, so a thread's seq never skips a number."""
    reserved, used = _event_counts(batch), _event_counts(accepted)
    for key, count in reserved.items():
        base = bases.get(key)
        if base is not None and used.get(key, 0) != count:
            connection.execute(_SET_LAST_SEQ, {"b_thread": key[0], "b_last": base + used.get(key, 0)})


def _event_counts(batch: Sequence[WriteRequest]) -> dict[ThreadKey, int]:
    counts: dict[ThreadKey, int] = defaultdict(int)
    for request in batch:
        for event in request.events:
            counts[event.thread_id, request.owner_id] += 1
    return counts


def _number(batch: Sequence[WriteRequest], bases: dict[ThreadKey, int | None],
            now: datetime) -> list[list[StoredEvent]]:
    next_seq = {key: base for key, base in bases.items() if base is not None}
    ts = rfc3339(now)
    results = []
    for request in batch:
        stored = []
        for event in request.events:
            key = (event.thread_id, request.owner_id)
            next_seq[key] += 1
            stored.append(StoredEvent.make(event.thread_id, next_seq[key], event.run_id, str(event.type),
                                           event.payload, now, ts))
        results.append(stored)
    return results


def _insert(connection: Connection, batch: Sequence[WriteRequest], numbered: list[list[StoredEvent]]) -> None:
    runs = [row for request in batch for row in request.runs]
    if runs:
        connection.execute(_INSERT_RUNS, runs)
    messages = [row for request in batch for row in request.messages]
    if messages:
        connection.execute(_INSERT_MESSAGES, messages)
    events = [e for stored in numbered for e in stored]
    if events and connection.dialect.name == "sqlite":
        _insert_events_sqlite(connection, events)
    elif events:
        connection.execute(_INSERT_EVENTS, [
            {"thread_id": e.thread_id, "seq": e.seq, "run_id": e.run_id, "type": e.type, "payload": e.payload,
             "created_at": e.created_at} for e in events])
    changes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for request in batch:
        for change in request.run_changes:
            changes[tuple(sorted(change.values))].append(
                {"b_run_id": change.run_id, **{f"b_{k}": v for k, v in change.values.items()}})
    for columns, params in changes.items():
        connection.execute(_run_update(columns), params)


def _insert_events_sqlite(connection: Connection, events: list[StoredEvent]) -> None:
    bind_time = EVENTS.c.created_at.type.bind_processor(connection.dialect)
    stamps: dict[datetime, Any] = {}  # a batch shares one timestamp
    rows = []
    for e in events:
        stamp = stamps.get(e.created_at)
        if stamp is None:
            stamp = stamps[e.created_at] = bind_time(e.created_at) if bind_time is not None else e.created_at
        rows.append((e.thread_id, e.seq, e.run_id, e.type, _json_text(e.payload), stamp))
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(_SQLITE_INSERT_EVENTS, rows)
    finally:
        cursor.close()


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
