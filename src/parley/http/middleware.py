"""Pure ASGI middleware: security headers, request context (id, access log, last-resort errors), body limit.

`SecurityHeadersMiddleware` only rewrites the headers of the response start message: it does no I/O and calls
nothing that can raise, so no exception anywhere can make a response leave without its headers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parley.errors import PayloadTooLarge
from parley.http.errors import error_response, response_for_unexpected
from parley.ids import new_id
from parley.observability.logging import describe, get_logger
from parley.storage.database import is_database_unavailable, is_invalid_data

access_log = get_logger("parley.http")

API_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
HTML_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Told of every finished request: (method, route template, status, duration_ms, user_id). Must not block.
RequestRecorder = Callable[[str, str, int, float, str | None], None]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


# Where SecurityHeadersMiddleware leaves a WebSocket's unwrapped `send`, for the frames after the handshake.
FRAME_SEND_KEY = "parley.frame_send"


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, hsts_max_age_s: int = 0) -> None:
        self.app = app
        self.static_headers: list[tuple[bytes, bytes]] = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]
        if hsts_max_age_s > 0:
            self.static_headers.append(
                (b"strict-transport-security", b"max-age=%d; includeSubDomains" % hsts_max_age_s)
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                is_html = any(n.lower() == b"content-type" and v.startswith(b"text/html") for n, v in headers)
                extra = [h for h in self.static_headers if h[0] not in present]
                if b"content-security-policy" not in present:
                    extra.append((b"content-security-policy", HTML_CSP if is_html else API_CSP))
                message = {**message, "headers": headers + extra}
            await send(message)

        if scope["type"] == "websocket":
            # A WebSocket's frames after the handshake carry no headers: they may skip the wrapper.
            scope[FRAME_SEND_KEY] = send
        await self.app(scope, receive, send_with_headers)


class RequestContextMiddleware:
    """Gives each request an id (echoed as X-Request-ID), logs one line per request, and turns an exception
    no handler claimed into the error envelope (500, or 503 for a database outage) if nothing was sent yet."""

    def __init__(self, app: ASGIApp, retry_after_s: int = 2, on_request: RequestRecorder | None = None) -> None:
        self.app = app
        self.retry_after_s = retry_after_s
        self.on_request = on_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # WebSockets never get here: WebSocketRouteMiddleware answers them all
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or new_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:  # the request's boundary: log with context, answer cleanly
                await self._answer_unexpected(scope, receive, send_with_id, exc, response_started=status != 0)
                if status == 0:
                    status = 500
            finally:
                self._log(scope, status, started)

    async def _answer_unexpected(self, scope: Scope, receive: Receive, send: Send, exc: Exception,
                                 response_started: bool) -> None:
        state = scope.get("state") or {}
        context = {"method": scope.get("method"), "route": _route_template(scope), "user_id": state.get("user_id")}
        if is_database_unavailable(exc):  # an outage, not a bug: one line without a traceback per request
            access_log.warning("database_unavailable", reason=describe(exc), **context)
        elif is_invalid_data(exc):  # the client's value, refused by the database: not our failure
            access_log.info("invalid_data_refused", reason=describe(exc), **context)
        else:
            access_log.error("request_failed", exc_info=exc, **context)
        if response_started:
            return  # the status line is gone; the server ends the response
        await response_for_unexpected(scope, exc, self.retry_after_s)(scope, receive, send)

    def _log(self, scope: Scope, status: int, started: float) -> None:
        state = scope.get("state") or {}
        fields: dict[str, Any] = {
            "method": scope.get("method"),
            "route": _route_template(scope),
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if self.on_request is not None:
            self.on_request(fields["method"], fields["route"], status, fields["duration_ms"], state.get("user_id"))
        if state.get("user_id"):
            fields["user_id"] = state["user_id"]
        # 503 is a declared state (starting, draining, database down) that says so in its own lines.
        level = "warning" if status >= 500 and status != 503 else "info"
        getattr(access_log, level)("request", **fields)


class BodySizeLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                response = error_response(scope, 413, PayloadTooLarge.code, PayloadTooLarge.message)
                await response(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException, because FastAPI turns any other error while reading a body into 400.
                    raise HTTPException(413, PayloadTooLarge.message)
            return message

        await self.app(scope, counting_receive, send)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _REQUEST_ID.match(candidate) else None
    return None


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<unmatched>"
