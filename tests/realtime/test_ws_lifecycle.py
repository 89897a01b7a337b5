"""A WebSocket connection's life: closed by both ends at once by the thousand (incident pattern 4: "Error closing
fastapi WebSocket: Unexpected ASGI message 'websocket.close'"), refused while starting or draining, counted by the
beacon (pattern 6: `/ws/beacon` 404), kept alive or dropped by the heartbeat, and cut off when it reads too slowly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection as AsyncClientConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed

from parley.realtime.connection import CLOSE_POLICY, Connection, ConnectionState
from tests.conftest import SettingsFactory, event_of
from tests.support.clients import Account, register
from tests.support.live import LiveServer, ready_status, wait_for
from tests.support.tcp_proxy import TcpProxy
from tests.support.ws import (
    RawWebSocket,
    assert_answers_ping,
    beacon,
    close_code,
    frame,
    greeted,
    open_connections,
    read_until_closed,
    recv_json,
    ws_connect,
)

TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}
ALARMING_TEXT = ("Unexpected ASGI message", "double", "already closed", "Error closing", "Exception in ASGI")


def alarming(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    """What the server logged that an operator would be paged for: errors, and any double-close symptom."""
    found = []
    for record in list(records):
        if record.name.startswith("websockets.client"):
            continue  # the test's own clients
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        if record.levelno >= logging.ERROR or any(s.lower() in text.lower() for s in ALARMING_TEXT):
            found.append({**event_of(record), "text": text[:500]})
    return found


def ws_closed_events(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    return [e for e in (event_of(r) for r in list(records)) if e.get("event") == "ws_closed"]


@pytest.fixture
def run_server(make_settings: SettingsFactory) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(make_settings(**{"builtin_token_delay_s": 0, **overrides})).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def server_loop(server: LiveServer) -> asyncio.AbstractEventLoop:
    return server.server.servers[0].get_loop()


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == resource.RLIM_INFINITY or soft >= needed, f"need {needed} open files, the hard limit allows {soft}"


def tcp_send_buffer_max() -> int:
    """The most a kernel will buffer for one socket (what a non-reading client can absorb before the server's
    own writes start to wait)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as values:
            return int(values.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


# --- pattern 4: a thousand connections closed by both ends at once ---------------------------------------------

CONNECTIONS = 1000
CLOSE_STYLES = ("disconnect then close", "disconnect and close in one write", "disconnect then drop", "close")


async def _open(server: LiveServer, account: Account, gate: asyncio.Semaphore) -> AsyncClientConnection:
    async with gate:  # a bounded number of handshakes in flight; all connections end up open together
        ws = await async_connect(f"{server.ws_url}/ws", additional_headers=account.headers, proxy=None,
                                 open_timeout=60, close_timeout=10, ping_interval=None)
        hello = orjson.loads(await ws.recv())
        assert hello["type"] == "connected"
        return ws


async def _close(ws: AsyncClientConnection, style: str) -> int | None:
    """Closes from the client side in `style`, as the server closes too; returns the close code the client got."""
    try:
        if style == "disconnect then close":
            await ws.send(frame("disconnect", {}))
            await ws.close()
        elif style == "disconnect and close in one write":
            ws.protocol.send_text(frame("disconnect", {}).encode())
            ws.protocol.send_close(1000)
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
            await ws.wait_closed()
        elif style == "disconnect then drop":
            await ws.send(frame("disconnect", {}))
            ws.transport.abort()
            return None
        elif style == "close":
            await ws.close()
        else:
            await ws.wait_closed()
    except ConnectionClosed:
        pass  # the server's close won the race
    await ws.wait_closed()
    return ws.close_code


async def _thousand(server: LiveServer, accounts: list[Account], close_all: Callable[[], None] | None,
                    styles: tuple[str, ...]) -> list[tuple[str, int | None]]:
    gate = asyncio.Semaphore(200)
    sockets = await asyncio.gather(*(_open(server, accounts[n % len(accounts)], gate) for n in range(CONNECTIONS)))
    await asyncio.to_thread(wait_for, lambda: open_connections(server.url) == CONNECTIONS, 60,
                            0.05, f"{CONNECTIONS} open connections")
    chosen = [styles[n % len(styles)] for n in range(CONNECTIONS)]
    closing = [asyncio.create_task(_close(ws, style)) for ws, style in zip(sockets, chosen, strict=True)]
    if close_all is not None:
        close_all()
    codes = await asyncio.gather(*closing)
    return list(zip(chosen, codes, strict=True))


@pytest.mark.slow
def test_pattern4_thousand_connections_closed_by_client_and_server_at_once_log_nothing_alarming(
        run_server: Callable[..., LiveServer], log_records: list[logging.LogRecord]) -> None:
    raise_open_files_limit(2 * CONNECTIONS + 512)  # both ends of every connection live in this process
    server = run_server(ws_max_connections_per_user=CONNECTIONS)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        accounts = [register(client) for _ in range(4)]
    log_records.clear()

    # Each client asks the server to close (`disconnect`) and closes its own side at the same instant.
    results = asyncio.run(_thousand(server, accounts, None, CLOSE_STYLES))

    wait_for(lambda: open_connections(server.url) == 0, timeout=30, message="every connection to be released")
    assert alarming(log_records) == []
    closed = ws_closed_events(log_records)
    assert len(closed) == CONNECTIONS, "every connection is closed exactly once"
    assert len({e["connection_id"] for e in closed}) == CONNECTIONS
    assert {code for style, code in results if style != "disconnect then drop"} == {1000}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ws/beacon").json()["websocket"] == {"accepting": True, "connections": 0}
    with ws_connect(server.ws_url, headers=accounts[0].headers) as ws:  # and it still serves
        greeted(ws)
        assert_answers_ping(ws)


@pytest.mark.slow
def test_pattern4_thousand_connections_closed_by_server_shutdown_while_clients_close_log_nothing_alarming(
        run_server: Callable[..., LiveServer], log_records: list[logging.LogRecord]) -> None:
    raise_open_files_limit(2 * CONNECTIONS + 512)
    server = run_server(ws_max_connections_per_user=CONNECTIONS)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        accounts = [register(client) for _ in range(4)]
    log_records.clear()

    def shut_down() -> None:
        server.server.should_exit = True

    results = asyncio.run(_thousand(server, accounts, shut_down, (*CLOSE_STYLES, "wait for the server")))

    server.thread.join(30)
    assert not server.thread.is_alive(), "the server did not stop"
    assert alarming(log_records) == []
    closed = ws_closed_events(log_records)
    assert len(closed) == CONNECTIONS and len({e["connection_id"] for e in closed}) == CONNECTIONS
    # Whoever closed first, each client that waited saw the server's close: its own disconnect honoured (1000)
    # or the server going away (1001, 1012).
    waited = Counter(code for style, code in results if style == "wait for the server")
    assert set(waited) <= {1000, 1001, 1012}, waited


# --- refused while not ready --------------------------------------------------------------------------------------

def test_connections_before_the_service_is_ready_are_closed_1013_and_the_beacon_says_so(
        make_settings: SettingsFactory, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        settings = make_settings(database_busy_timeout_s=0.1, builtin_token_delay_s=0)
        holder = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # migrations cannot run while this lock is held: start-up waits

        def release() -> None:
            holder.execute("ROLLBACK")
            holder.close()

        proxy = None
    else:
        proxy = TcpProxy("127.0.0.1", 5432)
        proxy.cut()  # the database is unreachable: start-up keeps retrying
        settings = make_settings(database_url=database_url.replace(":5432/", f":{proxy.port}/"),
                                 database_connect_timeout_s=1, builtin_token_delay_s=0)
        release = proxy.restore
    server = LiveServer(settings)
    try:
        server.start(wait_ready=False)
        assert ready_status(server.url) == 503
        with ws_connect(server.ws_url, headers={"Authorization": "Bearer whatever"}) as ws:
            assert close_code(ws) == 1013  # "try again later", before even looking at the credentials
        starting = beacon(server.url)
        assert starting.status_code == 503
        assert starting.body["websocket"] == {"accepting": False, "connections": 0}
        assert httpx.head(f"{server.url}/ws/beacon").status_code == 503
        release()
        wait_for(lambda: ready_status(server.url) == 200, timeout=30, message="readiness")
        ready = beacon(server.url)
        assert ready.status_code == 200 and ready.body["websocket"] == {"accepting": True, "connections": 0}
        with httpx.Client(base_url=server.url) as client:
            account = register(client)
        with ws_connect(server.ws_url, headers=account.headers) as ws:
            greeted(ws)
            assert_answers_ping(ws)
    finally:
        server.stop()
        if proxy is not None:
            proxy.close()


def test_connections_while_draining_are_closed_1013_and_the_beacon_says_so(live_server: LiveServer,
                                                                           account: Account) -> None:
    with ws_connect(live_server.ws_url, headers=account.headers) as before:
        greeted(before)
        assert beacon(live_server.url).connections == 1
        server_loop(live_server).call_soon_threadsafe(live_server.services.lifecycle.begin_drain)  # as SIGTERM
        wait_for(lambda: beacon(live_server.url).status_code == 503, timeout=10, message="the beacon to say 503")
        draining = beacon(live_server.url)
        assert draining.body["websocket"]["accepting"] is False
        assert httpx.get(f"{live_server.url}/health/ready").json()["status"] == "draining"
        with ws_connect(live_server.ws_url, headers=account.headers) as refused:
            assert close_code(refused) == 1013
        assert beacon(live_server.url).connections == 1  # the refused one was never counted


# --- pattern 6: the beacon ------------------------------------------------------------------------------------------

def _assert_beacon_shape(body: dict[str, Any], connections: int) -> None:
    assert set(body) == {"status", "websocket", "ts"}
    assert body["status"] == "ok"
    assert body["websocket"] == {"accepting": True, "connections": connections}
    assert isinstance(body["ts"], str) and body["ts"].endswith("Z")


def test_pattern6_beacon_answers_get_head_and_post_with_the_real_connection_count(live_server: LiveServer,
                                                                                  account: Account) -> None:
    with httpx.Client(base_url=live_server.url) as client:  # no credentials: monitors and sendBeacon have none
        get = client.get("/ws/beacon")
        assert get.status_code == 200 and get.headers["content-type"].startswith("application/json")
        _assert_beacon_shape(get.json(), 0)
        head = client.head("/ws/beacon")
        assert head.status_code == 200 and head.content == b""
        sent = client.post("/ws/beacon", content=b'{"event":"pagehide","open":true}',
                           headers={"Content-Type": "text/plain;charset=UTF-8"})  # what navigator.sendBeacon sends
        assert sent.status_code == 200
        _assert_beacon_shape(sent.json(), 0)
        assert client.post("/ws/beacon").status_code == 200  # an empty beacon too

        sockets = [ws_connect(live_server.ws_url, headers=account.headers) for _ in range(3)]
        try:
            for ws in sockets:
                greeted(ws)
            _assert_beacon_shape(client.get("/ws/beacon").json(), 3)
            _assert_beacon_shape(client.post("/ws/beacon", content=b"x" * 100).json(), 3)
        finally:
            for ws in sockets:
                ws.close()
        wait_for(lambda: client.get("/ws/beacon").json()["websocket"]["connections"] == 0, timeout=10,
                 message="the beacon to count the closed connections out")


def test_pattern6_oversized_beacon_body_is_413_with_the_error_envelope(live_server: LiveServer) -> None:
    response = httpx.post(f"{live_server.url}/ws/beacon", content=b"x" * 64_000,
                          headers={"Content-Type": "text/plain"})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and error["message"] and error["request_id"]
    assert response.headers["X-Request-ID"] == error["request_id"]
    assert beacon(live_server.url).status_code == 200  # and the beacon is none the worse for it


# --- heartbeat -------------------------------------------------------------------------------------------------------

HEARTBEAT_S = 1.0


def test_heartbeat_keeps_a_client_that_answers_pings(run_server: Callable[..., LiveServer]) -> None:
    server = run_server(ws_heartbeat_s=HEARTBEAT_S)
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    raw = RawWebSocket("127.0.0.1", server.port, headers=account.headers)
    try:
        opcode, hello = raw.read_frame()
        assert opcode == RawWebSocket.OP_TEXT and orjson.loads(hello)["payload"]["heartbeat_s"] == HEARTBEAT_S
        started = time.monotonic()
        pings = 0
        while pings < 4:  # four heartbeats, each ping answered by hand
            opcode, payload = raw.read_frame(timeout=HEARTBEAT_S * 3)
            assert opcode == RawWebSocket.OP_PING, (opcode, payload)
            raw.send_frame(RawWebSocket.OP_PONG, payload)
            pings += 1
        assert time.monotonic() - started >= 3 * HEARTBEAT_S * 0.9  # they came one heartbeat apart
        raw.send_text(frame("ping", {}, "still-here"))
        while True:
            opcode, payload = raw.read_frame()
            if opcode == RawWebSocket.OP_PING:
                raw.send_frame(RawWebSocket.OP_PONG, payload)
                continue
            assert opcode == RawWebSocket.OP_TEXT and orjson.loads(payload)["id"] == "still-here"
            break
        assert open_connections(server.url) == 1
    finally:
        raw.close()


def test_heartbeat_drops_a_client_that_never_answers_within_a_few_heartbeats(
        run_server: Callable[..., LiveServer], log_records: list[logging.LogRecord]) -> None:
    server = run_server(ws_heartbeat_s=HEARTBEAT_S)
    with httpx.Client(base_url=server.url) as client:
        account = register(client)
    raw = RawWebSocket("127.0.0.1", server.port, headers=account.headers)  # handshake, then silence
    try:
        started = time.monotonic()
        wait_for(lambda: open_connections(server.url) == 1, timeout=5, message="the connection to open")
        wait_for(lambda: open_connections(server.url) == 0, timeout=HEARTBEAT_S * 6, interval=0.05,
                 message="the server to drop the silent client")
        elapsed = time.monotonic() - started
    finally:
        raw.close()
    assert 2 * HEARTBEAT_S * 0.9 <= elapsed <= 4.5 * HEARTBEAT_S, elapsed  # two missed pings, not one, not ten
    assert alarming(log_records) == []


def test_pattern4_client_that_stops_reading_with_a_backlog_is_dropped_by_the_heartbeat_without_errors(
        run_server: Callable[..., LiveServer], log_records: list[logging.LogRecord]) -> None:
    """A frozen tab: it stops reading while the server has megabytes for it, so it answers no ping either.
    The heartbeat must release it (the beacon and the per-user limit count it) and, when the client wakes up and
    reads again, nothing may be sent after the server's close or logged as an error."""
    server = run_server(ws_heartbeat_s=HEARTBEAT_S, max_message_chars=1_000_000,
                        max_request_body_bytes=4_000_000)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        account = register(client)
        thread = client.post("/api/threads", headers=account.headers, json={}).json()
        stored = 0
        while stored < tcp_send_buffer_max() + 2_000_000:  # more than the kernel buffers for one socket
            content = random.randbytes(500_000).hex()  # incompressible
            response = client.post(f"/api/threads/{thread['id']}/messages", headers=account.headers,
                                   json={"content": content})
            assert response.status_code == 202, response.text
            stored += len(content)
        # The backlog is the thread's history, replayed at once on subscribe: no race with the heartbeat.
        raw = RawWebSocket("127.0.0.1", server.port, headers=account.headers, receive_buffer=4096)
        try:
            raw.send_text(frame("subscribe", {"thread_id": thread["id"], "after_seq": 0}, "sub"))
            stalled = time.monotonic()  # from here on the client reads nothing and answers no ping
            wait_for(lambda: open_connections(server.url) == 1, timeout=5, message="the connection to open")
            try:
                wait_for(lambda: open_connections(server.url) == 0, timeout=HEARTBEAT_S * 6, interval=0.05,
                         message="the heartbeat to drop the stalled client")
                released_after: float | None = time.monotonic() - stalled
            except AssertionError:
                released_after = None
            with pytest.raises((ConnectionError, TimeoutError, OSError)):
                while True:  # the client wakes up and reads whatever the server still sends it
                    opcode, _ = raw.read_frame(timeout=5)
                    if opcode == RawWebSocket.OP_CLOSE:
                        raise ConnectionError("closed")
        finally:
            raw.close()
    wait_for(lambda: open_connections(server.url) == 0, timeout=10, message="the connection to be released")
    problems: list[Any] = alarming(log_records)
    if released_after is None:
        problems.append(f"a client that stopped reading was still connected {HEARTBEAT_S * 6:.0f}s later (heartbeat "
                        f"{HEARTBEAT_S}s): it was released only when it read again")
    assert problems == []


# --- slow clients ----------------------------------------------------------------------------------------------------

def _seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages if "seq" in m]


def test_slow_client_is_closed_1008_and_resumes_without_gaps_while_a_reader_keeps_up(
        run_server: Callable[..., LiveServer], log_records: list[logging.LogRecord]) -> None:
    server = run_server(ws_send_queue_max=256, max_message_chars=1_000_000, max_request_body_bytes=4_000_000)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        account = register(client)
        thread = client.post("/api/threads", headers=account.headers, json={}).json()

        reader = ws_connect(server.ws_url, headers=account.headers, max_size=None)
        greeted(reader)
        reader.send(frame("subscribe", {"thread_id": thread["id"]}, "sub"))
        assert recv_json(reader)["type"] == "ack"
        kept_up: list[dict[str, Any]] = []
        reader_closed: list[BaseException] = []

        def keep_reading() -> None:
            try:
                while True:
                    kept_up.append(orjson.loads(reader.recv()))
            except ConnectionClosed as exc:
                reader_closed.append(exc)

        reading = threading.Thread(target=keep_reading, daemon=True)
        reading.start()

        stalled_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stalled_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled_socket.connect(("127.0.0.1", server.port))
        slow = ws_connect(server.ws_url, headers=account.headers, sock=stalled_socket, max_queue=1, max_size=None,
                          compression=None)  # uncompressed, or the kernel buffers would hold it all
        greeted(slow)
        slow.send(frame("subscribe", {"thread_id": thread["id"]}, "sub"))
        assert recv_json(slow)["type"] == "ack"

        def slow_client_cut_off() -> bool:
            return any(event_of(r).get("event") == "ws_slow_client_disconnected" for r in list(log_records))

        posted = 0
        while not slow_client_cut_off():  # the slow client stops reading; the thread keeps talking
            assert posted < 60, "the slow client's queue never overflowed"
            response = client.post(f"/api/threads/{thread['id']}/messages", headers=account.headers,
                                   json={"content": random.randbytes(250_000).hex()})
            assert response.status_code == 202, response.text
            posted += 1

        missed, close = read_until_closed(slow, timeout=30)  # it wakes up: what was in flight, then the close
        assert close is not None and close.code == CLOSE_POLICY, close
        seen = _seqs(missed)
        assert seen == list(range(1, len(seen) + 1)), "what it got before the cut is a gapless prefix"

        def reader_saw_every_run_end() -> bool:
            return sum(1 for m in list(kept_up) if m["type"] in TERMINAL) == posted

        wait_for(reader_saw_every_run_end, timeout=60, message="the reader to see every run end")
        assert reader_closed == [], "the reader that kept up was never cut off"
        final = _seqs(kept_up)[-1]
        assert _seqs(kept_up) == list(range(1, final + 1))
        reader.close()

        with ws_connect(server.ws_url, headers=account.headers, max_size=None) as resumed:  # resubscribe, resume
            greeted(resumed)
            after = seen[-1] if seen else 0
            resumed.send(frame("subscribe", {"thread_id": thread["id"], "after_seq": after}, "resume"))
            replay: list[dict[str, Any]] = []
            while not _seqs(replay) or _seqs(replay)[-1] < final:
                replay.append(recv_json(resumed, 30))
        assert _seqs(replay) == list(range(after + 1, final + 1))
    closed = [e for e in ws_closed_events(log_records) if e.get("code") == CLOSE_POLICY]
    assert len(closed) == 1 and closed[0]["by"] == "server"
    assert alarming(log_records) == []



# --- the connection state machine, with a socket whose sends block until the test lets them through -------------

class BlockingSocket:
    """Stands in for Starlette's WebSocket: `send_text` waits on `gate`, like a send to a client that stopped
    reading; every frame that would go out is recorded. `fail_sends_with` makes sends raise, as the server
    does once it has closed the socket on its own (keepalive timeout, oversized frame)."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"type": "websocket", "subprotocols": []}
        self.gate = asyncio.Event()
        self.sent: list[str] = []
        self.closes: list[tuple[int, str | None]] = []
        self.in_send = asyncio.Event()
        self.fail_sends_with: BaseException | None = None

    async def accept(self, subprotocol: str | None = None) -> None:
        pass

    async def send_text(self, text: str) -> None:
        self.in_send.set()
        await self.gate.wait()
        if self.fail_sends_with is not None:
            raise self.fail_sends_with
        self.sent.append(text)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closes.append((code, reason))


def state_of(connection: Connection) -> ConnectionState:
    return connection.state  # read afresh: it changes across awaits


async def _open_blocked(queue_max: int) -> tuple[Connection, BlockingSocket, list[Connection]]:
    """An open connection whose writer is stuck in its first send."""
    fake = BlockingSocket()
    released: list[Connection] = []
    connection = Connection(fake, "c1", "u1", queue_max=queue_max, on_closed=released.append)  # type: ignore[arg-type]
    await connection.accept(None)
    assert connection.send("first")
    await asyncio.wait_for(fake.in_send.wait(), 5)
    return connection, fake, released


async def test_slow_reader_overflow_requests_one_1008_close_and_never_queues_past_the_bound(
        log_records: list[logging.LogRecord]) -> None:
    queue_max = 16
    connection, fake, released = await _open_blocked(queue_max)
    accepted = 0
    longest = 0
    for n in range(1000):  # a thread's events keep coming while the client reads nothing
        accepted += connection.send(f"event {n}")
        longest = max(longest, connection.queued)  # what the connection holds in memory for this client
    assert longest <= queue_max
    assert accepted == queue_max
    assert state_of(connection) is ConnectionState.CLOSING
    cut_off = [e for e in (event_of(r) for r in list(log_records)) if e["event"] == "ws_slow_client_disconnected"]
    assert len(cut_off) == 1

    fake.gate.set()  # the client reads again
    await asyncio.wait_for(connection.shutdown(), 10)
    assert fake.sent == ["first"]  # nothing queued after the cut is sent: the client resumes from the log
    assert [code for code, _ in fake.closes] == [CLOSE_POLICY]
    assert state_of(connection) is ConnectionState.CLOSED and released == [connection]


@pytest.mark.parametrize("seed", range(200))
async def test_close_requested_everywhere_while_the_client_leaves_sends_at_most_one_close_frame(seed: int) -> None:
    """Server code closes from several places (rate limit, disconnect, shutdown, slow client) while the client's
    own close arrives and the writer is mid-send; in every interleaving at most one close frame goes out, none
    after the client's close was seen, and the connection is released once."""
    chooser = random.Random(seed)
    connection, fake, released = await _open_blocked(queue_max=16)
    client_close_seen_before_server_close: list[bool] = []

    async def server_closes(code: int) -> None:
        for _ in range(chooser.randint(0, 3)):
            await asyncio.sleep(0)
        connection.close(code, "test")

    async def client_leaves() -> None:
        for _ in range(chooser.randint(0, 3)):
            await asyncio.sleep(0)
        client_close_seen_before_server_close.append(fake.closes == [])
        connection.client_closed(1001)

    async def client_reads_again() -> None:
        for _ in range(chooser.randint(0, 3)):
            await asyncio.sleep(0)
        fake.gate.set()

    actions = [server_closes(1000), server_closes(4429), server_closes(1008), server_closes(1011), client_reads_again()]
    if chooser.random() < 0.7:
        actions.append(client_leaves())
    chooser.shuffle(actions)
    await asyncio.gather(*actions)
    fake.gate.set()
    await asyncio.wait_for(connection.shutdown(), 10)

    assert len(fake.closes) <= 1, fake.closes
    if client_close_seen_before_server_close == [True]:
        assert fake.closes == [], "a close frame was sent after the client's close had been seen"
    assert connection.state is ConnectionState.CLOSED
    assert released == [connection], "released exactly once"
    assert not connection.send("late"), "nothing is queued after the close"


@pytest.mark.parametrize("failure", [
    RuntimeError("Unexpected ASGI message 'websocket.send', after sending 'websocket.close'."),
    OSError("connection lost"),
], ids=["server already closed it", "socket gone"])
async def test_send_failing_because_the_server_closed_the_socket_ends_the_connection_quietly(
        failure: BaseException, log_records: list[logging.LogRecord]) -> None:
    """uvicorn closes a socket by itself on a keepalive timeout or an oversized frame, and then refuses the
    app's next send with a RuntimeError. The connection must end, released once, without raising to the server
    (which would log "Exception in ASGI application ... Unexpected ASGI message")."""
    connection, fake, released = await _open_blocked(queue_max=16)
    fake.fail_sends_with = failure
    fake.gate.set()
    await asyncio.wait_for(connection.shutdown(), 10)  # the endpoint's `finally` awaits exactly this
    assert connection.state is ConnectionState.CLOSED
    assert released == [connection]
    assert len(fake.closes) <= 1
