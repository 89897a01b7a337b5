"""`parley diagnose` and `RecentErrors`: known failure patterns come back with exact counts, ranks and dimensions.

The generated log is written with structlog's own JSON and console renderers (as parley writes them) plus plain text.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from parley.observability.diagnose import (
    Diagnosis,
    FailurePattern,
    LogEvent,
    RecentErrors,
    diagnose,
    event_from_dict,
    main,
    mask,
    parse_lines,
    parse_since,
    render_markdown,
)
from parley.observability.logging import configure_logging, get_logger
from parley.settings import Settings

DATA = Path(__file__).parent / "data"
BASE = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_JSON = structlog.processors.JSONRenderer()
_CONSOLE = structlog.dev.ConsoleRenderer(colors=False)


def as_json(fields: dict[str, Any]) -> str:
    """The line parley writes in production."""
    return str(_JSON(None, "", dict(fields)))


def as_console(fields: dict[str, Any]) -> str:
    """The line (and traceback) parley writes in development."""
    return str(_CONSOLE(None, "", dict(fields)))


# ------------------------------------------------------------------------------------------ the generated log


@dataclass
class Expected:
    template: str
    count: int
    level: str
    routes: Counter[str] = field(default_factory=Counter)
    users: Counter[str] = field(default_factory=Counter)
    seen: list[datetime] = field(default_factory=list)


@dataclass
class GeneratedLog:
    lines: list[str]
    expected: list[Expected]  # in the rank diagnose must give
    events: list[tuple[int, datetime]]  # (pattern index, time) of every WARNING+ occurrence

    def write(self, path: Path) -> Path:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        return path


def _ulid(rng: random.Random) -> str:
    return "01" + "".join(rng.choice(ALPHABET) for _ in range(24))


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _plain_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S,") + f"{when.microsecond // 1000:03d}"


def _frames(rng: random.Random, *calls: tuple[str, str, str]) -> str:
    lines = ["Traceback (most recent call last):"]
    for path, function, code in calls:
        lines += [f'  File "/srv/parley/src/parley/{path}", line {rng.randint(20, 400)}, in {function}', f"    {code}"]
    return "\n".join(lines)


# A writer gets the RNG, the time and a user pool; it returns the text it writes and the route and user a reader
# should attribute to it.
Written = tuple[str, str | None, str | None]


def database_unavailable(rng: random.Random, when: datetime, users: list[str]) -> Written:
    user = rng.choice([*users, None, None])
    route = rng.choice(["/api/threads", "/api/threads/{thread_id}/messages", "/api/runs/{run_id}"])
    fields = {"method": rng.choice(["GET", "POST"]), "route": route, "user_id": user,
              "reason": f'OperationalError: connection to server at "10.0.{rng.randrange(256)}.{rng.randrange(256)}",'
                        f" port 5432 failed: Connection refused",
              "request_id": _ulid(rng), "event": "database_unavailable", "level": "warning",
              "logger": "parley.http", "timestamp": _iso(when)}
    render = as_json if rng.random() < 0.7 else as_console  # the same failure from a JSON and a console deployment
    return render(fields), route, user


def request_failed_key_error(rng: random.Random, when: datetime, users: list[str]) -> Written:
    user, route = rng.choice(users), rng.choice(["/api/threads", "/api/threads/{thread_id}"])
    exception = _frames(rng, ("http/middleware.py", "__call__", "await self.app(scope, receive, send_with_id)"),
                        ("threads/routes.py", "create_thread", 'title = body["thread_title"]'))
    fields = {"route": route, "user_id": user, "method": "POST", "request_id": _ulid(rng),
              "event": "request_failed", "level": "error", "logger": "parley.http", "timestamp": _iso(when),
              "exception": exception + "\nKeyError: 'thread_title'"}
    return as_json(fields), route, user


def request_failed_attribute_error(rng: random.Random, when: datetime, users: list[str]) -> Written:
    user = rng.choice(users[:4])
    exception = _frames(rng, ("http/middleware.py", "__call__", "await self.app(scope, receive, send_with_id)"),
                        ("threads/repository.py", "list_for_user", "rows = await session.execute(query)"))
    fields = {"timestamp": _iso(when), "level": "error", "event": "request_failed", "logger": "parley.http",
              "route": "/api/threads", "user_id": user, "method": "GET",
              "exception": exception + "\nAttributeError: '_AsyncGeneratorContextManager' object has no attribute"
                                       " 'execute'"}
    return as_console(fields), "/api/threads", user


def ws_connection_failed(rng: random.Random, when: datetime, users: list[str]) -> Written:
    user = rng.choice(users)
    exception = _frames(rng, ("realtime/endpoint.py", "serve", "await connection.run()"),
                        ("realtime/connection.py", "run", "message = await self.websocket.receive_text()"))
    fields = {"connection_id": _ulid(rng), "user_id": user, "request_id": _ulid(rng),
              "event": "ws_connection_failed", "level": "error", "logger": "parley.realtime", "timestamp": _iso(when),
              "exception": exception + "\nwebsockets.exceptions.ConnectionClosedError: received 1011 (internal error)"
                                       f" keepalive ping timeout; then sent {rng.choice([1011, 1006])} (internal error)"
                                       " keepalive ping timeout"}
    return as_json(fields), None, user


def agent_message_routing(rng: random.Random, when: datetime, users: list[str]) -> Written:
    text = ("'async for' requires an object with __aiter__ method, got _AsyncGeneratorContextManager")
    head = (f"{_plain_time(when)} ERROR parley.agents.runs: Error handling agent message from {rng.choice(users)}: "
            f"{text}")
    exception = _frames(rng, ("agents/runs.py", "handle_message", "async for chunk in stream:"))
    return f"{head}\n{exception}\nTypeError: {text}", None, None


def client_retries_exhausted(rng: random.Random, when: datetime, users: list[str]) -> Written:
    url = f"https://chat.example.test/api/threads/{_ulid(rng)}/messages?after_seq={rng.randint(1, 9000)}&limit=50"
    line = (f"{_plain_time(when)} WARNING parley.client - GET {url} failed after {rng.randint(2, 5)} retries in "
            f"{rng.uniform(0.5, 9.5):.1f}s (status 503)")
    return line, "/api/threads/{id}/messages", None


def analytics_write_failed(rng: random.Random, when: datetime, users: list[str]) -> Written:
    fields = {"timestamp": _iso(when), "level": "warning", "event": "analytics_write_failed",
              "logger": "parley.analytics", "backend": "clickhouse", "pending": rng.randint(1, 5000),
              "reason": "ConnectError: [Errno 111] Connection refused"}
    return as_console(fields), None, None


def asgi_exception(rng: random.Random, when: datetime, users: list[str]) -> Written:
    exception = _frames(rng, ("realtime/connection.py", "close", "await self.websocket.close(code)"))
    fields = {"event": "Exception in ASGI application", "level": "error", "logger": "uvicorn.error",
              "timestamp": _iso(when),
              "exception": exception + "\nRuntimeError: Unexpected ASGI message 'websocket.close', after sending "
                                       "'websocket.close' or response already completed."}
    return as_json(fields), None, None


def startup_failed(rng: random.Random, when: datetime, users: list[str]) -> Written:
    fields = {"timestamp": _iso(when), "level": "critical", "event": "startup_failed", "logger": "parley.server",
              "reason": "Required secrets missing: ['CLICKHOUSE_URL']"}
    return as_console(fields), None, None


PATTERNS: list[tuple[Callable[[random.Random, datetime, list[str]], Written], int, str, str]] = [
    (database_unavailable, 137, "warning",
     'database_unavailable reason=OperationalError: connection to server at "<IP>", port <NUM> failed: '
     "Connection refused"),
    (request_failed_key_error, 61, "error", "request_failed exception=KeyError: 'thread_title'"),
    (request_failed_attribute_error, 23, "error",
     "request_failed exception=AttributeError: '_AsyncGeneratorContextManager' object has no attribute 'execute'"),
    (ws_connection_failed, 12, "error",
     "ws_connection_failed exception=websockets.exceptions.ConnectionClosedError: received <NUM> (internal error) "
     "keepalive ping timeout; then sent <NUM> (internal error) keepalive ping timeout"),
    (agent_message_routing, 7, "error",
     "Error handling agent message from <ID>: 'async for' requires an object with __aiter__ method, "
     "got _AsyncGeneratorContextManager"),
    (client_retries_exhausted, 5, "warning",
     "GET https://chat.example.test/api/threads/<ID>/messages failed after <NUM> retries in <DUR> (status 503)"),
    (analytics_write_failed, 3, "warning",
     "analytics_write_failed backend=clickhouse reason=ConnectError: [Errno <NUM>] Connection refused"),
    (asgi_exception, 2, "error",
     "Exception in ASGI application exception=RuntimeError: Unexpected ASGI message 'websocket.close', after "
     "sending 'websocket.close' or response already completed."),
    (startup_failed, 1, "critical", "startup_failed reason=Required secrets missing: ['CLICKHOUSE_URL']"),
]


def noise(rng: random.Random, when: datetime, users: list[str]) -> str:
    """Below WARNING, in every format, including lines that mention errors and a traceback under an INFO line."""
    kind = rng.randrange(8)
    route = rng.choice(["/api/threads", "/api/runs/{run_id}", "/healthz"])
    if kind <= 2:
        return as_json({"method": "GET", "route": route, "status": rng.choice([200, 201, 404, 500]),
                               "duration_ms": rng.uniform(1, 900), "user_id": rng.choice(users), "event": "request",
                               "level": "info", "logger": "parley.http", "timestamp": _iso(when)})
    if kind == 3:
        return as_console({"timestamp": _iso(when), "level": rng.choice(["info", "debug"]),
                                  "event": "run_started", "logger": "parley.agents", "run_id": _ulid(rng)})
    if kind == 4:
        return f"{_plain_time(when)} INFO parley.client - retrying thread list after ERROR from upstream"
    if kind == 5:
        return f"{_plain_time(when)} DEBUG parley.tools: Exception budget at {rng.randint(0, 9)} of 10"
    if kind == 6:
        return f'127.0.0.1:{rng.randint(30000, 60000)} - "GET {route} HTTP/1.1" 500'
    fields = {"timestamp": _iso(when), "level": "info", "event": "ws_client_gone", "logger": "parley.realtime",
              "connection_id": _ulid(rng),
              "exception": _frames(rng, ("realtime/connection.py", "run", "await self.websocket.receive_text()"))
              + "\nstarlette.websockets.WebSocketDisconnect: 1001"}
    return as_console(fields)


def generate(seed: int = 20260302, noise_lines: int = 1400) -> GeneratedLog:
    rng = random.Random(seed)
    users = [_ulid(rng) for _ in range(30)]
    slots = [index for index, (_, count, _, _) in enumerate(PATTERNS) for _ in range(count)]
    slots += [-1] * noise_lines
    rng.shuffle(slots)
    expected = [Expected(template, count, level) for _, count, level, template in PATTERNS]
    lines: list[str] = []
    events: list[tuple[int, datetime]] = []
    when = BASE
    for index in slots:
        when += timedelta(milliseconds=rng.randint(1, 4000))
        if index < 0:
            lines.append(noise(rng, when, users))
        else:
            text, route, user = PATTERNS[index][0](rng, when, users)
            lines.append(text)
            events.append((index, when))
            expected[index].seen.append(when)
            if route:
                expected[index].routes[route] += 1
            if user:
                expected[index].users[user] += 1
        if rng.random() < 0.02:
            lines.append("")
    return GeneratedLog(lines, expected, events)


def top(counts: Counter[str], limit: int = 10) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit])


def assert_reproduces(diagnosis: Diagnosis, expected: list[Expected], total: int) -> None:
    assert diagnosis.total == total
    assert [p.template for p in diagnosis.patterns] == [e.template for e in expected]
    assert [p.count for p in diagnosis.patterns] == [e.count for e in expected]
    for pattern, want in zip(diagnosis.patterns, expected, strict=True):
        assert pattern.share == want.count / total
        assert pattern.levels == {want.level: want.count}
        assert (pattern.first_seen, pattern.last_seen) == (min(want.seen), max(want.seen))
        assert pattern.routes == top(want.routes) and pattern.distinct_routes == len(want.routes)
        assert pattern.users == top(want.users) and pattern.distinct_users == len(want.users)


# ------------------------------------------------------------------------------------------ reproducing patterns


def test_generated_log_reproduces_known_patterns_exactly() -> None:
    log = generate()
    diagnosis = diagnose(parse_lines(log.lines))
    assert_reproduces(diagnosis, log.expected, total=251)
    # The biggest pattern reaches more than TOP users: the list is capped, the distinct count is not.
    assert len(diagnosis.patterns[0].users) == 10 and diagnosis.patterns[0].distinct_users == 29


def test_templates_are_stable_across_runs_and_seeds() -> None:
    first = diagnose(parse_lines(generate(seed=1).lines))
    again = diagnose(parse_lines(generate(seed=1).lines))
    other = diagnose(parse_lines(generate(seed=2, noise_lines=300).lines))
    assert first == again
    assert [p.template for p in first.patterns] == [p.template for p in other.patterns] == [t for *_, t in PATTERNS]


def test_request_failed_with_different_exceptions_are_different_patterns() -> None:
    templates = [p.template for p in diagnose(parse_lines(generate().lines)).patterns]
    assert sum(t.startswith("request_failed exception=") for t in templates) == 2


def test_traceback_lines_attach_to_the_line_that_started_them() -> None:
    log = generate()
    events = list(parse_lines(log.lines))
    assert len(events) == 251  # no frame, no exception line, no chained traceback becomes an event of its own
    routing = [e for e in events if e.message.startswith("Error handling agent message")]
    assert len(routing) == 7 and all("TypeError: 'async for'" in e.raw.splitlines()[-1] for e in routing)


INCIDENT = [  # the report's error patterns, each a pattern of its own, with the count in incident_lines.log
    ("http_500_thread_api", "HTTP 500 - https://api.staging.netrasystems.ai/api/threads", 5),
    ("async_for_async_generator_context_manager", "Error handling agent message from <UUID>: 'async for' requires "
     "an object with __aiter__ method, got _AsyncGeneratorContextManager", 4),
    ("security_response_middleware_bypassed", "SecurityResponseMiddleware bypassed due to exception: "
     "'_AsyncGeneratorContextManager' object has no attribute 'execute'", 4),
    ("unexpected_asgi_message_websocket_close", "Error closing fastapi WebSocket: Unexpected ASGI message "
     "'websocket.close', after sending 'websocket.close' or response already completed.", 3),
    ("no_handler_for_message_type_disconnect", "No handler found for message type MessageType.DISCONNECT", 4),
    ("http_404_ws_beacon", "HTTP 404 - https://api.staging.netrasystems.ai/ws/beacon", 3),
    ("not_connected_to_clickhouse", "Not connected to ClickHouse.", 2),
    ("required_secrets_missing", "Required secrets missing: ['CLICKHOUSE_URL']", 2),
    ("agent_websocket_bridge_unhealthy_uninitialized",
     "Component agent_websocket_bridge reported unhealthy status: uninitialized", 2),
    ("global_state_usage_unified_tool_dispatcher",
     "GLOBAL STATE USAGE: UnifiedToolDispatcher created without user context", 3),
    ("extra_tables_in_database", "Extra tables in database not defined in models", 2),
]


@pytest.fixture(scope="module")
def incident() -> Diagnosis:
    with (DATA / "incident_lines.log").open(encoding="utf-8") as lines:
        return diagnose(parse_lines(lines))


def test_report_error_lines_separate_into_exactly_the_report_patterns(incident: Diagnosis) -> None:
    assert sorted(p.template for p in incident.patterns) == sorted(template for _, template, _ in INCIDENT)
    assert incident.total == sum(count for *_, count in INCIDENT)


@pytest.mark.parametrize(("template", "count"), [(t, c) for _, t, c in INCIDENT], ids=[n for n, _, _ in INCIDENT])
def test_report_error_pattern(incident: Diagnosis, template: str, count: int) -> None:
    (pattern,) = [p for p in incident.patterns if p.template == template]
    assert pattern.count == count


def test_report_http_errors_name_their_routes(incident: Diagnosis) -> None:
    by_template = {p.template: p for p in incident.patterns}
    assert by_template["HTTP 500 - https://api.staging.netrasystems.ai/api/threads"].routes == {"/api/threads": 5}
    assert by_template["HTTP 404 - https://api.staging.netrasystems.ai/ws/beacon"].routes == {"/ws/beacon": 3}


# ------------------------------------------------------------------------------------------ formats and masking


def test_json_and_console_lines_of_one_event_read_the_same() -> None:
    fields = {"timestamp": "2026-03-02T09:00:00.123000Z", "level": "warning", "event": "database_unavailable",
              "logger": "parley.http", "route": "/api/threads", "user_id": "01abc",
              "reason": "OperationalError: 'quoted' and \"double\" = signs"}
    from_json, from_console = parse_lines([as_json(dict(fields)), as_console(dict(fields))])
    assert (from_json.message, from_json.route, from_json.user_id, from_json.timestamp) == (
        from_console.message, from_console.route, from_console.user_id, from_console.timestamp)
    assert from_json.timestamp == datetime(2026, 3, 2, 9, 0, 0, 123000, tzinfo=UTC)


@pytest.mark.parametrize(("line", "level", "message"), [
    ("2025-09-03 12:01:02,123 ERROR Error handling agent message from 7c1f: boom", "error",
     "Error handling agent message from 7c1f: boom"),
    ('severity=ERROR message="HTTP 500 - https://x.test/api/threads?limit=20" timestamp=2025-09-03T12:00:00Z',
     "error", "HTTP 500 - https://x.test/api/threads?limit=20"),
    ('{"severity": "WARNING", "textPayload": "Not connected to ClickHouse.", "timestamp": "2025-09-03T12:00:00Z"}',
     "warning", "Not connected to ClickHouse."),
    ("ERROR:root:disk full", "error", "disk full"),
    ("[2025-09-03 12:00:00] [warning] [worker-2] queue backlog", "warning", "queue backlog"),
    ("time=2025-09-03T12:00:00Z level=error msg=\"upstream closed\" code=E_UPSTREAM", "error",
     "upstream closed code=E_UPSTREAM"),
    ("level=warn slow consumer detected", "warning", "slow consumer detected"),
    ("CRITICAL out of memory", "critical", "out of memory"),
    ("Exception in thread worker-3", "error", "Exception in thread worker-3"),
])
def test_plain_text_lines(line: str, level: str, message: str) -> None:
    (event,) = parse_lines([line])
    assert (event.level, event.message) == (level, message)


@pytest.mark.parametrize("line", [
    "2025-09-03 12:01:02,123 INFO retrying after ERROR from upstream",
    '{"event": "request", "level": "info", "status": 500}',
    "2026-03-02T09:00:00.000000Z [debug    ] cache_miss                     [parley.cache] key=x",
    '127.0.0.1:5000 - "GET /api/threads HTTP/1.1" 500',
    "just words",
])
def test_lines_below_warning_are_ignored(line: str) -> None:
    assert list(parse_lines([line])) == []


def test_chained_tracebacks_stay_one_event_and_a_bare_traceback_is_one_error() -> None:
    lines = [
        "2025-09-03 12:00:00,000 ERROR job failed",
        "Traceback (most recent call last):",
        '  File "a.py", line 1, in f',
        "KeyError: 'k'",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "a.py", line 3, in f',
        "RuntimeError: lookup failed",
        "Traceback (most recent call last):",
        '  File "b.py", line 9, in g',
        "ValueError: invalid literal for int() with base 10: 'x'",
    ]
    first, second = parse_lines(lines)
    assert first.message == "job failed exception=RuntimeError: lookup failed"
    assert second.level == "error" and second.timestamp is None
    assert second.message == "exception=ValueError: invalid literal for int() with base 10: 'x'"


@pytest.mark.parametrize(("text", "masked"), [
    ("user 01j9z8y7x6w5v4t3s2r1q0p9n8 in 0f6e4a1c-8f0e-4b7c-9a53-0d4b1e2f3a4b", "user <ID> in <UUID>"),
    ("from 10.1.2.3:5432 after 1.5s and 250ms", "from <IP> after <DUR> and <DUR>"),
    ("object at 0x7f3a2b1c and trace 9f86d081884c7d65", "object at <HEX> and trace <HEX>"),
    ("HTTP 500 on /api/threads?limit=20 status=503 status code 404, took 3 tries, exit code 137",
     "HTTP 500 on /api/threads status=503 status code 404, took <NUM> tries, exit code <NUM>"),
    ("no attribute 'execute' for 'user 42' and 'alice@example.test'", "no attribute 'execute' for <STR> and '<EMAIL>'"),
    ('open "/var/lib/parley/data.db" failed at 2026-03-02T09:00:00Z', 'open "<PATH>" failed at <TS>'),
    ("request req-7f3k2j1x0p9 retried", "request <ID> retried"),
])
def test_masking(text: str, masked: str) -> None:
    assert mask(text) == masked


def test_drain_generalises_a_word_that_masking_left() -> None:
    events = [LogEvent(None, "warning", f"Lost connection to cache host {host} during flush", None, None, "x")
              for host in ("cache-primary", "cache-replica", "cache-primary")]
    (pattern,) = diagnose(events).patterns
    assert (pattern.template, pattern.count) == ("Lost connection to cache host <*> during flush", 3)


# ------------------------------------------------------------------------------------------ since, CLI, Markdown


def test_since_keeps_events_at_or_after_it() -> None:
    log = generate()
    since = BASE + timedelta(hours=1)
    kept = Counter(index for index, when in log.events if when >= since)
    diagnosis = diagnose(parse_lines(log.lines), since=since)
    assert diagnosis.since == since and diagnosis.total == sum(kept.values())
    assert {p.template: p.count for p in diagnosis.patterns} == {PATTERNS[i][3]: n for i, n in kept.items()}
    assert all(p.first_seen is not None and p.first_seen >= since for p in diagnosis.patterns)


def run(argv: list[str], stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    code = main(argv, io.StringIO(stdin), out)
    return code, out.getvalue()


def test_cli_json_output_parses_and_matches(tmp_path: Path) -> None:
    log = generate()
    code, out = run([str(log.write(tmp_path / "parley.log")), "--json"])
    assert code == 0
    document = json.loads(out)
    assert document["total"] == 251 and document["since"] is None
    for shown, want in zip(document["patterns"], log.expected, strict=True):
        assert (shown["template"], shown["count"], shown["share"]) == (want.template, want.count, want.count / 251)
        assert shown["first_seen"] == _iso(min(want.seen)) and shown["last_seen"] == _iso(max(want.seen))
        assert shown["routes"] == top(want.routes) and shown["users"] == top(want.users)
        assert shown["distinct_users"] == len(want.users) and shown["levels"] == {want.level: want.count}
        assert shown["sample"]


def test_cli_since_accepts_times_dates_and_ages(tmp_path: Path) -> None:
    path = generate().write(tmp_path / "parley.log")
    code, out = run([str(path), "--json", "--since", "2026-03-02T10:00:00Z"])
    assert code == 0 and json.loads(out)["since"] == "2026-03-02T10:00:00Z"
    assert json.loads(out)["total"] == diagnose(parse_lines(path.read_text().splitlines()),
                                                since=BASE + timedelta(hours=1)).total
    code, out = run([str(path), "--json", "--since", "2026-03-03"])
    assert code == 0 and json.loads(out)["total"] == 0

    now = datetime.now(UTC)
    recent = tmp_path / "recent.log"
    recent.write_text(f"{_plain_time(now - timedelta(hours=3))} ERROR old failure 1\n"
                      f"{_plain_time(now - timedelta(minutes=10))} ERROR new failure 2\n")
    for age, total in (("1h", 1), ("30m", 1), ("5m", 0), ("7d", 2)):
        code, out = run([str(recent), "--json", "--since", age])
        assert (code, json.loads(out)["total"]) == (0, total), age


def test_cli_markdown_names_every_pattern_with_count_share_and_sample(tmp_path: Path) -> None:
    code, out = run([str(generate().write(tmp_path / "parley.log"))])
    assert code == 0 and out.startswith("# Failure patterns\n")
    assert "**251** warnings and errors (1 critical, 105 error, 145 warning) in **9** patterns" in out
    for rank, (_, count, _, template) in enumerate(PATTERNS, 1):
        assert f"## {rank}. `{template}`" in out
        assert f"- **Count:** {count} ({count / 251 * 100:.1f}% of all)" in out
    assert "| 1 | 137 | 54.6% |" in out
    assert "- **Users** (29): " in out and "and 19 more" in out
    assert out.count("- **Sample:**") == 9 and out.count("```") == 18


def test_markdown_escapes_backticks_and_pipes() -> None:
    events = [LogEvent(None, "error", "bad `value` | other", "/x", None, "raw `with` ```ticks```")]
    out = render_markdown(diagnose(events))
    assert "| `` bad `value` \\| other `` |" in out
    assert "\n````\nraw `with` ```ticks```\n````\n" in out


def test_cli_reads_stdin_for_dash(tmp_path: Path) -> None:
    log = generate()
    code, out = run(["-", "--json"], stdin="\n".join(log.lines))
    assert code == 0 and [p["count"] for p in json.loads(out)["patterns"]] == [e.count for e in log.expected]


def test_cli_reads_several_files_and_gzip(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "incident.log.gz", "wt", encoding="utf-8") as packed:
        packed.write((DATA / "incident_lines.log").read_text(encoding="utf-8"))
    code, out = run([str(generate().write(tmp_path / "a.log")), str(tmp_path / "incident.log.gz"), "--json"])
    assert code == 0 and json.loads(out)["total"] == 251 + 34


def test_cli_with_no_errors_says_so(tmp_path: Path) -> None:
    (tmp_path / "quiet.log").write_text("2025-09-03 12:00:00,000 INFO all good\n")
    assert run([str(tmp_path / "quiet.log")]) == (0, "# Failure patterns\n\nNo warnings or errors.\n")
    code, out = run([str(tmp_path / "quiet.log"), "--json"])
    assert code == 0 and json.loads(out) == {"total": 0, "since": None, "patterns": []}


@pytest.mark.parametrize(("argv", "message"), [
    (["/nonexistent/parley.log"], "parley diagnose: no such log file: /nonexistent/parley.log"),
    ([], "parley diagnose: the following arguments are required: LOGFILE"),
    (["-", "--since", "yesterday-ish"], "parley diagnose: --since: not a date, time or age (like 2h, 30m, 7d): "
                                        "'yesterday-ish'"),
    (["-", "--colour"], "parley diagnose: unrecognized arguments: --colour"),
    (["-", "--since", "99999999999d"], "parley diagnose: --since: not a date, time or age (like 2h, 30m, 7d): "
                                       "'99999999999d'"),
])
def test_cli_bad_arguments_exit_2_with_one_line(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == (2, "")
    assert capsys.readouterr().err == message + "\n"


def test_cli_unreadable_gzip_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not.gz").write_text("ERROR plain text, not gzip\n")
    assert run([str(tmp_path / "not.gz")]) == (2, "")
    assert capsys.readouterr().err.startswith("parley diagnose: cannot read")


def test_parse_since() -> None:
    now = datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert parse_since("90m", now) == datetime(2026, 3, 2, 10, 30, tzinfo=UTC)
    assert parse_since("1w", now) == datetime(2026, 2, 23, 12, tzinfo=UTC)
    assert parse_since("2026-03-01") == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_since("2026-03-01T10:00:00+02:00") == datetime(2026, 3, 1, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a date"):
        parse_since("last tuesday")


def test_since_leaves_out_events_whose_time_is_unknown() -> None:
    undated = LogEvent(None, "error", "boom", None, None, "ERROR boom")
    assert diagnose([undated]).total == 1
    assert diagnose([undated], since=BASE).total == 0


def test_cli_help_goes_to_stdout() -> None:
    code, out = run(["--help"])
    assert code == 0 and out.startswith("usage: parley diagnose")


NASTY = [
    "", "{", "}", "{}", "[]", "null", '{"level": "error"}', '{"level": 5, "event": ["x", {"y": 1}]}',
    '{"event": "x", "level": "error", "timestamp": 1e300}', '{"event": "x", "level": "ERROR", "timestamp": -1e20}',
    '{"event": "x", "level": "error", "timestamp": "not a time", "user_id": {"id": 1}, "route": 7}',
    "[" * 50_000 + "]" * 50_000, "{" + '"a":{' * 5000 + "}" * 5001, "x" * 300_000,
    "Traceback (most recent call last):", "  File orphan", "\x00\x01ERROR\x02", "level=error msg=\"unterminated",
    "severity=ERROR message='\\x' ", "2026-13-45T99:99:99Z [error    ] bad time", "ERROR " + "'" * 1000,
    "ERROR " + "1" * 10_000, "WARNING " + "a=" * 5000, "\ud800 ERROR surrogate", "ERROR https://" + "/" * 5000,
]


def test_garbage_lines_never_crash() -> None:
    events = list(parse_lines(NASTY))
    assert all(e.level in ("warning", "error", "critical") for e in events)
    diagnosis = diagnose(events)
    render_markdown(diagnosis)
    json.dumps(diagnosis.as_dict())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(NASTY[:12] + generate(noise_lines=20).lines[:40])),
                max_size=30))
def test_arbitrary_text_never_crashes(lines: list[str]) -> None:
    diagnosis = diagnose(parse_lines(lines))
    render_markdown(diagnosis)
    json.dumps(diagnosis.as_dict())


# ------------------------------------------------------------------------------------------ the running process


def test_event_from_dict() -> None:
    assert event_from_dict({"event": "request", "level": "info"}) is None
    try:
        raise KeyError("thread_title")
    except KeyError as exc:
        error = exc
    event = event_from_dict({"event": "request_failed", "level": "error", "exc_info": error, "route": "/api/threads",
                             "user_id": "u1", "timestamp": "2026-03-02T09:00:00Z", "request_id": "01abc"})
    assert event is not None
    assert (event.message, event.route, event.user_id) == ("request_failed exception=KeyError: 'thread_title'",
                                                            "/api/threads", "u1")
    assert event.timestamp == datetime(2026, 3, 2, 9, tzinfo=UTC)
    assert json.loads(event.raw)["exception"] == "KeyError: 'thread_title'"
    structured = event_from_dict({"event": "tool_failed", "level": "error", "tool": "calculator",
                                  "exception": [{"exc_type": "ZeroDivisionError", "exc_value": "division by zero"}]})
    assert structured is not None
    assert structured.message == "tool_failed exception=ZeroDivisionError: division by zero tool=calculator"


@pytest.fixture
def logged() -> Iterator[tuple[RecentErrors, io.StringIO]]:
    """parley's logging pipeline (JSON) writing to a buffer, with a RecentErrors on the root logger."""
    stream = io.StringIO()
    configure_logging(Settings(_env_file=None, env="test", log_format="json"), stream=stream)
    recent = RecentErrors(capacity=50)
    root = logging.getLogger()
    root.addHandler(recent)
    try:
        yield recent, stream
    finally:
        root.removeHandler(recent)
        # Back to what tests/conftest.py installed for the rest of the session.
        configure_logging(Settings(_env_file=None, env="test", log_format="json", log_level="INFO"))


