"""Agents and tools for tests: a slow tool (to stop runs inside it) and a tool that always fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from pydantic import BaseModel

from parley.agents.base import AgentEvent, AgentInput, Finished, TextChunk, Thinking, ToolFinished, ToolStarted
from parley.agents.context import UserExecutionContext
from parley.llm.base import ToolCall, Usage


class SleepParams(BaseModel):
    seconds: float = 30.0


class SlowTool:
    name: ClassVar[str] = "slow"
    description: ClassVar[str] = "Sleeps."
    Params: ClassVar[type[BaseModel]] = SleepParams
    timeout_s: ClassVar[float] = 60.0
    admin_only: ClassVar[bool] = False

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        await asyncio.sleep(params.seconds)
        return {"slept": params.seconds}


class NoParams(BaseModel):
    pass


class BrokenTool:
    name: ClassVar[str] = "broken"
    description: ClassVar[str] = "Always raises."
    Params: ClassVar[type[BaseModel]] = NoParams
    timeout_s: ClassVar[float] = 5.0
    admin_only: ClassVar[bool] = False

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        raise RuntimeError("a bug in the tool")


class ToolCallingAgent:
    """Calls each of its tools once through the dispatcher, then answers `done`."""

    name: ClassVar[str] = "tool_caller"
    description: ClassVar[str] = "Calls its tools."
    tool_names: ClassVar[tuple[str, ...]] = ("slow",)
    admin_only: ClassVar[bool] = False

    def __init__(self, name: str = "tool_caller", tool_names: tuple[str, ...] = ("slow",),
                 arguments: str = "{}") -> None:
        self.name = name  # type: ignore[misc]
        self.tool_names = tool_names  # type: ignore[misc]
        self.arguments = arguments

    async def run(self, ctx: UserExecutionContext, run_input: AgentInput) -> AsyncIterator[AgentEvent]:
        yield Thinking("calling tools")
        for index, tool in enumerate(self.tool_names):
            call = ToolCall(id=f"call_{index}", name=tool, arguments=self.arguments)
            yield ToolStarted(call.id, call.name, {})
            yield ToolFinished(await run_input.dispatcher.execute(call))
        yield TextChunk("done")
        yield Finished(Usage(1, 1, "test"))


def extra_agents() -> list[Any]:
    return [
        ToolCallingAgent("sleeper", ("slow",)),
        ToolCallingAgent("short_sleeper", ("slow",), '{"seconds": 0.3}'),
        ToolCallingAgent("breaker", ("broken", "slow"), '{"seconds": 0}'),
    ]


def extra_tools() -> list[Any]:
    return [SlowTool(), BrokenTool()]
