"""HTTP edges of real-time delivery: SSE for a thread's events, and the WebSocket beacon."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from parley.auth.tokens import Principal
from parley.clock import rfc3339, utcnow
from parley.errors import InvalidRequest, Unauthorized
from parley.health.components import Phase
from parley.http.deps import ServicesDep, SessionDep, bearer_token
from parley.http.errors import error_response
from parley.realtime.event_log import EventLog
from parley.realtime.events import StoredEvent
from parley.realtime.feed import ThreadFeed
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
    after_seq: Annotated[int | None, Query(ge=0)] = None,
    ticket: Annotated[str | None, Query(max_length=512)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    principal = await _sse_principal(request, services, session, ticket)
    thread = await ThreadRepository(session).get_for_user(principal.user_id, thread_id)
    await session.close()  # the stream may last hours: hold no database connection for it
    start = after_seq
    if start is None and last_event_id is not None:
        if not last_event_id.isdigit():
            raise InvalidRequest(details=[{"field": "header.last-event-id", "type": "invalid",
                                           "message": "Last-Event-ID must be an event seq"}])
        start = int(last_event_id)
    return StreamingResponse(_stream(services, thread.id, start or 0), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(services: ServicesDep, thread_id: str, after_seq: int) -> AsyncIterator[str]:
    settings = services.settings
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=settings.ws_send_queue_max)

    telemetry = services.telemetry

    def live(event: StoredEvent) -> bool:
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:  # too slow: end the stream; the client resumes with Last-Event-ID
            queue.get_nowait()
            queue.put_nowait(_CLOSED)
            telemetry.run_events("dropped")
            return False
        telemetry.run_events("sent")
        return True

    async def replayed(event: StoredEvent) -> bool:
        await queue.put(event)
        telemetry.run_events("resent")
        return True

    async def read(thread: str, after: int, limit: int) -> list[StoredEvent]:
        async with services.database.session() as session:
            return await EventLog.read(session, thread, after, limit)

    feed = ThreadFeed(thread_id, after_seq, read, live, replayed)
    await feed.start(services.realtime.bus)
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    try:
        yield ": connected\n\n"
        while services.lifecycle.phase is Phase.READY:
            try:
                async with asyncio.timeout(1.0):  # not wait_for: it can swallow the stream's cancellation
                    item = await queue.get()
            except TimeoutError:
                if loop.time() - last_sent >= settings.sse_keepalive_s:
                    last_sent = loop.time()
                    yield ": keepalive\n\n"
                continue
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
