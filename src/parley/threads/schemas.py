"""Bodies of the thread and message endpoints (API.md, Threads and Messages)."""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

from parley.clock import rfc3339
from parley.errors import InvalidRequest
from parley.storage.models import Message, Thread
from parley.text import InputModel

MAX_TITLE = 200


def check_metadata_size(value: dict[str, Any] | None, limit: int) -> None:
    """Metadata is free-form, so its size is bounded by a setting rather than by the schema."""
    if value is not None and len(orjson.dumps(value)) > limit:
        raise InvalidRequest(details=[{"field": "body.metadata", "type": "too_large",
                                       "message": f"metadata is larger than {limit} bytes as JSON"}])


class ThreadCreate(InputModel):
    title: str | None = Field(default=None, max_length=MAX_TITLE)
    metadata: dict[str, Any] | None = None


class ThreadUpdate(ThreadCreate):
    pass


class ThreadOut(BaseModel):
    id: str
    title: str
    created_at: str
    updated_at: str
    message_count: int
    last_message_at: str | None
    metadata: dict[str, Any]
    last_seq: int  # the thread's newest event: subscribe with after_seq=last_seq to follow it from now

    @classmethod
    def of(cls, thread: Thread) -> ThreadOut:
        return cls(
            id=thread.id, title=thread.title, created_at=rfc3339(thread.created_at),
            updated_at=rfc3339(thread.updated_at), message_count=thread.message_count,
            last_message_at=rfc3339(thread.last_message_at) if thread.last_message_at else None,
            metadata=thread.meta, last_seq=thread.last_seq,
        )


class ThreadPage(BaseModel):
    items: list[ThreadOut]
    total: int | None
    limit: int
    offset: int | None
    has_more: bool
    next_cursor: str | None


class MessageOut(BaseModel):
    id: str
    thread_id: str
    role: Literal["user", "assistant", "tool", "system"]
    content: str
    run_id: str | None
    created_at: str
    metadata: dict[str, Any]

    @classmethod
    def of(cls, message: Message) -> MessageOut:
        return cls.model_validate({
            "id": message.id, "thread_id": message.thread_id, "role": message.role,
            "content": message.content, "run_id": message.run_id,
            "created_at": rfc3339(message.created_at), "metadata": message.meta,
        })


class MessagePage(BaseModel):
    items: list[MessageOut]
    has_more: bool
