"""The event log against a real database: a thread's seq never skips a number, whatever a batch holds, and a
feed that meets a gap anyway moves past it instead of spinning."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError

from parley.realtime.bus import InProcessEventBus
from parley.realtime.event_log import EventLog, PrecedingWriteFailed, ThreadGone, WriteRequest
from parley.realtime.event_store import EventStore, write_batch
from parley.realtime.events import EventType, NewEvent, StoredEvent
from parley.realtime.feed import FeedState, ThreadFeed
from parley.storage.database import Database, is_database_unavailable
from parley.storage.migrate import upgrade
from parley.storage.models import Message, RunEvent, Thread, User
from tests.conftest import SettingsFactory

MOMENT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OWNER = "user-owner"


@dataclass
class World:
    database: Database
    log: EventLog


@pytest.fixture
async def world(make_settings: SettingsFactory) -> AsyncIterator[World]:
    settings = make_settings()
    database = Database(settings)
    await upgrade(database)
    async with database.session() as session, session.begin():
        session.add(User(id=OWNER, email="owner@example.com", password_hash="x", display_name="owner",
                         role="user", created_at=MOMENT, thread_count=0))
        await session.flush()
        for thread_id in ("thread-x", "thread-y"):
            session.add(Thread(id=thread_id, user_id=OWNER, title=thread_id, meta={}, created_at=MOMENT,
                               updated_at=MOMENT, message_count=0, last_seq=0))
    bus = InProcessEventBus()
    await bus.start()
    log = EventLog(EventStore(Database(settings, pool_size=1, max_overflow=1)), bus, batch_max=100,
                   queue_max=1000)
    await log.start()
    yield World(database, log)
    await log.stop(5)
    await database.dispose()


def delta(thread_id: str, text: str) -> NewEvent:
    return NewEvent(thread_id, "run-1", EventType.AGENT_DELTA, {"text": text})


async def stored_seqs(world: World, thread_id: str) -> list[int]:
    async with world.database.session() as session:
        return list(await session.scalars(
            select(RunEvent.seq).where(RunEvent.thread_id == thread_id).order_by(RunEvent.seq)))


async def last_seq(world: World, thread_id: str) -> int:
    async with world.database.session() as session:
        return int(await session.scalar(select(Thread.last_seq).where(Thread.id == thread_id)) or 0)


async def delete_thread(world: World, thread_id: str) -> None:
    async with world.database.session() as session, session.begin():
        await session.execute(delete(Thread).where(Thread.id == thread_id))


async def test_queued_writes_of_two_threads_are_stored_apart_when_one_thread_is_gone(world: World) -> None:
    """Fire-and-forget writes join a request still waiting in the queue, but only one of the same thread:
    a deleted thread's events fail alone and never take another thread's with them, or leave it a gap."""
    await delete_thread(world, "thread-y")
    # As a run emits them (lists, so a queued request can take in the next), with no await between these that
    # yields to the writer: all three wait in the queue together.
    for thread_id, words in (("thread-x", "a"), ("thread-y", "lost"), ("thread-x", "b")):
        await world.log.emit(delta(thread_id, words), OWNER)
    stored = await world.log.write(WriteRequest(events=[delta("thread-x", "c")], owner_id=OWNER))

    assert [event.seq for event in stored] == [3]
    assert await stored_seqs(world, "thread-x") == [1, 2, 3]
    assert await last_seq(world, "thread-x") == 3


async def test_a_request_spanning_a_gone_thread_gives_back_the_numbers_it_reserved(world: World) -> None:
    await delete_thread(world, "thread-y")
    spanning = WriteRequest(events=[delta("thread-x", "1"), delta("thread-y", "2"), delta("thread-x", "3")],
                            owner_id=OWNER)
    alone = WriteRequest(events=[delta("thread-x", "4")], owner_id=OWNER)

    result = await world.log.store.transaction(lambda connection: write_batch(connection, [spanning, alone],
                                                                                datetime.now(UTC)))

    assert result.stored[0] is None  # left out whole
    assert [event.seq for event in result.stored[1] or []] == [1]
    assert await stored_seqs(world, "thread-x") == [1]
    assert await last_seq(world, "thread-x") == 1  # not 3: the left-out request's two numbers went back
    with pytest.raises(ThreadGone):
        await world.log.write(WriteRequest(events=[delta("thread-y", "x")], owner_id=OWNER))
    stored = await world.log.write(WriteRequest(events=[delta("thread-x", "5")], owner_id=OWNER))
    assert [event.seq for event in stored] == [2]


async def test_a_feed_moves_past_a_gap_in_the_log_instead_of_spinning() -> None:
    """Should the log ever hold a gap (it cannot by construction), a feed reads again once, then skips it."""
    log_events = [StoredEvent.make("t", seq, "r", "agent_delta", {"text": str(seq)}, MOMENT) for seq in (1, 2, 5, 6)]
    reads = 0

    async def read(thread_id: str, after_seq: int, limit: int) -> list[StoredEvent]:
        nonlocal reads
        reads += 1
        return [event for event in log_events if event.seq > after_seq][:limit]

    received: list[int] = []

    async def replayed(event: StoredEvent) -> bool:
        received.append(event.seq)
        return True

    feed = ThreadFeed("t", 0, read, lambda event: True, replayed)
    bus = InProcessEventBus()
    await bus.start()
    await feed.start(bus)
    for _ in range(100):
        if feed.state is FeedState.LIVE:
            break
        await asyncio.sleep(0.05)
    assert feed.state is FeedState.LIVE
    assert received == [1, 2, 5, 6]
    assert reads <= 5  # a handful of reads, not a loop hammering the database
    feed.close()


async def test_the_writer_stores_values_exactly_as_sqlalchemy_would(world: World) -> None:
    """On SQLite the writer binds values itself (no SQLAlchemy execution per statement): timestamps and JSON
    must come out as the same text SQLAlchemy stores for the same values, or ordering and reads would differ."""
    meta = {"usage": {"input_tokens": 3}, "text": "é"}
    row = {"id": "m-writer", "thread_id": "thread-x", "user_id": OWNER, "role": "user", "content": "hi",
           "run_id": None, "client_message_id": None, "created_at": MOMENT, "metadata": meta}
    request = WriteRequest(events=[delta("thread-x", "a")], messages=[row], owner_id=OWNER)
    await world.log.store.transaction(lambda connection: write_batch(connection, [request], MOMENT))
    async with world.database.session() as session, session.begin():
        session.add(Message(id="m-orm", thread_id="thread-x", user_id=OWNER, role="user", content="hi",
                            run_id=None, client_message_id=None, created_at=MOMENT, meta=meta))
    async with world.database.session() as session:
        def raw(sql: str) -> Any:
            return session.scalar(text(sql))

        writer_time = await raw("SELECT CAST(created_at AS TEXT) FROM messages WHERE id = 'm-writer'")
        orm_time = await raw("SELECT CAST(created_at AS TEXT) FROM messages WHERE id = 'm-orm'")
        event_time = await raw("SELECT CAST(created_at AS TEXT) FROM run_events WHERE thread_id = 'thread-x'")
        thread_time = await raw("SELECT CAST(created_at AS TEXT) FROM threads WHERE id = 'thread-x'")
        writer_meta = await raw("SELECT CAST(metadata AS TEXT) FROM messages WHERE id = 'm-writer'")
        orm_meta = await raw("SELECT CAST(metadata AS TEXT) FROM messages WHERE id = 'm-orm'")
    assert writer_time == orm_time == event_time == thread_time  # MOMENT everywhere, one spelling
    assert writer_meta == orm_meta


def message_row(message_id: str) -> dict[str, Any]:
    return {"id": message_id, "thread_id": "thread-x", "user_id": OWNER, "role": "user", "content": "hi",
            "run_id": None, "client_message_id": None, "created_at": MOMENT, "metadata": {}}


async def test_a_duplicate_row_fails_with_sqlalchemys_integrity_error_and_alone(world: World) -> None:
    """What callers catch (a repeated client_message_id is answered with the first submission) is SQLAlchemy's
    IntegrityError, whichever way the writer talks to the database; the failing request takes nothing else
    down with it."""
    await world.log.write(WriteRequest(messages=[message_row("m-1")], owner_id=OWNER))
    duplicate = world.log.write(WriteRequest(events=[delta("thread-x", "dup")], messages=[message_row("m-1")],
                                             owner_id=OWNER))
    other = world.log.write(WriteRequest(events=[delta("thread-x", "ok")], owner_id=OWNER))
    results = await asyncio.gather(duplicate, other, return_exceptions=True)

    assert isinstance(results[0], IntegrityError)
    assert not is_database_unavailable(results[0])  # a bug or a race to report, never retried as an outage
    assert [event.payload for event in results[1]] == [{"text": "ok"}]  # type: ignore[union-attr]
    assert await stored_seqs(world, "thread-x") == [1]


@pytest.mark.only_on("sqlite")  # the file lock of another process
async def test_a_locked_sqlite_database_is_reported_as_unavailable_not_as_a_bug(
        make_settings: SettingsFactory, world: World) -> None:
    """A writer that meets another process's write lock past the busy timeout must see the outage it is (the
    event log then retries; an API caller gets 503), not a driver error nobody recognises (a 500)."""
    settings = make_settings(database_busy_timeout_s=0.05)
    store = EventStore(Database(settings, pool_size=1, max_overflow=1))
    blocker = sqlite3.connect(settings.database_url.split("///", 1)[1], isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        request = WriteRequest(events=[delta("thread-x", "locked out")], owner_id=OWNER)
        with pytest.raises(Exception) as raised:
            await store.transaction(lambda connection: write_batch(connection, [request], MOMENT))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        await store.close()
    assert is_database_unavailable(raised.value), repr(raised.value)
    assert await stored_seqs(world, "thread-x") == []


async def test_events_lost_by_a_failed_unawaited_write_are_an_error_in_the_log(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Nobody waits for a run's fire-and-forget writes; if one fails for any reason but a deleted thread, its
    events are lost to every client, so the operator must see it (ERROR, with what was lost), not a DEBUG line."""
    await world.log.write(WriteRequest(messages=[message_row("m-2")], owner_id=OWNER))
    await world.log.write(WriteRequest(events=[delta("thread-x", "lost")], messages=[message_row("m-2")],
                                       owner_id=OWNER), wait=False)
    await world.log.write(WriteRequest(events=[delta("thread-x", "after")], owner_id=OWNER))  # flushes the queue

    failures = [record for record in caplog.records if "unawaited_write_failed" in record.getMessage()]
    assert [record.levelname for record in failures] == ["ERROR"]
    assert "thread-x" in failures[0].getMessage() and "run-1" in failures[0].getMessage()