def test_recent_errors_sees_what_the_log_file_shows(logged: tuple[RecentErrors, io.StringIO]) -> None:
    recent, stream = logged
    log = get_logger("parley.http")
    log.info("request", route="/api/threads", status=200)
    for user in ("u1", "u2", "u1"):
        log.error("boom", route="/api/x", user_id=user)
    empty: dict[str, int] = {}
    for key in ("a", "a"):
        try:
            empty[key]
        except KeyError:
            log.exception("request_failed", route="/api/threads/{thread_id}", user_id="u3")
    log.warning("database_unavailable", reason="OperationalError: connection refused", route="/api/threads")
    try:
        raise RuntimeError("Unexpected ASGI message 'websocket.close'")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    logging.getLogger("some.library").warning("disk %d%% full", 93)
    logging.getLogger("some.library").info("disk fine")

    in_process = recent.diagnosis()
    from_file = diagnose(parse_lines(stream.getvalue().splitlines()))
    assert in_process.total == from_file.total == 8
    summary = [(p.template, p.count, p.routes, p.users, p.levels) for p in in_process.patterns]
    assert summary == [(p.template, p.count, p.routes, p.users, p.levels) for p in from_file.patterns]
    assert summary[:2] == [("boom", 3, {"/api/x": 3}, {"u1": 2, "u2": 1}, {"error": 3}),
                           ("request_failed exception=KeyError: 'a'", 2, {"/api/threads/{thread_id}": 2},
                            {"u3": 2}, {"error": 2})]
    assert {p.template for p in in_process.patterns} >= {
        "Exception in ASGI application exception=RuntimeError: Unexpected ASGI message 'websocket.close'",
        "disk <NUM>% full", "database_unavailable reason=OperationalError: connection refused"}
    assert all(p.first_seen is not None and p.first_seen.tzinfo is UTC for p in in_process.patterns)
    assert recent.diagnosis(since=datetime.now(UTC) + timedelta(seconds=1)).total == 0


