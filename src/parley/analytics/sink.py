"""The analytics sink: producers hand it records without waiting; one writer ships them in batches.

`record()` never blocks and never fails: the queue is bounded, and beyond its bound the oldest records are
dropped and counted. The writer connects and migrates lazily, batches by size or every flush interval, and
runs every ClickHouse call on a thread of its own. When ClickHouse is slow or down nothing else notices: the
writer retries with backoff, `/health` says `degraded` and why, and the backlog flushes when it returns.
`DisabledSink` is what a process without analytics has; the rest of the code never asks which it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from parley.analytics.clickhouse import ClickHouseStore
from parley.analytics.records import Record
from parley.health.components import ComponentHealth, public_reason
from parley.observability.logging import describe, get_logger

log = get_logger("parley.analytics")

T = TypeVar("T")


# Analytics is background work: its threads run this much nicer than the event loop's, so on a busy machine the
# scheduler serves requests first. chDB's own worker threads start from the writer's and inherit its niceness.
WRITER_NICENESS = 10


def _lower_thread_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: runs at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)


class AnalyticsUnavailable(Exception):
    """Analytics is off, or ClickHouse cannot answer now."""


class AnalyticsSink(Protocol):
    name: str
    required: bool
    backend: str  # "clickhouse", "chdb" or "off"

    @property
    def enabled(self) -> bool: ...

    def record(self, record: Record) -> None: ...

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def check(self) -> ComponentHealth: ...


class DisabledSink:
    name = "analytics"
    required = False
    backend = "off"
    enabled = False

    def record(self, record: Record) -> None:
        return None

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        raise AnalyticsUnavailable("analytics is off")

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def check(self) -> ComponentHealth:
        return ComponentHealth("disabled", detail="no analytics backend configured")


class ClickHouseSink:
    name = "analytics"
    required = False
    enabled = True

    def __init__(self, store: ClickHouseStore, *, queue_max: int, batch_max: int, flush_interval_s: float,
                 retry_max_s: float, shutdown_flush_s: float, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[], None] | None = None, query_timeout_s: float = 1.5) -> None:
        self.store = store
        self.backend = store.backend
        self.queue_max = queue_max
        self.batch_max = batch_max
        self.flush_interval_s = flush_interval_s
        self.retry_max_s = retry_max_s
        self.shutdown_flush_s = shutdown_flush_s
        self._clock = clock
        self._on_drop = on_drop or (lambda: None)
        self._queue: deque[Record] = deque()
        self._pending: dict[str, list[Record]] = {}  # taken from the queue, not yet written, by table
        self._full = asyncio.Event()  # the queue holds a whole batch
        self._flushed = asyncio.Event()  # everything recorded so far is written
        self.query_timeout_s = query_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-analytics",
                                            initializer=_lower_thread_priority)
        # A server is read on a thread of its own, so a slow insert cannot hold up the usage API; chDB is one
        # engine in this process, so its reads share the writer's thread (and give up after the timeout).
        self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parley-analytics-read",
                                          initializer=_lower_thread_priority) \
            if self.backend == "clickhouse" else self._executor
        self._writer: asyncio.Task[None] | None = None
        self._ready = False
        self._stopping = False
        self.failing_since: float | None = None
        self.last_error: str | None = None  # for the logs; may name the server
        self.public_error: str | None = None  # for /health, which anyone may read
        self.dropped = 0
        self.written = 0

    # --- producing -----------------------------------------------------------------------------------------
    def record(self, record: Record) -> None:
        if self._stopping:
            self.dropped += 1
            self._on_drop()
            return
        if len(self._queue) >= self.queue_max:
            self._queue.popleft()  # the oldest goes: recent records matter more to an operator
            self.dropped += 1
            self._on_drop()
        self._queue.append(record)
        self._flushed.clear()
        if len(self._queue) >= self.batch_max:
            self._full.set()

    @property
    def queued(self) -> int:
        return len(self._queue) + sum(map(len, self._pending.values()))

    # --- reading -------------------------------------------------------------------------------------------
    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if not self._ready:
            raise AnalyticsUnavailable(self.last_error or "analytics is not connected yet")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.query_timeout_s):  # a slow ClickHouse: answer from elsewhere
                return await loop.run_in_executor(self._reader, self.store.query, sql, parameters)
        except Exception as exc:
            raise AnalyticsUnavailable(describe(exc)) from exc

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._writer = asyncio.create_task(self._run(), name="parley-analytics-writer")

    async def stop(self) -> None:
        """Flushes what is queued within `shutdown_flush_s`, then stops; says how much was left behind."""
        self._stopping = True
        self._full.set()
        if self._writer is not None:
            if self.queued and self._ready and self.failing_since is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.shutdown_flush_s):
                        await self._flushed.wait()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self.queued:
            log.warning("analytics_rows_lost_at_shutdown", rows=self.queued, reason=self.last_error or "deadline")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(0.5):  # behind a slow insert it may never get its turn: the deadline holds
                await self._call(self.store.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._reader.shutdown(wait=False, cancel_futures=True)

    async def check(self) -> ComponentHealth:
        counts = f"{self.written} rows written, {self.queued} queued, {self.dropped} dropped"
        if self.failing_since is not None:
            outage = self._clock() - self.failing_since
            return ComponentHealth("degraded", detail=f"{self.backend} {self.public_error} for {outage:.0f} s; "
                                   f"retrying; {counts}")
        if not self._ready:
            return ComponentHealth("starting", detail=f"connecting to {self.backend}; {counts}")
        try:
            async with asyncio.timeout(1.5):
                latency = await self._call(self.store.ping)
        except Exception as exc:
            return ComponentHealth("degraded", detail=f"{self.backend} not answering ({public_reason(exc)}); "
                                   f"{counts}")
        return ComponentHealth("healthy", latency_ms=latency, detail=f"{self.backend}: {counts}")

    # --- the writer ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = 0.2
        while True:
            try:
                if not self._ready:
                    applied = await self._call(self.store.migrate)
                    self._ready = True
                    log.info("analytics_connected", backend=self.backend, migrations_applied=applied)
                if not self._pending:
                    await self._wait_for_records()
                    self._pending = self._take_batch()
                await self._write_pending()
                if not self._pending and not self._queue:
                    self._flushed.set()
            except Exception as exc:  # ClickHouse is down or refusing: keep the batch, back off, retry
                self._failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            if self.failing_since is not None:
                log.info("analytics_recovered", outage_s=round(self._clock() - self.failing_since, 3),
                         dropped=self.dropped)
                self.failing_since = None
            delay = 0.2

    def _take_batch(self) -> dict[str, list[Record]]:
        """Up to `batch_max` records off the queue, grouped by table in one pass. This runs on the event loop
        once per flush, so it is kept to a single walk over the batch."""
        queue = self._queue
        if len(queue) <= self.batch_max:
            taken, self._queue = queue, deque()
        else:
            taken = deque(queue.popleft() for _ in range(self.batch_max))
        by_table: dict[str, list[Record]] = {}
        for record in taken:
            rows = by_table.get(record.table)
            if rows is None:
                rows = by_table[record.table] = []
            rows.append(record)
        return by_table

    async def _write_pending(self) -> None:
        """Writes the batch one table at a time, forgetting each table's records once they are in: a retry
        after a failure in the middle never writes a table twice."""
        while self._pending:
            table, rows = next(iter(self._pending.items()))
            self.written += await self._call(self.store.insert, table, rows)
            del self._pending[table]

    async def _wait_for_records(self) -> None:
        if self._queue and (len(self._queue) >= self.batch_max or self._stopping):
            return
        self._full.clear()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the writer's cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.flush_interval_s):
                await self._full.wait()

    def _failed(self, exc: Exception) -> None:
        self.last_error = describe(exc)[:500]
        self.public_error = public_reason(exc)
        if self.failing_since is None:
            self.failing_since = self._clock()
            log.warning("analytics_write_failed", backend=self.backend, reason=self.last_error,
                        queued=self.queued, note="requests are unaffected; retrying with backoff")
