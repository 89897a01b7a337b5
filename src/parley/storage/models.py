"""parley's tables as typed SQLAlchemy models. Migrations under `migrations/` create exactly these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, MetaData, PrimaryKeyConstraint, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from parley.storage.types import JSONDocument, UTCDateTime

ID = String(26)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDocument}


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16), default="user")
    created_at: Mapped[datetime]
    # Kept in the same transaction as thread inserts and deletes, so listing totals cost no count query.
    thread_count: Mapped[int] = mapped_column(Integer, default=0)


class RefreshToken(Base):
    """One refresh token; every token descended from one login shares a `family_id`."""

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    family_id: Mapped[str] = mapped_column(ID, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class WebSocketTicket(Base):
    """A single-use, short-lived credential a browser trades for a WebSocket connection."""

    __tablename__ = "ws_tickets"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    ticket_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    used_at: Mapped[datetime | None]


class Thread(Base):
    __tablename__ = "threads"
    __table_args__ = (
        # Serves the listing order (updated_at desc, id desc) for one user, offset and keyset alike.
        Index("ix_threads_user_updated", "user_id", "updated_at", "id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    last_message_at: Mapped[datetime | None]
    # The last event sequence number handed out in this thread (the event log's gapless counter).
    last_seq: Mapped[int] = mapped_column(Integer, default=0)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_thread_created", "thread_id", "created_at", "id"),
        UniqueConstraint("thread_id", "client_message_id", name="uq_messages_thread_client_message_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    thread_id: Mapped[str] = mapped_column(ID, ForeignKey("threads.id", ondelete="CASCADE"))
    # The thread owner, repeated so that searches over a user's messages need no join to be scoped.
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(ID)
    client_message_id: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata")


class Run(Base):
    """One agent run: the answer to one user message. Status moves queued → running → a final state."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_thread_created", "thread_id", "created_at", "id"),
        # Finds the unfinished runs (of a thread, or whose lease lapsed) without scanning finished ones.
        Index("ix_runs_status_lease", "status", "lease_until"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    thread_id: Mapped[str] = mapped_column(ID, ForeignKey("threads.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    agent: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    input_message_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(500))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    model: Mapped[str | None] = mapped_column(String(100))
    # The process executing the run and until when it vouches for it (renewed while it runs).
    worker_id: Mapped[str | None] = mapped_column(ID)
    lease_until: Mapped[datetime | None]


class RunEvent(Base):
    """The per-thread event log: every event a client is sent, stored first, numbered 1, 2, 3… per thread."""

    __tablename__ = "run_events"
    __table_args__ = (PrimaryKeyConstraint("thread_id", "seq"),)

    thread_id: Mapped[str] = mapped_column(ID, ForeignKey("threads.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(ID, index=True)
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
