"""What analytics records: one frozen dataclass per kind, each naming its table; its fields are the table's
columns, in order."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol


@dataclass(frozen=True, slots=True)
class LLMCallRecord:
    table: ClassVar[str] = "llm_calls"
    ts: datetime
    user_id: str
    thread_id: str
    run_id: str
    agent: str
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    ttft_ms: float
    latency_ms: float
    cost_usd: float
    outcome: str  # "ok" or an error code



@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    table: ClassVar[str] = "tool_calls"
    ts: datetime
    user_id: str
    thread_id: str
    run_id: str
    agent: str
    tool: str
    duration_ms: float
    ok: bool



@dataclass(frozen=True, slots=True)
class RunRecord:
    table: ClassVar[str] = "runs"
    ts: datetime  # when the run finished
    user_id: str
    thread_id: str
    run_id: str
    agent: str
    model: str
    status: str
    duration_ms: float
    input_tokens: int
    output_tokens: int
    cost_usd: float



@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    table: ClassVar[str] = "ws_connections"
    ts: datetime  # when the connection closed
    connection_id: str
    user_id: str
    duration_ms: float
    close_code: int
    closed_by: str



@dataclass(frozen=True, slots=True)
class RequestRecord:
    table: ClassVar[str] = "http_requests"
    ts: datetime
    method: str
    route: str
    status: int
    duration_ms: float
    user_id: str



Record = LLMCallRecord | ToolCallRecord | RunRecord | ConnectionRecord | RequestRecord


class Recorder(Protocol):
    """Anything that takes records without blocking (the analytics sink, or telemetry in front of it)."""

    def record(self, record: Record) -> None: ...
