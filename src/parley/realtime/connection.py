"""One WebSocket connection as an explicit state machine (incident pattern 4: double closes).

CONNECTING → OPEN → CLOSING → CLOSED. The state is checked and moved without awaiting in between, so a close
requested twice, or by both ends at once, sends at most one close frame, and never after the client's own
close arrived. Only the writer task touches the socket's send side; producers append to a bounded queue,
and a client too slow to drain it is disconnected (it resumes from the event log) instead of growing memory.
A send that the server refuses (uvicorn already closed the socket) or that does not complete within
`send_timeout_s` means the client is gone; the reader, waiting for a client that never will speak again, is
then woken (cancelled) so the connection can be let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable
from typing import Any

from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from parley.observability.logging import get_logger

log = get_logger("parley.ws")

# What a send raises once the socket is gone: Starlette's disconnect, the transport's error, or (when uvicorn
# closed the socket itself, e.g. a keepalive timeout) "Unexpected ASGI message ... after sending websocket.close".
SOCKET_GONE: tuple[type[BaseException], ...] = (WebSocketDisconnect, OSError, RuntimeError)
SEND_FAILED: tuple[type[BaseException], ...] = (*SOCKET_GONE, TimeoutError)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # the client reads too slowly: its queue overflowed
CLOSE_INTERNAL = 1011
CLOSE_NOT_READY = 1013
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_RATE_LIMITED = 4429


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Connection:
    def __init__(self, websocket: WebSocket, connection_id: str, user_id: str, queue_max: int,
                 on_closed: Callable[[Connection], None] | None = None, send_timeout_s: float | None = None,
                 frame_send: Send | None = None) -> None:
        self.websocket = websocket
        # Frames go straight to the server's ASGI `send` when the caller has it (one call per frame instead of
        # Starlette's three; its state checks guard the handshake and the close, which still go through it).
        self._frame_send = frame_send
        self.id = connection_id
        self.user_id = user_id
        self.state = ConnectionState.CONNECTING
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by: str | None = None  # "server" or "client"
        # Idle connections are the common case, so what each holds is kept small: a plain list for the queue,
        # and futures made only while someone actually waits (an asyncio.Event carries a deque of its own).
        self._queue: list[str] = []  # queued, not yet taken by the writer
        self._queued = 0  # queued plus taken by the writer and not yet handed to the socket: the bound
        self._queue_max = queue_max
        self._wake: asyncio.Future[None] | None = None  # the idle writer waits on it
        self._room_waiters: list[asyncio.Future[None]] = []  # replays waiting for the queue to drain
        self._writer: asyncio.Task[None] | None = None
        self._on_closed = on_closed
        self.send_timeout_s = send_timeout_s
        self._flush_on_close = False
        self.reader: asyncio.Task[Any] | None = None  # the task reading from the client (the endpoint's)
        self.reader_woken = False
        self.sent = 0

    # --- opening -------------------------------------------------------------------------------------------
    async def accept(self, subprotocol: str | None) -> None:
        if self.state is not ConnectionState.CONNECTING:
            return
        await self.websocket.accept(subprotocol=subprotocol)
        self.state = ConnectionState.OPEN
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")

    async def reject(self, code: int, reason: str) -> None:
        """Accepts and at once closes with `code`, so a browser can read why (a refused handshake hides it)."""
        if self.state is not ConnectionState.CONNECTING:
            return
        await self.websocket.accept(subprotocol=self._offered_subprotocol())
        self.state = ConnectionState.OPEN
        self._writer = asyncio.create_task(self._write_loop(), name=f"ws-writer-{self.id}")
        self.close(code, reason)
        await self.wait_closed()

    def _offered_subprotocol(self) -> str | None:
        offered = self.websocket.scope.get("subprotocols") or []
        return "parley.v1" if "parley.v1" in offered else None

    # --- sending -------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Messages queued for this client and not yet handed to the socket (the bound applies to these)."""
        return self._queued

    def send(self, text: str) -> bool:
        """Queues a message without waiting. A full queue means the client is too slow: it is disconnected."""
        if self.state is not ConnectionState.OPEN:
            return False
        if self._queued >= self._queue_max:
            log.warning("ws_slow_client_disconnected", connection_id=self.id, user_id=self.user_id,
                        queued=self._queued)
            self.close(CLOSE_POLICY, "client too slow; resubscribe with after_seq")
            return False
        self._queue.append(text)
        self._queued += 1
        self._wake_writer()
        return True

    async def send_when_room(self, text: str) -> bool:
        """Queues a message, first waiting for room (replays use this: a backlog is not a slow client)."""
        while self.state is ConnectionState.OPEN and self._queued >= self._queue_max:
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(waiter)
        return self.send(text)

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _make_room(self) -> None:
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue and self.state is ConnectionState.OPEN:
                    self._wake = loop.create_future()
                    await self._wake
                    self._wake = None
                sending = self._queue and (self.state is ConnectionState.OPEN or self._flushing())
                if sending and not await self._send_burst(loop):
                    return
                if self.state is ConnectionState.CLOSING and not (self._queue and self._flushing()):
                    await self._send_close()
                    return
                if self.state is ConnectionState.CLOSED:
                    return
        finally:
            self._make_room()

    async def _send_burst(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Sends what is queued. One timeout covers the burst, pushed back as sends complete (at most every
        quarter of `send_timeout_s`, so the per-frame path stays cheap): a client that takes in nothing for
        `send_timeout_s` is let go. Returns False when the client is gone."""
        burst, self._queue = self._queue, []
        timeout = self.send_timeout_s
        frame_send = self._frame_send
        try:
            async with asyncio.timeout(timeout) as deadline:
                pushed = loop.time()
                for text in burst:
                    if self.state is not ConnectionState.OPEN and not self._flushing():
                        break  # closed meanwhile: what is left is not sent
                    self._queued -= 1  # the frame in flight is the transport's now, as before a queue
                    if self._room_waiters and self._queued < self._queue_max:
                        self._make_room()
                    if frame_send is not None:
                        await frame_send({"type": "websocket.send", "text": text})
                    else:
                        await self.websocket.send_text(text)
                    self.sent += 1
                    if timeout is not None and (now := loop.time()) - pushed > timeout / 4:
                        deadline.reschedule(now + timeout)
                        pushed = now
        except SEND_FAILED as exc:
            self._client_gone(None)
            if isinstance(exc, TimeoutError):
                self._wake_reader()  # the client stopped reading; it will not speak either
            return False
        return True

    # --- closing -------------------------------------------------------------------------------------------
    def close(self, code: int = CLOSE_NORMAL, reason: str = "", flush: bool = False) -> None:
        """Asks for the connection to close with `code`. Queued messages are dropped, or with `flush` sent
        first (answers owed to what the client said before asking to go). Idempotent."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        if self.state is ConnectionState.CONNECTING:
            self._finish(code, reason, "server")
            return
        self.state = ConnectionState.CLOSING
        self.close_code, self.close_reason, self.closed_by = code, reason, "server"
        self._flush_on_close = flush
        if not flush:
            self._drop_queue()
        self._wake_writer()

    def _drop_queue(self) -> None:
        self._queue = []
        self._queued = 0

    def _flushing(self) -> bool:
        return self.state is ConnectionState.CLOSING and self._flush_on_close

    def client_closed(self, code: int | None) -> None:
        """The reader saw the client's close (or the socket drop): nothing may be sent any more."""
        self._client_gone(code)

    def _client_gone(self, code: int | None) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        if self.state is not ConnectionState.CLOSING:
            self.close_code, self.closed_by = code, "client"
        self._finish(self.close_code, self.close_reason, self.closed_by or "client")

    async def _send_close(self) -> None:
        # Only the writer gets here, once, in state CLOSING: the one place a close frame is ever sent.
        with contextlib.suppress(*SEND_FAILED):  # the client's close crossed ours: closed anyway
            async with asyncio.timeout(self.send_timeout_s):
                await self.websocket.close(code=self.close_code or CLOSE_NORMAL, reason=self.close_reason[:120])
        self._finish(self.close_code, self.close_reason, "server")

    def _finish(self, code: int | None, reason: str, by: str) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        self.close_code, self.close_reason, self.closed_by = code, reason, by
        self._drop_queue()
        self._wake_writer()
        self._make_room()
        if self._on_closed is not None:
            self._on_closed(self)

    def _wake_reader(self) -> None:
        if self.reader is not None and not self.reader.done() and self.reader is not asyncio.current_task():
            self.reader_woken = True
            self.reader.cancel()

    async def wait_closed(self) -> None:
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def shutdown(self) -> None:
        """Waits for the writer to end (after a close); cancels it if the client never lets it finish."""
        if self._writer is None:
            return
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(self._writer)
        except TimeoutError:
            self._writer.cancel()
        except Exception:  # the writer's own failure: the connection is over either way
            log.exception("ws_writer_failed", connection_id=self.id, user_id=self.user_id)
        self._finish(self.close_code, self.close_reason, self.closed_by or "server")
