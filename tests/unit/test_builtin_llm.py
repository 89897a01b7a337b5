"""The built-in provider: which tools it asks for, how it words answers, and how it streams them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parley.llm.base import (
    ChatMessage,
    LLMChunk,
    LLMRequest,
    TextDelta,
    ToolCall,
    ToolSpec,
    Usage,
    tool_message_content,
)
from parley.llm.builtin import BuiltinProvider, split_tokens
from parley.tools.base import Tool, tool_spec
from parley.tools.builtin import CalculatorTool, CurrentTimeTool, SearchThreadsTool

MOMENT = datetime(2026, 11, 29, 14, 5, tzinfo=UTC)  # a Sunday
ALL_TOOLS: tuple[ToolSpec, ...] = tuple(
    tool_spec(tool) for tool in (CurrentTimeTool(), CalculatorTool(), SearchThreadsTool(database=None))  # type: ignore[arg-type]
)


def request(text: str, tools: tuple[ToolSpec, ...] = ALL_TOOLS, history: tuple[ChatMessage, ...] = ()) -> LLMRequest:
    return LLMRequest(messages=(ChatMessage("system", "You are helpful."), *history, ChatMessage("user", text)),
                      tools=tools)


async def collect(provider: BuiltinProvider, llm_request: LLMRequest) -> list[LLMChunk]:
    return [chunk async for chunk in provider.stream(llm_request)]


async def tool_calls(text: str, tools: tuple[ToolSpec, ...] = ALL_TOOLS) -> list[tuple[str, dict[str, Any]]]:
    chunks = await collect(BuiltinProvider(token_delay_s=0), request(text, tools))
    return [(chunk.name, orjson.loads(chunk.arguments)) for chunk in chunks if isinstance(chunk, ToolCall)]


def answer_of(chunks: list[LLMChunk]) -> str:
    return "".join(chunk.text for chunk in chunks if isinstance(chunk, TextDelta))


def with_results(text: str, calls: list[ToolCall], contents: list[str]) -> LLMRequest:
    """The conversation after the agent ran `calls` and stored their results as tool messages."""
    return request(text) if not calls else LLMRequest(
        messages=(ChatMessage("system", "You are helpful."), ChatMessage("user", text),
                  ChatMessage("assistant", "", tool_calls=tuple(calls)),
                  *(ChatMessage("tool", content, tool_call_id=call.id) for call, content in zip(calls, contents,
                                                                                                strict=True))),
        tools=ALL_TOOLS)


# --- choosing tools -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("What time is it?", [("current_time", {})]),
    ("what's the date today", [("current_time", {})]),
    ("What time is it in Europe/Paris?", [("current_time", {"timezone": "Europe/Paris"})]),
    ("time in america/new_york please", [("current_time", {"timezone": "America/New_York"})]),
    ("what time is it in UTC", [("current_time", {"timezone": "UTC"})]),
    ("what is 2+2?", [("calculator", {"expression": "2+2"})]),
    ("2 + 2", [("calculator", {"expression": "2 + 2"})]),
    ("Calculate 12 * (3 + 4) / 2.", [("calculator", {"expression": "12 * (3 + 4) / 2"})]),
    ("compute sqrt(2) * 10", [("calculator", {"expression": "sqrt(2) * 10"})]),
    ("what is 7 divided by 2", [("calculator", {"expression": "7 / 2"})]),
    ("what is 3 x 4", [("calculator", {"expression": "3 * 4"})]),
    ("Did I mention pineapples?", [("search_threads", {"query": "pineapples"})]),
    ("search for invoice tuesday", [("search_threads", {"query": "invoice tuesday"})]),
    ("Do you remember what I said about the dentist appointment?",
     [("search_threads", {"query": "dentist appointment"})]),
    ("look for the time I talked about Lisbon", [("search_threads", {"query": "time Lisbon"})]),
    ("What time is it in Asia/Tokyo, and what is 6 * 7?",
     [("current_time", {"timezone": "Asia/Tokyo"}), ("calculator", {"expression": "6 * 7"})]),
])
async def test_intent_rules_pick_tools(text: str, expected: list[tuple[str, dict[str, Any]]]) -> None:
    assert await tool_calls(text) == expected


@pytest.mark.parametrize("text", [
    "hello there",
    "I have 2 cats and 3 dogs",
    "call me on 555-1234 tomorrow please",
    "the meeting is on 2026-11-29",
    "my flight lands at 14:05",
    "search",  # nothing left to search for
])
async def test_no_tool_when_none_applies(text: str) -> None:
    assert await tool_calls(text) == []


async def test_only_offered_tools_are_called() -> None:
    only_calculator = tuple(spec for spec in ALL_TOOLS if spec.name == "calculator")

    assert await tool_calls("what time is it and what is 2+2", only_calculator) == [
        ("calculator", {"expression": "2+2"})]
    assert await tool_calls("what time is it?", only_calculator) == []
    assert await tool_calls("what time is it?", ()) == []


async def test_tool_calls_come_with_distinct_ids_then_usage() -> None:
    chunks = await collect(BuiltinProvider(0), request("time in Europe/Paris and 1+1"))

    calls = [chunk for chunk in chunks if isinstance(chunk, ToolCall)]
    assert [call.id for call in calls] == ["call_1_1", "call_1_2"]
    assert isinstance(chunks[-1], Usage) and len(chunks) == 3
    assert not any(isinstance(chunk, TextDelta) for chunk in chunks)


async def test_ids_differ_from_one_turn_to_the_next() -> None:
    earlier = (ChatMessage("user", "1+1"),
               ChatMessage("assistant", "", tool_calls=(ToolCall("call_1_1", "calculator", '{"expression":"1+1"}'),)),
               ChatMessage("tool", tool_message_content(True, {"expression": "1+1", "result": 2}),
                           tool_call_id="call_1_1"),
               ChatMessage("assistant", "1+1 = 2."))
    chunks = await collect(BuiltinProvider(0), request("and 2+2?", history=earlier))

    assert [chunk.id for chunk in chunks if isinstance(chunk, ToolCall)] == ["call_2_1"]


# --- answering from tool results ------------------------------------------------------------------------------


async def answer_after(text: str) -> str:
    """Asks, runs the real tools for the calls the provider makes, and returns the provider's answer."""
    provider = BuiltinProvider(0)
    first = await collect(provider, request(text))
    calls = [chunk for chunk in first if isinstance(chunk, ToolCall)]
    tools: dict[str, Tool] = {"current_time": CurrentTimeTool(now=lambda: MOMENT), "calculator": CalculatorTool()}
    contents = []
    for call in calls:
        tool = tools[call.name]
        try:
            result = await tool.run(None, tool.Params.model_validate_json(call.arguments))  # type: ignore[arg-type]
            contents.append(tool_message_content(True, result))
        except Exception as exc:  # the tool's ToolError, as the dispatcher would report it
            contents.append(tool_message_content(False, error=str(exc)))
    second = await collect(provider, with_results(text, calls, contents))
    assert not any(isinstance(chunk, ToolCall) for chunk in second)  # one round of tools per turn, never a loop
    return answer_of(second)


