"""The per-thread event log and its single writer, which stores events in group commits before they are sent.

Producers hand the writer `WriteRequest`s (events, and the rows that must change with them: messages, runs).
One task takes everything queued, reserves gapless `seq` numbers per thread with one UPDATE of the thread row
(which also serialises writers of that thread across processes), inserts it all in one transaction, and
only after the commit resolves the producers and publishes the events. A database outage is retried with
backoff; a request that fails on its own (a deleted thread, a duplicate key) fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from parley.clock import utcnow
from parley.errors import NotFound
from parley.health.components import ComponentHealth
from parley.observability.logging import describe, get_logger
from parley.realtime.bus import EventBus
from parley.realtime.events import NewEvent, StoredEvent
from parley.storage.database import Database, is_database_unavailable
from parley.storage.models import Message, Run, RunEvent, Thread

log = get_logger("parley.event_log")


class ThreadGone(NotFound):
    """The thread does not exist (any more), or is not the writer's claimed owner's: the same to a client."""

    message = "Thread not found."


@dataclass(frozen=True, slots=True)
class RunChange:
    """New values for some columns of one run."""

    run_id: str
    values: dict[str, Any]


@dataclass(slots=True)
class WriteRequest:
    events: Sequence[NewEvent] = ()
    messages: Sequence[dict[str, Any]] = ()  # rows of the messages table (column names)
    runs: Sequence[dict[str, Any]] = ()  # rows of the runs table
    run_changes: Sequence[RunChange] = ()
    # Whose thread this writes to: the thread row is only updated (and so the request only stored) where it
    # belongs to this user. None for the system's own writes (the sweeper).
    owner_id: str | None = None
    future: asyncio.Future[list[StoredEvent]] = field(default_factory=lambda: _new_future())

    def thread_ids(self) -> set[str]:
        ids = {event.thread_id for event in self.events}
        ids.update(row["thread_id"] for row in self.messages)
        ids.update(row["thread_id"] for row in self.runs)
        return ids


class EventLog:
    name = "event_log"

    def __init__(self, database: Database, bus: EventBus, *, batch_max: int, queue_max: int,
                 retry_max_s: float = 2.0, on_stored: Callable[[int], None] | None = None) -> None:
        self.database = database
        self.bus = bus
        self.batch_max = batch_max
        self.retry_max_s = retry_max_s
        self._on_stored = on_stored or (lambda count: None)
        self._queue: asyncio.Queue[WriteRequest] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.events_stored = 0
        self.batches = 0
        self.last_commit_ms: float | None = None
        self._connection: AsyncConnection | None = None

    # --- producing -----------------------------------------------------------------------------------------
    async def write(self, request: WriteRequest, wait: bool = True) -> list[StoredEvent]:
        """Queues `request`; with `wait`, returns its stored events once committed (or raises its error).

        Without `wait` it returns at once (after waiting for queue space, the backpressure); the events are
        still stored before anyone is sent them."""
        if self._stopping or self._task is None:
            raise RuntimeError("the event log is not running")
        if not wait:
            request.future.add_done_callback(_consume_exception)
        await self._queue.put(request)
        return await request.future if wait else []

    async def write_guarded(self, request: WriteRequest,
                            guard: Callable[[AsyncConnection], Awaitable[bool]]) -> bool:
        """Stores `request` in a transaction of its own, only if `guard` (run first, inside it) agrees.

        For rare writes that must win a race exactly once (the sweeper ending an orphaned run)."""
        now = utcnow()
        async with self.database.engine.begin() as connection:
            if not await guard(connection):
                return False
            bases = await self._reserve(connection, [request], now)
            if any(base is None for base in bases.values()):
                raise ThreadGone()
            results = self._number([request], bases, now)
            await self._insert(connection, [request], results)
        await self._deliver([(request, results[0])])
        return True

    # --- reading -------------------------------------------------------------------------------------------
    @staticmethod
    async def read(session: AsyncSession, thread_id: str, after_seq: int, limit: int) -> list[StoredEvent]:
        rows = await session.execute(
            select(RunEvent.seq, RunEvent.run_id, RunEvent.type, RunEvent.payload, RunEvent.created_at)
            .where(RunEvent.thread_id == thread_id, RunEvent.seq > after_seq)
            .order_by(RunEvent.seq)
            .limit(limit)
        )
        return [StoredEvent.make(thread_id, seq, run_id, type_, payload, created_at)
                for seq, run_id, type_, payload, created_at in rows]

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="parley-event-log-writer")

    async def stop(self, deadline_s: float = 10.0) -> None:
        """Stores what is queued (within the deadline), then stops; what could not be stored fails."""
        self._stopping = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_s):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        await self.database.dispose()
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the event log stopped before storing this"))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def health(self) -> ComponentHealth:
        if self._task is None or self._task.done():
            return ComponentHealth("unhealthy", detail="event log writer is not running")
        if self.failing_since is not None:
            return ComponentHealth("unhealthy", detail=f"cannot store events for "
                                   f"{time.monotonic() - self.failing_since:.0f} s; retrying")
        return ComponentHealth("healthy")

    # --- the writer ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit_with_retry(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit_with_retry(self, batch: list[WriteRequest]) -> None:
        delay = 0.05
        while True:
            try:
                await self._commit_isolating_failures(batch)
            except Exception as exc:
                if not is_database_unavailable(exc) or self._stopping:
                    _fail_all(batch, exc)
                    return
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    log.warning("event_log_write_failed", reason=describe(exc), pending=len(batch))
                self.last_error = describe(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self.failing_since is not None:
                log.info("event_log_recovered", outage_s=round(time.monotonic() - self.failing_since, 3))
            self.failing_since = None
            return

    async def _commit_isolating_failures(self, batch: list[WriteRequest]) -> None:
        try:
            stored = await self._commit(batch)
        except Exception as exc:
            if is_database_unavailable(exc) or len(batch) == 1:
                raise
            # One request broke the batch (a duplicate key, say): store the others one by one.
            for request in batch:
                try:
                    await self._commit_isolating_failures([request])
                except Exception as single_exc:
                    if is_database_unavailable(single_exc):
                        raise
                    _fail_all([request], single_exc)
            return
        await self._deliver(stored)

    async def _commit(self, batch: list[WriteRequest]) -> list[tuple[WriteRequest, list[StoredEvent]]]:
        live = [request for request in batch if not request.future.done()]
        now = utcnow()
        started = time.perf_counter()
        connection = await self._writer_connection()
        try:
            async with connection.begin():
                bases = await self._reserve(connection, live, now)
                gone = {key for key, base in bases.items() if base is None}
                if gone:
                    for request in live:
                        if _keys(request) & gone:
                            _fail_all([request], ThreadGone())
                    live = [request for request in live if not _keys(request) & gone]
                results = self._number(live, bases, now)
                await self._insert(connection, live, results)
        except Exception as exc:
            if is_database_unavailable(exc):
                await self._drop_connection()
            raise
        self.batches += 1
        self.last_commit_ms = (time.perf_counter() - started) * 1000
        return list(zip(live, results, strict=True))

    async def _writer_connection(self) -> AsyncConnection:
        """The writer's own connection, kept between batches: no checkout, ping or reset per commit.
        Core statements on it, because the ORM's unit of work would double the writer's CPU."""
        if self._connection is None or self._connection.closed:
            self._connection = await self.database.engine.connect()
        return self._connection

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # it is broken already; the pool discards it
                await connection.invalidate()
                await connection.close()

    async def _reserve(self, connection: AsyncConnection, batch: list[WriteRequest],
                       now: datetime) -> dict[tuple[str, str | None], int | None]:
        """Moves each touched thread's counters in one UPDATE per thread (and claimed owner) and returns the
        seq before this batch; None for a thread that does not exist or is not the claimed owner's."""
        events: dict[tuple[str, str | None], int] = defaultdict(int)
        messages: dict[tuple[str, str | None], int] = defaultdict(int)
        keys: set[tuple[str, str | None]] = set()
        for request in batch:
            keys.update((thread_id, request.owner_id) for thread_id in request.thread_ids())
            for event in request.events:
                events[event.thread_id, request.owner_id] += 1
            for row in request.messages:
                messages[row["thread_id"], request.owner_id] += 1
        bases: dict[tuple[str, str | None], int | None] = {}
        table = _table(Thread)
        for key in sorted(keys, key=lambda k: (k[0], k[1] or "")):  # one lock order everywhere: no deadlocks
            thread_id, owner_id = key
            values: dict[str, Any] = {"last_seq": table.c.last_seq + events[key]}
            if messages[key]:
                values.update(message_count=table.c.message_count + messages[key], last_message_at=now,
                              updated_at=now)
            statement = update(table).where(table.c.id == thread_id)
            if owner_id is not None:
                statement = statement.where(table.c.user_id == owner_id)
            result = await connection.execute(statement.values(**values).returning(table.c.last_seq))
            last = result.scalar_one_or_none()
            bases[key] = None if last is None else last - events[key]
        return bases

    @staticmethod
    def _number(batch: list[WriteRequest], bases: dict[tuple[str, str | None], int | None],
                now: datetime) -> list[list[StoredEvent]]:
        next_seq = {key: base for key, base in bases.items() if base is not None}
        results = []
        for request in batch:
            stored = []
            for event in request.events:
                key = (event.thread_id, request.owner_id)
                next_seq[key] += 1
                stored.append(StoredEvent.make(event.thread_id, next_seq[key], event.run_id, str(event.type),
                                               event.payload, now))
            results.append(stored)
        return results

    @staticmethod
    async def _insert(connection: AsyncConnection, batch: list[WriteRequest],
                      results: list[list[StoredEvent]]) -> None:
        runs = [row for request in batch for row in request.runs]
        if runs:
            await connection.execute(insert(_table(Run)), runs)
        messages = [row for request in batch for row in request.messages]
        if messages:
            await connection.execute(insert(_table(Message)), messages)
        rows = [{"thread_id": e.thread_id, "seq": e.seq, "run_id": e.run_id, "type": e.type,
                 "payload": e.payload, "created_at": e.created_at} for stored in results for e in stored]
        if rows:
            await connection.execute(insert(_table(RunEvent)), rows)
        changes: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for request in batch:
            for change in request.run_changes:
                changes[tuple(sorted(change.values))].append(
                    {"b_run_id": change.run_id, **{f"b_{k}": v for k, v in change.values.items()}})
        table = _table(Run)
        for columns, params in changes.items():
            statement = (update(table).where(table.c.id == bindparam("b_run_id"))
                         .values({column: bindparam(f"b_{column}") for column in columns}))
            await connection.execute(statement, params)

    async def _deliver(self, stored: list[tuple[WriteRequest, list[StoredEvent]]]) -> None:
        events = [event for _, batch_events in stored for event in batch_events]
        self.events_stored += len(events)
        self._on_stored(len(events))
        for request, request_events in stored:
            if not request.future.done():
                request.future.set_result(request_events)
        if events:
            await self.bus.publish(events)


def _keys(request: WriteRequest) -> set[tuple[str, str | None]]:
    return {(thread_id, request.owner_id) for thread_id in request.thread_ids()}


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _new_future() -> asyncio.Future[list[StoredEvent]]:
    return asyncio.get_running_loop().create_future()


def _fail_all(batch: list[WriteRequest], exc: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)


def _consume_exception(future: asyncio.Future[list[StoredEvent]]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("unawaited_write_failed", reason=describe(future.exception()))  # type: ignore[arg-type]
