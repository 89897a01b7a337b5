"""WebSocket clients for tests: the `websockets` client set up the way a non-browser client uses /ws, reading
helpers (until an answer, until the close), the beacon, and a hand-rolled client for what a well-behaved library
never does (answer pings by hand or never, stop reading with a backlog, write raw frames).
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

_ids = itertools.count()

# Server → client types that answer one client message (everything else is a thread event, which has a `seq`).
ANSWER_TYPES = frozenset({"pong", "ack", "error", "thread_created"})


def fresh_id(prefix: str = "t") -> str:
    return f"{prefix}{next(_ids)}-{os.urandom(3).hex()}"


def ws_connect(ws_url: str, *, headers: dict[str, str] | None = None, subprotocols: Sequence[str] | None = None,
               query: str = "", **options: Any) -> ClientConnection:
    """Opens `/ws` with the `websockets` sync client (no proxy from the environment, answers pings itself)."""
    offered = [Subprotocol(name) for name in subprotocols] if subprotocols is not None else None
    return connect(f"{ws_url}/ws{query}", additional_headers=headers, subprotocols=offered, proxy=None,
                   open_timeout=10, close_timeout=5, legacy=True, **options)


def frame(type_: str, payload: dict[str, Any] | None = None, id_: str | None = None) -> str:
    body: dict[str, Any] = {"type": type_}
    if id_ is not None:
        body["id"] = id_
    if payload is not None:
        body["payload"] = payload
    return orjson.dumps(body).decode()


def recv_json(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    message = ws.recv(timeout=timeout)
    value = orjson.loads(message)
    assert isinstance(value, dict), value
    return value


def greeted(ws: ClientConnection) -> dict[str, Any]:
    """The `connected` greeting, which is the first thing the server says."""
    hello = recv_json(ws)
    assert hello["type"] == "connected", hello
    return hello


def answers_until_pong(ws: ClientConnection, sent: str | bytes, timeout: float = 10) -> list[dict[str, Any]]:
    """Sends `sent`, then a ping with a fresh id; returns every answer (not thread events) before that pong.
    Raises ConnectionClosed if the server closes first."""
    ping_id = fresh_id("probe")
    ws.send(sent)
    ws.send(frame("ping", {}, ping_id))
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        message = recv_json(ws, max(0.01, deadline - time.monotonic()))
        if message["type"] == "pong" and message.get("id") == ping_id:
            return answers
        if message["type"] in ANSWER_TYPES and "seq" not in message:
            answers.append(message)


def assert_answers_ping(ws: ClientConnection, timeout: float = 10) -> None:
    """The connection is open and served: a ping with a fresh id gets the pong echoing that id."""
    ping_id = fresh_id("alive")
    ws.send(frame("ping", {}, ping_id))
    deadline = time.monotonic() + timeout
    while True:
        message = recv_json(ws, max(0.01, deadline - time.monotonic()))
        if message["type"] == "pong" and message.get("id") == ping_id:
            return


def read_until_closed(ws: ClientConnection, timeout: float = 10) -> tuple[list[dict[str, Any]], Close | None]:
    """Every message the server still sends, and the close frame it sent (None: the connection just dropped)."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            messages.append(recv_json(ws, max(0.01, deadline - time.monotonic())))
    except ConnectionClosed as closed:
        return messages, closed.rcvd


def close_code(ws: ClientConnection, timeout: float = 10) -> int | None:
    """The code the server closed with, asserting it sent nothing before closing."""
    messages, close = read_until_closed(ws, timeout)
    assert messages == [], messages
    return close.code if close else None


@dataclass(frozen=True)
class Beacon:
    status_code: int
    body: dict[str, Any]

    @property
    def connections(self) -> int:
        return int(self.body["websocket"]["connections"])

    @property
    def accepting(self) -> bool:
        return bool(self.body["websocket"]["accepting"])


def beacon(base_url: str) -> Beacon:
    response = httpx.get(f"{base_url}/ws/beacon", timeout=10)
    return Beacon(response.status_code, response.json())


def open_connections(base_url: str) -> int:
    return beacon(base_url).connections


class RawWebSocket:
    """A client written by hand over a TCP socket: it does the handshake, then only what the test tells it to.
    It never answers a ping by itself and never reads unless asked, like a frozen tab or a dead NAT."""

    OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA

    def __init__(self, host: str, port: int, *, headers: dict[str, str] | None = None,
                 receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connecting, so the window the server sees is small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /ws HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed during the handshake")
            self._buffer += chunk
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n", 1)[0].decode()

    # --- writing --------------------------------------------------------------------------------------------
    @staticmethod
    def encode_frame(opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return header + mask + masked

    def send_frame(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(self.encode_frame(opcode, payload))

    def send_frames(self, frames: Sequence[tuple[int, bytes]]) -> None:
        """Several frames in one write, so the server reads them together."""
        self.sock.sendall(b"".join(self.encode_frame(opcode, payload) for opcode, payload in frames))

    def send_text(self, text: str) -> None:
        self.send_frame(self.OP_TEXT, text.encode())

    # --- reading --------------------------------------------------------------------------------------------
    def _read_exact(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def read_frame(self, timeout: float = 10) -> tuple[int, bytes]:
        """The next frame's opcode and payload (server frames are never masked)."""
        self.sock.settimeout(timeout)
        first, second = self._read_exact(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8))
        return first & 0x0F, self._read_exact(length)

    def read_until_close(self, timeout: float = 10) -> list[tuple[int, bytes]]:
        """Every frame up to and including the server's close frame, which is then answered (handshake done)."""
        frames: list[tuple[int, bytes]] = []
        while not frames or frames[-1][0] != self.OP_CLOSE:
            frames.append(self.read_frame(timeout))
        self.send_frame(self.OP_CLOSE, frames[-1][1][:2])
        return frames

    def close(self) -> None:
        self.sock.close()


def close_code_of_frame(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
