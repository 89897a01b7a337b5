"""`RecentErrors`: a logging handler that keeps the running process's last WARNING+ events as `LogEvent`s.

Serves `GET /api/admin/errors`; a stdlib or structlog record becomes the same event its log line would.
"""

from __future__ import annotations

import logging
from collections import deque
from datetime import UTC, datetime
from typing import Any

from parley.observability.diagnose.clustering import Diagnosis, diagnose
from parley.observability.diagnose.events import LogEvent, _build


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
