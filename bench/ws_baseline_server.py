"""The WebSocket benchmark's baseline: a bare Starlette `/ws` endpoint that answers each `user_message` with the
same frames parley sends for one run of the builtin assistant, and stores nothing.

Per run it sends, like parley: `thread_created` (a conversation's first run) or `message_created` (every later
run), then `ack`, then the run's events `agent_started`, `agent_thinking`, `tool_executing`, `tool_completed`,
`agent_thinking`, one `agent_delta` per token of `ANSWER` and `agent_completed`. Each frame is a JSON envelope of
the same shape and about the same size as parley's (ids, `seq`, `ts`, payload), serialised with orjson. It greets
with `connected` and ignores authentication. `GET /ready` answers 200 once it serves.

It runs under the same uvicorn options as `parley serve` (`parley.server.uvicorn_config`: uvloop, the
websockets-sansio protocol, the same frame limit and heartbeat, one process), so the gap between it and parley is
parley's own work: authentication, storing the message, the run and every event before sending it, the agent and
the provider, and the fan-out through the event bus.

    .venv/bin/python bench/ws_baseline_server.py PORT
"""

from __future__ import annotations

import re
import sys
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from parley.clock import rfc3339, utcnow
from parley.ids import new_id
from parley.server import uvicorn_config
from parley.settings import Settings

# What parley's builtin provider answers to bench/runs_ws.py's question, split the way it streams it.
EXPRESSION = "1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 +10"
ANSWER = f"{EXPRESSION} = 55."
TOKENS = re.findall(r"\S+\s*|\s+", ANSWER)
READY_PATH = "/ready"


class Conversation:
    """One connection's thread: its id and the last `seq` it handed out."""

    def __init__(self) -> None:
        self.thread_id: str | None = None
        self.seq = 0

    def run_frames(self, content: str, request_id: str | None) -> list[bytes]:
        """Every frame of one run, in parley's order."""
        ts = rfc3339(utcnow())
        message_id, run_id = new_id(), new_id()
        frames: list[bytes] = []
        if self.thread_id is None:
            self.thread_id = new_id()
            self.seq = 1  # parley's first `message_created` is not sent: the feed starts after it
            thread = {"id": self.thread_id, "title": content[:60], "created_at": ts, "updated_at": ts,
                      "message_count": 0, "last_message_at": None, "metadata": {}}
            frames.append(self._frame("thread_created", {"thread": thread}, ts, request_id=request_id))
        else:
            message = {"id": message_id, "thread_id": self.thread_id, "role": "user", "content": content,
                       "run_id": run_id, "created_at": ts, "metadata": {}}
            frames.append(self._frame("message_created", {"message": message}, ts, seq=True))
        frames.append(self._frame("ack", {"message_id": message_id, "run_id": run_id, "thread_id": self.thread_id},
                                  ts, request_id=request_id))
        call = {"call_id": "call_1_1", "tool": "calculator"}
        result = {"expression": EXPRESSION, "result": 55}
        events: list[tuple[str, dict[str, Any]]] = [
            ("agent_started", {"agent": "assistant", "input_message_id": message_id}),
            ("agent_thinking", {"text": "Reading your message."}),
            ("tool_executing", {**call, "arguments": {"expression": EXPRESSION}}),
            ("tool_completed", {**call, "ok": True, "duration_ms": 0.1, "result": result}),
            ("agent_thinking", {"text": "Reading the tool results."}),
            *(("agent_delta", {"text": token}) for token in TOKENS),
            ("agent_completed", {
                "message": {"id": new_id(), "thread_id": self.thread_id, "role": "assistant", "content": ANSWER,
                            "run_id": run_id, "created_at": ts,
                            "metadata": {"tool_calls": [{**call, "ok": True, "duration_ms": 0.1, "result": result,
                                                         "arguments": {"expression": EXPRESSION}}]}},
                "usage": {"input_tokens": 355, "output_tokens": 39, "cost_usd": 0.0}}),
        ]
        frames.extend(self._frame(type_, payload, ts, run_id=run_id, seq=True) for type_, payload in events)
        return frames

    def _frame(self, type_: str, payload: dict[str, Any], ts: str, *, request_id: str | None = None,
               run_id: str | None = None, seq: bool = False) -> bytes:
        body: dict[str, Any] = {"type": type_}
        if request_id is not None:
            body["id"] = request_id
        body["thread_id"] = self.thread_id
        if run_id is not None:
            body["run_id"] = run_id
        if seq:
            self.seq += 1
            body["seq"] = self.seq
        body["ts"] = ts
        body["payload"] = payload
        return orjson.dumps(body)


async def ws_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    now = rfc3339(utcnow())
    await websocket.send_text(orjson.dumps({"type": "connected", "ts": now, "payload": {
        "connection_id": new_id(), "user_id": new_id(), "protocol": "parley.v1", "heartbeat_s": 20.0,
        "server_time": now}}).decode())
    conversation = Conversation()
    try:
        while True:
            message = orjson.loads(await websocket.receive_text())
            if message.get("type") != "user_message":
                continue
            for frame in conversation.run_frames(str(message["payload"]["content"]), message.get("id")):
                await websocket.send_text(frame.decode())
    except WebSocketDisconnect:
        return


async def ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def build_app() -> Starlette:
    return Starlette(routes=[WebSocketRoute("/ws", ws_endpoint), Route(READY_PATH, ready)])


def main(port: int) -> None:
    settings = Settings(_env_file=None, env="test", host="127.0.0.1", port=port)
    uvicorn.Server(uvicorn_config(settings, build_app())).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
