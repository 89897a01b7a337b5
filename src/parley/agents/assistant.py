"""The built-in `assistant`: asks the model, runs the tools it asks for, and streams the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

from parley.agents.base import AgentEvent, AgentInput, Finished, TextChunk, Thinking, ToolFinished, ToolStarted
from parley.agents.context import UserExecutionContext
from parley.llm.base import ChatMessage, LLMRequest, TextDelta, ToolCall, Usage, tool_message_content
from parley.tools.dispatcher import parse_arguments

SYSTEM_PROMPT = (
    "You are parley's assistant. Answer briefly and plainly. Use the tools when they help: "
    "current_time for the date and time, calculator for arithmetic, search_threads to find what the user "
    "wrote in earlier conversations, usage_report for their token usage and cost."
)


class Assistant:
    name: ClassVar[str] = "assistant"
    description: ClassVar[str] = ("A general assistant that can tell the time, calculate, search your threads and "
                                  "report your token usage.")
    tool_names: ClassVar[tuple[str, ...]] = ("search_threads", "current_time", "calculator", "usage_report")
    admin_only: ClassVar[bool] = False
    system_prompt: ClassVar[str] = SYSTEM_PROMPT

    async def run(self, ctx: UserExecutionContext, run_input: AgentInput) -> AsyncIterator[AgentEvent]:
        messages = [ChatMessage(role="system", content=self.system_prompt), *run_input.history]
        tools = run_input.dispatcher.specs()
        input_tokens = output_tokens = 0
        first_token_ms: float | None = None
        model = run_input.llm.model
        for step in range(run_input.max_steps):
            yield Thinking("Reading your message." if step == 0 else "Reading the tool results.")
            calls: list[ToolCall] = []
            text: list[str] = []
            async for chunk in run_input.llm.stream(LLMRequest(messages=tuple(messages), tools=tools)):
                if isinstance(chunk, TextDelta):
                    text.append(chunk.text)
                    yield TextChunk(chunk.text)
                elif isinstance(chunk, ToolCall):
                    calls.append(chunk)
                elif isinstance(chunk, Usage):
                    input_tokens += chunk.input_tokens
                    output_tokens += chunk.output_tokens
                    model = chunk.model
                    if first_token_ms is None:
                        first_token_ms = chunk.time_to_first_token_ms
            if not calls:
                break
            messages.append(ChatMessage(role="assistant", content="".join(text), tool_calls=tuple(calls)))
            for call in calls:
                yield ToolStarted(call.id, call.name, parse_arguments(call.arguments) or {})
                outcome = await run_input.dispatcher.execute(call)
                yield ToolFinished(outcome)
                messages.append(ChatMessage(role="tool", tool_call_id=call.id, content=tool_message_content(
                    outcome.ok, outcome.result, outcome.error)))
        yield Finished(Usage(input_tokens, output_tokens, model, first_token_ms))