async def test_answers_the_time() -> None:
    assert await answer_after("what time is it?") == "It is 14:05 UTC on Sunday 29 November 2026."
    assert await answer_after("what time is it in Europe/Paris?") == (
        "In Europe/Paris it is 15:05 CET on Sunday 29 November 2026.")


async def test_answers_arithmetic() -> None:
    assert await answer_after("what is 2 + 2?") == "2 + 2 = 4."
    assert await answer_after("compute 2 ** 100") == f"2 ** 100 = {2**100}."


async def test_answers_several_results_in_order() -> None:
    assert await answer_after("what time is it and what is 6*7") == (
        "It is 14:05 UTC on Sunday 29 November 2026. 6*7 = 42.")


async def test_explains_a_failed_tool_plainly() -> None:
    assert await answer_after("what is 1/0") == "I couldn't calculate 1/0: division by zero."
    call = ToolCall("call_1_1", "search_threads", '{"query":"budget"}')
    chunks = await collect(BuiltinProvider(0), with_results(
        "did I mention the budget?", [call], [tool_message_content(False, error="timed out after 10 s")]))
    assert answer_of(chunks) == "I couldn't search your messages: timed out after 10 s."


async def test_answers_search_results() -> None:
    call = ToolCall("call_1_1", "search_threads", '{"query":"budget"}')
    found = {"query": "budget", "matches": [
        {"thread_id": "t1", "thread_title": "Planning", "message_id": "m1", "role": "user",
         "snippet": "the budget is 40k", "created_at": "2026-11-20T10:00:00.000Z"},
        {"thread_id": "t2", "thread_title": "Q3", "message_id": "m2", "role": "assistant",
         "snippet": "budget approved", "created_at": "2026-10-01T09:00:00.000Z"}]}
    none = {"query": "budget", "matches": []}

    found_answer = answer_of(await collect(BuiltinProvider(0), with_results(
        "did I mention the budget?", [call], [tool_message_content(True, found)])))
    none_answer = answer_of(await collect(BuiltinProvider(0), with_results(
        "did I mention the budget?", [call], [tool_message_content(True, none)])))

    assert found_answer == ("I found 2 messages mentioning “budget”: “the budget is 40k” (in “Planning”, 2026-11-20); "
                            "“budget approved” (in “Q3”, 2026-10-01).")
    assert none_answer == "I couldn't find any of your messages mentioning “budget”."


