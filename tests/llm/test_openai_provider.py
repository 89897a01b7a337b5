"""The OpenAI provider against a real local server speaking the streaming Chat Completions protocol.

No SDK mocks: the official SDK makes real HTTP requests to `FakeOpenAI`, which records them.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import AsyncIterator, Iterator

import pytest

from parley.llm.base import ChatMessage, LLMChunk, LLMError, LLMRequest, TextDelta, ToolCall, ToolSpec, Usage
from parley.llm.component import LLMComponent
from parley.llm.openai_provider import OpenAIProvider
from tests.support.fake_openai import (
    MODEL,
    ErrorReply,
    FakeOpenAI,
    ScriptedToolCall,
    StallReply,
    TextReply,
    ToolCallReply,
)

API_KEY = "sk-test-SECRETKEY-0123456789abcdef"
FAST_RETRY = {"retry-after-ms": "10"}  # the SDK honours it, so retry tests take milliseconds
WEATHER = ToolSpec(name="weather", description="Weather for a city.",
                   parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def make_provider(fake: FakeOpenAI, *, timeout_s: float = 5.0, max_retries: int = 2,
                  health_ttl_s: float = 30.0) -> OpenAIProvider:
    return OpenAIProvider(base_url=fake.base_url, api_key=API_KEY, model=MODEL, timeout_s=timeout_s,
                          max_retries=max_retries, health_ttl_s=health_ttl_s)


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    llm = make_provider(fake)
    yield llm
    await llm.aclose()


async def collect(llm: OpenAIProvider, request: LLMRequest) -> list[LLMChunk]:
    return [chunk async for chunk in llm.stream(request)]


def ask(text: str = "Hello?", tools: tuple[ToolSpec, ...] = ()) -> LLMRequest:
    return LLMRequest(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", text)), tools=tools)


async def test_text_streams_as_deltas_then_one_usage(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.script(TextReply(("Hel", "lo, ", "world", "!"), usage=(11, 7)))

    chunks = await collect(provider, ask())

    assert chunks[:-1] == [TextDelta("Hel"), TextDelta("lo, "), TextDelta("world"), TextDelta("!")]
    usage = chunks[-1]
    assert isinstance(usage, Usage)
    assert (usage.input_tokens, usage.output_tokens, usage.model) == (11, 7, MODEL)
    assert usage.time_to_first_token_ms is not None and usage.time_to_first_token_ms >= 0
    [sent] = fake.chat_requests()
    assert sent.body["model"] == MODEL
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert "tools" not in sent.body  # no tools offered: the key is left out, not sent empty
    assert sent.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"


async def test_usage_falls_back_to_zero_when_the_server_sends_none(fake: FakeOpenAI,
                                                                   provider: OpenAIProvider) -> None:
    fake.script(TextReply(("fine",), usage=None))

    chunks = await collect(provider, ask())

    assert chunks == [TextDelta("fine"), Usage(0, 0, MODEL, chunks[-1].time_to_first_token_ms)]  # type: ignore[union-attr]


async def test_tool_calls_are_assembled_from_fragments(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.script(ToolCallReply(
        calls=(ScriptedToolCall("call_a", "weather", ('{"ci', 'ty": "Pa', 'ris"}')),
               ScriptedToolCall("call_b", "calculator", ('{"expression"', ': "2 + ', '2"}'))),
        text_before="Checking. ", interleave=True, usage=(20, 9)))

    chunks = await collect(provider, ask("Weather in Paris and 2+2?", tools=(WEATHER,)))

    assert chunks[0] == TextDelta("Checking. ")
    assert chunks[1:3] == [ToolCall("call_a", "weather", '{"city": "Paris"}'),
                           ToolCall("call_b", "calculator", '{"expression": "2 + 2"}')]
    assert isinstance(chunks[3], Usage) and chunks[3].input_tokens == 20 and len(chunks) == 4
    [sent] = fake.chat_requests()
    assert sent.body["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather for a city.", "parameters": WEATHER.parameters}}]


async def test_tool_results_are_sent_back_in_the_api_shape(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.script(TextReply(("It is 18°C in Paris.",)))
    conversation = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_a", "weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", '{"ok":true,"result":{"celsius":18},"error":null}', tool_call_id="call_a"),
    )

    chunks = await collect(provider, LLMRequest(messages=conversation, tools=(WEATHER,)))

    assert chunks[0] == TextDelta("It is 18°C in Paris.")
    [sent] = fake.chat_requests()
    assert sent.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"ok":true,"result":{"celsius":18},"error":null}'},
    ]


async def test_max_output_tokens_is_passed_on(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.script(TextReply(("ok",)))

    await collect(provider, LLMRequest(messages=(ChatMessage("user", "hi"),), max_output_tokens=64))

    assert fake.chat_requests()[0].body["max_completion_tokens"] == 64


async def test_rate_limit_is_retried_then_succeeds(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.script(ErrorReply(429, "slow down", headers=FAST_RETRY, error_type="rate_limit_error"), TextReply(("ok",)))

    chunks = await collect(provider, ask())

    assert chunks[0] == TextDelta("ok")
    sent = fake.chat_requests()
    assert len(sent) == 2
    assert sent[1].headers["x-stainless-retry-count"] == "1"


async def test_persistent_server_error_becomes_a_retryable_llm_error(fake: FakeOpenAI) -> None:
    fake.script(*[ErrorReply(500, "boom", headers=FAST_RETRY)] * 3)
    llm = make_provider(fake, max_retries=2)

    with pytest.raises(LLMError) as caught:
        await collect(llm, ask())
    await llm.aclose()

    assert caught.value.code == "llm_unavailable"
    assert caught.value.retryable is True
    assert caught.value.status == 500
    assert len(fake.chat_requests()) == 3  # the first attempt and max_retries more


async def test_bad_api_key_is_llm_auth_without_retry_or_leak(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    # OpenAI's real 401 quotes a masked key; the provider must not pass even that on.
    fake.script(ErrorReply(401, f"Incorrect API key provided: {API_KEY}. Also sk-test***cdef.",
                           error_type="invalid_request_error"))

    with pytest.raises(LLMError) as caught:
        await collect(provider, ask())

    error = caught.value
    assert error.code == "llm_auth"
    assert error.retryable is False
    assert error.status == 401
    assert len(fake.chat_requests()) == 1
    printed = "".join(traceback.format_exception(error)) + repr(error) + str(error)
    assert "SECRETKEY" not in printed and "sk-test" not in printed
    assert "PARLEY_OPENAI_API_KEY" in error.message


async def test_a_bad_request_is_not_retried(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    fake.script(ErrorReply(400, "messages: too long", error_type="invalid_request_error"))

    with pytest.raises(LLMError) as caught:
        await collect(provider, ask())

    assert (caught.value.code, caught.value.retryable, caught.value.status) == ("llm_bad_request", False, 400)
    assert "messages: too long" in caught.value.detail  # for the operator's log
    assert "messages: too long" not in caught.value.message  # never for the user: it can quote internals
    assert "400" in caught.value.message
    assert len(fake.chat_requests()) == 1


async def test_a_server_that_never_answers_is_llm_timeout(fake: FakeOpenAI) -> None:
    fake.script(StallReply(seconds=5))
    llm = make_provider(fake, timeout_s=0.3, max_retries=0)

    with pytest.raises(LLMError) as caught:
        await collect(llm, ask())
    await llm.aclose()

    assert (caught.value.code, caught.value.retryable) == ("llm_timeout", True)


async def test_a_stall_before_the_stream_is_retried(fake: FakeOpenAI) -> None:
    fake.script(StallReply(seconds=5), TextReply(("late but fine",)))
    llm = make_provider(fake, timeout_s=0.3, max_retries=1)

    chunks = await collect(llm, ask())
    await llm.aclose()

    assert chunks[0] == TextDelta("late but fine")
    assert len(fake.chat_requests()) == 2


async def test_a_stream_that_stalls_midway_is_llm_timeout_after_its_text(fake: FakeOpenAI) -> None:
    fake.script(StallReply(seconds=5, pieces=("Once upon",), before_headers=False))
    llm = make_provider(fake, timeout_s=0.3, max_retries=2)
    received: list[LLMChunk] = []

    with pytest.raises(LLMError) as caught:
        async for chunk in llm.stream(ask()):
            received.append(chunk)
    await llm.aclose()

    assert received == [TextDelta("Once upon")]
    assert caught.value.code == "llm_timeout"
    assert len(fake.chat_requests()) == 1  # once streaming has begun, a retry would repeat text already shown


async def test_probe_reports_latency_and_caches_for_the_ttl(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    first = await provider.probe()
    second = await provider.probe()

    assert first.ok is True
    assert first.latency_ms is not None and first.latency_ms > 0
    assert first.extra["model_listed"] is True
    assert second == first
    assert len(fake.model_requests()) == 1


async def test_probe_failure_is_reported_not_raised(fake: FakeOpenAI) -> None:
    fake.script_models(ErrorReply(503, "overloaded", headers=FAST_RETRY))
    llm = make_provider(fake, health_ttl_s=0)

    down = await llm.probe()
    up = await llm.probe()  # ttl 0: checked again, and the server is fine now
    await llm.aclose()

    assert down.ok is False
    assert down.extra["code"] == "llm_unavailable"
    assert down.detail is not None and "503" in down.detail
    assert up.ok is True
    assert len(fake.model_requests()) == 2  # the probe makes one attempt; it does not retry


async def test_public_health_names_the_failure_not_the_providers_words(fake: FakeOpenAI) -> None:
    """/health is unauthenticated: the llm component shows the failure's code, never the provider's own
    message (which can name an account or organisation)."""
    fake.script_models(ErrorReply(429, "Rate limit reached for org-SECRETORG on requests", headers=FAST_RETRY))
    llm = make_provider(fake, health_ttl_s=0)
    health = await LLMComponent(llm).check()
    await llm.aclose()

    assert health.status == "unhealthy"
    assert health.detail == f"openai:{MODEL} llm_rate_limited"
    assert "SECRETORG" not in (health.detail or "")


async def test_probe_of_an_unreachable_server_is_not_ok() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the probe: nothing listens there
    llm = OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, model=MODEL, timeout_s=1,
                         max_retries=0)

    health = await llm.probe()
    await llm.aclose()

    assert health.ok is False
    assert health.extra["code"] == "llm_unavailable"


async def test_no_api_key_still_talks_to_a_keyless_server(fake: FakeOpenAI) -> None:
    fake.script(TextReply(("hi",)))
    llm = OpenAIProvider(base_url=fake.base_url, api_key=None, model=MODEL, timeout_s=5, max_retries=0)

    chunks = await collect(llm, ask())
    await llm.aclose()

    assert chunks[0] == TextDelta("hi")
    assert "SECRETKEY" not in repr(llm)
