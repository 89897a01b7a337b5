"""Bodies of the message, run and agent endpoints (API.md, Messages and runs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from parley.clock import rfc3339
from parley.storage.models import Run
from parley.text import InputModel
from parley.threads.schemas import MessageOut

RunStatus = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled", "interrupted"})
UNFINISHED_STATUSES = ("queued", "running")


class PostMessage(InputModel):
    content: str = Field(min_length=1)
    agent: str | None = Field(default=None, max_length=64)
    on_busy: Literal["enqueue", "reject", "interrupt"] = "enqueue"
    client_message_id: str | None = Field(default=None, min_length=1, max_length=100)


class UsageOut(BaseModel):
    input_tokens: int
    output_tokens: int
    cost_usd: float


class RunError(BaseModel):
    code: str
    message: str


class RunOut(BaseModel):
    id: str
    thread_id: str
    agent: str
    status: RunStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: RunError | None
    usage: UsageOut

    @classmethod
    def of(cls, run: Run) -> RunOut:
        return cls.model_validate({
            "id": run.id, "thread_id": run.thread_id, "agent": run.agent, "status": run.status,
            "created_at": rfc3339(run.created_at),
            "started_at": rfc3339(run.started_at) if run.started_at else None,
            "finished_at": rfc3339(run.finished_at) if run.finished_at else None,
            "error": {"code": run.error_code, "message": run.error_message or ""} if run.error_code else None,
            "usage": {"input_tokens": run.input_tokens, "output_tokens": run.output_tokens,
                      "cost_usd": run.cost_usd},
        })


class PostMessageResponse(BaseModel):
    message: MessageOut
    run: RunOut


class RunPage(BaseModel):
    items: list[RunOut]
    has_more: bool


class ToolOut(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any]


class AgentOut(BaseModel):
    name: str
    description: str
    tools: list[ToolOut]


class AgentList(BaseModel):
    items: list[AgentOut]
