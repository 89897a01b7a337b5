"""HTTP routes of API.md's Threads section and the message history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from parley.errors import InvalidRequest
from parley.http.deps import CurrentUser, ServicesDep, SessionDep
from parley.threads.repository import MessageRepository, ThreadCursor, ThreadRepository
from parley.threads.schemas import (
    MessageOut,
    MessagePage,
    ThreadCreate,
    ThreadOut,
    ThreadPage,
    ThreadUpdate,
    check_metadata_size,
)

router = APIRouter(tags=["threads"])


@router.get("/api/threads")
async def list_threads(
    principal: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> ThreadPage:
    if cursor is not None and offset:
        raise InvalidRequest(details=[{"field": "query.cursor", "type": "conflict",
                                       "message": "pass either offset or cursor, not both"}])
    decoded = ThreadCursor.decode(cursor) if cursor is not None else None
    page = await ThreadRepository(session).list_for_user(principal.user_id, limit, offset or 0, decoded)
    return ThreadPage(items=[ThreadOut.of(t) for t in page.items], total=page.total, limit=limit,
                      offset=None if decoded else (offset or 0), has_more=page.has_more,
                      next_cursor=page.next_cursor)


@router.post("/api/threads", status_code=201)
async def create_thread(body: ThreadCreate, principal: CurrentUser, services: ServicesDep,
                        session: SessionDep) -> ThreadOut:
    check_metadata_size(body.metadata, services.settings.max_metadata_bytes)
    thread = await ThreadRepository(session).create(principal.user_id, body.title, body.metadata)
    await session.commit()
    return ThreadOut.of(thread)


@router.get("/api/threads/{thread_id}")
async def get_thread(thread_id: str, principal: CurrentUser, session: SessionDep) -> ThreadOut:
    return ThreadOut.of(await ThreadRepository(session).get_for_user(principal.user_id, thread_id))


@router.patch("/api/threads/{thread_id}")
async def update_thread(thread_id: str, body: ThreadUpdate, principal: CurrentUser, services: ServicesDep,
                        session: SessionDep) -> ThreadOut:
    check_metadata_size(body.metadata, services.settings.max_metadata_bytes)
    thread = await ThreadRepository(session).update(principal.user_id, thread_id, body.title, body.metadata)
    await session.commit()
    return ThreadOut.of(thread)


@router.delete("/api/threads/{thread_id}", status_code=204)
async def delete_thread(thread_id: str, principal: CurrentUser, services: ServicesDep,
                        session: SessionDep) -> Response:
    await ThreadRepository(session).delete(principal.user_id, thread_id)
    await session.commit()
    await services.runs.cancel_thread_runs(thread_id)  # its runs have nowhere left to write
    return Response(status_code=204)


@router.get("/api/threads/{thread_id}/messages")
async def list_messages(
    thread_id: str,
    principal: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> MessagePage:
    await ThreadRepository(session).get_for_user(principal.user_id, thread_id)
    page = await MessageRepository(session).list_for_thread(principal.user_id, thread_id, limit, before)
    return MessagePage(items=[MessageOut.of(m) for m in page.items], has_more=page.has_more)
