"""The tools parley ships with: the current time, a calculator and a search over the caller's own messages.
Each is a small class satisfying `Tool`; `SearchThreadsTool` scopes its SQL to `ctx.user_id` itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, select

from parley.agents.context import UserExecutionContext
from parley.clock import rfc3339, utcnow
from parley.storage.database import Database
from parley.storage.models import Message, Thread
from parley.tools.base import ToolError
from parley.tools.calculator import MAX_EXPRESSION_CHARS, CalculatorError, calculate, json_number

SNIPPET_CHARS = 160
MAX_SEARCH_TERMS = 12
# Tool results repeat earlier answers verbatim; searching them would find the search's own past output.
SEARCHED_ROLES = ("user", "assistant")


class CurrentTimeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(default="UTC", min_length=1, max_length=64,
                          description="An IANA time zone name such as 'Europe/Paris' or 'America/New_York'.")


class CurrentTimeTool:
    name: ClassVar[str] = "current_time"
    description: ClassVar[str] = (
        "Tells the current date and time, in UTC or in any IANA time zone (for example 'Europe/Paris'). "
        "Returns the ISO 8601 timestamp and a human-readable form."
    )
    Params: ClassVar[type[BaseModel]] = CurrentTimeParams
    timeout_s: ClassVar[float] = 5.0
    admin_only: ClassVar[bool] = False

    def __init__(self, now: Callable[[], datetime] = utcnow) -> None:
        self._now = now  # injectable so tests (and replays) can pin the moment

    async def run(self, ctx: UserExecutionContext, params: CurrentTimeParams) -> dict[str, Any]:
        zone = _zone(params.timezone)
        moment = self._now().astimezone(zone)
        return {"timezone": zone.key, "iso": moment.isoformat(timespec="seconds"), "human": human_time(moment)}


def human_time(moment: datetime) -> str:
    """`14:05 UTC on Sunday 29 November 2026`."""
    return f"{moment:%H:%M} {moment.tzname()} on {moment:%A} {moment.day} {moment:%B %Y}"


def _zone(name: str) -> ZoneInfo:
    key = name.strip()
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # ValueError: a path-like key such as '../x'
        raise ToolError(f"unknown time zone {key!r}; use an IANA name such as 'Europe/Paris'") from exc


class CalculatorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                            description="An arithmetic expression, for example '12 * (3 + 4) / 2' or 'sqrt(2)'.")


class CalculatorTool:
    name: ClassVar[str] = "calculator"
    description: ClassVar[str] = (
        "Evaluates an arithmetic expression exactly: numbers, + - * / // % and ** (or ^) for powers, "
        "parentheses, sqrt, abs, round, min, max and the constants pi and e. "
        "Very large integers are returned as exact decimal strings."
    )
    Params: ClassVar[type[BaseModel]] = CalculatorParams
    timeout_s: ClassVar[float] = 5.0
    admin_only: ClassVar[bool] = False

    async def run(self, ctx: UserExecutionContext, params: CalculatorParams) -> dict[str, Any]:
        expression = params.expression.strip()
        try:
            result = calculate(expression)
        except CalculatorError as exc:
            raise ToolError(str(exc)) from exc
        return {"expression": expression, "result": json_number(result)}


class SearchThreadsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=200,
                       description="Words to look for; every word must appear in a message (case-insensitive).")
    limit: int = Field(default=5, ge=1, le=20, description="The most matches to return, newest first.")


class SearchThreadsTool:
    name: ClassVar[str] = "search_threads"
    description: ClassVar[str] = (
        "Searches the user's own earlier conversations for messages containing every given word "
        "(case-insensitive) and returns the newest matches with their thread title, a snippet and the time. "
        "Only ever sees the messages of the user it runs for."
    )
    Params: ClassVar[type[BaseModel]] = SearchThreadsParams
    timeout_s: ClassVar[float] = 10.0
    admin_only: ClassVar[bool] = False

    def __init__(self, database: Database) -> None:
        self._database = database

    async def run(self, ctx: UserExecutionContext, params: SearchThreadsParams) -> dict[str, Any]:
        terms = search_terms(params.query)
        if not terms:
            raise ToolError("the search query has no words")
        query = (
            select(Message.id, Message.thread_id, Message.role, Message.content, Message.created_at, Thread.title)
            .join(Thread, Thread.id == Message.thread_id)
            # Scoped twice on purpose: the message's owner and the thread's owner must both be the caller.
            .where(Message.user_id == ctx.user_id, Thread.user_id == ctx.user_id,
                   Message.role.in_(SEARCHED_ROLES), *(self._contains(term) for term in terms))
            .order_by(Message.created_at.desc(), Message.id.desc())
            .limit(params.limit)
        )
        async with self._database.session() as session:
            rows = (await session.execute(query)).all()
        matches = [
            {"thread_id": row.thread_id, "thread_title": row.title, "message_id": row.id, "role": row.role,
             "snippet": snippet(row.content, terms), "created_at": rfc3339(row.created_at)}
            for row in rows
        ]
        return {"query": " ".join(terms), "matches": matches}

    def _contains(self, term: str) -> ColumnElement[bool]:
        pattern = f"%{escape_like(term)}%"
        # SQLite's LIKE is already case-insensitive (for ASCII); PostgreSQL needs ILIKE.
        if self._database.dialect == "postgresql":
            return Message.content.ilike(pattern, escape="\\")
        return Message.content.like(pattern, escape="\\")


def search_terms(query: str) -> list[str]:
    """The distinct whitespace-separated words of `query`, in order, at most MAX_SEARCH_TERMS of them."""
    seen: dict[str, str] = {}
    for word in query.split():
        seen.setdefault(word.casefold(), word)
    return list(seen.values())[:MAX_SEARCH_TERMS]


def escape_like(term: str) -> str:
    """`term` with LIKE's wildcards made literal (for `ESCAPE '\\'`)."""
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def snippet(content: str, terms: Sequence[str], width: int = SNIPPET_CHARS) -> str:
    """At most `width` characters of `content` around the earliest occurrence of any term, whitespace folded."""
    text = re.sub(r"\s+", " ", content).strip()
    if len(text) <= width:
        return text
    lowered = text.lower()
    hits = [index for index in (lowered.find(term.lower()) for term in terms) if index >= 0]
    # Some context before the hit reads better than a snippet that starts mid-word on the hit itself.
    start = max(0, min(hits, default=0) - width // 3)
    end = min(len(text), start + width)
    start = end - width
    piece = text[start:end]
    if start > 0:
        piece = "…" + piece[1:]
    if end < len(text):
        piece = piece[:-1] + "…"
    return piece
