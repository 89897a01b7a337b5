"""Threads and messages in the database. Every query names the owner, so another user's rows cannot match.

Listing walks the `(user_id, updated_at, id)` index in both paging modes; totals come from the user's counter
and per-thread counts from the thread row, so no query counts rows per request.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Select, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from parley.clock import utcnow
from parley.errors import InvalidRequest, NotFound
from parley.ids import new_id
from parley.storage.models import Message, Thread, User

DEFAULT_TITLE = "New thread"


@dataclass(frozen=True)
class ThreadCursor:
    updated_at: datetime
    id: str

    def encode(self) -> str:
        raw = orjson.dumps([self.updated_at.isoformat(), self.id])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> ThreadCursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            updated_at, thread_id = orjson.loads(raw)
            moment = datetime.fromisoformat(updated_at)
            if moment.tzinfo is None or not isinstance(thread_id, str):
                raise ValueError("bad cursor")
        except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError) as exc:
            raise InvalidRequest(details=[{"field": "query.cursor", "type": "invalid",
                                           "message": "cursor is not one this server issued"}]) from exc
        return cls(moment, thread_id)


@dataclass(frozen=True)
class ThreadSlice:
    items: list[Thread]
    has_more: bool
    total: int | None
    next_cursor: str | None


class ThreadRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list_for_user(self, user_id: str, limit: int, offset: int = 0,
                            cursor: ThreadCursor | None = None) -> ThreadSlice:
        query: Select[Any]
        if cursor is not None:
            query = select(Thread).where(
                Thread.user_id == user_id,
                tuple_(Thread.updated_at, Thread.id) < tuple_(cursor.updated_at, cursor.id))
        else:
            # The total rides along as a scalar subquery on the counter: one round trip, no counting.
            total_column = select(User.thread_count).where(User.id == user_id).scalar_subquery()
            query = select(Thread, total_column).where(Thread.user_id == user_id).offset(offset or None)
        query = query.order_by(Thread.updated_at.desc(), Thread.id.desc()).limit(limit + 1)
        result = (await self.session.execute(query)).all()
        rows = [row[0] for row in result]
        has_more = len(rows) > limit
        items = rows[:limit]
        next_cursor = ThreadCursor(items[-1].updated_at, items[-1].id).encode() if has_more else None
        total: int | None = None
        if cursor is None:
            total = int(result[0][1]) if result else await self._total(user_id, offset)
        return ThreadSlice(items=items, has_more=has_more, total=total, next_cursor=next_cursor)

    async def _total(self, user_id: str, offset: int) -> int:
        """The total when the page is empty (a new user, or an offset past the end)."""
        if not offset:
            return 0
        return int(await self.session.scalar(select(User.thread_count).where(User.id == user_id)) or 0)

    async def get_for_user(self, user_id: str, thread_id: str) -> Thread:
        thread = await self.session.scalar(
            select(Thread).where(Thread.id == thread_id, Thread.user_id == user_id)
        )
        if thread is None:
            raise NotFound("Thread not found.")
        return thread

    async def create(self, user_id: str, title: str | None, meta: dict[str, Any] | None) -> Thread:
        now = utcnow()
        thread = Thread(id=new_id(), user_id=user_id, title=title or DEFAULT_TITLE, meta=meta or {},
                        created_at=now, updated_at=now, message_count=0, last_message_at=None, last_seq=0)
        self.session.add(thread)
        await self.session.execute(
            update(User).where(User.id == user_id).values(thread_count=User.thread_count + 1)
        )
        return thread

    async def update(self, user_id: str, thread_id: str, title: str | None,
                     meta: dict[str, Any] | None) -> Thread:
        thread = await self.get_for_user(user_id, thread_id)
        if title is not None:
            thread.title = title
        if meta is not None:
            thread.meta = meta
        thread.updated_at = utcnow()
        return thread

    async def delete(self, user_id: str, thread_id: str) -> None:
        deleted = await self.session.execute(
            delete(Thread).where(Thread.id == thread_id, Thread.user_id == user_id)
        )
        if deleted.rowcount != 1:  # type: ignore[attr-defined]
            raise NotFound("Thread not found.")
        await self.session.execute(
            update(User).where(User.id == user_id).values(thread_count=User.thread_count - 1)
        )


@dataclass(frozen=True)
class MessageSlice:
    items: list[Message]
    has_more: bool


class MessageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def list_for_thread(self, user_id: str, thread_id: str, limit: int,
                              before: str | None = None) -> MessageSlice:
        """The `limit` messages just before `before` (or the newest), returned oldest first."""
        query = select(Message).where(Message.thread_id == thread_id, Message.user_id == user_id)
        if before is not None:
            anchor = (await self.session.execute(
                select(Message.created_at, Message.id)
                .where(Message.id == before, Message.thread_id == thread_id, Message.user_id == user_id)
            )).one_or_none()
            if anchor is None:
                raise InvalidRequest(details=[{"field": "query.before", "type": "invalid",
                                               "message": "no such message in this thread"}])
            query = query.where(tuple_(Message.created_at, Message.id) < tuple_(anchor[0], anchor[1]))
        query = query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit + 1)
        rows = list((await self.session.scalars(query)).all())
        return MessageSlice(items=list(reversed(rows[:limit])), has_more=len(rows) > limit)

    async def find_by_client_id(self, thread_id: str, client_message_id: str) -> Message | None:
        return await self.session.scalar(
            select(Message).where(Message.thread_id == thread_id,
                                  Message.client_message_id == client_message_id)
        )

    async def add(self, thread: Thread, role: str, content: str, *, run_id: str | None = None,
                  client_message_id: str | None = None, meta: dict[str, Any] | None = None) -> Message:
        """Stores a message and moves the thread's counters in the same transaction."""
        now = utcnow()
        message = Message(id=new_id(), thread_id=thread.id, user_id=thread.user_id, role=role,
                          content=content, run_id=run_id, client_message_id=client_message_id,
                          created_at=now, meta=meta or {})
        self.session.add(message)
        await self.session.execute(
            update(Thread).where(Thread.id == thread.id, Thread.user_id == thread.user_id)
            .values(message_count=Thread.message_count + 1, last_message_at=now, updated_at=now)
        )
        return message
