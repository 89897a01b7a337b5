"""`/ws` goes straight from the security headers middleware to its endpoint (WebSocketRouteMiddleware), past
the HTTP-only layers; a WebSocket to any other path is refused with a 404 envelope and the security headers."""

from __future__ import annotations

import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from parley.app import create_app
from parley.http.middleware import SecurityHeadersMiddleware
from parley.realtime.endpoint import WebSocketRouteMiddleware
from parley.settings import Settings
from tests.support.clients import Account
from tests.support.live import LiveServer
from tests.support.ws import greeted, ws_connect


def test_the_security_headers_middleware_wraps_the_websocket_route(settings: Settings) -> None:
    app = create_app(settings)
    outermost_first = [middleware.cls for middleware in app.user_middleware]
    # Nothing sits between the two: every message /ws sends passes the security layer, as every response does.
    assert outermost_first[:2] == [SecurityHeadersMiddleware, WebSocketRouteMiddleware]


def test_ws_answers_and_other_websocket_paths_are_refused(live_server: LiveServer, account: Account) -> None:
    with ws_connect(live_server.ws_url, headers=account.headers) as ws:
        assert greeted(ws)["type"] == "connected"
    for path in ("/ws/", "/wsx", "/ws/other", "/api/threads"):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{live_server.ws_url}{path}", additional_headers=account.headers, proxy=None, open_timeout=10)
        # The refusal is an HTTP response like any other: a 404 envelope that carries the security headers.
        response = refused.value.response
        assert response.status_code == 404, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert orjson.loads(response.body)["error"]["code"] == "not_found", path