async def test_a_request_after_one_that_failed_is_not_stored(world: World) -> None:
    """A run started before its message was stored writes `after` the message's request: if that one fails,
    nothing of the run is stored, even when the two share a batch."""
    await world.log.write(WriteRequest(messages=[message_row("m-3")], owner_id=OWNER))
    message = WriteRequest(events=[delta("thread-x", "message")], messages=[message_row("m-3")], owner_id=OWNER)
    run_event = WriteRequest(events=[delta("thread-x", "run")], owner_id=OWNER, after=message)
    unrelated = WriteRequest(events=[delta("thread-x", "unrelated")], owner_id=OWNER)
    results = await asyncio.gather(world.log.write(message), world.log.write(run_event),
                                   world.log.write(unrelated), return_exceptions=True)

    assert isinstance(results[0], IntegrityError)
    assert isinstance(results[1], PrecedingWriteFailed)
    assert [event.payload for event in results[2]] == [{"text": "unrelated"}]  # type: ignore[union-attr]
    assert await stored_seqs(world, "thread-x") == [1]


async def test_a_request_after_one_whose_waiter_gave_up_is_not_stored(world: World) -> None:
    async with world.log.store._lock:  # the writer is held up by the database with an earlier batch
        await world.log.write(WriteRequest(events=[delta("thread-x", "earlier")], owner_id=OWNER), wait=False)
        await asyncio.sleep(0.05)
        message = WriteRequest(events=[delta("thread-x", "message")], owner_id=OWNER)
        waiting = asyncio.ensure_future(world.log.write(message))
        await asyncio.sleep(0)
        waiting.cancel()  # its client gives up while it is still queued
        await world.log.write(WriteRequest(events=[delta("thread-x", "run")], owner_id=OWNER, after=message),
                              wait=False)
    stored = await world.log.write(WriteRequest(events=[delta("thread-x", "later")], owner_id=OWNER))

    assert [event.seq for event in stored] == [2]  # neither the message nor the run's event took a number
    assert await stored_seqs(world, "thread-x") == [1, 2]


