"""A second user cannot see, subscribe to, post in, or stop the first user's threads and runs, by any route
(incident pattern 9: global state leaking between users)."""

from __future__ import annotations

import asyncio
from dataclasses import FrozenInstanceError

import httpx
import pytest

from parley.agents.context import UserExecutionContext
from parley.llm.base import ToolCall
from parley.tools.builtin import CalculatorTool, SearchThreadsTool
from parley.tools.dispatcher import ToolDispatcher
from tests.support.clients import error_code, register
from tests.support.conversation import Chat
from tests.support.live import LiveServer, wait_for


def test_second_user_cannot_touch_first_users_threads_or_runs(live_server: LiveServer,
                                                              client: httpx.Client) -> None:
    owner, intruder = register(client), register(client)
    thread_id = client.post("/api/threads", json={}, headers=owner.headers).json()["id"]
    run_id = client.post(f"/api/threads/{thread_id}/messages", json={"content": "my secret plan"},
                         headers=owner.headers).json()["run"]["id"]
    wait_for(lambda: client.get(f"/api/runs/{run_id}", headers=owner.headers).json()["status"] == "completed",
             message="owner's run")

    rest_calls = [
        client.post(f"/api/threads/{thread_id}/messages", json={"content": "mine now"}, headers=intruder.headers),
        client.get(f"/api/threads/{thread_id}/runs", headers=intruder.headers),
        client.get(f"/api/runs/{run_id}", headers=intruder.headers),
        client.post(f"/api/runs/{run_id}/cancel", headers=intruder.headers),
        client.get(f"/api/threads/{thread_id}/events?after_seq=0", headers=intruder.headers),
    ]
    for response in rest_calls:
        assert response.status_code == 404, response.request.url
        assert error_code(response) == "not_found"

    with Chat(live_server.ws_url, intruder) as chat:
        for type_, payload in [
            ("subscribe", {"thread_id": thread_id, "after_seq": 0}),
            ("user_message", {"thread_id": thread_id, "content": "hello"}),
            ("start_agent", {"thread_id": thread_id, "agent": "assistant", "input": "hello"}),
            ("stop_agent", {"run_id": run_id}),
        ]:
            request_id = chat.send(type_, payload)
            answer = chat.recv()
            assert answer["type"] == "error" and answer["id"] == request_id, answer
            assert answer["payload"]["code"] == "not_found"
        chat.send("ping", {}, "still-here")
        assert chat.recv()["type"] == "pong"  # nothing leaked in between: the next message is the pong

    history = client.get(f"/api/threads/{thread_id}/messages", headers=owner.headers).json()["items"]
    assert history[0]["content"] == "my secret plan" and len(history) == 2


def test_search_threads_sees_only_the_callers_messages(live_server: LiveServer, client: httpx.Client) -> None:
    alice, bob = register(client), register(client)
    for account, text in ((alice, "alice's zebra plans"), (bob, "bob's zebra plans")):
        thread = client.post("/api/threads", json={}, headers=account.headers).json()["id"]
        client.post(f"/api/threads/{thread}/messages", json={"content": text}, headers=account.headers)
    with Chat(live_server.ws_url, bob) as chat:
        chat.send("user_message", {"content": "search for zebra"})
        messages = chat.run_to_end()
    result = next(m for m in messages if m["type"] == "tool_completed")["payload"]["result"]
    contents = " ".join(match["snippet"] for match in result["matches"])
    assert "bob's zebra" in contents and "alice" not in contents


def test_dispatcher_cannot_exist_without_a_user_context() -> None:
    with pytest.raises(TypeError):
        ToolDispatcher(None, {"calculator": CalculatorTool()})  # type: ignore[arg-type]
    ctx = UserExecutionContext(user_id="u1", thread_id="t1", run_id="r1", request_id="q1", agent="assistant")
    with pytest.raises(FrozenInstanceError):
        ctx.user_id = "u2"  # type: ignore[misc]
    dispatcher = ToolDispatcher(ctx, {"calculator": CalculatorTool()})
    outcome = asyncio.run(dispatcher.execute(ToolCall("c1", "calculator", '{"expression": "6*7"}')))
    assert outcome.ok and outcome.result["result"] == 42
    missing = asyncio.run(dispatcher.execute(ToolCall("c2", "search_threads", '{"query": "x"}')))
    assert not missing.ok and "no tool named" in (missing.error or "")
    bad = asyncio.run(dispatcher.execute(ToolCall("c3", "calculator", '{"expression": 5}')))
    assert not bad.ok and (bad.error or "").startswith("invalid arguments")


def test_admin_only_tools_are_invisible_to_other_users() -> None:
    class AdminTool(SearchThreadsTool):
        admin_only = True
        name = "admin_search"

    user = UserExecutionContext(user_id="u", thread_id="t", run_id="r", request_id="q", agent="a")
    admin = UserExecutionContext(user_id="u", thread_id="t", run_id="r", request_id="q", agent="a", is_admin=True)
    tools = {"admin_search": AdminTool.__new__(AdminTool)}
    assert [s.name for s in ToolDispatcher(user, tools).specs()] == []
    assert [s.name for s in ToolDispatcher(admin, tools).specs()] == ["admin_search"]
