"""Run leases: a process vouches for its unfinished runs by renewing their lease; any process ends the runs
whose lease lapsed (their process died) with `agent_error` `interrupted`, exactly once, so no client waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select, update

from parley.agents.schemas import UNFINISHED_STATUSES
from parley.clock import rfc3339, utcnow
from parley.observability.logging import describe, get_logger
from parley.realtime.event_log import EventLog, RunChange, WriteRequest
from parley.realtime.events import EventType, NewEvent
from parley.settings import Settings
from parley.storage.database import Database
from parley.storage.models import Run, RunEvent

log = get_logger("parley.runs")

INTERRUPTED_MESSAGE = "The server stopped while this run was in progress."
SWEEP_BATCH = 500


def started_event(thread_id: str, run_id: str, agent: str) -> NewEvent:
    """The `agent_started` of a run that ends before it started, so every run's events still pair."""
    return NewEvent(thread_id, run_id, EventType.AGENT_STARTED, {"agent": agent, "input_message_id": None})


class RunLeases:
    def __init__(self, settings: Settings, database: Database, event_log: EventLog,
                 local_runs: Callable[[], Collection[str]]) -> None:
        self.settings = settings
        self.database = database
        self.event_log = event_log
        self._local_runs = local_runs  # the runs this process executes, which are never orphans
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The embedded database serves one process, so at start every unfinished run there is an orphan.
        await self.sweep(everything=self.database.dialect == "sqlite")
        self._task = asyncio.create_task(self._maintain(), name="parley-run-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.settings.run_lease_s / 3)
            try:
                await self.renew()
                await self.sweep()
            except Exception as exc:  # the database may be down; try again next round
                log.warning("run_maintenance_failed", reason=describe(exc))

    async def renew(self) -> None:
        local = list(self._local_runs())
        if not local:
            return
        until = utcnow() + timedelta(seconds=self.settings.run_lease_s)
        async with self.database.session() as session:
            await session.execute(update(Run).where(Run.id.in_(local), Run.status.in_(UNFINISHED_STATUSES))
                                  .values(lease_until=until))
            await session.commit()

    async def sweep(self, everything: bool = False) -> int:
        """Interrupts unfinished runs whose process is gone; returns how many it ended."""
        now = utcnow()
        local = list(self._local_runs())
        async with self.database.session() as session:
            query = select(Run.id, Run.thread_id, Run.agent, Run.lease_until).where(
                Run.status.in_(UNFINISHED_STATUSES))
            if local:
                query = query.where(Run.id.not_in(local))
            if not everything:
                query = query.where(Run.lease_until < now)
            orphans = (await session.execute(query.limit(SWEEP_BATCH))).all()
            started = set(await session.scalars(
                select(func.distinct(RunEvent.run_id)).where(RunEvent.run_id.in_([o.id for o in orphans]),
                                                             RunEvent.type == EventType.AGENT_STARTED.value)
            )) if orphans else set()
        ended = 0
        for run_id, thread_id, agent, lease_until in orphans:
            error = NewEvent(thread_id, run_id, EventType.AGENT_ERROR,
                             {"error": {"code": "interrupted", "message": INTERRUPTED_MESSAGE}})
            opening = [] if run_id in started else [started_event(thread_id, run_id, agent)]
            request = WriteRequest(
                events=[*opening, error],
                run_changes=[RunChange(run_id, {"status": "interrupted", "finished_at": now,
                                                "error_code": "interrupted", "error_message": INTERRUPTED_MESSAGE,
                                                "lease_until": None})])
            if await self.event_log.write_guarded(request, _still_orphaned(run_id, None if everything else now)):
                ended += 1
                log.info("run_interrupted", run_id=run_id, thread_id=thread_id,
                         lease_until=rfc3339(lease_until) if lease_until else None)
        return ended


def _still_orphaned(run_id: str, lapsed_before: datetime | None) -> Callable[[Connection], bool]:
    """A guard run inside the sweep's transaction: claims the run only if no one finished or renewed it."""

    def guard(connection: Connection) -> bool:
        statement = update(Run).where(Run.id == run_id, Run.status.in_(UNFINISHED_STATUSES))
        if lapsed_before is not None:
            statement = statement.where(Run.lease_until < lapsed_before)
        return bool(connection.execute(statement.values(status="interrupted")).rowcount)

    return guard
