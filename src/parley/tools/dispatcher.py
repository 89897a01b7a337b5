"""The per-run tool dispatcher (incident pattern 9: a global dispatcher without user context).

A `ToolDispatcher` cannot be made without a `UserExecutionContext`; it is created for one run and dropped
with it. Every call runs with that context, under a timeout; failure of any kind is a result (`ok=false`),
never an exception that ends the run. Cancellation of the run passes straight through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from parley.agents.context import UserExecutionContext
from parley.llm.base import ToolCall, ToolSpec
from parley.observability.logging import get_logger
from parley.tools.base import Tool, ToolError, tool_spec

log = get_logger("parley.tools")

MAX_RESULT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    call_id: str
    tool: str
    arguments: dict[str, Any]
    ok: bool
    result: Any = None
    error: str | None = None
    duration_ms: float = 0.0


class ToolDispatcher:
    def __init__(self, ctx: UserExecutionContext, tools: Mapping[str, Tool]) -> None:
        if not isinstance(ctx, UserExecutionContext):
            raise TypeError("a ToolDispatcher needs the run's UserExecutionContext")
        self.ctx = ctx
        self._tools = {name: tool for name, tool in tools.items() if ctx.is_admin or not tool.admin_only}

    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(tool_spec(tool) for tool in self._tools.values())

    async def execute(self, call: ToolCall) -> ToolOutcome:
        started = time.perf_counter()
        arguments = parse_arguments(call.arguments)

        def outcome(ok: bool, result: Any = None, error: str | None = None) -> ToolOutcome:
            return ToolOutcome(call_id=call.id, tool=call.name, arguments=arguments if arguments is not None else {},
                               ok=ok, result=result, error=error,
                               duration_ms=round((time.perf_counter() - started) * 1000, 3))

        tool = self._tools.get(call.name)
        if tool is None:
            return outcome(False, error=f"no tool named {call.name!r} is available to this agent")
        if arguments is None:
            return outcome(False, error="the arguments are not a JSON object")
        try:
            params = tool.Params.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
            return outcome(False, error=f"invalid arguments: {problems}")
        try:
            async with asyncio.timeout(tool.timeout_s):
                result = await tool.run(self.ctx, params)
        except TimeoutError:
            return outcome(False, error=f"timed out after {tool.timeout_s:g} s")
        except ToolError as exc:
            return outcome(False, error=str(exc))
        except Exception:  # a tool's bug: the run goes on, the operator gets the traceback
            log.exception("tool_failed", tool=call.name, **self.ctx.log_fields())
            return outcome(False, error="the tool failed unexpectedly")
        if len(orjson.dumps(result, default=str)) > MAX_RESULT_BYTES:
            return outcome(False, error="the tool's result is too large")
        return outcome(True, result=result)


def parse_arguments(raw: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
