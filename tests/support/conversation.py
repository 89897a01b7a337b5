"""A WebSocket client that talks to parley the way the web client does, for conversation tests."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.support.clients import Account

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


class Chat:
    """One WebSocket connection of one account, with helpers to send and to collect events."""

    def __init__(self, ws_url: str, account: Account, *, ticket: str | None = None) -> None:
        self._stack = contextlib.ExitStack()
        if ticket is not None:
            opening = connect(f"{ws_url}/ws?ticket={ticket}", open_timeout=10)
        else:
            opening = connect(f"{ws_url}/ws", additional_headers=account.headers, open_timeout=10)
        self.ws: ClientConnection = self._stack.enter_context(opening)
        self.connected = self.recv()
        assert self.connected["type"] == "connected"

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        return dict(json.loads(self.ws.recv(timeout=timeout)))

    def send(self, type_: str, payload: dict[str, Any], id_: str | None = None) -> str:
        id_ = id_ or uuid.uuid4().hex[:12]
        self.ws.send(json.dumps({"type": type_, "id": id_, "payload": payload}))
        return id_

    def until(self, predicate: Any, timeout: float = 20) -> list[dict[str, Any]]:
        """Every message up to and including the first that satisfies `predicate`."""
        seen = []
        while True:
            message = self.recv(timeout)
            seen.append(message)
            if predicate(message):
                return seen

    def run_to_end(self, run_id: str | None = None, timeout: float = 20) -> list[dict[str, Any]]:
        return self.until(lambda m: m["type"] in TERMINAL and (run_id is None or m.get("run_id") == run_id),
                          timeout)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ticket_for(client: httpx.Client, account: Account) -> str:
    response = client.post("/api/ws/ticket", headers=account.headers)
    assert response.status_code == 201
    return str(response.json()["ticket"])


def run_events(messages: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("run_id") == run_id and "seq" in m]


def assert_contiguous(events: list[dict[str, Any]], start_after: int) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(start_after + 1, start_after + 1 + len(seqs))), seqs