def test_recent_errors_keeps_only_its_capacity(logged: tuple[RecentErrors, io.StringIO]) -> None:
    recent, _ = logged
    log = get_logger("parley.http")
    for n in range(120):
        log.warning("slow_request", route="/api/threads", duration_ms=1000 + n, n=n)
    events = recent.events()
    assert len(events) == 50 and recent.received == 120
    assert json.loads(events[0].raw)["n"] == 70 and json.loads(events[-1].raw)["n"] == 119
    (pattern,) = recent.diagnosis().patterns
    assert (pattern.template, pattern.count, pattern.share) == ("slow_request", 50, 1.0)


def test_recent_errors_never_raises_from_emit(logged: tuple[RecentErrors, io.StringIO]) -> None:
    recent, _ = logged

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

        __repr__ = __str__

    # Handed to the handler directly: other handlers (pytest's capture) would rightly complain about these.
    odd = logging.LogRecord("x", logging.ERROR, __file__, 1, {"event": "odd", "level": "error", "value": Unprintable()},
                            None, None)
    recent.handle(odd)
    recent.handle(logging.LogRecord("lib", logging.ERROR, __file__, 1, "bad %d format", ("x",), None))
    assert [(e.message, json.loads(e.raw).get("value")) for e in recent.events()] == [
        ("odd", "<Unprintable>"), ("bad %d format", None)]


def test_failure_pattern_as_dict_uses_rfc3339() -> None:
    pattern = FailurePattern("t", 1, 1.0, datetime(2026, 3, 2, 9, tzinfo=UTC), None, {"error": 1}, {}, {}, "s")
    assert pattern.as_dict()["first_seen"] == "2026-03-02T09:00:00Z" and pattern.as_dict()["last_seen"] is None
    assert Diagnosis([pattern], 1, datetime(2026, 3, 2, tzinfo=UTC)).as_dict()["since"] == "2026-03-02T00:00:00Z"
