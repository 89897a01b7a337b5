"""A real local HTTP server that speaks OpenAI's streaming Chat Completions protocol, scripted per test.
It records every request it receives; each POST takes the next scripted reply (text, tool calls, error, stall).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL = "fake-model"


@dataclass(frozen=True)
class TextReply:
    """Streams `pieces` as content deltas; then usage (when asked for and `usage` is set) and [DONE]."""

    pieces: tuple[str, ...]
    usage: tuple[int, int] | None = (11, 7)  # (prompt_tokens, completion_tokens)
    model: str = MODEL


@dataclass(frozen=True)
class ScriptedToolCall:
    id: str
    name: str
    argument_fragments: tuple[str, ...]


@dataclass(frozen=True)
class ToolCallReply:
    """Streams tool calls the way OpenAI does: id and name in the first fragment, arguments in pieces.
    With `interleave`, the fragments of different calls alternate (each still carries its `index`)."""

    calls: tuple[ScriptedToolCall, ...]
    text_before: str = ""
    interleave: bool = False
    usage: tuple[int, int] | None = (20, 9)
    model: str = MODEL


@dataclass(frozen=True)
class ErrorReply:
    status: int
    message: str = "scripted failure"
    headers: Mapping[str, str] = field(default_factory=dict)
    error_type: str = "server_error"


@dataclass(frozen=True)
class StallReply:
    """Waits `seconds` (or until the client hangs up): before any header, or after streaming `pieces`."""

    seconds: float
    pieces: tuple[str, ...] = ()
    before_headers: bool = True


Reply = TextReply | ToolCallReply | ErrorReply | StallReply


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body["messages"])


class FakeOpenAI:
    """`with FakeOpenAI() as fake:` serves on 127.0.0.1 at `fake.base_url` (ends in /v1) until the block ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chat_replies: deque[Reply] = deque()
        self._model_replies: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(self._app, interface="asgi3", log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"fake-openai-{self.port}", daemon=True)

    # --- scripting and inspection (called from the test's thread) -----------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queues replies for the next POST /v1/chat/completions requests, in order."""
        with self._lock:
            self._chat_replies.extend(replies)

    def script_models(self, *replies: ErrorReply | StallReply) -> None:
        """Queues failures for the next GET /v1/models requests; unscripted, it lists MODEL."""
        with self._lock:
            self._model_replies.extend(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path.endswith("/chat/completions")]

    def model_requests(self) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path.endswith("/models")]

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()
        if self._thread.is_alive():
            raise AssertionError("the fake OpenAI server did not stop")

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- the ASGI application (runs on the server's thread) --------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            event = await receive()
            raw += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        body = orjson.loads(raw) if raw else None
        path: str = scope["path"]
        reply = self._next_reply(RecordedRequest(scope["method"], path, headers, body))
        if reply is None:
            await _send_json(send, 200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "parley-tests"}]})
            return
        await self._reply(reply, body or {}, receive, send)

    def _next_reply(self, request: RecordedRequest) -> Reply | None:
        """Records `request` and takes its reply; None means the default model list."""
        with self._lock:
            self._requests.append(request)
            if request.method == "POST" and request.path.endswith("/chat/completions"):
                if self._chat_replies:
                    return self._chat_replies.popleft()
                # A test that forgot to script a reply fails loudly, and the SDK does not retry a 418.
                return ErrorReply(418, "the fake server has no scripted reply", error_type="test_error")
            if request.method == "GET" and request.path.endswith("/models"):
                return self._model_replies.popleft() if self._model_replies else None
            return ErrorReply(404, f"no route {request.path}", error_type="invalid_request_error")

    async def _reply(self, reply: Reply, body: dict[str, Any], receive: Receive, send: Send) -> None:
        if isinstance(reply, ErrorReply):
            await _send_json(send, reply.status, {"error": {"message": reply.message, "type": reply.error_type,
                                                            "param": None, "code": None}}, reply.headers)
            return
        if isinstance(reply, StallReply) and reply.before_headers:
            await _wait_or_disconnect(receive, reply.seconds)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if isinstance(reply, StallReply):
            for piece in reply.pieces:
                await _send_event(send, _chunk(MODEL, {"content": piece}))
            await _wait_or_disconnect(receive, reply.seconds)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if isinstance(reply, TextReply):
            events = [_chunk(reply.model, {"role": "assistant", "content": ""})]
            events += [_chunk(reply.model, {"content": piece}) for piece in reply.pieces]
            events.append(_chunk(reply.model, {}, finish_reason="stop"))
        else:
            events = _tool_call_events(reply)
        if include_usage and reply.usage is not None:
            prompt, completion = reply.usage
            events.append({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                           "model": reply.model, "choices": [],
                           "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion}})
        for event in events:
            await _send_event(send, event)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _tool_call_events(reply: ToolCallReply) -> list[dict[str, Any]]:
    events = [_chunk(reply.model, {"role": "assistant", "content": None})]
    if reply.text_before:
        events.append(_chunk(reply.model, {"content": reply.text_before}))
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(reply.calls):
        fragments = [{"index": index, "id": call.id, "type": "function",
                      "function": {"name": call.name, "arguments": ""}}]
        fragments += [{"index": index, "function": {"arguments": piece}} for piece in call.argument_fragments]
        per_call.append(fragments)
    if reply.interleave:
        ordered = [fragment for round_ in _zip_longest(per_call) for fragment in round_]
    else:
        ordered = [fragment for fragments in per_call for fragment in fragments]
    events += [_chunk(reply.model, {"tool_calls": [fragment]}) for fragment in ordered]
    events.append(_chunk(reply.model, {}, finish_reason="tool_calls"))
    return events


def _zip_longest(lists: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    longest = max((len(items) for items in lists), default=0)
    return [[items[i] for items in lists if i < len(items)] for i in range(longest)]


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


async def _send_event(send: Send, event: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(event) + b"\n\n", "more_body": True})


async def _send_json(send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
    raw = orjson.dumps(payload)
    header_list = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    header_list += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


async def _wait_or_disconnect(receive: Receive, seconds: float) -> None:
    """Sleeps `seconds`, ending early when the client goes away (so the server can stop promptly)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), timeout=seconds)
