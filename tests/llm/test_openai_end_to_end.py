"""parley configured for an OpenAI-compatible server, end to end: a WebSocket conversation whose model asks
for a tool, gets its result back, and streams the answer; and a model failure ending the run cleanly."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.support.clients import register
from tests.support.conversation import Chat
from tests.support.fake_openai import ErrorReply, FakeOpenAI, ScriptedToolCall, TextReply, ToolCallReply
from tests.support.live import LiveServer


def test_conversation_through_an_openai_compatible_server(make_settings: SettingsFactory) -> None:
    with FakeOpenAI() as fake:
        fake.script(
            ToolCallReply(calls=(ScriptedToolCall("call_a", "calculator", ('{"expre', 'ssion": "6', '*7"}')),)),
            TextReply(pieces=("The answer ", "is 42", ".")),
        )
        prices = '{"fake-model": {"input_per_mtok": 1000, "output_per_mtok": 2000}}'
        server = LiveServer(make_settings(llm_provider="openai", openai_base_url=fake.base_url,
                                          openai_api_key="sk-test-key-not-real", openai_model="fake-model",
                                          llm_max_retries=0, model_prices=prices)).start()
        try:
            with httpx.Client(base_url=server.url) as client:
                account = register(client)
                with Chat(server.ws_url, account) as chat:
                    chat.send("user_message", {"content": "what is six times seven?"})
                    messages = chat.run_to_end()
                health = client.get("/health").json()["components"]["llm"]
                run = client.get(f"/api/runs/{messages[-1]['run_id']}", headers=account.headers).json()
        finally:
            server.stop()
        types = [m["type"] for m in messages if "seq" in m]
        assert types[:4] == ["agent_started", "agent_thinking", "tool_executing", "tool_completed"]
        tool = next(m for m in messages if m["type"] == "tool_completed")["payload"]
        assert tool["ok"] is True and tool["result"]["result"] == 42
        assert messages[-1]["type"] == "agent_completed"
        assert messages[-1]["payload"]["message"]["content"] == "The answer is 42."
        usage = messages[-1]["payload"]["usage"]
        assert usage["input_tokens"] == 20 + 11 and usage["output_tokens"] == 9 + 7
        # Each call priced on its own: (20 * 1000 + 9 * 2000) / 1e6 + (11 * 1000 + 7 * 2000) / 1e6.
        assert usage["cost_usd"] == pytest.approx(0.038 + 0.025)
        assert run["usage"] == usage

        first, second = fake.chat_requests()
        assert first.body["model"] == "fake-model" and first.body["stream"] is True
        offered = {t["function"]["name"] for t in first.body["tools"]}
        assert offered == {"search_threads", "current_time", "usage_report", "calculator"}
        assert first.headers["authorization"] == "Bearer sk-test-key-not-real"
        sent = second.body["messages"]
        assert sent[0]["role"] == "system" and sent[1] == {"role": "user", "content": "what is six times seven?"}
        assert sent[2]["role"] == "assistant" and sent[2]["tool_calls"][0]["id"] == "call_a"
        assert sent[3]["role"] == "tool" and sent[3]["tool_call_id"] == "call_a" and '"result"' in sent[3]["content"]
        assert health["status"] == "healthy" and health["detail"] == "openai:fake-model"


def test_model_failure_ends_the_run_with_agent_error(make_settings: SettingsFactory) -> None:
    with FakeOpenAI() as fake:
        fake.script(ErrorReply(500), ErrorReply(500))
        server = LiveServer(make_settings(llm_provider="openai", openai_base_url=fake.base_url,
                                          openai_api_key="sk-secret-do-not-leak", llm_max_retries=1)).start()
        try:
            with httpx.Client(base_url=server.url) as client:
                account = register(client)
                with Chat(server.ws_url, account) as chat:
                    chat.send("user_message", {"content": "hello"})
                    messages = chat.run_to_end()
                run = client.get(f"/api/runs/{messages[-1]['run_id']}", headers=account.headers).json()
        finally:
            server.stop()
        error = messages[-1]
        assert error["type"] == "agent_error" and error["payload"]["error"]["code"] == "llm_unavailable"
        assert "sk-secret" not in str(messages)
        assert run["status"] == "failed" and run["error"]["code"] == "llm_unavailable"
        assert len(fake.chat_requests()) == 2  # retried once, as configured


def test_a_second_turn_shows_the_model_the_first(make_settings: SettingsFactory) -> None:
    with FakeOpenAI() as fake:
        fake.script(TextReply(pieces=("Nice to ", "meet you.")), TextReply(pieces=("You said hello.",)))
        server = LiveServer(make_settings(llm_provider="openai", openai_base_url=fake.base_url,
                                          openai_api_key="sk-test", llm_max_retries=0)).start()
        try:
            with httpx.Client(base_url=server.url) as client:
                account = register(client)
                with Chat(server.ws_url, account) as chat:
                    chat.send("user_message", {"content": "hello"})
                    thread_id = chat.run_to_end()[-1]["thread_id"]
                    chat.send("user_message", {"thread_id": thread_id, "content": "what did I say?"})
                    chat.run_to_end()
        finally:
            server.stop()
        second = fake.chat_requests()[1].body["messages"]
        assert [(m["role"], m["content"]) for m in second[1:]] == [
            ("user", "hello"), ("assistant", "Nice to meet you."), ("user", "what did I say?")]
