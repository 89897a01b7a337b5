"""Server events: their types, the stored form, and the wire envelope serialised once per event."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from parley.clock import rfc3339


class EventType(enum.StrEnum):
    # Stored in the thread's log, numbered by `seq`.
    MESSAGE_CREATED = "message_created"
    AGENT_STARTED = "agent_started"
    AGENT_THINKING = "agent_thinking"
    TOOL_EXECUTING = "tool_executing"
    TOOL_COMPLETED = "tool_completed"
    AGENT_DELTA = "agent_delta"
    AGENT_COMPLETED = "agent_completed"
    AGENT_ERROR = "agent_error"
    AGENT_CANCELLED = "agent_cancelled"
    # Sent to one connection only, never stored.
    CONNECTED = "connected"
    PONG = "pong"
    ACK = "ack"
    ERROR = "error"
    THREAD_CREATED = "thread_created"


TERMINAL_TYPES = frozenset({EventType.AGENT_COMPLETED, EventType.AGENT_ERROR, EventType.AGENT_CANCELLED})


# Events are made for every step of every run: plain slotted classes (a frozen dataclass's __init__ costs
# three times as much). Nothing changes one once made.
@dataclass(slots=True)
class NewEvent:
    """An event on its way into the log: it has no `seq` until the log stores it."""

    thread_id: str
    run_id: str | None
    type: EventType
    payload: dict[str, Any]


@dataclass(slots=True)
class StoredEvent:
    thread_id: str
    seq: int
    run_id: str | None
    type: str
    payload: dict[str, Any]
    created_at: datetime
    wire: str = field(default="", compare=False)  # the envelope as JSON text, made once for every receiver

    @classmethod
    def make(cls, thread_id: str, seq: int, run_id: str | None, type_: str, payload: dict[str, Any],
             created_at: datetime, ts: str | None = None) -> StoredEvent:
        """`ts`, when given, is `created_at` already formatted (a batch formats its one timestamp once)."""
        envelope: dict[str, Any] = {"type": type_, "thread_id": thread_id}
        if run_id is not None:
            envelope["run_id"] = run_id
        envelope["seq"] = seq
        envelope["ts"] = ts or rfc3339(created_at)
        envelope["payload"] = payload
        return cls(thread_id, seq, run_id, type_, payload, created_at, orjson.dumps(envelope).decode())

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


def envelope(type_: EventType, payload: dict[str, Any], *, request_id: str | None = None,
             thread_id: str | None = None, ts: datetime) -> str:
    """A connection-only message (connected, pong, ack, error, thread_created) as JSON text."""
    body: dict[str, Any] = {"type": str(type_)}
    if request_id is not None:
        body["id"] = request_id
    if thread_id is not None:
        body["thread_id"] = thread_id
    body["ts"] = rfc3339(ts)
    body["payload"] = payload
    return orjson.dumps(body).decode()
