"""Cancellation races inside one process, driven on the test's own event loop against a real database:
a stop that lands before a run's task first runs, and one that lands while the run stores its answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest

from parley.agents.base import AgentEvent, AgentInput, Finished, TextChunk
from parley.agents.context import UserExecutionContext
from parley.app import build_services
from parley.errors import ServiceUnavailable
from parley.http.deps import AppServices
from parley.llm.base import Usage
from parley.realtime.event_log import EventLog, WriteRequest
from parley.realtime.events import EventType, NewEvent
from parley.threads.repository import ThreadRepository
from tests.conftest import SettingsFactory

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


class StopsItselfAtTheEnd:
    """Answers at once; after its last event it asks for its own run to be stopped, which lands while the run
    is storing its terminal event."""

    name: ClassVar[str] = "stops_itself"
    description: ClassVar[str] = "Asks to be stopped as it finishes."
    tool_names: ClassVar[tuple[str, ...]] = ()
    admin_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self.stop: Callable[[str], Any] | None = None

    async def run(self, ctx: UserExecutionContext, run_input: AgentInput) -> AsyncIterator[AgentEvent]:
        yield TextChunk("done")
        yield Finished(Usage(1, 1, "test"))
        assert self.stop is not None
        asyncio.get_running_loop().call_soon(self.stop, ctx.run_id)


class WaitsForTheGate:
    """Holds its run open until the test opens the gate."""

    name: ClassVar[str] = "waits_for_gate"
    description: ClassVar[str] = "Answers once the gate opens."
    tool_names: ClassVar[tuple[str, ...]] = ()
    admin_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def run(self, ctx: UserExecutionContext, run_input: AgentInput) -> AsyncIterator[AgentEvent]:
        self.entered.set()
        await self.gate.wait()
        yield TextChunk("opened")
        yield Finished(Usage(1, 1, "test"))


@pytest.fixture
async def started(make_settings: SettingsFactory) -> AsyncIterator[tuple[AppServices, StopsItselfAtTheEnd]]:
    agent = StopsItselfAtTheEnd()
    services = build_services(make_settings(builtin_token_delay_s=0), extra_agents=[agent])
    runs = services.runs
    agent.stop = lambda run_id: asyncio.ensure_future(runs.request_cancel(run_id, "stopped by the user"))
    await services.lifecycle.start()
    yield services, agent
    services.lifecycle.begin_drain()
    await services.lifecycle.stop(10)


async def submit(services: AppServices, agent: str | None = None) -> Any:
    async with services.database.session() as session:
        user = await services.auth.create_user(session, "racer@example.com", "a-long-password-1")
        thread = await ThreadRepository(session).create(user.id, None, None)
        await session.commit()
        return await services.runs.submit(session, thread.id, user.id, "hello", agent=agent, on_busy="enqueue",
                                          client_message_id=None, request_id="req-1", is_admin=False)


async def run_events(services: AppServices, thread_id: str, run_id: str) -> list[str]:
    async with services.database.session() as session:
        events = await EventLog.read(session, thread_id, 0, 1000)
    return [event.type for event in events if event.run_id == run_id]


async def wait_until_idle(services: AppServices) -> None:
    for _ in range(200):
        if services.runs.active_runs == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the run never finished")


async def test_a_run_stopped_before_its_task_first_runs_still_ends_and_frees_its_thread(
        started: tuple[AppServices, StopsItselfAtTheEnd]) -> None:
    services, _ = started
    submission = await submit(services)
    run = submission.run
    services.runs.launch(submission)
    await services.runs.request_cancel(run.id, "stopped by the user")  # no await in between that would run it

    await wait_until_idle(services)
    assert await run_events(services, run.thread_id, run.id) == ["agent_started", "agent_cancelled"]

    # The thread is not left waiting behind a run that never ended: the next one runs to completion.
    async with services.database.session() as session:
        following = await services.runs.submit(session, run.thread_id, submission.user_id, "what is 1+1",
                                                agent=None, on_busy="enqueue", client_message_id=None,
                                                request_id="req-2", is_admin=False)
    services.runs.launch(following)
    await wait_until_idle(services)
    events = await run_events(services, run.thread_id, following.run.id)
    assert events[0] == "agent_started" and events[-1] == "agent_completed"


async def test_a_stop_that_lands_while_the_answer_is_stored_is_too_late(
        started: tuple[AppServices, StopsItselfAtTheEnd]) -> None:
    services, _ = started
    submission = await submit(services, agent="stops_itself")
    run = submission.run
    services.runs.launch(submission)

    await wait_until_idle(services)
    events = await run_events(services, run.thread_id, run.id)
    assert [e for e in events if e in TERMINAL] == ["agent_completed"]  # one terminal event, never two
    async with services.database.session() as session:
        out = await services.runs.cancel(session, submission.user_id, run.id)
    assert out.status == "completed"


async def test_no_message_is_taken_before_the_orphan_sweep_has_run(make_settings: SettingsFactory) -> None:
    """Until the run manager has started (its first sweep interrupts the runs a dead process left), and again
    once it stops, a submission is a 503 `starting`/`draining`, never a run the sweep could take for an orphan."""
    services = build_services(make_settings())
    try:
        async with services.database.session() as session:
            with pytest.raises(ServiceUnavailable) as refused:
                await services.runs.submit(session, "thread", "user", "hello", agent=None, on_busy="enqueue",
                                           client_message_id=None, request_id="req", is_admin=False)
        assert refused.value.code == "starting" and refused.value.status == 503
    finally:
        await services.database.dispose()


async def test_a_waiting_run_that_is_cancelled_keeps_the_line_for_the_runs_behind_it(
        make_settings: SettingsFactory) -> None:
    """`enqueue` runs one run of a thread at a time, in order. Cancelling one that still waits its turn ends it
    at once, but the runs behind it go on waiting for the one still executing ahead of it."""
    gated = WaitsForTheGate()
    services = build_services(make_settings(builtin_token_delay_s=0), extra_agents=[gated])
    await services.lifecycle.start()
    try:
        first = await submit(services, agent="waits_for_gate")
        thread_id, user_id = first.run.thread_id, first.user_id
        services.runs.launch(first)
        await gated.entered.wait()

        async def enqueue(content: str) -> Any:
            async with services.database.session() as session:
                submission = await services.runs.submit(
                    session, thread_id, user_id, content, agent=None, on_busy="enqueue", client_message_id=None,
                    request_id="req", is_admin=False)
            services.runs.launch(submission)
            return submission

        second = await enqueue("what is 1+1")
        third = await enqueue("what is 2+2")
        await services.runs.request_cancel(second.run.id, "stopped by the user")
        fourth = await enqueue("what is 3+3")  # submitted after the cancel, while the first still runs
        await asyncio.sleep(0.3)

        assert await run_events(services, thread_id, second.run.id) == ["agent_started", "agent_cancelled"]
        assert await run_events(services, thread_id, third.run.id) == []  # still behind the first
        assert await run_events(services, thread_id, fourth.run.id) == []

        gated.gate.set()
        await wait_until_idle(services)
        async with services.database.session() as session:
            events = await EventLog.read(session, thread_id, 0, 1000)
        order = [(event.run_id, event.type) for event in events
                 if event.type in ("agent_started", "agent_completed") and event.run_id != second.run.id]
        assert order == [(first.run.id, "agent_started"), (first.run.id, "agent_completed"),
                         (third.run.id, "agent_started"), (third.run.id, "agent_completed"),
                         (fourth.run.id, "agent_started"), (fourth.run.id, "agent_completed")]
    finally:
        gated.gate.set()
        services.lifecycle.begin_drain()
        await services.lifecycle.stop(10)


async def test_a_run_stopped_while_its_start_waits_for_room_in_the_log_still_begins_with_agent_started(
        make_settings: SettingsFactory) -> None:
    """A run's events begin with `agent_started` even when it is cancelled while that event waits for room in a
    full write queue (the database is slow): the terminal write then adds it."""
    services = build_services(make_settings(builtin_token_delay_s=0, event_log_queue_max=100))
    await services.lifecycle.start()
    log = services.runs.event_log
    try:
        submission = await submit(services)
        run = submission.run
        def elsewhere(index: int) -> WriteRequest:  # another thread's write: none joins the run's
            return WriteRequest(events=[NewEvent(f"elsewhere-{index}", None, EventType.AGENT_DELTA, {"text": "x"})])

        async with log.store._lock:  # the writer stalls on its next commit, as on a database that hangs
            await log.write(elsewhere(0), wait=False)
            await asyncio.sleep(0.05)  # the writer has taken it and waits for the database
            while log.backlog < 100:  # then the queue fills up
                await log.write(elsewhere(log.backlog + 1), wait=False)
            services.runs.launch(submission)
            for _ in range(100):
                await asyncio.sleep(0)  # the run's task now waits to put `agent_started` in the full queue
            await services.runs.request_cancel(run.id, "stopped by the user")
            await asyncio.sleep(0.05)
        await wait_until_idle(services)
        assert await run_events(services, run.thread_id, run.id) == ["agent_started", "agent_cancelled"]
    finally:
        services.lifecycle.begin_drain()
        await services.lifecycle.stop(10)


async def test_a_message_that_would_start_early_keeps_its_place_behind_one_queued_first(
        make_settings: SettingsFactory) -> None:
    """Two messages to one thread: the first on a path that starts its run after the commit (REST), the second
    from a connection that follows the thread, queued while the first is still being stored. The second must
    not start ahead of the first: the thread's runs go in the order of their messages."""
    services = build_services(make_settings(builtin_token_delay_s=0))
    await services.lifecycle.start()
    log = services.runs.event_log
    try:
        first = await submit(services)
        services.runs.launch(first)
        await wait_until_idle(services)
        thread_id, user_id = first.run.thread_id, first.user_id

        async def post(content: str) -> Any:  # as the REST route does: launch as soon as it is stored
            submission = await services.runs.submit(None, thread_id, user_id, content, agent=None,
                                                    on_busy="enqueue", client_message_id=None, request_id="rest",
                                                    is_admin=False)
            services.runs.launch(submission)
            return submission

        acknowledged: list[str] = []
        async with log.store._lock:  # both messages wait in the queue together
            over_rest = asyncio.ensure_future(post("what is 1+1"))
            await asyncio.sleep(0)
            over_ws = asyncio.ensure_future(services.runs.submit(
                None, thread_id, user_id, "what is 2+2", agent=None, on_busy="enqueue", client_message_id=None,
                request_id="ws", is_admin=False, acknowledge=lambda s: acknowledged.append(s.run.id)))
            await asyncio.sleep(0.05)
        rest, ws = await over_rest, await over_ws
        await wait_until_idle(services)

        assert acknowledged == [ws.run.id]
        async with services.database.session() as session:
            events = await EventLog.read(session, thread_id, 0, 1000)
        started = [event.run_id for event in events if event.type == "agent_started"]
        assert started[-2:] == [rest.run.id, ws.run.id]
    finally:
        services.lifecycle.begin_drain()
        await services.lifecycle.stop(10)
