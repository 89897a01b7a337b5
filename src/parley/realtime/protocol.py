"""The client side of the WebSocket protocol: message types, their payloads, and the table of handlers.

Every `ClientMessageType` has exactly one handler, registered in one `MessageRouter`; building a router with a
type missing fails at once, so the app cannot start (incident pattern 5: "No handler found for DISCONNECT").
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parley.text import InputModel

Payload = TypeVar("Payload", bound=BaseModel)

MAX_SEQ = 2**31 - 1  # the event log's seq column is a 32-bit integer


class ClientMessageType(enum.StrEnum):
    PING = "ping"
    USER_MESSAGE = "user_message"
    START_AGENT = "start_agent"
    STOP_AGENT = "stop_agent"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    DISCONNECT = "disconnect"


class _Payload(InputModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PingPayload(_Payload):
    pass


OnBusy = Literal["enqueue", "reject", "interrupt"]


class UserMessagePayload(_Payload):
    thread_id: str | None = Field(default=None, max_length=64)
    content: str = Field(min_length=1)
    agent: str | None = Field(default=None, max_length=64)
    on_busy: OnBusy = "enqueue"
    client_message_id: str | None = Field(default=None, min_length=1, max_length=100)


class StartAgentPayload(_Payload):
    thread_id: str | None = Field(default=None, max_length=64)
    agent: str = Field(min_length=1, max_length=64)
    input: str = Field(min_length=1)
    on_busy: OnBusy = "enqueue"


class StopAgentPayload(_Payload):
    run_id: str = Field(min_length=1, max_length=64)


class SubscribePayload(_Payload):
    thread_id: str = Field(min_length=1, max_length=64)
    after_seq: int = Field(default=0, ge=0, le=MAX_SEQ)


class UnsubscribePayload(_Payload):
    thread_id: str = Field(min_length=1, max_length=64)


class DisconnectPayload(_Payload):
    pass


PAYLOADS: Mapping[ClientMessageType, type[_Payload]] = {
    ClientMessageType.PING: PingPayload,
    ClientMessageType.USER_MESSAGE: UserMessagePayload,
    ClientMessageType.START_AGENT: StartAgentPayload,
    ClientMessageType.STOP_AGENT: StopAgentPayload,
    ClientMessageType.SUBSCRIBE: SubscribePayload,
    ClientMessageType.UNSUBSCRIBE: UnsubscribePayload,
    ClientMessageType.DISCONNECT: DisconnectPayload,
}


@dataclass(frozen=True, slots=True)
class ClientMessage(Generic[Payload]):
    type: ClientMessageType
    id: str | None
    payload: Payload


class ProtocolError(Exception):
    """A message the server answers with `error` (the connection stays open)."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def request_id_of(text: str | bytes) -> str | None:
    """The `id` of a frame if it has a usable one (to echo in an error about the frame as a whole)."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    request_id = raw.get("id") if isinstance(raw, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 128 else None


def parse_client_message(text: str | bytes) -> ClientMessage[Any]:
    """Turns one frame into a typed message, or raises ProtocolError (invalid_json, unknown_type,
    invalid_payload)."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", "The message is not valid JSON.") from exc
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_payload", "A message is a JSON object with `type` and `payload`.")
    request_id = raw.get("id")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 128):
        raise ProtocolError("invalid_payload", "`id` must be a string of 1 to 128 characters.")
    type_name = raw.get("type")
    try:
        message_type = ClientMessageType(str(type_name))
    except ValueError as exc:
        shown = type_name if isinstance(type_name, str) and len(type_name) <= 64 else "?"
        raise ProtocolError("unknown_type", f"Unknown message type {shown!r}.", request_id) from exc
    extra = set(raw) - {"type", "id", "payload"}
    if extra:
        raise ProtocolError("invalid_payload", f"Unexpected fields: {', '.join(sorted(extra)[:5])}.", request_id)
    payload = raw.get("payload", {})
    if not isinstance(payload, dict):
        raise ProtocolError("invalid_payload", "`payload` must be an object.", request_id)
    try:
        parsed = PAYLOADS[message_type].model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in exc.errors()[:5])
        raise ProtocolError("invalid_payload", f"Invalid payload: {problems}.", request_id) from exc
    return ClientMessage(message_type, request_id, parsed)


Handler = Callable[[Any, ClientMessage[Any]], Awaitable[None]]


class MessageRouter:
    """Exactly one handler per client message type, checked when built."""

    def __init__(self, handlers: Mapping[ClientMessageType, Handler]) -> None:
        missing = [t.value for t in ClientMessageType if t not in handlers]
        if missing:
            raise RuntimeError(f"WebSocket message types without a handler: {', '.join(missing)}")
        self._handlers = dict(handlers)

    async def dispatch(self, connection: Any, message: ClientMessage[Any]) -> None:
        await self._handlers[message.type](connection, message)
