"""The /ws protocol as a client sees it: greeting, authentication, errors that keep the connection open,
disconnect, limits, and every message type having a handler (incident pattern 5: "No handler found for
DISCONNECT")."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from websockets.sync.client import ClientConnection

from parley.app import create_app
from parley.clock import utcnow
from parley.realtime import session as ws_session
from parley.realtime.protocol import PAYLOADS, ClientMessageType, MessageRouter
from parley.settings import Settings
from tests.conftest import TEST_JWT_SECRET, SettingsFactory, event_of
from tests.support.clients import Account, register
from tests.support.live import LiveServer, wait_for
from tests.support.ws import (
    RawWebSocket,
    answers_until_pong,
    assert_answers_ping,
    close_code,
    close_code_of_frame,
    frame,
    fresh_id,
    greeted,
    open_connections,
    read_until_closed,
    recv_json,
    ws_connect,
)

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(builtin_token_delay_s=0)


@pytest.fixture
def run_server(make_settings: SettingsFactory) -> Iterator[Callable[..., LiveServer]]:
    """Starts a server with settings overrides; stops it after the test."""
    started: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(make_settings(builtin_token_delay_s=0, **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def ticket_for(client: httpx.Client, account: Account) -> str:
    response = client.post("/api/ws/ticket", headers=account.headers)
    assert response.status_code == 201, response.text
    return str(response.json()["ticket"])


def user_ws(server: LiveServer, account: Account, **options: Any) -> ClientConnection:
    return ws_connect(server.ws_url, headers=account.headers, **options)


def error_of(message: dict[str, Any]) -> str:
    assert message["type"] == "error", message
    return str(message["payload"]["code"])


def parse_rfc3339(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def warnings_and_errors(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    return [event_of(r) for r in list(records) if r.levelno >= logging.WARNING]


# --- greeting and ping ------------------------------------------------------------------------------------------

def test_connected_greeting_says_who_the_server_thinks_you_are(live_server: LiveServer, account: Account,
                                                              settings: Settings) -> None:
    with user_ws(live_server, account) as first, user_ws(live_server, account) as second:
        hello = greeted(first)
        other = greeted(second)
    payload = hello["payload"]
    assert set(payload) == {"connection_id", "user_id", "protocol", "heartbeat_s", "server_time"}
    assert payload["user_id"] == account.id
    assert payload["protocol"] == "parley.v1"
    assert payload["heartbeat_s"] == settings.ws_heartbeat_s
    assert abs((parse_rfc3339(payload["server_time"]) - datetime.now(UTC)).total_seconds()) < 30
    parse_rfc3339(hello["ts"])
    assert isinstance(payload["connection_id"], str) and payload["connection_id"]
    assert other["payload"]["connection_id"] != payload["connection_id"]


def test_ping_is_answered_by_pong_echoing_its_id(live_server: LiveServer, account: Account) -> None:
    with user_ws(live_server, account) as ws:
        greeted(ws)
        ws.send(frame("ping", {}, "ping-42"))
        pong = recv_json(ws)
        assert pong["type"] == "pong" and pong["id"] == "ping-42" and pong["payload"] == {}
        parse_rfc3339(pong["ts"])
        ws.send(frame("ping"))  # no id and no payload: still a ping, answered without an id
        bare = recv_json(ws)
        assert bare["type"] == "pong" and "id" not in bare


# --- authentication --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["header", "subprotocol", "ticket"])
def test_each_authentication_method_opens_a_connection_for_its_user(live_server: LiveServer, client: httpx.Client,
                                                                    account: Account, method: str) -> None:
    if method == "header":
        ws = ws_connect(live_server.ws_url, headers=account.headers)
    elif method == "subprotocol":
        ws = ws_connect(live_server.ws_url, subprotocols=["parley.v1", f"bearer.{account.access_token}"])
    else:
        ws = ws_connect(live_server.ws_url, query=f"?ticket={ticket_for(client, account)}")
    with ws:
        assert greeted(ws)["payload"]["user_id"] == account.id
        if method == "subprotocol":
            assert ws.subprotocol == "parley.v1"  # the token is never echoed back as the selected protocol
        assert_answers_ping(ws)


def test_header_auth_offering_parley_v1_gets_it_selected(live_server: LiveServer, account: Account) -> None:
    with ws_connect(live_server.ws_url, headers=account.headers, subprotocols=["parley.v1"]) as ws:
        greeted(ws)
        assert ws.subprotocol == "parley.v1"


def test_ticket_works_once_then_closes_4401(live_server: LiveServer, client: httpx.Client,
                                             account: Account) -> None:
    ticket = ticket_for(client, account)
    with ws_connect(live_server.ws_url, query=f"?ticket={ticket}") as ws:
        greeted(ws)
    with ws_connect(live_server.ws_url, query=f"?ticket={ticket}") as again:
        assert close_code(again) == 4401


def test_expired_ticket_closes_4401(live_server: LiveServer, client: httpx.Client, account: Account,
                                    settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    ticket = ticket_for(client, account)
    later = timedelta(seconds=settings.ws_ticket_ttl_s + 1)
    monkeypatch.setattr("parley.auth.service.utcnow", lambda: utcnow() + later)  # the server's clock moves on
    with ws_connect(live_server.ws_url, query=f"?ticket={ticket}") as ws:
        assert close_code(ws) == 4401


@pytest.mark.parametrize("parameter", ["token", "access_token"])
def test_access_token_in_the_url_closes_4401(live_server: LiveServer, account: Account, parameter: str) -> None:
    with ws_connect(live_server.ws_url, query=f"?{parameter}={account.access_token}") as ws:
        assert close_code(ws) == 4401


def _forged(account: Account, secret: str, expires_in: int) -> str:
    now = int(time.time())
    claims = {"iss": "parley", "aud": "parley-api", "sub": account.id, "iat": now - 3600, "exp": now + expires_in,
              "jti": fresh_id("jti")}
    return jwt.encode(claims, secret, algorithm="HS256")


@pytest.mark.parametrize("credentials", ["none", "garbage header", "garbage subprotocol", "expired token",
                                         "foreign signature", "unknown ticket", "empty bearer subprotocol"])
def test_missing_or_invalid_credentials_close_4401(live_server: LiveServer, account: Account,
                                                   credentials: str) -> None:
    options: dict[str, Any] = {}
    if credentials == "garbage header":
        options["headers"] = {"Authorization": "Bearer not-a-token"}
    elif credentials == "garbage subprotocol":
        options["subprotocols"] = ["parley.v1", "bearer.not-a-token"]
    elif credentials == "expired token":
        options["headers"] = {"Authorization": f"Bearer {_forged(account, TEST_JWT_SECRET, -600)}"}
    elif credentials == "foreign signature":
        options["headers"] = {"Authorization": f"Bearer {_forged(account, 'another-secret-' + 'y' * 40, 600)}"}
    elif credentials == "unknown ticket":
        options["query"] = "?ticket=" + "A" * 43
    elif credentials == "empty bearer subprotocol":
        options["subprotocols"] = ["parley.v1", "bearer."]
    with ws_connect(live_server.ws_url, **options) as ws:
        assert close_code(ws) == 4401
    assert open_connections(live_server.url) == 0


# --- bad frames are answered; the connection lives on ------------------------------------------------------------

BAD_FRAMES: list[tuple[str, str | bytes, str, str | None]] = [
    # (case, frame, error code, id echoed)
    ("not json", "hello there", "invalid_json", None),
    ("truncated json", '{"type": "ping", "id": "a1"', "invalid_json", None),
    ("binary not utf-8", b"\xff\xfe\x00", "invalid_json", None),
    ("json array", "[1, 2, 3]", "invalid_payload", None),
    ("json string", '"ping"', "invalid_payload", None),
    ("json null", "null", "invalid_payload", None),
    ("unknown type with id", frame("shout", {}, "u1"), "unknown_type", "u1"),
    ("unknown type without id", frame("shout", {}), "unknown_type", None),
    ("type missing", '{"id": "u2", "payload": {}}', "unknown_type", "u2"),
    ("type not a string", '{"type": 7, "id": "u3"}', "unknown_type", "u3"),
    ("type in the wrong case", frame("PING", {}, "u4"), "unknown_type", "u4"),
    ("user_message without content", frame("user_message", {}, "p1"), "invalid_payload", "p1"),
    ("subscribe without thread_id", frame("subscribe", {"after_seq": 0}, "p2"), "invalid_payload", "p2"),
    ("stop_agent without run_id", frame("stop_agent", {}, "p3"), "invalid_payload", "p3"),
    ("start_agent without input", frame("start_agent", {"agent": "assistant"}, "p4"), "invalid_payload", "p4"),
    ("extra payload field", frame("ping", {"extra": 1}, "p5"), "invalid_payload", "p5"),
    ("extra envelope field", '{"type": "ping", "id": "p6", "payload": {}, "hello": 1}', "invalid_payload", "p6"),
    ("payload not an object", '{"type": "ping", "id": "p7", "payload": "x"}', "invalid_payload", "p7"),
    ("content not a string", frame("user_message", {"content": 5}, "p8"), "invalid_payload", "p8"),
    ("empty content", frame("user_message", {"content": ""}, "p9"), "invalid_payload", "p9"),
    ("unknown on_busy", frame("user_message", {"content": "hi", "on_busy": "maybe"}, "p10"), "invalid_payload",
     "p10"),
    ("thread_id not a string", frame("subscribe", {"thread_id": ["t"]}, "p11"), "invalid_payload", "p11"),
    ("negative after_seq", frame("subscribe", {"thread_id": "t", "after_seq": -1}, "p12"), "invalid_payload",
     "p12"),
    ("after_seq not a number", frame("subscribe", {"thread_id": "t", "after_seq": "abc"}, "p13"),
     "invalid_payload", "p13"),
    ("id not a string", '{"type": "ping", "id": 5}', "invalid_payload", None),
    ("empty id", '{"type": "ping", "id": ""}', "invalid_payload", None),
    ("id too long", frame("ping", {}, "i" * 129), "invalid_payload", None),
]


@pytest.mark.parametrize(("sent", "code", "echoed"), [case[1:] for case in BAD_FRAMES],
                         ids=[case[0] for case in BAD_FRAMES])
def test_bad_frame_is_answered_with_an_error_and_the_same_connection_answers_a_ping(
        live_server: LiveServer, account: Account, sent: str | bytes, code: str, echoed: str | None) -> None:
    with user_ws(live_server, account) as ws:
        greeted(ws)
        answers = answers_until_pong(ws, sent)
        assert [error_of(a) for a in answers] == [code], answers
        assert answers[0].get("id") == echoed
        assert answers[0]["payload"]["message"]
        assert_answers_ping(ws)


def test_error_messages_leak_no_internals(live_server: LiveServer, account: Account) -> None:
    with user_ws(live_server, account) as ws:
        greeted(ws)
        answers = [answer for _, sent, _, _ in BAD_FRAMES for answer in answers_until_pong(ws, sent)]
    text = " ".join(a["payload"]["message"] for a in answers)
    for leak in ("Traceback", "pydantic", "ValidationError", "orjson", "JSONDecodeError", "File \""):
        assert leak not in text


# --- disconnect ---------------------------------------------------------------------------------------------

def test_disconnect_closes_with_1000_and_sends_nothing_more(live_server: LiveServer, account: Account) -> None:
    with user_ws(live_server, account) as ws:
        greeted(ws)
        ws.send(frame("disconnect", {}, "bye-1"))
        ws.send(frame("ping", {}, "after-bye"))  # too late: the server is closing and does not answer
        messages, close = read_until_closed(ws)
    assert messages == []
    assert close is not None and close.code == 1000
    wait_for(lambda: open_connections(live_server.url) == 0, timeout=10, message="the connection to be released")


def test_answers_to_messages_sent_before_disconnect_arrive_before_the_close(live_server: LiveServer,
                                                                           account: Account) -> None:
    """A ping and a disconnect in one TCP write: the ping came first, so its pong is owed before the close."""
    raw = RawWebSocket("127.0.0.1", live_server.port, headers=account.headers)
    try:
        assert raw.status_line.startswith("HTTP/1.1 101"), raw.status_line
        opcode, _ = raw.read_frame()  # connected
        assert opcode == RawWebSocket.OP_TEXT
        raw.send_frames([(RawWebSocket.OP_TEXT, frame("ping", {}, "before-bye").encode()),
                         (RawWebSocket.OP_TEXT, frame("disconnect", {}).encode())])
        received = raw.read_until_close()
    finally:
        raw.close()
    kinds = [opcode for opcode, _ in received]
    assert close_code_of_frame(received[-1][1]) == 1000
    assert kinds == [RawWebSocket.OP_TEXT, RawWebSocket.OP_CLOSE], \
        "the pong owed for the ping sent before `disconnect` was dropped"
    assert b'"before-bye"' in received[0][1]


# --- limits ---------------------------------------------------------------------------------------------------

def test_frame_over_the_size_limit_closes_1009_and_one_under_it_is_served(run_server: Callable[..., LiveServer],
                                                                          log_records: list[logging.LogRecord]) -> None:
    server = run_server(ws_max_frame_bytes=4096)
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    with user_ws(server, account) as ws:
        greeted(ws)
        padded = frame("ping", {}, "padded")
        ws.send(padded + " " * (4096 - len(padded)))  # exactly at the limit: an ordinary message
        assert recv_json(ws)["id"] == "padded"
        ws.send("x" * 4097)
        assert close_code(ws) == 1009
    wait_for(lambda: open_connections(server.url) == 0, timeout=10, message="the connection to be released")
    assert [e for e in warnings_and_errors(log_records) if e["level"] in ("error", "critical")] == []


def test_connection_beyond_the_per_user_limit_closes_4429(run_server: Callable[..., LiveServer]) -> None:
    server = run_server(ws_max_connections_per_user=2)
    with httpx.Client(base_url=server.url) as client:
        alice, bob = register(client), register(client)
    first, second = user_ws(server, alice), user_ws(server, alice)
    try:
        greeted(first)
        greeted(second)
        with user_ws(server, alice) as third:
            assert close_code(third) == 4429
        with user_ws(server, bob) as other_user:  # the limit is per user
            greeted(other_user)
            assert_answers_ping(other_user)
        assert_answers_ping(first)
        first.close()
        wait_for(lambda: open_connections(server.url) == 1, timeout=10, message="the closed connection to count out")
        with user_ws(server, alice) as replacement:  # a freed slot can be used again
            greeted(replacement)
    finally:
        first.close()
        second.close()


def test_messages_over_the_rate_limit_are_refused_then_the_connection_closes_4429(
        run_server: Callable[..., LiveServer]) -> None:
    limit = 10
    server = run_server(ws_messages_per_minute=limit)
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    with user_ws(server, account) as ws:
        greeted(ws)
        for n in range(limit):
            ws.send(frame("ping", {}, f"ok-{n}"))
            assert recv_json(ws)["type"] == "pong"
        for n in range(limit):  # over the limit: refused one by one, the connection stays
            ws.send(frame("ping", {}, f"over-{n}"))
            assert error_of(recv_json(ws)) == "rate_limited"
        ws.send(frame("ping", {}, "far-over"))
        assert close_code(ws) == 4429


def test_rate_limited_error_echoes_the_refused_message_id(run_server: Callable[..., LiveServer]) -> None:
    """The contract: `id` is echoed in `error`. A client must know which of its requests was refused."""
    server = run_server(ws_messages_per_minute=1)
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    with user_ws(server, account) as ws:
        greeted(ws)
        ws.send(frame("ping", {}, "first"))
        assert recv_json(ws)["id"] == "first"
        ws.send(frame("ping", {}, "second"))
        refused = recv_json(ws)
    assert error_of(refused) == "rate_limited"
    assert refused.get("id") == "second"


# --- pattern 5: every message type has a handler -------------------------------------------------------------

@pytest.mark.parametrize("missing", list(ClientMessageType), ids=[t.value for t in ClientMessageType])
def test_pattern5_router_missing_a_handler_refuses_to_be_built(missing: ClientMessageType) -> None:
    table = {t: handler for t, handler in ws_session.HANDLERS.items() if t is not missing}
    with pytest.raises(RuntimeError, match=missing.value):
        MessageRouter(table)


def test_pattern5_app_does_not_start_with_a_message_type_unhandled(settings: Settings,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ws_session.HANDLERS, ClientMessageType.DISCONNECT)
    with pytest.raises(RuntimeError, match="disconnect"):
        create_app(settings)


def test_pattern5_the_real_handler_table_covers_every_message_type() -> None:
    assert set(ws_session.HANDLERS) == set(ClientMessageType)
    assert set(PAYLOADS) == set(ClientMessageType)
    assert all(callable(handler) for handler in ws_session.HANDLERS.values())
    MessageRouter(ws_session.HANDLERS)


def test_pattern5_every_message_type_is_answered_over_the_wire(live_server: LiveServer, client: httpx.Client,
                                                              account: Account) -> None:
    thread = client.post("/api/threads", headers=account.headers, json={"title": "handlers"}).json()
    with user_ws(live_server, account) as ws:
        greeted(ws)
        ws.send(frame("user_message", {"thread_id": thread["id"], "content": "hello"}, "seed"))
        seeded = [m for m in _until(ws, lambda m: m["type"] in TERMINAL) if m.get("id") == "seed"]
        run_id = next(m["payload"]["run_id"] for m in seeded if m["type"] == "ack")
        valid: dict[ClientMessageType, dict[str, Any]] = {
            ClientMessageType.PING: {},
            ClientMessageType.USER_MESSAGE: {"thread_id": thread["id"], "content": "hello again"},
            ClientMessageType.START_AGENT: {"thread_id": thread["id"], "agent": "assistant", "input": "hi"},
            ClientMessageType.STOP_AGENT: {"run_id": run_id},
            ClientMessageType.SUBSCRIBE: {"thread_id": thread["id"], "after_seq": 0},
            ClientMessageType.UNSUBSCRIBE: {"thread_id": thread["id"]},
            ClientMessageType.DISCONNECT: {},
        }
        assert set(valid) == set(ClientMessageType), "a new message type needs a case here"
        for message_type, payload in valid.items():
            if message_type is ClientMessageType.DISCONNECT:
                continue
            request_id = fresh_id(message_type.value)
            answers = [a for a in answers_until_pong(ws, frame(message_type.value, payload, request_id))
                       if a.get("id") == request_id]
            assert answers, f"{message_type.value} got no answer"
            assert all(a["type"] != "error" for a in answers), answers
        ws.send(frame("disconnect", {}, "bye"))
        _, close = read_until_closed(ws)
        assert close is not None and close.code == 1000


def _until(ws: ClientConnection, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    seen = []
    while True:
        message = recv_json(ws, 20)
        seen.append(message)
        if predicate(message):
            return seen


# --- requests the server refuses leave nothing behind and fail cleanly ------------------------------------------

@pytest.mark.parametrize("payload", [{"content": "x" * 101}, {"content": "hi", "agent": "no-such-agent"}],
                         ids=["content too long", "unknown agent"])
def test_refused_user_message_creates_no_empty_thread(run_server: Callable[..., LiveServer],
                                                      payload: dict[str, Any]) -> None:
    server = run_server(max_message_chars=100)
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
        with user_ws(server, account) as ws:
            greeted(ws)
            answers = answers_until_pong(ws, frame("user_message", payload, "refused"))
        threads = client.get("/api/threads", headers=account.headers).json()
    assert [a["type"] for a in answers] == ["error"], answers
    assert threads["total"] == 0, "a refused message left an empty thread in the user's list"


NUL_FRAMES: dict[str, Callable[[str], str]] = {
    "content": lambda thread_id: frame("user_message", {"thread_id": thread_id, "content": "a\u0000b"}, "nul"),
    "new thread content": lambda _: frame("user_message", {"content": "a\u0000b"}, "nul"),
    "client_message_id": lambda thread_id: frame(
        "user_message", {"thread_id": thread_id, "content": "hi", "client_message_id": "c\u0000"}, "nul"),
    "subscribe thread_id": lambda _: frame("subscribe", {"thread_id": "t\u0000"}, "nul"),
    "stop_agent run_id": lambda _: frame("stop_agent", {"run_id": "r\u0000"}, "nul"),
}


@pytest.mark.parametrize("field", list(NUL_FRAMES))
def test_text_with_a_nul_character_is_answered_without_an_internal_error(
        live_server: LiveServer, client: httpx.Client, account: Account, field: str,
        log_records: list[logging.LogRecord]) -> None:
    """JSON allows \\u0000 in strings; PostgreSQL text does not. Either way the client gets a real answer."""
    thread = client.post("/api/threads", headers=account.headers, json={}).json()
    with user_ws(live_server, account) as ws:
        greeted(ws)
        answers = [a for a in answers_until_pong(ws, NUL_FRAMES[field](thread["id"])) if a.get("id") == "nul"]
        assert_answers_ping(ws)
    assert answers, "no answer"
    assert [a for a in answers if a["type"] == "error" and a["payload"]["code"] == "internal_error"] == []
    assert [e for e in warnings_and_errors(log_records) if e["level"] in ("error", "critical")] == []


@pytest.mark.parametrize("after_seq", [2**31, 2**63], ids=["past int32", "past int64"])
def test_subscribe_after_a_seq_no_thread_can_reach_fails_cleanly(live_server: LiveServer, client: httpx.Client,
                                                                 account: Account, after_seq: int,
                                                                 log_records: list[logging.LogRecord]) -> None:
    """Either refused as `invalid_payload` or acknowledged (nothing can come after it) — but never a feed that
    retries a failing database read for as long as the connection lives."""
    thread = client.post("/api/threads", headers=account.headers, json={}).json()
    with user_ws(live_server, account) as ws:
        greeted(ws)
        answers = answers_until_pong(ws, frame("subscribe", {"thread_id": thread["id"], "after_seq": after_seq},
                                               "far"))
        assert len(answers) == 1 and (answers[0]["type"] == "ack" or error_of(answers[0]) == "invalid_payload")
        # A whole conversation on another thread: many database round trips after the subscription's first read.
        ws.send(frame("user_message", {"content": "hello"}, "later"))
        _until(ws, lambda m: m["type"] in TERMINAL)
    assert warnings_and_errors(log_records) == []


def test_conversation_beyond_the_subscription_limit_is_refused_whole_or_runs(
        live_server: LiveServer, client: httpx.Client, account: Account, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each conversation started over a connection subscribes it to the new thread. One past the limit must not
    be acknowledged and then abandoned: either it is refused (no ack, no run) or its run runs."""
    monkeypatch.setattr(ws_session, "MAX_SUBSCRIPTIONS", 2)  # the real limit is 100; the behaviour is the same
    with user_ws(live_server, account) as ws:
        greeted(ws)
        for n in range(2):
            ws.send(frame("user_message", {"content": f"conversation {n}"}, f"c{n}"))
            _until(ws, lambda m: m["type"] in TERMINAL)
        answers = [a for a in answers_until_pong(ws, frame("user_message", {"content": "one too many"}, "c2"))
                   if a.get("id") == "c2"]
    acks = [a for a in answers if a["type"] == "ack"]
    if not acks:
        assert any(a["type"] == "error" for a in answers), answers
        return
    run_id = acks[0]["payload"]["run_id"]

    def run_status() -> str:
        return str(client.get(f"/api/runs/{run_id}", headers=account.headers).json()["status"])

    try:
        wait_for(lambda: run_status() in ("completed", "failed", "cancelled"), timeout=10, message="the run")
    except AssertionError:
        pytest.fail(f"the acknowledged run never ran: it is still {run_status()!r}; the answers were {answers}")


def test_a_message_refused_for_too_many_waiting_runs_creates_no_thread(make_settings: SettingsFactory) -> None:
    """A `user_message` without a thread is refused before the thread would be made: a user at the limit of
    waiting runs gets `rate_limited` and no new, empty thread per attempt."""
    # One run at a time, and the first takes a while (a few tokens a second).
    server = LiveServer(make_settings(max_queued_runs_per_user=1, builtin_token_delay_s=0.5)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            account = register(client)
            with user_ws(server, account) as ws:
                greeted(ws)
                ws.send(frame("user_message", {"content": "hello there"}, "first"))
                assert recv_json(ws)["type"] == "thread_created"
                wait_for(lambda: recv_json(ws)["type"] == "ack", message="the first message acknowledged")
                ws.send(frame("user_message", {"content": "and another"}, "second"))
                answer = recv_json(ws)
                while answer["type"] != "error":  # the first run's events stream meanwhile
                    assert answer["type"] != "thread_created", answer
                    answer = recv_json(ws)
                assert error_of(answer) == "rate_limited" and answer["id"] == "second"
            threads = client.get("/api/threads", headers=account.headers).json()
            assert threads["total"] == 1
    finally:
        server.stop()
