"""The `llm` component: the configured provider's measured ability to answer (optional: when it is down
runs fail with `agent_error`, the rest of the service works)."""

from __future__ import annotations

from parley.health.components import ComponentHealth
from parley.llm.base import LLMProvider


class LLMComponent:
    name = "llm"
    required = False

    def __init__(self, provider: LLMProvider) -> None:
        self.provider = provider

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.provider.aclose()

    async def check(self) -> ComponentHealth:
        health = await self.provider.probe()
        detail = f"{self.provider.name}:{self.provider.model}"
        if not health.ok:
            return ComponentHealth("unhealthy", latency_ms=health.latency_ms,
                                   detail=f"{detail} {health.detail or 'not answering'}")
        return ComponentHealth("healthy", latency_ms=health.latency_ms, detail=detail)
