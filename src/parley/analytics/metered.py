"""A run's view of the model: the configured provider, with each call timed, priced and recorded."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from parley.agents.context import UserExecutionContext
from parley.analytics.pricing import PriceTable
from parley.analytics.records import LLMCallRecord, Recorder
from parley.clock import utcnow
from parley.llm.base import LLMChunk, LLMError, LLMProvider, LLMRequest, ProviderHealth, Usage


class MeteredLLM:
    """Made per run; sums the run's cost. Satisfies `LLMProvider`, so agents cannot tell it apart."""

    def __init__(self, provider: LLMProvider, ctx: UserExecutionContext, sink: Recorder,
                 prices: PriceTable) -> None:
        self.provider = provider
        self.name = provider.name
        self.model = provider.model
        self.ctx = ctx
        self.sink = sink
        self.prices = prices
        self.cost_usd = 0.0

    async def stream(self, request: LLMRequest) -> AsyncIterator[LLMChunk]:
        started = time.perf_counter()
        first_chunk_ms: float | None = None
        usage: Usage | None = None
        outcome = "ok"
        try:
            async for chunk in self.provider.stream(request):
                if first_chunk_ms is None:
                    first_chunk_ms = (time.perf_counter() - started) * 1000
                if isinstance(chunk, Usage):
                    usage = chunk
                yield chunk
        except LLMError as exc:
            outcome = exc.code
            raise
        except BaseException:
            outcome = "aborted"  # cancelled, or failed in a way the run reports itself
            raise
        finally:
            self._record(usage, started, first_chunk_ms, outcome)

    def _record(self, usage: Usage | None, started: float, first_chunk_ms: float | None, outcome: str) -> None:
        model = usage.model if usage else self.model
        tokens_in = usage.input_tokens if usage else 0
        tokens_out = usage.output_tokens if usage else 0
        cost = self.prices.cost(model, tokens_in, tokens_out)
        self.cost_usd += cost
        ttft = usage.time_to_first_token_ms if usage and usage.time_to_first_token_ms is not None else first_chunk_ms
        ctx = self.ctx
        self.sink.record(LLMCallRecord(
            ts=utcnow(), user_id=ctx.user_id, thread_id=ctx.thread_id, run_id=ctx.run_id, agent=ctx.agent,
            provider=self.name, model=model, input_tokens=tokens_in, output_tokens=tokens_out,
            ttft_ms=round(ttft or 0.0, 3), latency_ms=round((time.perf_counter() - started) * 1000, 3),
            cost_usd=cost, outcome=outcome))

    async def probe(self) -> ProviderHealth:
        return await self.provider.probe()

    async def aclose(self) -> None:
        return None  # the provider belongs to the process, not to the run
