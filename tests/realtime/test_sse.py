"""SSE's edges: where a reconnect resumes, bounds on positions, streams per user, keepalive timing; tickets'
rate limit; and the hourly housekeeping that deletes expired tokens and tickets."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import func, select

from parley.auth.service import AuthService
from parley.clock import utcnow
from parley.health.components import Phase
from parley.realtime.bus import InProcessEventBus
from parley.realtime.events import StoredEvent
from parley.realtime.routes import _stream
from parley.settings import Settings
from parley.storage.component import DatabaseComponent
from parley.storage.database import Database
from parley.storage.models import RefreshToken, User, WebSocketTicket
from tests.conftest import SettingsFactory
from tests.realtime.test_conversation import read_sse
from tests.support.clients import Account, error_code, register
from tests.support.live import LiveServer, wait_for


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(builtin_token_delay_s=0, ws_max_connections_per_user=2, sse_keepalive_s=1,
                         ticket_rate_limit=3)


def finished_thread(client: httpx.Client, account: Account) -> str:
    thread_id = str(client.post("/api/threads", json={}, headers=account.headers).json()["id"])
    run = client.post(f"/api/threads/{thread_id}/messages", json={"content": "what is 2 + 2"},
                    headers=account.headers).json()["run"]
    wait_for(lambda: client.get(f"/api/runs/{run['id']}", headers=account.headers).json()["status"] == "completed",
             message="the run to complete")
    return thread_id


def test_a_reconnect_resumes_from_the_later_of_after_seq_and_last_event_id(live_server: LiveServer,
                                                                           client: httpx.Client) -> None:
    account = register(client)
    thread_id = finished_thread(client, account)
    everything = read_sse(live_server.url, thread_id, account, after_seq=0)
    # An EventSource repeats its URL (after_seq=0) and adds Last-Event-ID: it must not get 1..3 again.
    resumed = read_sse(live_server.url, thread_id, account, after_seq=0, last_event_id="3")
    assert [e["seq"] for e in resumed] == [e["seq"] for e in everything[3:]]
    later_query = read_sse(live_server.url, thread_id, account, after_seq=4, last_event_id="2")
    assert [e["seq"] for e in later_query] == [e["seq"] for e in everything[4:]]


@pytest.mark.parametrize(("query", "header"), [("?after_seq=2147483648", None), ("", "2147483648"),
                                               ("", "12ab"), ("?after_seq=-1", None)])
def test_positions_beyond_the_log_are_refused(client: httpx.Client, query: str, header: str | None) -> None:
    account = register(client)
    thread_id = client.post("/api/threads", json={}, headers=account.headers).json()["id"]
    headers = {**account.headers, **({"Last-Event-ID": header} if header else {})}
    response = client.get(f"/api/threads/{thread_id}/events{query}", headers=headers)
    assert response.status_code == 422 and error_code(response) == "invalid_request"


def test_streams_per_user_are_limited_and_given_back_when_they_end(live_server: LiveServer,
                                                                   client: httpx.Client) -> None:
    account, other = register(client), register(client)
    thread_id = client.post("/api/threads", json={}, headers=account.headers).json()["id"]
    other_thread = client.post("/api/threads", json={}, headers=other.headers).json()["id"]
    url = f"{live_server.url}/api/threads/{thread_id}/events"
    with httpx.Client(timeout=10) as first, httpx.Client(timeout=10) as second, \
            first.stream("GET", url, headers=account.headers) as one, \
            second.stream("GET", url, headers=account.headers) as two:
        lines = [one.iter_lines(), two.iter_lines()]  # kept: a dropped line iterator closes its connection
        assert [next(stream) for stream in lines] == [": connected", ": connected"]
        third = client.get(f"/api/threads/{thread_id}/events", headers=account.headers)
        assert third.status_code == 429 and error_code(third) == "rate_limited"
        assert int(third.headers["Retry-After"]) >= 1
        # The limit is per user: someone else still gets a stream.
        with client.stream("GET", f"/api/threads/{other_thread}/events", headers=other.headers) as others:
            assert others.status_code == 200
    # Both streams ended with their clients: their slots come back.

    def opens() -> bool:
        with client.stream("GET", url, headers=account.headers) as again:
            return again.status_code == 200

    wait_for(opens, timeout=10, interval=0.2, message="a stream slot to come back")


def test_keepalive_comments_come_at_least_every_keepalive_interval(live_server: LiveServer,
                                                                   client: httpx.Client) -> None:
    account = register(client)
    thread_id = client.post("/api/threads", json={}, headers=account.headers).json()["id"]
    arrivals: list[float] = []
    with client.stream("GET", f"/api/threads/{thread_id}/events", headers=account.headers) as stream:
        for line in stream.iter_lines():
            if line == ": keepalive":
                arrivals.append(time.monotonic())
                if len(arrivals) == 3:
                    break
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap <= 1.25 for gap in gaps), gaps  # PARLEY_SSE_KEEPALIVE_S=1 here


def test_tickets_are_rate_limited_per_user(client: httpx.Client) -> None:
    account, other = register(client), register(client)
    for _ in range(3):
        assert client.post("/api/ws/ticket", headers=account.headers).status_code == 201
    limited = client.post("/api/ws/ticket", headers=account.headers)
    assert limited.status_code == 429 and error_code(limited) == "rate_limited"
    assert client.post("/api/ws/ticket", headers=other.headers).status_code == 201


async def test_housekeeping_deletes_expired_tokens_and_tickets(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    auth = AuthService.from_settings(settings)
    component = DatabaseComponent(Database(settings), settings, housekeeping=[auth.purge_expired],
                                  housekeeping_interval_s=0.05)
    await component.start()
    try:
        database = component.database
        async with database.session() as session:
            user = await auth.create_user(session, "keeper@example.com", "a-long-password-1")
            await auth.create_ws_ticket(session, user.id)
            await auth.create_ws_ticket(session, user.id)
            await session.commit()
        async with database.session() as session, session.begin():
            ticket = await session.scalar(select(WebSocketTicket).where(WebSocketTicket.user_id == user.id))
            assert ticket is not None
            ticket.expires_at = utcnow() - timedelta(seconds=1)
            session.add(RefreshToken(id="expired-token", user_id=user.id, family_id="family",
                                     token_hash="h" * 64, expires_at=utcnow() - timedelta(days=1),
                                     created_at=utcnow() - timedelta(days=31)))

        async def counts() -> tuple[int, int]:
            async with database.session() as session:
                tickets = await session.scalar(select(func.count()).select_from(WebSocketTicket))
                tokens = await session.scalar(select(func.count()).select_from(RefreshToken))
                return int(tickets or 0), int(tokens or 0)

        deadline = time.monotonic() + 10
        while await counts() != (1, 0):  # the unexpired ticket stays
            assert time.monotonic() < deadline, await counts()
            await asyncio.sleep(0.05)
        async with database.session() as session:
            assert await session.scalar(select(func.count()).select_from(User)) == 1
    finally:
        await component.stop()


async def test_a_stream_too_slow_for_its_queue_ends_after_everything_it_was_given() -> None:
    """A live event that finds the stream's queue full ends the stream; nothing already queued is dropped, so
    the client's Last-Event-ID is exactly where the next stream must start."""

    class NoLog:  # the log holds nothing older: only live events matter here
        async def execute(self, *args: object, **kwargs: object) -> list[object]:
            return []

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[NoLog]:
        yield NoLog()

    bus = InProcessEventBus()
    await bus.start()
    services = SimpleNamespace(
        settings=SimpleNamespace(ws_send_queue_max=4, sse_keepalive_s=15.0),
        telemetry=SimpleNamespace(run_events=lambda *args: None),
        database=SimpleNamespace(session=session),
        realtime=SimpleNamespace(bus=bus),
        lifecycle=SimpleNamespace(phase=Phase.READY),
    )
    stream = _stream(services, "t", 0)  # type: ignore[arg-type]
    assert await anext(stream) == ": connected\n\n"
    for _ in range(20):  # the feed's replay of the empty log ends and it goes live
        await asyncio.sleep(0.01)
    await bus.publish([StoredEvent.make("t", seq, "r", "agent_delta", {"text": str(seq)}, utcnow())
                       for seq in range(1, 7)])  # six arrive while the client reads nothing

    received = [chunk async for chunk in stream]
    assert [int(chunk.split("\n")[0].removeprefix("id: ")) for chunk in received] == [1, 2, 3, 4]
