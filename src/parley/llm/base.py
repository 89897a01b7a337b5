"""The streaming interface every provider implements: text deltas, complete tool calls, then usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool the model asks for. `arguments` is the model's raw JSON text; the dispatcher validates it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_call_id: str | None = None  # role "tool": the call this result answers
    tool_calls: tuple[ToolCall, ...] = ()  # role "assistant": the calls it made


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object


@dataclass(frozen=True, slots=True)
class LLMRequest:
    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    max_output_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int
    model: str
    time_to_first_token_ms: float | None = None


LLMChunk = TextDelta | ToolCall | Usage


def tool_message_content(ok: bool, result: Any = None, error: str | None = None) -> str:
    """How a tool's outcome is shown to a model, as the content of a `tool` message:
    `{"ok": true, "result": ..., "error": null}` or `{"ok": false, "result": null, "error": "..."}`."""
    return orjson.dumps({"ok": ok, "result": result, "error": error}, default=str).decode()


class LLMError(Exception):
    """A provider failed in a way the run reports (`agent_error`) rather than crashing on.

    `message` is what the user is shown; `detail` (for the log) may add what the provider itself said, which
    can quote internals of a self-hosted model server and so never goes to a client."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, status: int | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.detail = detail or message


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    ok: bool
    latency_ms: float | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LLMProvider(Protocol):
    name: str  # "builtin" or "openai"
    model: str

    def stream(self, request: LLMRequest) -> AsyncIterator[LLMChunk]:
        """Yields TextDelta and ToolCall chunks in the model's order, then exactly one Usage last.
        Raises LLMError on failure (after any retries the provider makes)."""
        ...

    async def probe(self) -> ProviderHealth:
        """A real, cheap check that the provider can answer now."""
        ...

    async def aclose(self) -> None: ...
