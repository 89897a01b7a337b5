"""Runs: accepting a message (with idempotency and the thread's busy policy), executing the agent, and ending
every run with exactly one terminal event (leases.py ends the runs of processes that died).

Each run executes in its own task with a fresh `UserExecutionContext` and `ToolDispatcher`. Runs of one user
share `max_concurrent_runs_per_user` slots (extra runs wait); runs of one thread execute in order. A process
renews a lease on its unfinished runs; any process interrupts runs whose lease lapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from parley.agents.base import (
    Agent,
    AgentInput,
    AgentRegistry,
    Finished,
    TextChunk,
    Thinking,
    ToolFinished,
    ToolStarted,
)
from parley.agents.context import UserExecutionContext
from parley.agents.history import HISTORY_MESSAGES, HistoryCache, HistoryItem, history_item
from parley.agents.leases import INTERRUPTED_MESSAGE, RunLeases, started_event
from parley.agents.schemas import FINISHED_STATUSES, UNFINISHED_STATUSES, RunOut
from parley.analytics.metered import MeteredLLM
from parley.analytics.pricing import PriceTable
from parley.analytics.records import Recorder, RunRecord, ToolCallRecord
from parley.clock import rfc3339, utcnow
from parley.errors import Conflict, InvalidRequest, NotFound, RateLimited, ServiceUnavailable
from parley.ids import new_id
from parley.llm.base import ChatMessage, LLMError, LLMProvider, Usage
from parley.observability.logging import get_logger
from parley.realtime.bus import EventBus
from parley.realtime.event_log import EventLog, PrecedingWriteFailed, RunChange, ThreadGone, WriteRequest
from parley.realtime.events import EventType, NewEvent, StoredEvent
from parley.settings import Settings
from parley.storage.database import Database
from parley.storage.models import Message, Run, Thread
from parley.threads.repository import MessageRepository
from parley.threads.schemas import MessageOut
from parley.tools.base import ToolRegistry
from parley.tools.dispatcher import ToolDispatcher

log = get_logger("parley.runs")



class RunInProgress(Conflict):
    code = "run_in_progress"
    message = "The thread has an unfinished run."


class RunNotFound(NotFound):
    message = "Run not found."


@dataclass(frozen=True)
class Submission:
    message: MessageOut
    run: RunOut
    created: bool  # False: the same client_message_id was seen before; nothing new was started
    user_id: str
    message_seq: int | None = None  # seq of the `message_created` event (None for a replayed submission)
    request_id: str = ""
    is_admin: bool = False
    launched: bool = False  # its run was started with it (`submit(..., acknowledge=...)`)


@dataclass
class _RunState:
    """What a run accumulates while it executes."""

    llm: MeteredLLM
    started_at: datetime | None = None
    announced: bool = False  # its `agent_started` is queued for the log (else the terminal write adds one)
    after: WriteRequest | None = None  # its writes are stored only if this one (its message's) was
    answer: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=lambda: Usage(0, 0, ""))


@dataclass
class _LocalRun:
    """A run this process executes: its task and why it is being cancelled, if it is."""

    run_id: str
    thread_id: str
    user_id: str
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    interrupted: bool = False  # cancelled by shutdown, not by a user
    started: bool = False  # its task has taken its first step (cancelling before that would skip its cleanup)
    finishing: bool = False  # its terminal event is being stored: too late to cancel
    # Resolved when the thread's next run may start: this run has ended, and so have the runs ahead of it.
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    previous: asyncio.Future[None] | None = None  # the `done` of the thread's run launched before this one
    after: WriteRequest | None = None  # its message's write, when it started before that was stored


class RunManager:
    def __init__(self, settings: Settings, database: Database, event_log: EventLog, bus: EventBus,
                 agents: AgentRegistry, tools: ToolRegistry, llm: LLMProvider, worker_id: str,
                 telemetry: Recorder, prices: PriceTable) -> None:
        self.settings = settings
        self.database = database
        self.event_log = event_log
        self.bus = bus
        self.agents = agents
        self.tools = tools
        self.llm = llm
        self.worker_id = worker_id
        self.telemetry = telemetry
        self.prices = prices
        self._local: dict[str, _LocalRun] = {}
        # Submissions between their first check and their launch, per user and per thread: counted with the
        # launched runs, so concurrent requests cannot all pass a limit or a busy check that each alone would not.
        self._submitting: Counter[str] = Counter()
        self._submitting_threads: Counter[tuple[str, str]] = Counter()  # (user, thread)
        self._thread_tail: dict[str, asyncio.Future[None]] = {}
        self._user_slots: dict[str, asyncio.Semaphore] = {}
        self.history = HistoryCache()
        event_log.observers.append(self.history.observe)
        self.leases = RunLeases(settings, database, event_log, local_runs=lambda: self._local.keys())
        self._stopping = False
        self._accepting = False  # from the end of start (after the orphan sweep) until stop

    # --- accepting work ------------------------------------------------------------------------------------
    async def submit(self, session: AsyncSession | None, thread_id: str, user_id: str, content: str, *,
                     agent: str | None, on_busy: str, client_message_id: str | None, request_id: str,
                     is_admin: bool, acknowledge: Callable[[Submission], None] | None = None) -> Submission:
        """Stores the user's message, its run (queued) and `message_created`; starts nothing (see `launch`).

        With `acknowledge`, for a caller that knows the thread is the user's (its connection follows it), a
        message that needs no read first (`enqueue`, no client_message_id) starts its run at once instead:
        the run's work overlaps the message's commit and its events are queued behind it, stored only if the
        message is. `acknowledge` is called once the message is stored, after its `message_created` is
        published and before any of the run's events are; the returned submission says `launched`.

        The thread's ownership is enforced by the write itself (the event log updates the thread row only where
        it belongs to `user_id`): a thread that is not the user's is `ThreadGone`, a 404. Ends the caller's
        transaction before waiting for the event log, so no pooled connection is held idle. Without a
        `session`, one is opened only if something must be read first (idempotency, the busy policy)."""
        agent_name = self.validate(content, agent, is_admin, user_id)
        if on_busy == "reject" and self._submitting_threads[user_id, thread_id]:
            raise RunInProgress()  # another message to this thread is being submitted right now
        self._submitting[user_id] += 1
        self._submitting_threads[user_id, thread_id] += 1
        try:
            return await self._submit(session, thread_id, user_id, content, agent_name, on_busy, client_message_id,
                                      request_id, is_admin, acknowledge)
        finally:
            _release(self._submitting, user_id)
            _release(self._submitting_threads, (user_id, thread_id))

    async def _submit(self, session: AsyncSession | None, thread_id: str, user_id: str, content: str,
                      agent_name: str, on_busy: str, client_message_id: str | None, request_id: str,
                      is_admin: bool, acknowledge: Callable[[Submission], None] | None = None) -> Submission:
        if session is None and (client_message_id is not None or on_busy != "enqueue"):
            async with self.database.session() as own:
                return await self._submit(own, thread_id, user_id, content, agent_name, on_busy, client_message_id,
                                          request_id, is_admin)
        if session is not None and client_message_id is not None:
            existing = await self._existing_submission(session, thread_id, user_id, client_message_id)
            if existing is not None:
                return existing
        # `enqueue` needs no look: the run waits its turn behind whatever the thread has unfinished.
        unfinished = await self._unfinished_run_ids(session, thread_id, user_id) \
            if session is not None and on_busy != "enqueue" else []
        if unfinished and on_busy == "reject":
            raise RunInProgress()
        if session is not None:
            await session.commit()
        if on_busy == "interrupt":
            for run_id in unfinished:
                await self.request_cancel(run_id, "interrupted by a newer message")

        now = utcnow()
        message_id, run_id = new_id(), new_id()
        message_row: dict[str, Any] = {
            "id": message_id, "thread_id": thread_id, "user_id": user_id, "role": "user",
            "content": content, "run_id": run_id, "client_message_id": client_message_id, "created_at": now,
            "metadata": {}}
        run_row = {"id": run_id, "thread_id": thread_id, "user_id": user_id, "agent": agent_name,
                   "status": "queued", "input_message_id": message_id, "created_at": now,
                   "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0,
                   "worker_id": self.worker_id,
                   "lease_until": now + timedelta(seconds=self.settings.run_lease_s)}
        message_fields = _message_fields(message_row)
        event = NewEvent(thread_id, None, EventType.MESSAGE_CREATED, {"message": message_fields})
        request = WriteRequest(events=[event], messages=[message_row], runs=[run_row], owner_id=user_id)
        submission = Submission(message=MessageOut.model_validate(message_fields), run=_run_out(run_row),
                                created=True, user_id=user_id, request_id=request_id, is_admin=is_admin)
        if acknowledge is not None and session is None:  # (a session is opened only for a message that reads)
            return await self._submit_and_launch(submission, request, acknowledge)
        try:
            stored = await self.event_log.write_for_client(request)
        except IntegrityError:
            if client_message_id is None or session is None:
                raise
            # The same client_message_id raced in from another request: answer as the winner did.
            existing = await self._existing_submission(session, thread_id, user_id, client_message_id)
            if existing is None:
                raise
            return existing
        return dataclasses.replace(submission, message_seq=stored[0].seq)

    async def _submit_and_launch(self, submission: Submission, request: WriteRequest,
                                 acknowledge: Callable[[Submission], None]) -> Submission:
        def stored(events: list[StoredEvent]) -> None:
            acknowledge(dataclasses.replace(submission, message_seq=events[0].seq, launched=True))

        started_early = False

        def queued() -> None:
            # Only if no other message to this thread is being submitted: one that was queued first, on a path
            # that starts its run after the commit, must keep its place in the thread's line.
            nonlocal started_early
            if self._submitting_threads[submission.user_id, submission.run.thread_id] == 1:
                self.launch(submission, request)
                started_early = True

        request.on_stored = stored
        try:
            events = await self.event_log.write_for_client(request, queued=queued)
        except BaseException:
            if request.outcome is not True:  # not stored: the run, started or not, ends without a trace
                self._cancel_local(submission.run.id, "its message could not be stored")
            raise
        if not started_early:
            self.launch(submission)  # after the commit, as any other message's (the ack went out with it)
        return dataclasses.replace(submission, message_seq=events[0].seq, launched=True)

    def validate(self, content: str, agent: str | None, is_admin: bool, user_id: str) -> str:
        """Refuses, before anything is made for it, a message that could not start a run now: the service is
        not taking runs, the content is too long, the agent unknown, or the user has too many runs waiting.
        Returns the agent it would use."""
        if not self._accepting:
            raise ServiceUnavailable.not_running(draining=self._stopping)
        if sum(1 for run in self._local.values() if run.user_id == user_id) + self._submitting[user_id] >= \
                self.settings.max_queued_runs_per_user:
            raise RateLimited("Too many runs are waiting; retry when some have finished.", retry_after=5)
        if len(content) > self.settings.max_message_chars:
            raise InvalidRequest(details=[{"field": "content", "type": "too_long",
                                           "message": f"at most {self.settings.max_message_chars} characters"}])
        agent_name = agent or self.settings.default_agent
        self.agents.get(agent_name, is_admin)
        return agent_name

    async def _existing_submission(self, session: AsyncSession, thread_id: str, user_id: str,
                                   client_message_id: str) -> Submission | None:
        message = await MessageRepository(session).find_by_client_id(thread_id, client_message_id)
        if message is None or message.user_id != user_id:
            return None
        run = await session.get(Run, message.run_id) if message.run_id else None
        if run is None:
            return None
        return Submission(message=MessageOut.of(message), run=RunOut.of(run), created=False, user_id=user_id)

    @staticmethod
    async def _unfinished_run_ids(session: AsyncSession, thread_id: str, user_id: str) -> list[str]:
        rows = await session.scalars(select(Run.id).where(
            Run.thread_id == thread_id, Run.user_id == user_id, Run.status.in_(UNFINISHED_STATUSES)))
        return list(rows)

    def launch(self, submission: Submission, after: WriteRequest | None = None) -> None:
        """Starts executing a submitted run (after the caller has told its client about it). With `after` (its
        message's write, still queued), the run's writes are stored only if that one is."""
        if not submission.created or submission.launched or self._stopping:
            return
        run = submission.run
        local = _LocalRun(run.id, run.thread_id, submission.user_id, previous=self._thread_tail.get(run.thread_id),
                          after=after)
        self._thread_tail[run.thread_id] = local.done
        self._local[run.id] = local
        local.task = asyncio.create_task(self._execute(local, submission), name=f"run-{run.id}")

    # --- cancelling ----------------------------------------------------------------------------------------
    async def cancel(self, session: AsyncSession, user_id: str, run_id: str,
                     before: Callable[[RunOut], None] | None = None) -> RunOut:
        """Cancels the user's run (a finished run is returned unchanged). `before` is told of the run first,
        so an acknowledgement can precede the run's `agent_cancelled`."""
        run = await session.scalar(select(Run).where(Run.id == run_id, Run.user_id == user_id))
        if run is None:
            raise RunNotFound()
        found = RunOut.of(run)
        if before is not None:
            before(found)
        if run.status not in FINISHED_STATUSES:
            await self.request_cancel(run_id, "cancelled by the user")
        return found

    async def request_cancel(self, run_id: str, reason: str) -> None:
        if run_id in self._local:
            self._cancel_local(run_id, reason)
        else:  # executing in another process (or nowhere: the sweeper will interrupt it)
            await self.bus.send_control({"type": "cancel_run", "run_id": run_id, "reason": reason})

    async def cancel_thread_runs(self, thread_id: str) -> None:
        for run_id, local in list(self._local.items()):
            if local.thread_id == thread_id:
                self._cancel_local(run_id, "the thread was deleted")

    def _cancel_local(self, run_id: str, reason: str, interrupted: bool = False) -> None:
        local = self._local.get(run_id)
        if local is None or local.task is None or local.task.done() or local.cancel_reason is not None \
                or local.finishing:
            return
        local.cancel_reason, local.interrupted = reason, interrupted
        if local.started:  # else its first step sees the reason and ends the run cancelled
            local.task.cancel()

    async def _on_control(self, message: dict[str, Any]) -> None:
        if message.get("type") == "cancel_run" and message.get("run_id") in self._local:
            self._cancel_local(str(message["run_id"]), str(message.get("reason") or "cancelled"))

    # --- executing -----------------------------------------------------------------------------------------
    async def _execute(self, local: _LocalRun, submission: Submission) -> None:
        run = submission.run
        ctx = UserExecutionContext(user_id=local.user_id, thread_id=run.thread_id, run_id=run.id,
                                   request_id=submission.request_id, agent=run.agent, is_admin=submission.is_admin)
        state = _RunState(llm=MeteredLLM(self.llm, ctx, self.telemetry, self.prices), after=local.after)
        # This task's own log context: every line it (or a tool) writes can be followed by run_id.
        structlog.contextvars.bind_contextvars(**ctx.log_fields(), agent=ctx.agent)
        local.started = True
        try:
            try:
                if local.cancel_reason is not None:
                    raise asyncio.CancelledError  # cancelled before this task first ran
                if local.previous is not None:
                    await asyncio.shield(local.previous)  # runs of one thread execute in order
                async with self._user_slot(local.user_id):
                    state.started_at = utcnow()
                    await self._emit(ctx, state, EventType.AGENT_STARTED,
                                     {"agent": run.agent, "input_message_id": submission.message.id},
                                     run_changes=[RunChange(run.id, {"status": "running",
                                                                     "started_at": state.started_at})])
                    state.announced = True  # (a cancel while it waited for room in the queue left it out)
                    agent = self.agents.get(run.agent, submission.is_admin)
                    async with asyncio.timeout(self.settings.run_timeout_s):
                        async for event in await self._agent_events(agent, ctx, state.llm, submission.message):
                            if isinstance(event, TextChunk):  # most of a run's events: straight to the log
                                state.answer.append(event.text)
                                await self.event_log.emit(
                                    self._event(ctx, EventType.AGENT_DELTA, {"text": event.text}), ctx.user_id,
                                    after=state.after)
                            else:
                                await self._record(ctx, event, state)
                local.finishing = True
                await self._finish_completed(ctx, state)
            except asyncio.CancelledError:
                if local.cancel_reason is None:
                    raise  # not ours: the loop itself is going away
                local.finishing = True
                await self._finish_cancelled(ctx, state, local)
            except (ThreadGone, PrecedingWriteFailed):
                raise  # deleted under the run, or its message never stored: nothing left to write to
            except TimeoutError:
                local.finishing = True
                await self._finish_error(ctx, state, "run_timeout",
                                         f"The run took longer than {self.settings.run_timeout_s:g} s.", "failed")
            except LLMError as exc:
                local.finishing = True
                log.warning("run_llm_failed", code=exc.code, reason=exc.detail, **ctx.log_fields())
                await self._finish_error(ctx, state, exc.code, exc.message, "failed")
            except Exception:  # the run's boundary: log with context, end the run cleanly
                local.finishing = True
                log.exception("run_failed", **ctx.log_fields())
                await self._finish_error(ctx, state, "agent_failed", "The agent failed unexpectedly.", "failed")
        except ThreadGone:  # the user deleted the thread: its runs, messages and events went with it
            log.info("run_thread_deleted", **ctx.log_fields())
        except PrecedingWriteFailed:  # its message was not stored (the caller was told): neither is the run
            log.info("run_message_not_stored", **ctx.log_fields())
        except Exception:  # even the terminal event could not be stored; the sweeper will interrupt the run
            log.exception("run_terminal_write_failed", **ctx.log_fields())
        finally:
            self._forget(local)

    async def _agent_events(self, agent: Agent, ctx: UserExecutionContext, llm: LLMProvider,
                            message: MessageOut) -> AsyncIterator[Any]:
        """The agent's run, ready to iterate, with this run's own dispatcher (gone with it)."""
        dispatcher = ToolDispatcher(ctx, self.tools.select(agent.tool_names))
        history = await self._history(ctx, message)
        run_input = AgentInput(history=history, dispatcher=dispatcher, llm=llm,
                               max_steps=self.settings.agent_max_steps)
        return agent.run(ctx, run_input)

    async def _record(self, ctx: UserExecutionContext, event: Any, state: _RunState) -> None:
        if isinstance(event, Thinking):  # (text deltas are handled by the run loop itself)
            await self._emit(ctx, state, EventType.AGENT_THINKING, {"text": event.text})
        elif isinstance(event, ToolStarted):
            await self._emit(ctx, state, EventType.TOOL_EXECUTING,
                             {"call_id": event.call_id, "tool": event.tool, "arguments": event.arguments})
        elif isinstance(event, ToolFinished):
            outcome = event.outcome
            payload: dict[str, Any] = {"call_id": outcome.call_id, "tool": outcome.tool, "ok": outcome.ok,
                                       "duration_ms": outcome.duration_ms}
            payload.update({"result": outcome.result} if outcome.ok else {"error": outcome.error})
            state.tool_calls.append({**payload, "arguments": outcome.arguments})
            self.telemetry.record(ToolCallRecord(
                ts=utcnow(), user_id=ctx.user_id, thread_id=ctx.thread_id, run_id=ctx.run_id, agent=ctx.agent,
                tool=outcome.tool, duration_ms=outcome.duration_ms, ok=outcome.ok))
            await self._emit(ctx, state, EventType.TOOL_COMPLETED, payload)
        elif isinstance(event, Finished):
            state.usage = event.usage

    async def _history(self, ctx: UserExecutionContext, message: MessageOut) -> tuple[ChatMessage, ...]:
        """The thread's recent messages, ending with the run's own `message`. A run can start before its message
        is stored (then it is added), or after later ones were: the user's later messages are left for their
        own runs, and answers stored after it (to earlier messages, sent while those ran) come before it."""
        items = self.history.get(ctx.thread_id)
        if items is None:
            items = await self._read_history(ctx)
        ids = [message_id for message_id, _ in items]
        if message.id in ids:
            index = ids.index(message.id)
            answers = tuple(item for item in items[index + 1:] if item[1].role == "assistant")
            items = (*items[:index], *answers, items[index])
        else:
            items = (*items, history_item(message.id, "user", message.content))[-HISTORY_MESSAGES:]
        return tuple(chat for _, chat in items)

    async def _read_history(self, ctx: UserExecutionContext) -> tuple[HistoryItem, ...]:
        last_seq = select(Thread.last_seq).where(Thread.id == ctx.thread_id).scalar_subquery()
        async with self.database.engine.connect() as connection:
            # One statement, so the messages and the seq they are current to come from one snapshot.
            rows = (await connection.execute(
                select(Message.id, Message.role, Message.content, last_seq)
                .where(Message.thread_id == ctx.thread_id, Message.user_id == ctx.user_id,
                       Message.role.in_(("user", "assistant")))
                .order_by(Message.created_at.desc(), Message.id.desc())
                .limit(HISTORY_MESSAGES)
            )).all()
        items = tuple(history_item(message_id, role, content) for message_id, role, content, _ in reversed(rows))
        if rows:
            self.history.put(ctx.thread_id, items, int(rows[0][3]))
        return items

    @contextlib.asynccontextmanager
    async def _user_slot(self, user_id: str) -> AsyncIterator[None]:
        slots = self._user_slots.get(user_id)
        if slots is None:
            slots = self._user_slots[user_id] = asyncio.Semaphore(self.settings.max_concurrent_runs_per_user)
        async with slots:
            yield

    def _forget(self, local: _LocalRun) -> None:
        self._local.pop(local.run_id, None)
        if not any(run.user_id == local.user_id for run in self._local.values()):
            self._user_slots.pop(local.user_id, None)
        # A run cancelled while it waited its turn leaves now, but its place in the thread's line holds until
        # the runs ahead of it have ended: the runs behind it still wait for those.
        if local.previous is not None and not local.previous.done():
            local.previous.add_done_callback(lambda _: self._end_turn(local))
        else:
            self._end_turn(local)

    def _end_turn(self, local: _LocalRun) -> None:
        local.previous = None
        if not local.done.done():
            local.done.set_result(None)
        if self._thread_tail.get(local.thread_id) is local.done:
            del self._thread_tail[local.thread_id]

    # --- events --------------------------------------------------------------------------------------------
    async def _emit(self, ctx: UserExecutionContext, state: _RunState, type_: EventType, payload: dict[str, Any],
                    run_changes: Sequence[RunChange] = ()) -> None:
        """Queues one of the run's events for the log without waiting for the commit (it is still stored
        before anyone is sent it); the write only lands in the run's user's own thread."""
        await self.event_log.emit(self._event(ctx, type_, payload), ctx.user_id, run_changes, state.after)

    @staticmethod
    def _event(ctx: UserExecutionContext, type_: EventType, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(ctx.thread_id, ctx.run_id, type_, payload)

    @staticmethod
    def _started_event(ctx: UserExecutionContext, started: bool) -> list[NewEvent]:
        return [] if started else [started_event(ctx.thread_id, ctx.run_id, ctx.agent)]

    async def _finish(self, ctx: UserExecutionContext, state: _RunState, terminal: NewEvent, status: str,
                      changes: dict[str, Any], messages: Sequence[dict[str, Any]] = ()) -> None:
        """Stores the run's one terminal event with its final state (shielded: a second cancel cannot stop
        it), then records the run for analytics."""
        now = utcnow()
        usage = state.usage
        await asyncio.shield(self.event_log.write(WriteRequest(
            events=[*self._started_event(ctx, state.announced), terminal], messages=messages,
            run_changes=[RunChange(ctx.run_id, {
                "status": status, "finished_at": now, "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens, "model": usage.model, "cost_usd": state.llm.cost_usd,
                "lease_until": None, **changes})],
            owner_id=ctx.user_id, after=state.after)))
        duration = (now - state.started_at).total_seconds() * 1000 if state.started_at else 0.0
        self.telemetry.record(RunRecord(
            ts=now, user_id=ctx.user_id, thread_id=ctx.thread_id, run_id=ctx.run_id, agent=ctx.agent,
            model=usage.model, status=status, duration_ms=round(duration, 3), input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cost_usd=state.llm.cost_usd))

    async def _finish_completed(self, ctx: UserExecutionContext, state: _RunState) -> None:
        meta: dict[str, Any] = {"tool_calls": state.tool_calls} if state.tool_calls else {}
        usage = state.usage
        usage_out = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                     "cost_usd": state.llm.cost_usd}
        meta["usage"] = usage_out
        message_row = {"id": new_id(), "thread_id": ctx.thread_id, "user_id": ctx.user_id, "role": "assistant",
                       "content": "".join(state.answer), "run_id": ctx.run_id, "client_message_id": None,
                       "created_at": utcnow(), "metadata": meta}
        completed = self._event(ctx, EventType.AGENT_COMPLETED,
                                {"message": _message_fields(message_row), "usage": usage_out})
        await self._finish(ctx, state, completed, "completed", {}, [message_row])

    async def _finish_error(self, ctx: UserExecutionContext, state: _RunState, code: str, message: str,
                            status: str) -> None:
        error = self._event(ctx, EventType.AGENT_ERROR, {"error": {"code": code, "message": message}})
        await self._finish(ctx, state, error, status, {"error_code": code, "error_message": message[:500]})

    async def _finish_cancelled(self, ctx: UserExecutionContext, state: _RunState, local: _LocalRun) -> None:
        if local.interrupted:
            await self._finish_error(ctx, state, "interrupted", INTERRUPTED_MESSAGE, "interrupted")
            return
        cancelled = self._event(ctx, EventType.AGENT_CANCELLED, {"reason": local.cancel_reason or "cancelled"})
        await self._finish(ctx, state, cancelled, "cancelled", {})

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self.bus.on_control(self._on_control)
        await self.leases.start()  # its first sweep must not meet runs submitted meanwhile
        self._accepting = True

    async def stop(self, deadline_s: float) -> None:
        """Interrupts this process's runs, each ending with its terminal event, within the deadline."""
        self._stopping = True
        self._accepting = False
        await self.leases.stop()
        locals_ = list(self._local.values())
        for local in locals_:
            self._cancel_local(local.run_id, "server shutting down", interrupted=True)
        tasks = [local.task for local in locals_ if local.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=deadline_s)

    @property
    def active_runs(self) -> int:
        return len(self._local)


def _release(counter: Counter[Any], key: Any) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _message_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A messages row as the API shows it (`MessageOut`'s fields, in its order)."""
    return {"id": row["id"], "thread_id": row["thread_id"], "role": row["role"], "content": row["content"],
            "run_id": row["run_id"], "created_at": rfc3339(row["created_at"]), "metadata": row["metadata"]}


def _run_out(row: dict[str, Any]) -> RunOut:
    """A just-queued run as the API shows it, from the row being inserted."""
    unset = {"started_at": None, "finished_at": None, "error_code": None, "error_message": None}
    return RunOut.of(cast(Run, SimpleNamespace(**unset, **row)))  # an ORM instance costs ten times as much
