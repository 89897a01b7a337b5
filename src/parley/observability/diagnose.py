"""Failure patterns from logs: WARNING+ lines (parley's JSON or console lines, any plain text) clustered into templates.

Serves `parley diagnose LOGFILE... | -` (`main`) and, through `RecentErrors`, the running process's recent errors.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import logging
import re
import sys
import traceback
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, NoReturn, TextIO

from drain3.drain import Drain

__all__ = [
    "Diagnosis", "FailurePattern", "LogEvent", "RecentErrors", "diagnose", "event_from_dict", "main",
    "mask", "parse_lines", "parse_since", "render_markdown",
]

TOP = 10  # routes and users listed per pattern; the distinct count is reported beside them
_RAW_CHARS = 4000  # a sample is for reading, not for replaying
_KEPT_RAW_CHARS = 1000
_FIELD_CHARS = 300
_MESSAGE_CHARS = 2000
_TAIL_LINES = 400
_LINE_CHARS = 256_000  # longer lines are cut (a JSON line this long no longer parses: it is read as plain text)
_SCAN_CHARS = 10_000  # key=value pairs and console fields are looked for this far into a line

_LEVELS = {
    "warning": "warning", "warn": "warning",
    "error": "error", "err": "error", "exception": "error", "severe": "error",
    "critical": "critical", "crit": "critical", "fatal": "critical", "alert": "critical",
    "emergency": "critical", "emerg": "critical",
}
_MESSAGE_KEYS = ("event", "message", "msg", "textPayload")
_LEVEL_KEYS = ("level", "severity", "levelname", "lvl")
_TIME_KEYS = ("timestamp", "time", "ts", "@timestamp", "asctime")
_ROUTE_KEYS = ("route", "path", "url", "request_url", "requestUrl")
_USER_KEYS = ("user_id", "userId", "user", "uid")
# Fields that say *what* failed (not who or where): they join the event name in the clustered text.
_SALIENT = ("code", "component", "tool", "backend", "error_type", "reason", "error", "detail")
_TRACEBACK = "Traceback (most recent call last):"
_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")

_TIME = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2}|\s?UTC)?"
_LEADING_TIME = re.compile(rf"\s*\[?({_TIME})\]?\s*")
_CONSOLE = re.compile(
    r"(?P<ts>\d{4}-\d{2}-\d{2}T\S+)\s+\[(?P<level>debug|info|warning|warn|error|critical|exception|notset)\s*\]\s"
    r"(?P<rest>.*)"
)
# `(?<!\s)`: try a separator only where a run of spaces starts, so the padding costs linear time.
_CONSOLE_REST = re.compile(
    r"(?P<event>.*?)(?:(?<!\s)\s+\[(?P<logger>[^\]\s]+)\])?(?P<kv>(?:(?<!\s)\s+[A-Za-z_][\w.]*=.*)?)"
)
_KV = re.compile(r"""(?:^|(?<=\s))([A-Za-z_@][\w.@-]*)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)""")
_LEVEL_WORD = re.compile(r"\b(CRITICAL|FATAL|EMERGENCY|ALERT|ERROR|SEVERE|WARNING|WARN|NOTICE|INFO|DEBUG|TRACE)\b")
_BRACKET_LEVEL = re.compile(r"\[(critical|fatal|error|warning|warn|notice|info|debug|trace)\s*\]", re.IGNORECASE)
_EXCEPTION_HINT = re.compile(r"Traceback \(most recent call last\)|\b\w*Exception\b|^\s*[A-Za-z_][\w.]*Error:")
_LOGGER_PREFIX = re.compile(  # "[worker-1]", "netra.app.ws:", "netra.app.ws - ", "root:"
    r"(?:\[[^\]]{1,80}\]\s*|(?:root|[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?::\d+)?(?:\s*[:|]\s*|\s+-\s+))"
)
_EXCEPTION_TYPE = re.compile(r"(?:^|\s)exception=([A-Za-z_][\w.]*)")
_URL = re.compile(r"https?://[^\s'\"<>]+")
_REQUEST_PATH = re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS)\s+(/[^\s'\"?]*)")
_ID_SEGMENT = re.compile(
    r"^(?:\d+|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}|(?=[0-9a-z]*\d)[0-9a-z]{26}|(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,})$"
)
_KEPT_NUMBER = re.compile(r"(?:HTTP(?:/[\d.]+)?|status(?:[ _]code)?)[\s=:]*$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class LogEvent:
    """One WARNING/ERROR/CRITICAL occurrence, whatever format it came from."""

    timestamp: datetime | None  # aware UTC when known
    level: str  # "warning" | "error" | "critical"
    message: str  # the text to cluster: event or message, plus exception summary and salient fields
    route: str | None
    user_id: str | None
    raw: str  # the original line (and its traceback), clipped


@dataclass(frozen=True)
class FailurePattern:
    """One distinct failure: its template, how often, when, where and for whom, and one occurrence as written."""

    template: str
    count: int
    share: float  # of all WARNING+ events, 0..1
    first_seen: datetime | None
    last_seen: datetime | None
    levels: dict[str, int]
    routes: dict[str, int]  # the TOP most affected, ranked
    users: dict[str, int]  # the TOP most affected, ranked
    sample: str
    distinct_routes: int = 0
    distinct_users: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "template": self.template, "count": self.count, "share": self.share,
            "first_seen": _rfc3339(self.first_seen), "last_seen": _rfc3339(self.last_seen),
            "levels": self.levels, "routes": self.routes, "distinct_routes": self.distinct_routes,
            "users": self.users, "distinct_users": self.distinct_users, "sample": self.sample,
        }


@dataclass(frozen=True)
class Diagnosis:
    """Every failure pattern among `total` WARNING+ events (those at or after `since`, when given)."""

    patterns: list[FailurePattern]  # ranked by count desc, then first seen
    total: int
    since: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "since": _rfc3339(self.since),
                "patterns": [pattern.as_dict() for pattern in self.patterns]}


# ---------------------------------------------------------------------------------------------------- parsing


def parse_lines(lines: Iterable[str]) -> Iterator[LogEvent]:
    """WARNING+ events in any of the formats; a traceback joins the line that started it. Never raises on garbage."""
    pending: _Pending | None = None
    for line in _split(lines):
        if pending is not None and pending.take(line):
            continue
        if pending is not None and (event := pending.finish()) is not None:
            yield event
        pending = _start(line)
    if pending is not None and (event := pending.finish()) is not None:
        yield event


def _split(chunks: Iterable[str]) -> Iterator[str]:
    """Lines, also when a caller hands over multi-line chunks (a record with its traceback)."""
    for chunk in chunks:
        for line in chunk.rstrip("\r\n").split("\n"):
            yield line.rstrip("\r")[:_LINE_CHARS]


def event_from_dict(record: Mapping[str, Any]) -> LogEvent | None:
    """A structlog event dict (as the running process holds it) as a LogEvent; None below WARNING."""
    return _build(record, raw=None, structured=True)


@dataclass
class _Pending:
    """A record being read: its first line, its fields, and the lines (a traceback) that continue it."""

    head: str
    fields: Mapping[str, Any]
    structured: bool
    tail: list[str] = field(default_factory=list)
    in_frames: bool = False  # after "Traceback ...", before the exception line
    chained: bool = False  # a "During handling ..." line: the next traceback belongs here too

    def take(self, line: str) -> bool:
        """Whether the line continues this record (then it is kept)."""
        if not line.strip():
            return True
        if line.startswith(_TRACEBACK):
            if self.tail and not self.chained and not self.in_frames:
                return False  # a second, unrelated traceback
            self.in_frames, self.chained = True, False
        elif line.startswith(_CHAIN):
            self.chained, self.in_frames = True, False
        elif line[0] in " \t":
            pass
        elif _is_header(line):
            return False
        elif self.in_frames:  # the exception line ends the traceback
            self.in_frames = False
        else:
            return False
        self.tail.append(line[:_FIELD_CHARS * 4])
        if len(self.tail) > _TAIL_LINES * 2:  # garbage that never ends: keep the start and the latest lines
            del self.tail[20:-_TAIL_LINES]
        return True

    def finish(self) -> LogEvent | None:
        text = "\n".join(self.tail)
        has_traceback = _TRACEBACK in text or self.head.rstrip().endswith(_TRACEBACK)
        raw = "\n".join([self.head, *self.tail])[:_RAW_CHARS]
        return _build(self.fields, raw=raw, structured=self.structured, exception=text if has_traceback else None)


def _start(line: str) -> _Pending | None:
    if not line.strip():
        return None
    if (record := _json_record(line)) is not None:
        return _Pending(line, record, structured=True)
    if (match := _CONSOLE.match(line)) is not None:
        rest = _CONSOLE_REST.fullmatch(match["rest"][:_SCAN_CHARS])
        fields: dict[str, Any] = {"timestamp": match["ts"], "level": match["level"]}
        if rest is not None:
            fields.update(_kv(rest["kv"]), event=rest["event"].strip(), logger=rest["logger"])
        else:
            fields["event"] = match["rest"].strip()
        return _Pending(line, fields, structured=True, in_frames=line.rstrip().endswith(_TRACEBACK))
    if line.startswith(_TRACEBACK):  # a traceback on its own
        return _Pending(line, {"level": "error", "event": ""}, structured=False, tail=[line], in_frames=True)
    return _plain(line)


def _plain(line: str) -> _Pending:
    stamp = _LEADING_TIME.match(line)
    rest = line[stamp.end():] if stamp else line.strip()
    pairs = _kv(rest[:_SCAN_CHARS])
    fields: dict[str, Any] = dict(pairs)
    if stamp and not any(key in pairs for key in _TIME_KEYS):
        fields["timestamp"] = stamp[1]
    in_frames = line.rstrip().endswith(_TRACEBACK)
    if any(key in pairs for key in _LEVEL_KEYS) and any(key in pairs for key in _MESSAGE_KEYS):
        return _Pending(line, fields, structured=True, in_frames=in_frames)  # logfmt, GCP's severity=... message=...
    level, message = _plain_level(rest)
    stated = _first(pairs, _LEVEL_KEYS)
    if stated is not None:  # "level=error something broke": the stated level, the text without it
        level, message = stated, _KV.sub(lambda m: "" if m[1] in _LEVEL_KEYS else m[0], rest).strip()
    fields.update(level=level, event=message)
    return _Pending(line, fields, structured=False, in_frames=in_frames)


def _plain_level(text: str) -> tuple[str | None, str]:
    """The level a free-text line states, and the message after it (with any logger name dropped)."""
    found = [m for m in (_BRACKET_LEVEL.search(text), _LEVEL_WORD.search(text)) if m is not None]
    if not found:
        return ("error" if _EXCEPTION_HINT.search(text) else None), text.strip()
    first = min(found, key=lambda m: m.start())
    if first.start() > 80:  # a level word deep in the text is part of the message
        return first[1], text.strip()
    message = text[first.end():].lstrip(" \t:|->]")
    for _ in range(2):
        prefix = _LOGGER_PREFIX.match(message)
        if prefix is None or prefix.end() == len(message):
            break
        message = message[prefix.end():].lstrip(" \t:|->")
    return first[1], message.strip()


def _json_record(line: str) -> Mapping[str, Any] | None:
    text = line.strip()
    start = text.find("{")
    if start < 0 or not text.endswith("}"):
        return None
    try:
        record = json.loads(text[start:])
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("jsonPayload"), dict):  # a Cloud Logging export
        record = {**record, **record["jsonPayload"]}
    if isinstance(record.get("httpRequest"), dict) and "requestUrl" in record["httpRequest"]:
        record.setdefault("url", record["httpRequest"]["requestUrl"])
    return record if any(key in record for key in (*_MESSAGE_KEYS, *_LEVEL_KEYS)) else None


def _kv(text: str) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    for key, value in _KV.findall(text):
        if value[:1] in "\"'" and len(value) >= 2:
            value = _unquote(value)
        pairs[key] = value
    return pairs


def _unquote(value: str) -> str:
    """A value as structlog's console (Python repr) or logfmt/GCP (JSON-style escapes) quoted it."""
    for decode in (ast.literal_eval, json.loads):
        try:
            decoded = decode(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(decoded, str):
            return decoded
    return value[1:-1]


def _is_header(line: str) -> bool:
    return line.lstrip().startswith("{") or _LEADING_TIME.match(line) is not None


# ---------------------------------------------------------------------------------------------------- one event


def _build(fields: Mapping[str, Any], raw: str | None, structured: bool, exception: Any = None) -> LogEvent | None:
    level = _level(_first(fields, _LEVEL_KEYS))
    if level is None:
        return None
    text = _flat(_first(fields, _MESSAGE_KEYS))
    summary = _exception_summary(exception if exception is not None else fields.get("exception"))
    if summary is None and fields.get("exc_info"):
        summary = _exc_info_summary(fields["exc_info"])
    parts = [text] if text else []
    # A line that already quotes its exception's message reads the same with or without the traceback under it.
    detail = summary.partition(": ")[2] if summary else ""
    if summary and not (len(detail) >= 8 and detail in text):
        parts.append(f"exception={_clip(summary)}")
    if structured:
        salient = ((key, _flat(_first(fields, (key,)))) for key in _SALIENT)
        parts += [f"{key}={_clip(value)}" for key, value in salient if value]
    user = _flat(_first(fields, _USER_KEYS)) or None
    return LogEvent(
        timestamp=_timestamp(_first(fields, _TIME_KEYS)),
        level=level,
        message=" ".join(parts)[:_MESSAGE_CHARS],
        route=_route(fields, text),
        user_id=user[:_FIELD_CHARS] if user else None,
        raw=raw if raw is not None else _render(fields, summary),
    )


def _first(fields: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        value = fields.get(key)
        if value is not None and value not in ("", "None", "null"):  # the console renders a missing user as None
            return value
    return None


def _level(value: Any) -> str | None:
    return _LEVELS.get(value.strip().lower()) if isinstance(value, str) else None


def _flat(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=_safe_str, ensure_ascii=False)
    return " ".join(text.split())


def _clip(text: str) -> str:
    return text if len(text) <= _FIELD_CHARS else text[:_FIELD_CHARS] + "…"


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # an object whose __str__ fails must not lose the log line
        return f"<{type(value).__name__}>"


def _exception_summary(value: Any) -> str | None:
    """The `Type: message` line of a formatted traceback (structlog's `exception`), or of structlog's dict form."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        kind, detail = value[0].get("exc_type"), value[0].get("exc_value")
        return f"{kind}: {detail}" if detail else str(kind) if kind else None
    if not isinstance(value, str) or not value.strip():
        return None
    lines = value.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(_TRACEBACK)]
    if starts:
        for line in lines[starts[-1] + 1:]:
            if line and line[0] not in " \t" and not line.startswith(_CHAIN):
                return line.strip()
    last = [line.strip() for line in lines if line.strip() and not line.startswith(_CHAIN)]
    return last[-1] if last and not last[-1].startswith(_TRACEBACK) else None


def _exc_info_summary(value: Any) -> str | None:
    if value is True:
        value = sys.exc_info()[1]
    elif isinstance(value, tuple) and len(value) == 3:
        value = value[1]
    if not isinstance(value, BaseException):
        return None
    # The same line the formatted traceback ends with, so a file and the running process agree.
    text = "".join(traceback.format_exception_only(type(value), value))
    return text.splitlines()[0].strip() if text.strip() else type(value).__name__


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    elif isinstance(value, str):
        text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip().replace(",", ".").removesuffix("UTC").strip())
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _route(fields: Mapping[str, Any], text: str) -> str | None:
    value = _first(fields, _ROUTE_KEYS)
    if isinstance(value, str) and value.strip():
        path = _URL.sub(lambda m: _url_path(m[0]), value.strip()).split("?", 1)[0]
    elif (url := _URL.search(text)) is not None:
        path = _url_path(url[0]).split("?", 1)[0]
    elif (request := _REQUEST_PATH.search(text)) is not None:
        path = request[1]
    else:
        return None
    # Ids in a concrete path become {id}, so /api/threads/01j…/messages counts as one route.
    shaped = "/".join("{id}" if _ID_SEGMENT.match(part) else part for part in path.split("/"))
    return shaped[:_FIELD_CHARS] or None


def _url_path(url: str) -> str:
    rest = url.split("://", 1)[-1].rstrip(".,;)]")
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


def _render(fields: Mapping[str, Any], summary: str | None) -> str:
    shown = {key: value for key, value in fields.items()
             if not key.startswith("_") and key not in ("exc_info", "stack_info")}
    if isinstance(shown.get("timestamp"), datetime):
        shown["timestamp"] = _rfc3339(shown["timestamp"])
    if summary and not isinstance(shown.get("exception"), str):
        shown["exception"] = summary
    # Kept in memory by RecentErrors (capacity times this), so shorter than a sample read from a file.
    return json.dumps(shown, default=_safe_str, ensure_ascii=False)[:_KEPT_RAW_CHARS]


# ---------------------------------------------------------------------------------------------------- masking


def _mask_url(match: re.Match[str]) -> str:
    # The path names the endpoint; the query is data (limit/offset, cache busters) and is left out:
    # /api/threads?limit=20 and /api/threads are one endpoint. The sample keeps the full address.
    url = match[0].rstrip(".,;)]")
    return url.partition("?")[0] + match[0][len(url):]


def _mask_quoted(match: re.Match[str]) -> str:
    # A quoted identifier ('execute', 'CLICKHOUSE_URL', 'websocket.close') names code and stays;
    # a quoted value (digits, an address, prose, a long blob) is data.
    inner = match[0][1:-1]
    if any(c.isdigit() for c in inner) or "@" in inner or len(inner) > 40 or len(inner.split()) > 3:
        return "<STR>"
    return match[0]


def _mask_number(match: re.Match[str]) -> str:
    # HTTP status codes tell failures apart (500 vs 404); every other bare number is data.
    before = match.string[max(0, match.start() - 16):match.start()]
    if len(match[0]) == 3 and match[0][0] in "12345" and _KEPT_NUMBER.search(before):
        return match[0]
    return "<NUM>"


_MASKS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(_TIME), "<TS>"),
    (re.compile(r"\b\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\b"), "<TIME>"),
    (re.compile(rf"{_URL.pattern}|(?<![\w/])/[\w./{{}}-]*\?[^\s'\"<>]*"), _mask_url),
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<EMAIL>"),
    (re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"), "<UUID>"),
    (re.compile(r"\b(?=[0-9a-z]*\d)[0-9a-z]{26}\b|\b(?=[0-9A-Z]*\d)[0-9A-Z]{26}\b"), "<ID>"),  # ULIDs
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"), "<IP>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<HEX>"),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{6,}\b"), "<HEX>"),
    (re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[A-Za-z0-9][\w-]{9,}(?![\w-])"), "<ID>"),  # req_8f3k2j1x0p…
    (re.compile(
        r"(?<![\w/.:-])(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+)+\.(?:py|pyc|js|ts|go|rb|java|json|ya?ml|toml|log|txt|sql|"
        r"so|db|sqlite3?|csv|cfg|ini|conf|sock|pid)\b"
        r"|(?<![\w/.:-])/(?:home|usr|var|tmp|opt|srv|etc|app|proc|run|mnt|data)(?:/[\w.@+-]+)+"), "<PATH>"),
    (re.compile(
        r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|secs|seconds?|m|mins?|minutes?|h|hrs?|hours?|d|days?)"
        r"(?!\w)"), "<DUR>"),
    (re.compile(r"'[^'\n]{0,200}'|\"[^\"\n]{0,200}\""), _mask_quoted),
    (re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)*(?!\w)"), _mask_number),
)


def mask(message: str) -> str:
    """The message with its variable parts (ids, numbers, addresses, times, values) replaced by typed markers."""
    text = " ".join(message.split())[:_MESSAGE_CHARS]
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text or "(empty message)"


# ---------------------------------------------------------------------------------------------------- clustering


@dataclass
class _Group:
    """Every event whose masked message is the same text: the unit drain3 clusters."""

    order: int
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    sample: str = ""
    levels: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    users: Counter[str] = field(default_factory=Counter)

    def add(self, event: LogEvent) -> None:
        if not self.count:
            self.sample = event.raw
        self.count += 1
        self.levels[event.level] += 1
        if event.route:
            self.routes[event.route] += 1
        if event.user_id:
            self.users[event.user_id] += 1
        if event.timestamp is not None:
            self.first = min(self.first or event.timestamp, event.timestamp)
            self.last = max(self.last or event.timestamp, event.timestamp)


def diagnose(events: Iterable[LogEvent], since: datetime | None = None) -> Diagnosis:
    """The distinct failure patterns among the events (those at or after `since`, when given), ranked by count."""
    since = _aware(since)
    groups: dict[tuple[str, str], _Group] = {}
    keys: dict[str, tuple[str, str]] = {}  # the same message again (no ids in it) is masked once
    total = 0
    for event in events:
        if since is not None and (event.timestamp is None or event.timestamp < since):
            continue
        total += 1
        key = keys.get(event.message)
        if key is None:
            kind = _EXCEPTION_TYPE.search(event.message)
            key = (kind[1] if kind else "", mask(event.message))
            if len(keys) < 50_000:
                keys[event.message] = key
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(order=len(groups))
        group.add(event)
    patterns = [_pattern(template, members, total) for template, members in _cluster(groups)]
    patterns.sort(key=lambda p: (-p.count, p.first_seen is None, p.first_seen or datetime.min.replace(tzinfo=UTC),
                                 p.template))
    return Diagnosis(patterns=patterns, total=total, since=since)


def _cluster(groups: Mapping[tuple[str, str], _Group]) -> list[tuple[str, list[_Group]]]:
    """Drain over the distinct masked messages, one tree per exception type, in order of first appearance.

    Feeding each distinct text once (not every occurrence) makes identical texts share a pattern by construction:
    drain alone can send a repeat of a message to another cluster once the first cluster's template has widened.
    """
    trees: dict[str, Drain] = {}
    members: dict[tuple[str, int], list[_Group]] = {}
    for (kind, text), group in groups.items():
        tree = trees.get(kind)
        if tree is None:
            # depth 5: the first two tokens (an event name and its exception or reason; "HTTP 500") never merge.
            # Numbers are masked already, so a digit left in a token (an HTTP status) is meant to tell apart.
            tree = trees[kind] = Drain(depth=5, sim_th=0.5, max_children=100, parametrize_numeric_tokens=False)
        cluster, _ = tree.add_log_message(text)
        members.setdefault((kind, int(cluster.cluster_id)), []).append(group)
    return [(" ".join(str(t) for t in trees[kind].id_to_cluster[cluster_id].log_template_tokens), found)
            for (kind, cluster_id), found in members.items()]


def _pattern(template: str, groups: list[_Group], total: int) -> FailurePattern:
    levels: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    users: Counter[str] = Counter()
    for group in groups:
        levels.update(group.levels)
        routes.update(group.routes)
        users.update(group.users)
    firsts = [g.first for g in groups if g.first is not None]
    lasts = [g.last for g in groups if g.last is not None]
    count = sum(g.count for g in groups)
    return FailurePattern(
        template=template, count=count, share=count / total if total else 0.0,
        first_seen=min(firsts, default=None), last_seen=max(lasts, default=None),
        levels=_ranked(levels, len(levels)), routes=_ranked(routes, TOP), users=_ranked(users, TOP),
        sample=min(groups, key=lambda g: g.order).sample,
        distinct_routes=len(routes), distinct_users=len(users),
    )


def _ranked(counts: Counter[str], limit: int) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit])


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------------- Markdown


def render_markdown(diagnosis: Diagnosis) -> str:
    since = f" since {_when(diagnosis.since)}" if diagnosis.since else ""
    lines = ["# Failure patterns", ""]
    if not diagnosis.patterns:
        return "\n".join([*lines, f"No warnings or errors{since}.", ""])
    levels: Counter[str] = Counter()
    for pattern in diagnosis.patterns:
        levels.update(pattern.levels)
    firsts = [p.first_seen for p in diagnosis.patterns if p.first_seen]
    lasts = [p.last_seen for p in diagnosis.patterns if p.last_seen]
    span = f", {_when(min(firsts))} to {_when(max(lasts))}" if firsts and lasts else ""
    by_level = ", ".join(f"{levels[name]} {name}" for name in ("critical", "error", "warning") if levels[name])
    lines += [f"**{diagnosis.total}** warnings and errors{since} ({by_level}) in **{len(diagnosis.patterns)}** "
              f"patterns{span}.", "", "| # | Count | Share | Template |", "|---:|---:|---:|---|"]
    for rank, pattern in enumerate(diagnosis.patterns, 1):
        template = _code(_shorten(pattern.template, 120)).replace("|", "\\|")
        lines.append(f"| {rank} | {pattern.count} | {_percent(pattern.share)} | {template} |")
    for rank, pattern in enumerate(diagnosis.patterns, 1):
        lines += ["", f"## {rank}. {_code(_shorten(pattern.template, 500))}", "",
                  f"- **Count:** {pattern.count} ({_percent(pattern.share)} of all), "
                  + ", ".join(f"{n} {name}" for name, n in pattern.levels.items()),
                  f"- **First seen:** {_when(pattern.first_seen)} · **Last seen:** {_when(pattern.last_seen)}",
                  f"- **Routes** ({pattern.distinct_routes}): {_top(pattern.routes, pattern.distinct_routes)}",
                  f"- **Users** ({pattern.distinct_users}): {_top(pattern.users, pattern.distinct_users)}",
                  "- **Sample:**", "", *_block(pattern.sample)]
    return "\n".join([*lines, ""])


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "unknown"


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%" if share >= 0.001 else f"{share * 100:.2f}%"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _code(text: str) -> str:
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if "`" in text else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _top(counts: Mapping[str, int], distinct: int) -> str:
    if not counts:
        return "none recorded"
    shown = ", ".join(f"{_code(_shorten(name, 80))} {n}" for name, n in counts.items())
    return shown + (f", and {distinct - len(counts)} more" if distinct > len(counts) else "")


def _block(sample: str) -> list[str]:
    lines = [_shorten(line, 400) for line in _readable(sample).splitlines()] or [""]
    if len(lines) > 12:
        lines = [*lines[:4], "…", *lines[-7:]]
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", sample)), default=0) + 1)
    return [fence, *lines, fence]


def _readable(sample: str) -> str:
    """A JSON line with its traceback unfolded below it, as the console would have shown it."""
    record = _json_record(sample) if "\n" not in sample else None
    if record is None or not isinstance(record.get("exception"), str):
        return sample
    rest = {key: value for key, value in record.items() if key != "exception"}
    return json.dumps(rest, ensure_ascii=False) + "\n" + str(record["exception"])


# ---------------------------------------------------------------------------------------------------- in process


class RecentErrors(logging.Handler):
    """The last `capacity` WARNING+ events of this process, for `GET /api/admin/errors`. Attach to the root logger."""

    def __init__(self, capacity: int = 5000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        super().__init__(level=logging.WARNING)
        self.capacity = capacity
        self.received = 0  # WARNING+ events seen; beyond `capacity` the oldest are forgotten
        self._events: deque[LogEvent] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = _event_from_record(record)
            if event is not None:
                self._events.append(event)  # emit runs under the handler's lock
                self.received += 1
        except Exception:  # a log handler must never break the code that logs
            self.handleError(record)

    def events(self) -> list[LogEvent]:
        self.acquire()
        try:
            return list(self._events)
        finally:
            self.release()

    def diagnosis(self, since: datetime | None = None) -> Diagnosis:
        return diagnose(self.events(), since)


def _event_from_record(record: logging.LogRecord) -> LogEvent | None:
    # structlog's wrap_for_formatter leaves the event dict in record.msg; a library's record has a plain message.
    if isinstance(record.msg, dict):
        fields: dict[str, Any] = dict(record.msg)
    else:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format
            message = str(record.msg)
        fields = {"event": message}
    fields["level"] = "critical" if record.levelno >= logging.CRITICAL else (
        "error" if record.levelno >= logging.ERROR else "warning")
    fields.setdefault("logger", record.name)
    if not fields.get("timestamp"):
        fields["timestamp"] = datetime.fromtimestamp(record.created, UTC)
    if record.exc_info and not fields.get("exc_info") and not fields.get("exception"):
        fields["exc_info"] = record.exc_info
    return _build(fields, raw=None, structured=True)


# ---------------------------------------------------------------------------------------------------- the command


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(message)


def _parser() -> _Parser:
    parser = _Parser(prog="parley diagnose", add_help=False,
                     description="Cluster the WARNING and ERROR lines of parley's logs (JSON, console or plain text) "
                                 "into failure patterns, ranked by count.")
    parser.add_argument("files", nargs="+", metavar="LOGFILE", help="log files (.gz too); - reads standard input")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--since", metavar="WHEN",
                        help="only events at or after WHEN: an ISO 8601 date or time (UTC unless stated), "
                             "or an age such as 30m, 2h, 7d")
    return parser


def main(argv: Sequence[str], stdin: TextIO, stdout: TextIO) -> int:
    """`parley diagnose LOGFILE... | -`: 0 when done (also with nothing found), 2 on a bad argument or file."""
    if "-h" in argv or "--help" in argv:
        stdout.write(_parser().format_help())
        return 0
    try:
        args = _parser().parse_args(list(argv))
        since = _since_argument(args.since) if args.since else None
        for name in args.files:
            if name != "-" and not Path(name).is_file():
                raise _Usage(f"no such log file: {name}")
        events = chain.from_iterable(parse_lines(_read(name, stdin)) for name in args.files)
        diagnosis = diagnose(events, since)
    except _Usage as exc:
        print(f"parley diagnose: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"parley diagnose: cannot read {exc.filename or 'input'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except EOFError as exc:  # a truncated .gz
        print(f"parley diagnose: cannot read input: {exc}", file=sys.stderr)
        return 2
    stdout.write(json.dumps(diagnosis.as_dict(), indent=2, ensure_ascii=False) + "\n" if args.json
                 else render_markdown(diagnosis))
    return 0


def _since_argument(text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise _Usage(f"--since: {exc}") from None


def _read(name: str, stdin: TextIO) -> Iterator[str]:
    if name == "-":
        yield from stdin
        return
    opener: Any = gzip.open if name.endswith(".gz") else open
    with opener(name, "rt", encoding="utf-8", errors="replace") as lines:
        yield from lines


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d|w)", re.IGNORECASE)
_UNITS = {"s": "seconds", "sec": "seconds", "m": "minutes", "min": "minutes", "h": "hours", "hr": "hours",
          "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`2025-09-03`, `2025-09-03T12:00:00Z` (naive means UTC), or an age before `now`: `30m`, `2h`, `7d`.

    Raises ValueError for anything else (the CLI's `--since`; an HTTP `?since=` can share it).
    """
    age = _AGE.fullmatch(text.strip())
    moment: datetime | None
    try:
        if age is not None:
            moment = (now or datetime.now(UTC)) - timedelta(**{_UNITS[age[2].lower()]: float(age[1])})
        else:
            moment = _timestamp(text)
    except OverflowError:
        moment = None
    if moment is None:
        raise ValueError(f"not a date, time or age (like 2h, 30m, 7d): {text!r}")
    return moment
