"""What one authenticated WebSocket connection can do: a handler for every client message type.

Handlers answer with `ack` or `error` (echoing the client's `id`); no failure of one message ends the
connection. Subscriptions are `ThreadFeed`s that write into the connection's queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from parley.agents.runs import RunManager, Submission
from parley.agents.schemas import RunOut
from parley.auth.tokens import Principal
from parley.clock import utcnow
from parley.errors import ParleyError
from parley.observability.logging import get_logger
from parley.observability.telemetry import Telemetry
from parley.realtime.bus import EventBus
from parley.realtime.connection import CLOSE_NORMAL, Connection
from parley.realtime.event_log import EventLog
from parley.realtime.events import EventType, StoredEvent, envelope
from parley.realtime.feed import ThreadFeed
from parley.realtime.protocol import (
    ClientMessage,
    ClientMessageType,
    Handler,
    MessageRouter,
    StartAgentPayload,
    StopAgentPayload,
    SubscribePayload,
    UnsubscribePayload,
    UserMessagePayload,
)
from parley.storage.database import Database
from parley.storage.models import Run, RunEvent, Thread
from parley.threads.repository import ThreadRepository
from parley.threads.schemas import ThreadOut

log = get_logger("parley.ws")

MAX_SUBSCRIPTIONS = 100
TITLE_FROM_CONTENT = 60


class TooManySubscriptions(ParleyError):
    code = "too_many_subscriptions"
    message = f"At most {MAX_SUBSCRIPTIONS} threads per connection; unsubscribe from one first."


@dataclass(frozen=True)
class SessionServices:
    database: Database
    bus: EventBus
    runs: RunManager
    telemetry: Telemetry


class ClientSession:
    def __init__(self, connection: Connection, principal: Principal, services: SessionServices) -> None:
        self.connection = connection
        self.principal = principal
        self.services = services
        self.feeds: dict[str, ThreadFeed] = {}

    # --- sending -------------------------------------------------------------------------------------------
    def send(self, type_: EventType, payload: dict[str, Any], request_id: str | None = None,
             thread_id: str | None = None) -> None:
        self.connection.send(envelope(type_, payload, request_id=request_id, thread_id=thread_id, ts=utcnow()))

    def send_error(self, code: str, message: str, request_id: str | None = None,
                   details: list[dict[str, Any]] | None = None) -> None:
        payload: dict[str, Any] = {"code": code, "message": message}
        if details:
            payload["details"] = details
        self.send(EventType.ERROR, payload, request_id)

    # --- subscriptions -------------------------------------------------------------------------------------
    async def subscribe(self, thread_id: str, after_seq: int) -> None:
        old = self.feeds.pop(thread_id, None)
        if old is not None:
            old.close()
        if len(self.feeds) >= MAX_SUBSCRIPTIONS:
            raise TooManySubscriptions()
        feed = ThreadFeed(thread_id, after_seq, self._read_events, self._send_live, self._send_replayed,
                          on_failure=self._feed_failed)
        self.feeds[thread_id] = feed
        await feed.start(self.services.bus)

    def _feed_failed(self, thread_id: str) -> None:
        self.feeds.pop(thread_id, None)
        self.send(EventType.ERROR, {"code": "subscription_failed",
                                    "message": "The thread's events could not be read; subscribe again."},
                  thread_id=thread_id)

    def _send_live(self, event: StoredEvent) -> bool:
        sent = self.connection.send(event.wire)
        self.services.telemetry.run_events("sent" if sent else "dropped")
        return sent

    async def _send_replayed(self, event: StoredEvent) -> bool:
        sent = await self.connection.send_when_room(event.wire)
        self.services.telemetry.run_events("resent" if sent else "dropped")
        return sent

    async def _read_events(self, thread_id: str, after_seq: int, limit: int) -> list[StoredEvent]:
        async with self.services.database.session() as session:
            return await EventLog.read(session, thread_id, after_seq, limit)

    def close(self) -> None:
        for feed in self.feeds.values():
            feed.close()
        self.feeds.clear()

    # --- handlers ------------------------------------------------------------------------------------------
    async def on_ping(self, message: ClientMessage[Any]) -> None:
        self.send(EventType.PONG, {}, message.id)

    async def on_user_message(self, message: ClientMessage[UserMessagePayload]) -> None:
        body = message.payload
        await self._converse(message.id, body.thread_id, body.content, body.agent, body.on_busy,
                             body.client_message_id)

    async def on_start_agent(self, message: ClientMessage[StartAgentPayload]) -> None:
        body = message.payload
        await self._converse(message.id, body.thread_id, body.input, body.agent, body.on_busy, None)

    async def _converse(self, request_id: str | None, thread_id: str | None, content: str, agent: str | None,
                        on_busy: str, client_message_id: str | None) -> None:
        user_id = self.principal.user_id
        # Everything that can refuse the message is checked before anything (a new thread) is made.
        if thread_id not in self.feeds and len(self.feeds) >= MAX_SUBSCRIPTIONS:
            raise TooManySubscriptions()
        self.services.runs.validate(content, agent, self.principal.is_admin, user_id)
        if thread_id is None:
            async with self.services.database.session() as session:
                thread = await ThreadRepository(session).create(user_id, _title_from(content), None)
                await session.commit()
            thread_id = thread.id
            self.send(EventType.THREAD_CREATED, {"thread": ThreadOut.of(thread).model_dump()}, request_id,
                      thread_id)

        def acknowledge(submission: Submission) -> None:
            self.send(EventType.ACK, {"message_id": submission.message.id, "run_id": submission.run.id,
                                      "thread_id": submission.run.thread_id}, request_id, submission.run.thread_id)

        # No read first: the write checks that the thread is this user's (else `not_found`). A session is
        # opened only if the message needs one (idempotency, the busy policy). On a thread this connection
        # already follows (so it is the user's), the run may start while the message is being stored; the
        # `ack` then goes out as soon as it is, between `message_created` and the run's first event.
        following = thread_id in self.feeds
        submission = await self.services.runs.submit(
            None, thread_id, user_id, content, agent=agent, on_busy=on_busy, client_message_id=client_message_id,
            request_id=request_id or self.connection.id, is_admin=self.principal.is_admin,
            acknowledge=acknowledge if following else None)
        if submission.launched:
            return
        acknowledge(submission)
        if thread_id not in self.feeds:
            # The client knows its own message: its feed starts with the run. A repeated submission (same
            # client_message_id) starts where its run's events begin.
            after = submission.message_seq
            if after is None:
                after = await self._seq_before_run(submission.run.id)
            await self.subscribe(thread_id, after)
        self.services.runs.launch(submission)

    async def _seq_before_run(self, run_id: str) -> int:
        async with self.services.database.session() as session:
            first = await session.scalar(select(func.min(RunEvent.seq)).where(RunEvent.run_id == run_id))
            if first is not None:
                return int(first) - 1
            run_thread = await session.scalar(select(Run.thread_id).where(Run.id == run_id))
            last = await session.scalar(select(Thread.last_seq).where(Thread.id == run_thread))
            return int(last or 0)

    async def on_stop_agent(self, message: ClientMessage[StopAgentPayload]) -> None:
        def acknowledge(run: RunOut) -> None:  # before the cancellation, so `ack` precedes `agent_cancelled`
            self.send(EventType.ACK, {"run_id": run.id, "status": run.status}, message.id, run.thread_id)

        async with self.services.database.session() as session:
            await self.services.runs.cancel(session, self.principal.user_id, message.payload.run_id, acknowledge)

    async def on_subscribe(self, message: ClientMessage[SubscribePayload]) -> None:
        body = message.payload
        async with self.services.database.session() as session:
            thread = await ThreadRepository(session).get_for_user(self.principal.user_id, body.thread_id)
        self.send(EventType.ACK, {"thread_id": thread.id, "after_seq": body.after_seq}, message.id, thread.id)
        await self.subscribe(thread.id, body.after_seq)

    async def on_unsubscribe(self, message: ClientMessage[UnsubscribePayload]) -> None:
        feed = self.feeds.pop(message.payload.thread_id, None)
        if feed is not None:
            feed.close()
        self.send(EventType.ACK, {"thread_id": message.payload.thread_id}, message.id)

    async def on_disconnect(self, message: ClientMessage[Any]) -> None:
        # Answers to what the client said before `disconnect` still go out, then the close; nothing after.
        self.connection.close(CLOSE_NORMAL, "bye", flush=True)


def _title_from(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_FROM_CONTENT else line[: TITLE_FROM_CONTENT - 1].rstrip() + "…"


# The one table of handlers; `MessageRouter` refuses to be built if a message type is missing from it.
HANDLERS: dict[ClientMessageType, Handler] = {
    ClientMessageType.PING: ClientSession.on_ping,
    ClientMessageType.USER_MESSAGE: ClientSession.on_user_message,
    ClientMessageType.START_AGENT: ClientSession.on_start_agent,
    ClientMessageType.STOP_AGENT: ClientSession.on_stop_agent,
    ClientMessageType.SUBSCRIBE: ClientSession.on_subscribe,
    ClientMessageType.UNSUBSCRIBE: ClientSession.on_unsubscribe,
    ClientMessageType.DISCONNECT: ClientSession.on_disconnect,
}


def build_router() -> MessageRouter:
    return MessageRouter(HANDLERS)