async def test_on_stored_runs_between_its_own_events_and_the_next_requests(world: World) -> None:
    """The `ack` of a message whose run started early goes out after `message_created` and before the run's
    first event: `on_stored` runs between the two requests' events, though they share one commit."""
    seen: list[str] = []
    unsubscribe = await world.log.bus.subscribe("thread-x", lambda event: seen.append(event.payload["text"]))
    message = WriteRequest(events=[delta("thread-x", "message")], owner_id=OWNER,
                           on_stored=lambda events: seen.append(f"ack {events[0].seq}"))
    async with world.log.store._lock:  # both wait in the queue, so they go in one batch
        waiting = asyncio.ensure_future(world.log.write(message))
        await asyncio.sleep(0)
        await world.log.emit(delta("thread-x", "run"), OWNER, after=message)
    await waiting
    await world.log.write(WriteRequest(events=[delta("thread-x", "last")], owner_id=OWNER))
    unsubscribe()

    assert seen == ["message", "ack 1", "run", "last"]


async def test_a_message_whose_commit_is_under_way_at_the_deadline_is_answered_by_that_commit(world: World) -> None:
    """Giving up on a message must not tell its client it failed while the commit that stores it is under
    way: that attempt decides. (One not yet taken is refused and never stored: test_database_outage.)"""
    world.log.answer_within_s = 0.1
    async with world.log.store._lock:  # the transaction has begun and is slow
        writing = asyncio.ensure_future(world.log.write_for_client(
            WriteRequest(events=[delta("thread-x", "slow")], owner_id=OWNER)))
        await asyncio.sleep(0.3)  # past the deadline
        assert not writing.done()
    stored = await writing
    assert [event.seq for event in stored] == [1]
    assert await stored_seqs(world, "thread-x") == [1]


async def test_a_request_an_earlier_attempt_stored_is_not_stored_again(world: World) -> None:
    """A batch retried after an outage skips what an earlier attempt already stored (while it isolated a
    failing request) instead of storing it twice or marking it failed."""
    request = WriteRequest(events=[delta("thread-x", "once")], owner_id=OWNER)
    await world.log._commit([request])
    assert request.outcome is True
    assert await world.log._commit([request]) == []
    assert request.outcome is True
    assert await stored_seqs(world, "thread-x") == [1]
