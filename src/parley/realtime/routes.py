"""HTTP edges of real-time delivery: SSE for a thread's events, and the WebSocket beacon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from parley.auth.tokens import Principal
from parley.clock import rfc3339, utcnow
from parley.errors import InvalidRequest, RateLimited, Unauthorized
from parley.health.components import Phase
from parley.http.deps import ServicesDep, SessionDep, bearer_token
from parley.http.errors import error_response
from parley.realtime.event_log import EventLog
from parley.realtime.events import StoredEvent
from parley.realtime.feed import ThreadFeed
from parley.realtime.protocol import MAX_SEQ
from parley.threads.repository import ThreadRepository

router = APIRouter(tags=["realtime"])

BEACON_MAX_BODY = 4096
_CLOSED = object()


async def _sse_principal(request: Request, services: ServicesDep, session: SessionDep,
                         ticket: str | None) -> Principal:
    """SSE takes a bearer header or, for browsers' EventSource (which cannot set headers), a ticket."""
    token = bearer_token(request)
    if token is not None:
        principal = services.auth.codec.verify(token)
    elif ticket:
        user = await services.auth.redeem_ws_ticket(session, ticket[:512])
        principal = Principal(user_id=user.id, role=user.role, token_id="ticket")
    else:
        raise Unauthorized("A bearer access token or a ticket is required.")
    request.state.user_id = principal.user_id
    return principal


@router.get("/api/threads/{thread_id}/events")
async def thread_events(
    thread_id: str,
    request: Request,
    services: ServicesDep,
    session: SessionDep,
    after_seq: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
    ticket: Annotated[str | None, Query(max_length=512)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    principal = await _sse_principal(request, services, session, ticket)
    thread = await ThreadRepository(session).get_for_user(principal.user_id, thread_id)
    await session.close()  # the stream may last hours: hold no database connection for it
    # A reconnecting EventSource repeats its URL (with any after_seq) and adds Last-Event-ID: the later wins.
    start = max(after_seq or 0, _last_event_id(last_event_id))
    hub = services.realtime.hub
    if not hub.open_stream(principal.user_id):
        raise RateLimited("Too many event streams for this user; close one first.", retry_after=5)
    released = False

    def release() -> None:  # called by whichever comes first: the stream's end, or the response's
        nonlocal released
        if not released:
            released = True
            hub.close_stream(principal.user_id)

    # The stream's own `finally` releases its slot; the background task covers a response whose stream never
    # started (the client left first), where no `finally` of the generator would run.
    return StreamingResponse(_counted(_stream(services, thread.id, start), release), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(release))


def _last_event_id(header: str | None) -> int:
    if header is None:
        return 0
    if not header.isdigit() or int(header) > MAX_SEQ:
        raise InvalidRequest(details=[{"field": "header.last-event-id", "type": "invalid",
                                       "message": "Last-Event-ID must be an event seq"}])
    return int(header)


async def _counted(stream: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    """The stream, counted against its user until it ends, however it ends (client gone, shutdown, error)."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        release()


async def _stream(services: ServicesDep, thread_id: str, after_seq: int) -> AsyncIterator[str]:
    settings = services.settings
    limit = settings.ws_send_queue_max
    # Unbounded by type, bounded by hand: a live event that finds `limit` waiting ends the stream (the client
    # resumes with Last-Event-ID) but is never made to push out one the client has not had yet; replays wait.
    queue: asyncio.Queue[object] = asyncio.Queue()
    room = asyncio.Event()
    telemetry = services.telemetry

    def end() -> None:
        queue.put_nowait(_CLOSED)

    def live(event: StoredEvent) -> bool:
        if queue.qsize() >= limit:  # too slow: what it has is delivered, then the stream ends
            end()
            telemetry.run_events("dropped")
            return False
        queue.put_nowait(event)
        telemetry.run_events("sent")
        return True

    async def replayed(event: StoredEvent) -> bool:
        while queue.qsize() >= limit:
            room.clear()
            await room.wait()
        queue.put_nowait(event)
        telemetry.run_events("resent")
        return True

    async def read(thread: str, after: int, limit: int) -> list[StoredEvent]:
        async with services.database.session() as session:
            return await EventLog.read(session, thread, after, limit)

    feed = ThreadFeed(thread_id, after_seq, read, live, replayed, on_failure=lambda _thread: end())
    await feed.start(services.realtime.bus)
    loop = asyncio.get_running_loop()
    keepalive_s = settings.sse_keepalive_s
    last_sent = loop.time()
    try:
        yield ": connected\n\n"
        while services.lifecycle.phase is Phase.READY:
            # Wakes at least every second (to notice draining) and in time for the next keepalive comment.
            wait_s = min(1.0, keepalive_s - (loop.time() - last_sent))
            try:
                async with asyncio.timeout(max(wait_s, 0.0)):  # not wait_for: it can swallow cancellation
                    item = await queue.get()
            except TimeoutError:
                if loop.time() - last_sent >= keepalive_s - 0.001:
                    last_sent = loop.time()
                    yield ": keepalive\n\n"
                continue
            if queue.qsize() < limit:
                room.set()
            if item is _CLOSED or not isinstance(item, StoredEvent):
                return
            last_sent = loop.time()
            yield f"id: {item.seq}\nevent: {item.type}\ndata: {item.wire}\n\n"
    finally:
        feed.close()


@router.api_route("/ws/beacon", methods=["GET", "HEAD", "POST"])
async def beacon(request: Request, services: ServicesDep) -> Response:
    if request.method == "POST":
        received = 0
        async for chunk in request.stream():  # navigator.sendBeacon sends a small body; read and ignore it
            received += len(chunk)
            if received > BEACON_MAX_BODY:
                return error_response(request.scope, 413, "payload_too_large", "Beacon bodies are small.")
    bridge = services.bridge
    accepting = services.lifecycle.phase is Phase.READY and bridge.accepting
    body = {"status": "ok" if accepting else "unavailable",
            "websocket": {"accepting": accepting, "connections": services.realtime.hub.count},
            "ts": rfc3339(utcnow())}
    return JSONResponse(body, status_code=200 if accepting else 503)
