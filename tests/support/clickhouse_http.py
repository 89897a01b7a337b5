"""A test fixture that speaks ClickHouse's HTTP interface over chDB, with faults the test controls.

It serves enough of the interface for clickhouse-connect's HTTP client: `/ping`; statements in the `query` URL
parameter and/or the POST body (concatenated with a newline, as ClickHouse does); `database`, `default_format`,
`param_*` bound parameters, session ids, settings as URL parameters; `INSERT ... FORMAT <fmt>` followed by data;
request bodies in `Content-Encoding` gzip, deflate, lz4 or zstd and responses compressed the same way when
`enable_http_compression=1`; ClickHouse's response headers (`X-ClickHouse-Query-Id`, `-Format`, `-Timezone`,
`-Summary`, `-Server-Display-Name`, `-Exception-Code`) and error bodies (`Code: N. DB::Exception: ...`).
Not served: ClickHouse's own block compression (`compress=1`/`decompress=1`) and the Native block-info protocol
(`client_protocol_version` is ignored, as a proxy that strips it would, so the client falls back to revision 0).

Faults: `down()` closes the listener and every connection while keeping the port bound, so connecting is refused
(ECONNREFUSED) and nobody else can take the port; `up()` listens on it again; `slow(seconds)` holds every request
that long before it runs; `refuse_inserts_into(table)` fails inserts into one table (TOO_MANY_PARTS).
`query()` reads what arrived, bypassing faults and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib
import re
import socket
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import chdb.session
import orjson
import uvicorn

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DISPLAY_NAME = "parley-test-clickhouse"

# URL parameters the HTTP layer consumes itself; every other non-`param_` parameter is a setting for the query.
_TRANSPORT_PARAMETERS = frozenset({
    "query", "database", "default_format", "user", "password", "quota_key", "query_id", "session_id",
    "session_timeout", "session_check", "compress", "decompress", "wait_end_of_query", "buffer_size",
    "client_protocol_version", "role", "add_http_cors_header", "enable_http_compression",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
})
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IDENTIFIER = r"(?:`[^`]+`|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_]*)"
_INSERT_WITH_DATA = re.compile(
    rf"^\s*INSERT\s+INTO\s+(?:TABLE\s+)?(?P<table>{_IDENTIFIER}(?:\.{_IDENTIFIER})?)\s*(?P<columns>\([^)]*\))?"
    r"\s*FORMAT\s+(?P<format>\w+)[ \t]*\r?\n?", re.IGNORECASE)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_READ_ONLY = re.compile(r"^\s*(?:SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN|CHECK)\b", re.IGNORECASE)
_ERROR = re.compile(r"Code: (\d+)\. DB::Exception: (.*?)(?: \((\w+)\))?(?: \(version [^)]*\))?\s*$", re.DOTALL)

# ClickHouse answers some errors with a 4xx status (HTTPHandler's exceptionCodeToHTTPStatus); the rest get 500.
_NOT_FOUND = frozenset({
    "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
    "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT",
    "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY"})
_BAD_REQUEST = frozenset({"SYNTAX_ERROR", "INCORRECT_DATA", "UNKNOWN_QUERY_PARAMETER", "BAD_QUERY_PARAMETER"})

_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8", "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent", "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8", "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}


class ClickHouseError(Exception):
    """A statement failed; carries ClickHouse's code, name and the HTTP status ClickHouse would answer with."""

    def __init__(self, code: int, message: str, name: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.name = code, message, name

    @classmethod
    def from_engine(cls, exc: Exception) -> ClickHouseError:
        text = str(exc)
        start = text.find("Code: ")
        match = _ERROR.match(text[start:].strip()) if start >= 0 else None
        if match is None:
            return cls(1001, text.strip() or type(exc).__name__, "STD_EXCEPTION")
        return cls(int(match.group(1)), match.group(2), match.group(3) or "")

    @property
    def status(self) -> int:
        if self.name in _NOT_FOUND:
            return 404
        if self.name in _BAD_REQUEST or self.name.startswith("CANNOT_PARSE"):
            return 400
        if self.name == "NOT_IMPLEMENTED":
            return 501
        return 500


@dataclass
class _Request:
    method: str
    path: str
    parameters: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def sql(self) -> bytes:
        """The statement: the `query` parameter, then (after a newline) the body, decompressed."""
        body = _decompress(self.body, self.headers.get("content-encoding"))
        query = self.parameters.get("query", "").encode()
        return query + b"\n" + body if query and body else query or body


@dataclass
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Serving:
    """One listening period between `up()` and `down()`: a uvicorn server on a thread and loop of its own."""

    server: uvicorn.Server
    thread: threading.Thread | None = None
    started: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    halt: asyncio.Event | None = None  # set by `down()`: requests held by `slow()` end unanswered


class ClickHouseHTTP:
    """`with ClickHouseHTTP(tmp_path / "clickhouse") as clickhouse:` serves at `clickhouse.url` until the block ends.

    chDB allows one data path per process at a time, so at most one instance (or other chDB user) may be open."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._engine_lock = threading.Lock()  # one statement at a time on the one chDB session
        self._lock = threading.Lock()  # counters, fault state, the serving period
        engine_type: Any = chdb.session.Session  # chDB has no type hints
        self._engine = engine_type(str(data_dir / "engine"))
        self._database = "default"
        self._applied_settings: dict[str, str] = {}
        self.version, self.timezone = self._engine.query("SELECT version(), timezone()", "TabSeparated") \
            .bytes().decode().strip().split("\t")
        # Bound (never listening) for the fixture's whole life: while down, a connection is refused, and the
        # kernel cannot hand the port to anyone else, nor pick it as the source port of a connection to it.
        self._port_holder = _reusable_socket()
        self._port_holder.bind(("127.0.0.1", 0))
        self.port: int = self._port_holder.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._serving: _Serving | None = None
        self._halts: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}  # by listening period's loop
        self._delay_s = 0.0
        self._refused_tables: set[str] = set()
        self._sessions_busy: set[str] = set()
        self.requests = 0  # every HTTP request answered, /ping included
        self.statements = 0  # statements chDB executed successfully
        self.errors = 0  # statements that failed
        self.delayed = 0  # requests held by `slow()`, ever
        self.held = 0  # requests held by `slow()` now
        self.in_flight = 0  # requests being answered now
        self._rows_inserted: Counter[str] = Counter()

    # --- faults and counters (called from the test's thread) --------------------------------------------------

    def up(self) -> ClickHouseHTTP:
        with self._lock:
            if self._serving is not None:
                return self
            listener = _reusable_socket()
            listener.bind(("127.0.0.1", self.port))
            config = uvicorn.Config(self._app, interface="asgi3", lifespan="off", log_config=None,
                                    access_log=False, server_header=False, timeout_graceful_shutdown=2)
            serving = _Serving(uvicorn.Server(config))
            serving.thread = threading.Thread(target=asyncio.run, args=(self._serve(serving, listener),),
                                              name=f"clickhouse-http-{self.port}", daemon=True)
            self._serving = serving
        serving.thread.start()
        deadline = time.monotonic() + 10
        while not serving.server.started:  # the listener is up once uvicorn says so
            if time.monotonic() > deadline or not serving.thread.is_alive():
                raise AssertionError("the ClickHouse HTTP fixture did not start")
            time.sleep(0.005)
        return self

    def down(self) -> None:
        """ClickHouse goes away: the listener and every connection close, and requests held by `slow()` are
        answered 503 without running. Connecting is refused until `up()`."""
        with self._lock:
            serving, self._serving = self._serving, None
        if serving is None:
            return
        serving.started.wait(10)
        if serving.loop is not None and serving.halt is not None:
            serving.loop.call_soon_threadsafe(serving.halt.set)
        serving.server.should_exit = True
        assert serving.thread is not None
        serving.thread.join(15)
        if serving.thread.is_alive():
            raise AssertionError("the ClickHouse HTTP fixture did not go down")

    @property
    def is_up(self) -> bool:
        return self._serving is not None

    def slow(self, seconds: float) -> None:
        """Holds every request `seconds` before running it (0 ends it)."""
        with self._lock:
            self._delay_s = seconds

    def refuse_inserts_into(self, *tables: str) -> None:
        """Inserts into these tables ("db.table" or "table") fail as ClickHouse fails them when a table has too
        many parts; other statements succeed. No tables: every insert is accepted again."""
        with self._lock:
            self._refused_tables = set(tables)

    def rows_inserted(self, table: str | None = None) -> int:
        """Rows inserted through HTTP into `table` ("db.table", or "table" in any database); all tables if None."""
        with self._lock:
            if table is None:
                return sum(self._rows_inserted.values())
            return sum(rows for name, rows in self._rows_inserted.items()
                       if name == table or ("." not in table and name.endswith(f".{table}")))

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Runs `sql` directly on the engine (no faults, not counted); rows as dicts."""
        with self._engine_lock:
            self._use_locked("default")
            result = self._engine.query(sql, "JSONEachRow", params={k: str(v) for k, v in (parameters or {}).items()})
        return [orjson.loads(line) for line in result.bytes().splitlines() if line]

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> ClickHouseHTTP:
        return self.up()

    def stop(self) -> None:
        self.down()
        self._port_holder.close()
        with self._engine_lock:
            self._engine.close()

    def __enter__(self) -> ClickHouseHTTP:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    async def _serve(self, serving: _Serving, listener: socket.socket) -> None:
        serving.loop = asyncio.get_running_loop()
        serving.halt = asyncio.Event()
        with self._lock:
            self._halts[serving.loop] = serving.halt
        serving.started.set()
        try:
            await serving.server.serve(sockets=[listener])
        finally:
            with self._lock:
                self._halts.pop(serving.loop, None)

    # --- the ASGI application (runs on the serving thread) ----------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        parameters = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        request = _Request(scope["method"], scope["path"], parameters, headers, body)
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            delay = self._delay_s
            if delay > 0:
                self.delayed += 1
                self.held += 1
        try:
            halted = False
            if delay > 0:
                try:
                    halted = await self._halted_within(delay)
                finally:
                    with self._lock:
                        self.held -= 1
            if halted:
                answer = self._error(ClickHouseError(210, "Connection reset: ClickHouse went down", "NETWORK_ERROR"),
                                     status=503)
            else:
                answer = await asyncio.to_thread(self._answer, request)
        finally:
            with self._lock:
                self.in_flight -= 1
        encoding = self._response_encoding(request)
        if encoding and answer.status == 200 and answer.body:
            answer.body = _compress(answer.body, encoding)
            answer.headers["Content-Encoding"] = encoding
        header_list = [(b"x-clickhouse-server-display-name", DISPLAY_NAME.encode()),
                       (b"x-clickhouse-timezone", self.timezone.encode()),
                       (b"content-length", str(len(answer.body)).encode())]
        header_list += [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": header_list})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    async def _halted_within(self, seconds: float) -> bool:
        """Waits `seconds`, or less if this listening period ends (`down()`); whether it ended."""
        with self._lock:
            halt = self._halts[asyncio.get_running_loop()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(halt.wait(), timeout=seconds)
        return halt.is_set()

    def _answer(self, request: _Request) -> _Answer:
        asks_nothing = request.method == "GET" and not request.parameters.get("query") and not request.body
        if request.path in ("/ping", "/replicas_status") or (request.path == "/" and asks_nothing):
            return _Answer(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
        if request.path != "/":
            return _Answer(404, f"There is no handle {request.path}\n".encode(), {"Content-Type": "text/plain"})
        query_id = request.parameters.get("query_id") or str(uuid.uuid4())
        session_id = request.parameters.get("session_id")
        try:
            if request.parameters.get("compress") == "1" or request.parameters.get("decompress") == "1":
                raise ClickHouseError(48, "ClickHouse block compression is not served by the test fixture",
                                      "NOT_IMPLEMENTED")
            self._claim_session(session_id)
            try:
                answer = self._execute(request)
            finally:
                self._release_session(session_id)
        except ClickHouseError as exc:
            with self._lock:
                self.errors += 1
            answer = self._error(exc)
        answer.headers["X-ClickHouse-Query-Id"] = query_id
        return answer

    def _claim_session(self, session_id: str | None) -> None:
        if not session_id:
            return
        with self._lock:
            if session_id in self._sessions_busy:
                raise ClickHouseError(373, f"Session {session_id} is locked by a concurrent client",
                                      "SESSION_IS_LOCKED")
            self._sessions_busy.add(session_id)

    def _release_session(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions_busy.discard(session_id)

    def _execute(self, request: _Request) -> _Answer:
        raw = request.sql()
        parameters = request.parameters
        settings = {key: value for key, value in parameters.items()
                    if key not in _TRANSPORT_PARAMETERS and not key.startswith("param_")}
        bound = {key[len("param_"):]: value for key, value in parameters.items() if key.startswith("param_")}
        insert = _INSERT_WITH_DATA.match(raw[:65536].decode("utf-8", errors="replace"))
        if insert is None and not raw.strip():
            raise ClickHouseError(62, "Empty query", "SYNTAX_ERROR")
        text = raw.decode("utf-8", errors="replace")
        if request.method == "GET" and (insert is not None or not _READ_ONLY.match(text)):
            raise ClickHouseError(164, "Cannot execute query in readonly mode. For queries over HTTP, method GET "
                                       "implies readonly. You should use method POST for modifying queries",
                                  "READONLY")
        with self._engine_lock:
            self._use_locked(parameters.get("database") or "default")
            self._apply_settings_locked(settings)
            if insert is not None:
                return self._insert_locked(insert, raw[len(insert.group(0).encode()):])
            output_format = parameters.get("default_format") or "TabSeparated"
            result = self._run_locked(text, output_format, bound)
        embedded = _TRAILING_FORMAT.search(text)
        headers = _summary(result)
        if embedded is not None or _READ_ONLY.match(text):
            fmt = embedded.group(1) if embedded is not None else output_format
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = _CONTENT_TYPES.get(fmt, "application/octet-stream")
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        return _Answer(200, result.bytes() or b"", headers)

    def _insert_locked(self, insert: re.Match[str], data: bytes) -> _Answer:
        table = insert.group("table").replace("`", "").replace('"', "")
        if "." not in table:
            table = f"{self._database}.{table}"
        with self._lock:
            refused = table in self._refused_tables or table.split(".")[-1] in self._refused_tables
        if refused:
            raise ClickHouseError(252, f"Too many parts (300) in table '{table}'. Merges are processing "
                                       "significantly slower than inserts", "TOO_MANY_PARTS")
        fmt = insert.group("format")
        data_file = self.data_dir / f"insert-{uuid.uuid4().hex}.{fmt.lower()}"
        data_file.write_bytes(data)
        try:
            columns = insert.group("columns") or ""
            path = str(data_file).replace("\\", "\\\\").replace("'", "\\'")
            result = self._run_locked(f"INSERT INTO {insert.group('table')} {columns} FROM INFILE '{path}' "
                                      f"FORMAT {fmt}", "TabSeparated", {})
        finally:
            data_file.unlink(missing_ok=True)
        with self._lock:
            self._rows_inserted[table] += result.rows_written()
        return _Answer(200, b"", {**_summary(result), "Content-Type": "text/plain; charset=UTF-8"})

    def _run_locked(self, sql: str, fmt: str, parameters: dict[str, str]) -> Any:
        try:
            result = self._engine.query(sql, fmt, params=parameters)
        except Exception as exc:  # chDB raises its own error types; all carry ClickHouse's "Code: N." text
            raise ClickHouseError.from_engine(exc) from exc
        with self._lock:
            self.statements += 1
        return result

    def _use_locked(self, database: str) -> None:
        if database != self._database:
            try:
                self._engine.query(f"USE `{database.replace('`', '')}`", "TabSeparated")
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            self._database = database

    def _apply_settings_locked(self, settings: dict[str, str]) -> None:
        """Makes the session's settings exactly `settings` (as ClickHouse applies URL settings per query)."""
        changes = {name: "DEFAULT" for name in self._applied_settings if name not in settings}
        changes.update({name: "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
                        for name, value in settings.items() if self._applied_settings.get(name) != value})
        for name, literal in changes.items():
            if not _SETTING_NAME.match(name):
                raise ClickHouseError(115, f"Unknown setting '{name}'", "UNKNOWN_SETTING")
            try:
                self._engine.query(f"SET {name} = {literal}", "TabSeparated")
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            if literal == "DEFAULT":
                self._applied_settings.pop(name, None)
            else:
                self._applied_settings[name] = settings[name]

    def _error(self, exc: ClickHouseError, status: int | None = None) -> _Answer:
        name = f" ({exc.name})" if exc.name else ""
        body = f"Code: {exc.code}. DB::Exception: {exc.message}{name} (version {self.version})\n".encode()
        return _Answer(status or exc.status, body, {"X-ClickHouse-Exception-Code": str(exc.code),
                                                    "Content-Type": "text/plain; charset=UTF-8"})

    def _response_encoding(self, request: _Request) -> str | None:
        if request.parameters.get("enable_http_compression") != "1":
            return None
        offered = [part.split(";")[0].strip().lower() for part in request.headers.get("accept-encoding", "").split(",")]
        return next((encoding for encoding in offered if encoding in _CODECS), None)


def _reusable_socket() -> socket.socket:
    # SO_REUSEPORT lets the listener share the port with the holder that keeps it bound between outages.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _summary(result: Any) -> dict[str, str]:
    summary = {"read_rows": str(result.rows_read()), "read_bytes": str(result.bytes_read()),
               "written_rows": str(result.rows_written()), "written_bytes": str(result.bytes_written()),
               "total_rows_to_read": str(result.rows_read()), "elapsed_ns": str(int(result.elapsed() * 1e9))}
    return {"X-ClickHouse-Summary": orjson.dumps(summary).decode()}


def _optional_module(*names: str) -> Any:
    for name in names:
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    return None


def _build_codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    """Content encodings this fixture reads and writes, (compress, decompress) by name: those clickhouse-connect
    offers that are importable here."""
    codecs: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        "gzip": (gzip.compress, gzip.decompress),
        "deflate": (zlib.compress, zlib.decompress),
    }
    lz4_frame = _optional_module("lz4.frame")
    if lz4_frame is not None:
        codecs["lz4"] = (lz4_frame.compress, lz4_frame.decompress)
    zstd = _optional_module("compression.zstd", "backports.zstd")
    if zstd is not None:
        codecs["zstd"] = (zstd.compress, zstd.decompress)
    return codecs


_CODECS = _build_codecs()


def _compress(data: bytes, encoding: str) -> bytes:
    return _CODECS[encoding][0](data)


def _decompress(data: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return data
    codec = _CODECS.get(encoding.lower())
    if codec is None:
        raise ClickHouseError(48, f"Unknown HTTP compression method {encoding}", "NOT_IMPLEMENTED")
    try:
        return codec[1](data)
    except Exception as exc:
        raise ClickHouseError(432, f"Cannot decompress the request body ({exc})", "UNKNOWN_CODEC") from exc
