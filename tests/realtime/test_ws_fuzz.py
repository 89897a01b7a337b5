"""Ten thousand random frames over one live connection: text and binary, broken JSON, JSON that is not an object,
envelopes with real and junk types, ids and payloads. Every frame is answered before a ping sent after it is
(a valid `disconnect` instead closes with 1000), no answer is an internal error, and the server stays healthy."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from parley.realtime.protocol import ClientMessageType
from parley.settings import Settings
from tests.conftest import SettingsFactory
from tests.support.clients import Account
from tests.support.live import LiveServer
from tests.support.ws import answers_until_pong, assert_answers_ping, frame, greeted, recv_json, ws_connect

EXAMPLES = 10_000
REAL_TYPES = [t.value for t in ClientMessageType]
ABSENT = object()  # a key left out of the envelope (different from an explicit null)


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings(builtin_token_delay_s=0, ws_messages_per_minute=1_000_000)


# --- what a random frame looks like ---------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
short_text = st.text(max_size=40)


def _payloads(thread_id: str, run_id: str) -> dict[str, st.SearchStrategy[Any]]:
    """Payloads that are often valid for each real type (and often subtly not), beside plain junk."""
    threads = st.sampled_from([thread_id]) | short_text
    agents = st.sampled_from(["assistant"]) | short_text
    on_busy = st.sampled_from(["enqueue", "reject", "interrupt"]) | short_text
    seqs = st.integers(min_value=-3, max_value=50) | st.integers()
    return {
        "ping": st.just({}),
        "user_message": st.fixed_dictionaries(
            {"content": st.text(min_size=1, max_size=80)},
            optional={"thread_id": threads, "agent": agents, "on_busy": on_busy,
                      "client_message_id": st.text(max_size=110)}),
        "start_agent": st.fixed_dictionaries(
            {"agent": agents, "input": st.text(min_size=1, max_size=80)},
            optional={"thread_id": threads, "on_busy": on_busy}),
        "stop_agent": st.fixed_dictionaries({"run_id": st.sampled_from([run_id]) | short_text}),
        "subscribe": st.fixed_dictionaries({"thread_id": threads}, optional={"after_seq": seqs}),
        "unsubscribe": st.fixed_dictionaries({"thread_id": threads}),
        "disconnect": st.just({}),
    }


@st.composite
def envelopes(draw: st.DrawFn, thread_id: str, run_id: str) -> dict[str, Any]:
    """Mostly well-formed envelopes (so the handlers run, not only the parser), with each part sometimes wrong."""
    junk_payload = st.dictionaries(short_text, json_values, max_size=3) | json_values
    roll = draw(st.integers(0, 9))
    type_: Any = (draw(st.sampled_from(REAL_TYPES)) if roll < 6 else draw(short_text) if roll < 8
                  else draw(json_values) if roll < 9 else ABSENT)
    payloads = _payloads(thread_id, run_id)
    roll = draw(st.integers(0, 9))
    if isinstance(type_, str) and type_ in payloads and roll < 6:
        payload = draw(payloads[type_])
    else:
        payload = draw(junk_payload) if roll < 9 else ABSENT
    roll = draw(st.integers(0, 9))
    id_: Any = (ABSENT if roll < 4 else draw(st.text(min_size=1, max_size=128)) if roll < 8
                else draw(st.just("") | st.text(min_size=129, max_size=140)) if roll < 9 else draw(json_values))
    envelope = {key: value for key, value in (("type", type_), ("id", id_), ("payload", payload))
                if value is not ABSENT}
    if draw(st.integers(0, 19)) == 0:
        envelope.update(draw(st.dictionaries(short_text, json_values, min_size=1, max_size=2)))
    return envelope


@st.composite
def frames(draw: st.DrawFn, thread_id: str, run_id: str) -> str | bytes:
    kind = draw(st.sampled_from(["envelope"] * 5 + ["text", "binary", "json value"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    value: Any = draw(envelopes(thread_id, run_id)) if kind == "envelope" else draw(json_values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))  # NaN and Infinity too: not JSON, for the server
    return text.encode() if draw(st.integers(0, 4)) == 0 else text


# --- what the server must do with it ---------------------------------------------------------------------------------

def _parsed(sent: str | bytes) -> Any:
    try:
        return orjson.loads(sent)
    except orjson.JSONDecodeError:
        return None


def _echoable_id(value: Any) -> str | None:
    """The id the server must echo: present, a string, 1 to 128 characters."""
    if not isinstance(value, dict):
        return None
    request_id = value.get("id")
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 128 else None


def _is_valid_disconnect(value: Any) -> bool:
    return (isinstance(value, dict) and value.get("type") == "disconnect" and set(value) <= {"type", "id", "payload"}
            and ("id" not in value or value["id"] is None or _echoable_id(value) is not None)
            and value.get("payload", {}) == {} and isinstance(value.get("payload", {}), dict))


@dataclass
class FuzzedConnection:
    server: LiveServer
    account: Account
    ws: ClientConnection | None = None
    reconnects: int = 0
    answered: dict[str, int] = field(default_factory=dict)

    def open(self) -> ClientConnection:
        if self.ws is None:
            self.ws = ws_connect(self.server.ws_url, headers=self.account.headers)
            greeted(self.ws)
        return self.ws

    def send(self, sent: str | bytes) -> None:
        ws = self.open()
        value = _parsed(sent)
        try:
            answers = answers_until_pong(ws, sent)
        except ConnectionClosed as closed:
            self.ws = None
            self.reconnects += 1
            assert _is_valid_disconnect(value), f"closed ({closed.rcvd}) after {sent!r}"
            assert closed.rcvd is not None and closed.rcvd.code == 1000, closed.rcvd
            return
        assert not _is_valid_disconnect(value), f"a valid disconnect did not close: {sent!r} -> {answers}"
        assert answers, f"no answer to {sent!r}"
        internal = [a for a in answers if a["type"] == "error" and a["payload"]["code"] == "internal_error"]
        assert internal == [], f"{sent!r} -> {internal}"
        request_id = _echoable_id(value)
        if request_id is not None:
            assert any(a.get("id") == request_id for a in answers), f"id not echoed: {sent!r} -> {answers}"
        for answer in answers:
            key = answer["payload"].get("code", answer["type"]) if answer["type"] == "error" else answer["type"]
            self.answered[key] = self.answered.get(key, 0) + 1


@pytest.mark.slow
def test_ten_thousand_random_frames_are_each_answered_and_the_server_stays_healthy(
        live_server: LiveServer, client: httpx.Client, account: Account,
        log_records: list[logging.LogRecord]) -> None:
    thread = client.post("/api/threads", headers=account.headers, json={"title": "fuzz"}).json()
    with ws_connect(live_server.ws_url, headers=account.headers) as ws:  # a finished run, for stop_agent
        greeted(ws)
        ws.send(frame("user_message", {"thread_id": thread["id"], "content": "hello"}, "seed"))
        while (message := recv_json(ws, 20))["type"] not in ("agent_completed", "agent_error"):
            pass
        run_id = str(message["run_id"])
    connection = FuzzedConnection(live_server, account)

    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(sent=frames(thread["id"], run_id))
    def every_frame_is_answered(sent: str | bytes) -> None:
        connection.send(sent)

    every_frame_is_answered()

    ws = connection.open()
    assert_answers_ping(ws)
    ws.close()
    assert client.get("/health").status_code == 200
    assert {"pong", "ack", "invalid_json", "invalid_payload", "unknown_type"} <= set(connection.answered), \
        connection.answered  # the frames reached every kind of answer, not just one
    assert connection.reconnects > 0, "no random frame was a valid disconnect"
    errors = [r.getMessage() for r in list(log_records) if r.levelno >= logging.ERROR]
    assert errors == []
