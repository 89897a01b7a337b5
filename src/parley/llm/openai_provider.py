"""The OpenAI provider: streams Chat Completions through the official SDK from any compatible server.
Owns the conversion to the API's messages and tools, tool-call assembly from fragments and the error mapping.

Retries (429, 408/409, 5xx, timeouts and dropped connections before the stream starts) are the SDK's, with its
exponential backoff that honours `retry-after`; a failure that remains becomes an `LLMError` whose message never
contains the API key.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall
from pydantic import SecretStr

from parley.llm.base import ChatMessage, LLMChunk, LLMError, LLMRequest, ProviderHealth, TextDelta, ToolCall, Usage

# Servers that need no key (a local vLLM or Ollama) still get a bearer token: the SDK insists on one.
NO_API_KEY = "not-needed"
PROBE_TIMEOUT_S = 5.0
MAX_ERROR_DETAIL_CHARS = 300
# OpenAI echoes a masked key in some 401s ("sk-abc***xyz"); even a fragment does not belong in our messages.
_KEY_LIKE = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}")


class _ToolCallFragments:
    """One streamed tool call being assembled; mutable on purpose, it lives only while its stream is read."""

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []

    def add(self, fragment: ChoiceDeltaToolCall) -> None:
        if fragment.id:
            self.id = fragment.id
        if fragment.function is not None:
            if fragment.function.name:
                self.name += fragment.function.name
            if fragment.function.arguments:
                self.arguments.append(fragment.function.arguments)


@dataclass(frozen=True, slots=True)
class _CachedHealth:
    health: ProviderHealth
    checked_at: float  # time.monotonic()


class OpenAIProvider:
    name = "openai"

    def __init__(self, base_url: str, api_key: SecretStr | str | None, model: str, timeout_s: float,
                 max_retries: int, health_ttl_s: float = 30.0) -> None:
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        self.model = model
        self._secret = key or None
        self._health_ttl_s = health_ttl_s
        self._client = AsyncOpenAI(api_key=key or NO_API_KEY, base_url=base_url, timeout=timeout_s,
                                   max_retries=max_retries)
        # A health check must answer quickly and truthfully: one attempt, a short timeout, same connection pool.
        self._probe_client = self._client.with_options(max_retries=0, timeout=min(timeout_s, PROBE_TIMEOUT_S))
        self._health: _CachedHealth | None = None
        self._probe_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={str(self._client.base_url)!r}, model={self.model!r})"

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMChunk]:
        started = time.perf_counter()
        options: dict[str, Any] = {}
        if request.tools:
            options["tools"] = [_tool_param(spec.name, spec.description, spec.parameters) for spec in request.tools]
        if request.max_output_tokens is not None:
            options["max_completion_tokens"] = request.max_output_tokens
        messages = [_message_param(message) for message in request.messages]
        try:
            stream = await self._client.chat.completions.create(
                model=self.model, messages=messages, stream=True, stream_options={"include_usage": True}, **options
            )
        except openai.OpenAIError as exc:
            raise self._llm_error(exc) from None
        first_chunk_ms: float | None = None
        fragments: dict[int, _ToolCallFragments] = {}
        last: ChatCompletionChunk | None = None
        usage_chunk: ChatCompletionChunk | None = None
        try:
            async for chunk in stream:
                last = chunk
                if chunk.usage is not None:
                    usage_chunk = chunk
                for choice in chunk.choices:
                    if choice.index != 0:  # we never ask for n > 1
                        continue
                    text = (choice.delta.content or "") + (choice.delta.refusal or "")
                    if (text or choice.delta.tool_calls) and first_chunk_ms is None:
                        first_chunk_ms = (time.perf_counter() - started) * 1000
                    if text:
                        yield TextDelta(text)
                    for fragment in choice.delta.tool_calls or ():
                        fragments.setdefault(fragment.index, _ToolCallFragments()).add(fragment)
        except openai.OpenAIError as exc:
            raise self._llm_error(exc) from None
        finally:
            await stream.close()
        for index in sorted(fragments):
            yield _complete_call(index, fragments[index])
        yield _usage(usage_chunk, last, self.model, first_chunk_ms)

    async def probe(self) -> ProviderHealth:
        async with self._probe_lock:  # concurrent health checks share one call instead of stampeding the API
            cached = self._health
            if cached is not None and time.monotonic() - cached.checked_at < self._health_ttl_s:
                return cached.health
            health = await self._check()
            self._health = _CachedHealth(health, time.monotonic())
            return health

    async def _check(self) -> ProviderHealth:
        started = time.perf_counter()
        try:
            page = await self._probe_client.models.list()
        except openai.OpenAIError as exc:
            error = self._llm_error(exc)
            return ProviderHealth(ok=False, latency_ms=_ms_since(started), detail=error.message,
                                  extra={"code": error.code, "model": self.model})
        listed = any(model.id == self.model for model in page.data)
        return ProviderHealth(ok=True, latency_ms=_ms_since(started),
                              extra={"model": self.model, "model_listed": listed})

    async def aclose(self) -> None:
        await self._client.close()

    def _llm_error(self, exc: openai.OpenAIError) -> LLMError:
        code, retryable, status, message, said = _classify(exc)
        detail = f"{message}: {said}" if said else message
        return LLMError(code, message, retryable=retryable, status=status, detail=self._redact(detail))

    def _redact(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        text = _KEY_LIKE.sub("***", text)
        return text if len(text) <= MAX_ERROR_DETAIL_CHARS else text[: MAX_ERROR_DETAIL_CHARS - 1] + "…"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _classify(exc: openai.OpenAIError) -> tuple[str, bool, int | None, str, str | None]:
    """(code, retryable, HTTP status, message for the user, what the provider said) for an SDK exception,
    after the SDK's own retries. The provider's own words go to the log only."""
    if isinstance(exc, openai.APITimeoutError):
        return "llm_timeout", True, None, "the language model did not answer in time", None
    if isinstance(exc, openai.APIConnectionError):
        return "llm_unavailable", True, None, "the language model service could not be reached", None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        answered = f"the language model service answered {status}"
        if status in (401, 403):
            # Nothing of the server's own message, even in the log: it may quote (part of) the key.
            return "llm_auth", False, status, (f"the language model service refused the API key ({status}); "
                                               "check PARLEY_OPENAI_API_KEY"), None
        if status == 429:
            return "llm_rate_limited", True, status, f"{answered} (rate limited); try again shortly", exc.message
        if status in (408, 409) or status >= 500:
            return "llm_unavailable", True, status, f"{answered} (unavailable); try again shortly", exc.message
        if status in (400, 404, 413, 422):
            return "llm_bad_request", False, status, f"{answered} (it refused the request)", exc.message
        return "llm_error", False, status, answered, exc.message
    if isinstance(exc, openai.APIResponseValidationError):
        return ("llm_bad_response", True, exc.status_code,
                "the language model service sent a response we cannot read", None)
    if isinstance(exc, openai.APIError):  # an error event inside an otherwise successful stream
        return "llm_unavailable", True, None, "the language model stream failed", exc.message
    return "llm_error", False, None, "the language model call failed", str(exc)


def _tool_param(name: str, description: str, parameters: dict[str, Any]) -> ChatCompletionFunctionToolParam:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _message_param(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "user":
        return {"role": "user", "content": message.content}
    if message.role == "tool":
        if not message.tool_call_id:
            raise LLMError("llm_bad_request", "a tool message has no tool_call_id")
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    calls: list[ChatCompletionMessageFunctionToolCallParam] = [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in message.tool_calls
    ]
    # The API wants null, not "", for an assistant turn that only called tools.
    return {"role": "assistant", "content": message.content or None, "tool_calls": calls}


def _complete_call(index: int, fragments: _ToolCallFragments) -> ToolCall:
    if not fragments.name:
        raise LLMError("llm_bad_response", "the language model sent a tool call without a name", retryable=True)
    # Some compatible servers omit ids; the call still needs one to pair with its result.
    return ToolCall(id=fragments.id or f"call_{index}", name=fragments.name, arguments="".join(fragments.arguments))


def _usage(usage_chunk: ChatCompletionChunk | None, last: ChatCompletionChunk | None, model: str,
           first_chunk_ms: float | None) -> Usage:
    source = usage_chunk or last
    reported_model = source.model if source is not None else None
    usage = usage_chunk.usage if usage_chunk is not None else None
    return Usage(input_tokens=usage.prompt_tokens if usage else 0,
                 output_tokens=usage.completion_tokens if usage else 0,
                 model=reported_model or model, time_to_first_token_ms=first_chunk_ms)
