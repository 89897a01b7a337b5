"""What an agent is: an async generator of events for one run, given the run's context and dependencies.

`async for event in agent.run(ctx, run_input)` is the only way an agent is driven (incident pattern 2: an
agent handed over as a context manager where an async iterator was expected).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from parley.agents.context import UserExecutionContext
from parley.errors import NotFound
from parley.llm.base import ChatMessage, LLMProvider, Usage
from parley.tools.dispatcher import ToolDispatcher, ToolOutcome


@dataclass(frozen=True, slots=True)
class AgentInput:
    history: tuple[ChatMessage, ...]  # the thread so far, oldest first, ending with the new user message
    dispatcher: ToolDispatcher
    llm: LLMProvider
    max_steps: int


@dataclass(frozen=True, slots=True)
class Thinking:
    text: str


@dataclass(frozen=True, slots=True)
class ToolStarted:
    call_id: str
    tool: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolFinished:
    outcome: ToolOutcome


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    usage: Usage


AgentEvent = Thinking | ToolStarted | ToolFinished | TextChunk | Finished


class Agent(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]
    tool_names: ClassVar[tuple[str, ...]]
    admin_only: ClassVar[bool]

    def run(self, ctx: UserExecutionContext, run_input: AgentInput) -> AsyncIterator[AgentEvent]: ...


class AgentNotFound(NotFound):
    code = "agent_not_found"
    message = "No such agent."


class AgentRegistry:
    def __init__(self, agents: Iterable[Agent]) -> None:
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            if agent.name in self._agents:
                raise ValueError(f"two agents are named {agent.name!r}")
            self._agents[agent.name] = agent

    def get(self, name: str, is_admin: bool) -> Agent:
        agent = self._agents.get(name)
        if agent is None or (agent.admin_only and not is_admin):
            raise AgentNotFound(f"No agent named {name!r}.")  # admin-only agents do not exist for others
        return agent

    def visible_to(self, is_admin: bool) -> list[Agent]:
        return [agent for agent in self._agents.values() if is_admin or not agent.admin_only]
