"""What a tool is: a name, a description, a pydantic model of its parameters and an async body."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from parley.agents.context import UserExecutionContext
from parley.llm.base import ToolSpec


class ToolError(Exception):
    """A tool's expected failure; its message is shown to the user and the model (so keep it plain)."""


class Tool(Protocol):
    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[BaseModel]]
    timeout_s: ClassVar[float]
    admin_only: ClassVar[bool]

    async def run(self, ctx: UserExecutionContext, params: Any) -> Any:
        """Does the work for `ctx`'s user only; returns a JSON-serialisable result or raises ToolError."""
        ...


def tool_spec(tool: Tool) -> ToolSpec:
    return _spec_of(type(tool), tool.name, tool.description)


@functools.cache
def _spec_of(_cls: type, name: str, description: str) -> ToolSpec:
    # Generating a JSON Schema costs as much as the rest of a run's CPU: do it once per tool class.
    schema = _cls.Params.model_json_schema()  # type: ignore[attr-defined]
    schema.pop("title", None)
    return ToolSpec(name=name, description=description, parameters=schema)


class ToolRegistry:
    """Every tool the process knows, by name. App-scoped; filled while the app is built, then only read."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"two tools are named {tool.name!r}")
        self._tools[tool.name] = tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool:
        return self._tools[name]

    def select(self, names: Iterable[str]) -> Mapping[str, Tool]:
        missing = [name for name in names if name not in self._tools]
        if missing:
            raise KeyError(f"unknown tools: {missing}")
        return {name: self._tools[name] for name in names}

    def all(self) -> list[Tool]:
        return list(self._tools.values())
