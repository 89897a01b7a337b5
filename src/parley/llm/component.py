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
            # /health is public: the failure's code (llm_rate_limited, llm_auth…), never the provider's own
            # words, which can name an account or organisation. `parley doctor` shows the whole message.
            code = (health.extra or {}).get("code") or "not answering"
            return ComponentHealth("unhealthy", latency_ms=health.latency_ms, detail=f"{detail} {code}")
        return ComponentHealth("healthy", latency_ms=health.latency_ms, detail=detail)
