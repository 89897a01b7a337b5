"""The per-thread event log and its single writer, which stores events in group commits before they are sent.

Producers hand the writer `WriteRequest`s (events, and the rows that must change with them: messages, runs).
One task takes everything queued and stores it in one transaction (event_store.py: gapless `seq` numbers per
thread from one UPDATE of the thread row, which also serialises writers of a thread across processes), and
only after the commit resolves the producers and publishes the events. A database outage is retried with
backoff; a request that fails on its own (a deleted thread, a duplicate key) fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncSession

from parley.clock import utcnow
from parley.errors import DatabaseUnavailable, NotFound, ServiceUnavailable
from parley.health.components import ComponentHealth
from parley.observability.logging import describe, get_logger
from parley.realtime.bus import EventBus
from parley.realtime.event_store import EventStore, write_batch
from parley.realtime.events import NewEvent, StoredEvent
from parley.storage.database import is_database_unavailable
from parley.storage.models import RunEvent

log = get_logger("parley.event_log")


MERGE_MAX_EVENTS = 500


class ThreadGone(NotFound):
    """The thread does not exist (any more), or is not the writer's claimed owner's: the same to a client."""

    message = "Thread not found."


class PrecedingWriteFailed(Exception):
    """Not stored because the request it must follow (`WriteRequest.after`) was not: a run whose message
    could not be stored leaves nothing behind."""


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
    # Resolved with the stored events (or the error) once committed; made by `write` only when someone waits.
    future: asyncio.Future[list[StoredEvent]] | None = None
    # Stored only if this earlier request was (a run started before its message was stored).
    after: WriteRequest | None = None
    # Called once stored, after this request's events are handed to the bus and before any later request's
    # (not if its waiter gave up meanwhile: that one has been answered with an error already).
    on_stored: Callable[[list[StoredEvent]], None] | None = None
    outcome: bool | None = None  # True once stored, False once failed or given up; None while pending
    in_flight: bool = False  # in the writer's transaction right now
    abandoned: bool = False  # its waiter stopped waiting: not to be stored by any later attempt

    def thread_ids(self) -> set[str]:
        ids = {event.thread_id for event in self.events}
        ids.update(row["thread_id"] for row in self.messages)
        ids.update(row["thread_id"] for row in self.runs)
        return ids


class EventLog:
    name = "event_log"

    def __init__(self, store: EventStore, bus: EventBus, *, batch_max: int, queue_max: int,
                 retry_max_s: float = 2.0, on_stored: Callable[[int], None] | None = None,
                 answer_within_s: float = 30.0, retry_after_s: int = 2) -> None:
        # Told of every commit, in order, before anyone is sent its events (the run history cache).
        self.observers: list[Callable[[Sequence[tuple[WriteRequest, list[StoredEvent]]]], None]] = []
        self.store = store
        self.bus = bus
        self.batch_max = batch_max
        self.retry_max_s = retry_max_s
        self.answer_within_s = answer_within_s
        self.retry_after_s = retry_after_s
        self._on_stored = on_stored or (lambda count: None)
        self._queue: asyncio.Queue[WriteRequest] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.events_stored = 0
        self.batches = 0
        self.last_commit_ms: float | None = None
        self._tail: WriteRequest | None = None  # the last fire-and-forget request, while still queued

    # --- producing -----------------------------------------------------------------------------------------
    async def write(self, request: WriteRequest, wait: bool = True) -> list[StoredEvent]:
        """Queues `request`; with `wait`, returns its stored events once committed (or raises its error).

        Without `wait` it returns at once (after waiting for queue space, the backpressure); the events are
        still stored before anyone is sent them."""
        self._check_running()
        if wait:
            request.future = asyncio.get_running_loop().create_future()
            await self._queue.put(request)
            return await request.future
        await self._queue.put(request)
        if _appendable(request) and len(request.thread_ids()) == 1:
            self._tail = request
        return []

    async def write_for_client(self, request: WriteRequest,
                               queued: Callable[[], None] | None = None) -> list[StoredEvent]:
        """`write` for a client who waits for the answer (a new message): refused at once while the log cannot
        store anything, and given up after `answer_within_s`, with 503 `database_unavailable` either way. A
        request given up is never stored later (the writer skips a request nobody waits for any more), so a
        client that retries does not end up with its message twice. `queued` is called as soon as the request
        is in the queue: whatever is queued from then on is stored after it."""
        if self.failing_since is not None:
            raise DatabaseUnavailable(retry_after=self.retry_after_s)
        self._check_running()
        future: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()
        request.future = future
        is_queued = False
        try:
            async with asyncio.timeout(self.answer_within_s):
                await self._queue.put(request)
                is_queued = True
                if queued is not None:
                    queued()
                return await asyncio.shield(future)
        except (TimeoutError, asyncio.CancelledError) as exc:
            # Given up. Not taken yet: it never will be. Being committed right now: that attempt decides (if it
            # fails, the next one skips the request and says so), so a stored message is never reported lost.
            request.abandoned = True
            if is_queued and request.in_flight and not isinstance(exc, asyncio.CancelledError):
                return await future
            if request.outcome is None and not request.in_flight:
                request.outcome = False
                future.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise DatabaseUnavailable(retry_after=self.retry_after_s) from None

    async def emit(self, event: NewEvent, owner_id: str | None, run_changes: Sequence[RunChange] = (),
                   after: WriteRequest | None = None) -> None:
        """Queues one event (and run changes) without waiting for the commit; the event is still stored before
        anyone is sent it. A run's events come in bursts: while the previous request of the same thread and
        owner still waits in the queue, the event joins it (same order, same commit), sparing a request and
        a queue slot per event."""
        self._check_running()
        tail = self._tail
        if tail is not None and tail.owner_id == owner_id and len(tail.events) < MERGE_MAX_EVENTS \
                and tail.events[0].thread_id == event.thread_id and tail.after is after:  # stored or not, whole
            tail.events.append(event)  # type: ignore[attr-defined]
            if run_changes:
                tail.run_changes.extend(run_changes)  # type: ignore[attr-defined]
            return
        await self.write(WriteRequest(events=[event], run_changes=list(run_changes), owner_id=owner_id, after=after),
                         wait=False)

    def _check_running(self) -> None:
        if self._stopping or self._task is None:
            raise ServiceUnavailable.not_running(draining=self._stopping)

    async def write_guarded(self, request: WriteRequest, guard: Callable[[Connection], bool]) -> bool:
        """Stores `request` in a transaction of its own, only if `guard` (run first, inside it) agrees.

        For rare writes that must win a race exactly once (the sweeper ending an orphaned run)."""
        now = utcnow()

        def work(connection: Connection) -> list[StoredEvent] | None:
            if not guard(connection):
                return None
            stored = write_batch(connection, [request], now).stored[0]
            if stored is None:
                raise ThreadGone()
            return stored

        stored = await self.store.transaction(work)
        if stored is None:
            return False
        await self._deliver([(request, stored)])
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
        await self.store.close()
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            _fail_all([pending], ServiceUnavailable(
                "The service stopped before storing this; retry shortly.", code="draining", retry_after=1))

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
            self._tail = None  # what the writer has taken can no longer be joined
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
        live = []
        for request in batch:  # in queue order: a request's `after` is decided before it (or in this batch)
            if request.outcome is not None:
                continue  # decided by an earlier attempt: stored while failures were isolated, or given up
            if request.after is not None and request.after.outcome is False:
                _fail_all([request], PrecedingWriteFailed())
            elif request.abandoned or _settled(request):  # its waiter gave up: never stored later
                _fail_all([request], DatabaseUnavailable(retry_after=self.retry_after_s))
            else:
                live.append(request)
        now = utcnow()
        started = time.perf_counter()
        for request in live:
            request.in_flight = True
        try:
            result = await self.store.transaction(lambda connection: write_batch(connection, live, now))
        finally:
            for request in live:
                request.in_flight = False
        self.batches += 1
        self.last_commit_ms = (time.perf_counter() - started) * 1000
        stored = []
        for request, events in zip(live, result.stored, strict=True):
            if events is None:
                _fail_all([request], ThreadGone())
            else:
                request.outcome = True
                stored.append((request, events))
        return stored

    async def _deliver(self, stored: list[tuple[WriteRequest, list[StoredEvent]]]) -> None:
        events = [event for _, batch_events in stored for event in batch_events]
        self.events_stored += len(events)
        for observer in self.observers:
            observer(stored)
        self._on_stored(len(events))
        for request, request_events in stored:
            if request.future is not None and not request.future.done():
                request.future.set_result(request_events)
        if not any(request.on_stored is not None for request, _ in stored):
            if events:
                await self.bus.publish(events)
            return
        unpublished: list[StoredEvent] = []
        for request, request_events in stored:  # each callback between its own events and the next request's
            unpublished.extend(request_events)
            if request.on_stored is not None and not (request.future is not None and request.future.cancelled()):
                if unpublished:
                    await self.bus.publish(unpublished)
                    unpublished = []
                try:
                    request.on_stored(request_events)
                except Exception:  # a receiver's failure must not cost the others their events
                    log.exception("on_stored_failed")
        if unpublished:
            await self.bus.publish(unpublished)


def _appendable(request: WriteRequest) -> bool:
    """Only events and run changes, nobody waiting: safe to join with its neighbour in the queue."""
    return request.future is None and bool(request.events) and not request.messages and not request.runs \
        and isinstance(request.events, list) and isinstance(request.run_changes, list)


def _settled(request: WriteRequest) -> bool:
    """Its waiter has its answer already (or gave up): nothing left to store it for."""
    return request.future is not None and request.future.done()


def _fail_all(batch: list[WriteRequest], exc: BaseException) -> None:
    for request in batch:
        if request.outcome is True:
            continue  # stored by an earlier attempt of the same batch (while its failures were isolated)
        request.outcome = False
        if request.future is None:
            # Nobody waits to hear of it. A deleted thread is expected (its runs are being cancelled); any other
            # failure lost events that clients will never get: an error for the operator, with what was lost.
            if isinstance(exc, ThreadGone | PrecedingWriteFailed):  # expected, and reported where it began
                log.debug("unawaited_write_failed", reason=describe(exc))
            elif isinstance(exc, ServiceUnavailable):  # still queued when the service stopped
                log.warning("unawaited_write_failed", reason=describe(exc), events=len(request.events))
            else:
                log.error("unawaited_write_failed", reason=describe(exc), events=len(request.events),
                          threads=sorted(request.thread_ids()),
                          runs=sorted({event.run_id for event in request.events if event.run_id}))
        elif not request.future.done():
            request.future.set_exception(exc)
