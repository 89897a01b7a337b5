"""Log records as `LogEvent`s: WARNING+ lines in any format (JSON, structlog console, logfmt, plain text, tracebacks).

Owns format detection, `parse_lines`, `event_from_dict` and the mapping of one record's fields to an event.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
_URL = re.compile(r"https?://[^\s'\"<>]+")
_REQUEST_PATH = re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS)\s+(/[^\s'\"?]*)")
_ID_SEGMENT = re.compile(
    r"^(?:\d+|[0-9a-fA-F]{8}-[0-9a-fA-F-]{27}|(?=[0-9a-z]*\d)[0-9a-z]{26}|(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,})$"
)


@dataclass(frozen=True)
class LogEvent:
    """One WARNING/ERROR/CRITICAL occurrence, whatever format it came from."""

    timestamp: datetime | None  # aware UTC when known
    level: str  # "warning" | "error" | "critical"
    message: str  # the text to cluster: event or message, plus exception summary and salient fields
    route: str | None
    user_id: str | None
    raw: str  # the original line (and its traceback), clipped



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


def _rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