async def test_reads_results_that_are_not_in_the_envelope() -> None:
    call = ToolCall("call_1_1", "calculator", '{"expression":"2+2"}')
    bare = answer_of(await collect(BuiltinProvider(0), with_results(
        "2+2", [call], ['{"expression": "2+2", "result": 4}'])))
    garbled = answer_of(await collect(BuiltinProvider(0), with_results("2+2", [call], ["not json"])))

    assert bare == "2+2 = 4."
    assert garbled == "I couldn't calculate 2+2: the tool's result could not be read."


async def test_default_reply_echoes_and_lists_what_it_can_do() -> None:
    chunks = await collect(BuiltinProvider(0), request("Tell me a joke"))

    answer = answer_of(chunks)
    assert answer.startswith("You said: “Tell me a joke”.")
    assert "tell the time" in answer and "do arithmetic" in answer and "search your earlier messages" in answer

    no_tools = answer_of(await collect(BuiltinProvider(0), request("Tell me a joke", tools=())))
    assert "tell the time" not in no_tools and "language model" in no_tools


async def test_a_conversation_without_a_user_message_is_greeted() -> None:
    chunks = await collect(BuiltinProvider(0), LLMRequest(messages=(ChatMessage("system", "hi"),)))

    assert answer_of(chunks).startswith("Hello!")
    assert isinstance(chunks[-1], Usage)


# --- streaming ------------------------------------------------------------------------------------------------


async def test_deltas_are_words_that_concatenate_to_the_answer_then_one_usage() -> None:
    chunks = await collect(BuiltinProvider(0), request("Tell me a joke"))

    deltas = chunks[:-1]
    assert all(isinstance(chunk, TextDelta) for chunk in deltas)
    assert [chunk for chunk in chunks if isinstance(chunk, Usage)] == [chunks[-1]]
    text = answer_of(chunks)
    assert [delta.text for delta in deltas] == split_tokens(text)  # type: ignore[union-attr]
    assert all(delta.text.strip() and " " not in delta.text.strip() for delta in deltas)  # type: ignore[union-attr]
    usage = chunks[-1]
    assert isinstance(usage, Usage)
    assert usage.output_tokens == len(deltas)
    assert usage.input_tokens > 0
    assert usage.model == "parley-builtin"
    assert usage.time_to_first_token_ms is not None and usage.time_to_first_token_ms >= 0


async def test_token_delay_paces_the_stream() -> None:
    provider = BuiltinProvider(token_delay_s=0.01)
    started = time.perf_counter()
    chunks = await collect(provider, request("hello there"))
    elapsed = time.perf_counter() - started

    assert elapsed >= 0.01 * (len(chunks) - 2)  # a pause between each pair of tokens


async def test_max_output_tokens_truncates() -> None:
    llm_request = LLMRequest(messages=(ChatMessage("user", "hello"),), max_output_tokens=3)

    chunks = await collect(BuiltinProvider(0), llm_request)

    assert len(chunks) == 4 and isinstance(chunks[-1], Usage) and chunks[-1].output_tokens == 3


async def test_the_same_request_streams_the_same_chunks() -> None:
    provider = BuiltinProvider(0)
    for text in ("what time is it in Europe/Paris and 2+2", "hello", "did I mention kiwis?"):
        first, second = await collect(provider, request(text)), await collect(provider, request(text))
        strip = [chunk for chunk in first if not isinstance(chunk, Usage)]
        assert strip == [chunk for chunk in second if not isinstance(chunk, Usage)]
        assert first[-1].input_tokens == second[-1].input_tokens  # type: ignore[union-attr]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
async def test_any_user_text_streams_a_well_formed_reply(text: str) -> None:
    chunks = await collect(BuiltinProvider(0), request(text))

    assert isinstance(chunks[-1], Usage)
    assert not any(isinstance(chunk, Usage) for chunk in chunks[:-1])
    calls = [chunk for chunk in chunks if isinstance(chunk, ToolCall)]
    deltas = [chunk for chunk in chunks if isinstance(chunk, TextDelta)]
    assert bool(calls) != bool(deltas)  # either asks for tools or answers, never both
    for call in calls:
        assert isinstance(orjson.loads(call.arguments), dict)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_split_tokens_round_trips(text: str) -> None:
    assert "".join(split_tokens(text)) == text


async def test_probe_and_aclose() -> None:
    provider = BuiltinProvider(0)

    health = await provider.probe()
    await provider.aclose()

    assert health.ok is True
    assert health.latency_ms is not None and health.latency_ms >= 0


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="token_delay_s"):
        BuiltinProvider(token_delay_s=-1)
