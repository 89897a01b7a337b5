"""`/ws`: authenticate (header, subprotocol or single-use ticket), greet, then read and dispatch messages.

The reader is the connection's only receiver and the writer task its only sender; every exit path goes
through one `finally` that closes the feeds and the connection exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import structlog
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from parley.analytics.records import ConnectionRecord
from parley.auth.ratelimit import SlidingWindowCounter
from parley.auth.tokens import Principal
from parley.clock import rfc3339, utcnow
from parley.errors import ParleyError, Unauthorized
from parley.http.deps import AppServices, bearer_token, get_services
from parley.http.errors import error_response
from parley.http.middleware import FRAME_SEND_KEY
from parley.ids import new_id
from parley.observability.logging import describe, get_logger
from parley.realtime.connection import (
    CLOSE_INTERNAL,
    CLOSE_NOT_READY,
    CLOSE_RATE_LIMITED,
    CLOSE_UNAUTHORIZED,
    Connection,
    ConnectionState,
)
from parley.realtime.events import EventType
from parley.realtime.protocol import ProtocolError, parse_client_message, request_id_of
from parley.realtime.session import ClientSession
from parley.storage.database import is_database_unavailable, is_invalid_data

log = get_logger("parley.ws")

SUBPROTOCOL = "parley.v1"
BEARER_PREFIX = "bearer."


async def _authenticate(websocket: WebSocket, services: AppServices) -> tuple[Principal, str | None]:
    """Returns the caller and the subprotocol to select; raises Unauthorized."""
    offered: list[str] = list(websocket.scope.get("subprotocols") or [])
    selected = SUBPROTOCOL if SUBPROTOCOL in offered else None
    token = bearer_token(websocket)
    if token is None:
        token = next((p[len(BEARER_PREFIX):] for p in offered if p.startswith(BEARER_PREFIX)), None)
    if token is not None:
        return services.auth.codec.verify(token), selected
    params = websocket.query_params
    if "token" in params or "access_token" in params:
        raise Unauthorized("Access tokens are not accepted in the URL; use a ticket from POST /api/ws/ticket.")
    ticket = params.get("ticket")
    if ticket:
        async with services.database.session() as session:
            user = await services.auth.redeem_ws_ticket(session, ticket[:512])
        return Principal(user_id=user.id, role=user.role, token_id="ticket"), selected
    raise Unauthorized("Authenticate with a bearer token (header or subprotocol) or a ticket.")


class WebSocketRouteMiddleware:
    """Takes WebSocket scopes for `path` straight to the endpoint, past the layers inside it.

    Those layers are HTTP's (request log, body limit, CORS, FastAPI's routing and exception handling): for a
    WebSocket they do nothing after the handshake, yet each would wrap every frame sent for the connection's
    whole life and hold memory for it. Installed just inside the security headers middleware, which still
    sees every message, so a refused handshake's HTTP response carries its headers like any other.
    """

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
        elif scope["path"] == self.path:
            await websocket_endpoint(WebSocket(scope, receive, send), scope.get(FRAME_SEND_KEY, send))
        else:  # parley has no other WebSocket route: a 404 like any other, envelope and headers included
            websocket = WebSocket(scope, receive, send)
            if "websocket.http.response" in scope.get("extensions", {}):
                await websocket.send_denial_response(error_response(scope, 404, "not_found", "Not found."))
            else:
                await websocket.close()


async def websocket_endpoint(websocket: WebSocket, frame_send: Send | None = None) -> None:
    """`frame_send`: where the connection sends its frames once open (see `FRAME_SEND_KEY`)."""
    services = get_services(websocket)
    hub = services.realtime.hub
    # A send stuck for two heartbeats means a client that stopped reading: it is let go, and resumes later.
    connection = Connection(websocket, new_id(), user_id="", queue_max=services.settings.ws_send_queue_max,
                            on_closed=hub.unregister, send_timeout_s=services.settings.ws_heartbeat_s * 2,
                            frame_send=frame_send)
    telemetry = services.telemetry
    if not hub.accepting:
        telemetry.ws_attempt("rejected_not_ready")
        await connection.reject(CLOSE_NOT_READY, "service not ready")
        return
    try:
        principal, subprotocol = await _authenticate(websocket, services)
    except Unauthorized as exc:
        telemetry.ws_attempt("rejected_auth")
        await connection.reject(CLOSE_UNAUTHORIZED, exc.message)
        return
    except Exception as exc:  # the database is unavailable while redeeming a ticket
        telemetry.ws_attempt("rejected_not_ready")
        log.warning("ws_auth_unavailable", reason=describe(exc))
        await connection.reject(CLOSE_NOT_READY, "authentication is unavailable; retry shortly")
        return
    if hub.user_is_full(principal.user_id):
        telemetry.ws_attempt("rejected_rate_limited")
        await connection.reject(CLOSE_RATE_LIMITED, "too many connections for this user")
        return
    connection.user_id = principal.user_id
    await connection.accept(subprotocol)
    telemetry.ws_attempt("accepted")
    # Bound for this connection's task (and the runs it starts): its log lines carry both ids.
    structlog.contextvars.bind_contextvars(connection_id=connection.id, user_id=principal.user_id)
    hub.register(connection)
    session = ClientSession(connection, principal, services.realtime.session_services)
    opened = time.monotonic()
    session.send(EventType.CONNECTED, {
        "connection_id": connection.id, "user_id": principal.user_id, "protocol": SUBPROTOCOL,
        "heartbeat_s": services.settings.ws_heartbeat_s, "server_time": rfc3339(utcnow())})
    try:
        await _read_loop(websocket, connection, session, services)
    except Exception:  # the connection's boundary: log with context and close cleanly with 1011
        log.exception("ws_connection_failed", connection_id=connection.id, user_id=principal.user_id)
        telemetry.ws_attempt("error")
        connection.close(CLOSE_INTERNAL, "internal error")
    finally:
        session.close()
        connection.close(CLOSE_INTERNAL, "internal error")  # a no-op unless something above left it open
        await connection.shutdown()
        hub.unregister(connection)
        duration_s = time.monotonic() - opened
        log.info("ws_closed", connection_id=connection.id, user_id=principal.user_id, code=connection.close_code,
                 by=connection.closed_by, duration_s=round(duration_s, 3))
        telemetry.record(ConnectionRecord(
            ts=utcnow(), connection_id=connection.id, user_id=principal.user_id,
            duration_ms=round(duration_s * 1000, 3), close_code=connection.close_code or 1005,
            closed_by=connection.closed_by or "unknown"))


async def _read_loop(websocket: WebSocket, connection: Connection, session: ClientSession,
                     services: AppServices) -> None:
    router = services.realtime.router
    per_minute = services.settings.ws_messages_per_minute
    # Over the limit a message is answered with an error; at twice the limit the connection is closed.
    soft = SlidingWindowCounter(per_minute, 60.0)
    hard = SlidingWindowCounter(per_minute * 2, 60.0)
    # The writer wakes (cancels) this task if it lets the client go while we wait for it to speak.
    connection.reader = asyncio.current_task()
    try:
        while connection.state is ConnectionState.OPEN:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                connection.client_closed(message.get("code"))
                return
            if connection.state is not ConnectionState.OPEN:
                return  # closing: whatever the client still says is not answered
            if hard.hit() is not None:
                connection.close(CLOSE_RATE_LIMITED, "too many messages")
                return
            if soft.hit() is not None:
                session.send_error("rate_limited", "Too many messages; slow down.", request_id_of(_frame(message)))
                continue
            await _handle_frame(_frame(message), connection, session, router)
    except asyncio.CancelledError:
        if not connection.reader_woken:
            raise  # the server is going away: not ours to swallow
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()


def _frame(message: Mapping[str, Any]) -> str | bytes:
    text = message.get("text")
    return text if text is not None else (message.get("bytes") or b"")


async def _handle_frame(frame: str | bytes, connection: Connection, session: ClientSession, router: Any) -> None:
    request_id: str | None = None
    try:
        parsed = parse_client_message(frame)
        request_id = parsed.id
        await router.dispatch(session, parsed)
    except ProtocolError as exc:
        session.send_error(exc.code, exc.message, exc.request_id)
    except ParleyError as exc:
        session.send_error(exc.code, exc.message, request_id, exc.details)
    except Exception as exc:  # one message failed; the connection lives on
        if is_database_unavailable(exc):
            session.send_error("database_unavailable", "The database is unavailable; retry shortly.", request_id)
            return
        if is_invalid_data(exc):
            session.send_error("invalid_payload", "The message holds a value that cannot be stored.", request_id)
            return
        log.exception("ws_message_failed", connection_id=connection.id, user_id=connection.user_id)
        session.send_error("internal_error", "An internal error occurred; it has been logged.", request_id)
