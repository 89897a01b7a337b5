"""Structured logging: one structlog pipeline for parley's own lines and for the libraries' stdlib logging.

JSON lines in production (or when asked), readable console lines in development. Context such as request_id,
user_id, thread_id, run_id and connection_id is bound through contextvars, so it follows a request or a task.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from parley.settings import Settings

_MARK = "_parley_handler"
_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(settings: Settings, stream: Any = None) -> None:
    """Route every logger (parley's, uvicorn's, SQLAlchemy's) through one formatter. Safe to call again."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *_SHARED_PROCESSORS,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED_PROCESSORS,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    # Replace only a handler this function installed before; others (a test's capture) stay.
    root.handlers = [h for h in root.handlers if not getattr(h, _MARK, False)] + [handler]
    root.setLevel(settings.log_level)
    # uvicorn's own access log would duplicate parley's request line; its error log joins the pipeline.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Their per-retry lines (with the server's URL) would repeat what parley says once per outage.
    logging.getLogger("clickhouse_connect").setLevel(logging.ERROR)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def describe(exc: BaseException) -> str:
    """A short reason for operators' logs: the exception kind and the first line of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    kind = type(exc).__name__
    return f"{kind}: {text[:300]}" if text else kind
