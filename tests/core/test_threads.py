"""Threads and message history over real HTTP (incident pattern 1: 500s on /api/threads)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from parley.storage.database import Database
from parley.threads.repository import MessageRepository, ThreadRepository
from tests.support.clients import Account, error_code, register
from tests.support.live import LiveServer


def create_threads(client: httpx.Client, account: Account, count: int) -> list[str]:
    ids = []
    for index in range(count):
        response = client.post("/api/threads", json={"title": f"thread {index}"}, headers=account.headers)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def test_pattern1_threads_list_answers_200_for_a_new_user(client: httpx.Client, account: Account) -> None:
    response = client.get("/api/threads?limit=20&offset=0", headers=account.headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "total": 0, "limit": 20, "offset": 0, "has_more": False,
                               "next_cursor": None}


def test_pattern1_threads_list_with_1000_threads_visits_each_once(client: httpx.Client, account: Account) -> None:
    created = set(create_threads(client, account, 1000))
    first = client.get("/api/threads?limit=20&offset=0", headers=account.headers)
    assert first.status_code == 200
    assert first.json()["total"] == 1000 and first.json()["has_more"] is True

    by_offset: list[str] = []
    offset = 0
    while True:
        page = client.get(f"/api/threads?limit=100&offset={offset}", headers=account.headers).json()
        by_offset += [item["id"] for item in page["items"]]
        if not page["has_more"]:
            break
        offset += 100
    assert len(by_offset) == 1000 and set(by_offset) == created

    by_cursor: list[str] = []
    url = "/api/threads?limit=37"
    while True:
        response = client.get(url, headers=account.headers)
        assert response.status_code == 200
        page = response.json()
        by_cursor += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            assert page["has_more"] is False
            break
        url = f"/api/threads?limit=37&cursor={page['next_cursor']}"
    assert by_cursor == by_offset  # same stable order, each thread exactly once


def test_listing_order_is_updated_at_desc_and_follows_updates(client: httpx.Client, account: Account) -> None:
    first, second, third = create_threads(client, account, 3)
    assert [t["id"] for t in client.get("/api/threads", headers=account.headers).json()["items"]] == [
        third, second, first]
    assert client.patch(f"/api/threads/{first}", json={"title": "renamed"},
                        headers=account.headers).status_code == 200
    items = client.get("/api/threads", headers=account.headers).json()["items"]
    assert [t["id"] for t in items] == [first, third, second]
    assert items[0]["title"] == "renamed"


def test_thread_crud_and_validation(client: httpx.Client, account: Account) -> None:
    created = client.post("/api/threads", json={"title": "Plans", "metadata": {"color": "blue"}},
                          headers=account.headers)
    assert created.status_code == 201
    thread = created.json()
    assert thread["title"] == "Plans" and thread["metadata"] == {"color": "blue"}
    assert thread["message_count"] == 0 and thread["last_message_at"] is None
    assert thread["created_at"].endswith("Z")

    assert client.get(f"/api/threads/{thread['id']}", headers=account.headers).json() == thread
    assert client.post("/api/threads", json={}, headers=account.headers).json()["title"] == "New thread"

    too_long = client.post("/api/threads", json={"title": "x" * 201}, headers=account.headers)
    assert too_long.status_code == 422 and error_code(too_long) == "invalid_request"
    assert too_long.json()["error"]["details"][0]["field"] == "body.title"
    huge_metadata = client.post("/api/threads", json={"metadata": {"k": "v" * 20_000}}, headers=account.headers)
    assert huge_metadata.status_code == 422
    for bad in ("limit=0", "limit=101", "offset=-1", "cursor=not-a-cursor"):
        response = client.get(f"/api/threads?{bad}", headers=account.headers)
        assert response.status_code == 422, bad
        assert error_code(response) == "invalid_request"

    assert client.delete(f"/api/threads/{thread['id']}", headers=account.headers).status_code == 204
    assert client.get(f"/api/threads/{thread['id']}", headers=account.headers).status_code == 404
    assert client.delete(f"/api/threads/{thread['id']}", headers=account.headers).status_code == 404
    listing = client.get("/api/threads", headers=account.headers).json()
    assert listing["total"] == 1 and thread["id"] not in [t["id"] for t in listing["items"]]


def _add_messages(server: LiveServer, account: Account, thread_id: str, count: int) -> None:
    # The test's own engine: the server's pool belongs to the server's event loop.
    async def add() -> None:
        database = Database(server.settings)
        try:
            async with database.session() as session:
                thread = await ThreadRepository(session).get_for_user(account.id, thread_id)
                for index in range(count):
                    await MessageRepository(session).add(thread, "user" if index % 2 == 0 else "assistant",
                                                         f"message {index}")
                await session.commit()
        finally:
            await database.dispose()

    asyncio.run(add())


def test_message_history_pages_backwards_oldest_first(live_server: LiveServer, client: httpx.Client,
                                                      account: Account) -> None:
    thread_id = create_threads(client, account, 1)[0]
    _add_messages(live_server, account, thread_id, 120)

    thread = client.get(f"/api/threads/{thread_id}", headers=account.headers).json()
    assert thread["message_count"] == 120 and thread["last_message_at"] is not None

    seen: list[str] = []
    url = f"/api/threads/{thread_id}/messages?limit=50"
    while True:
        page = client.get(url, headers=account.headers).json()
        contents = [m["content"] for m in page["items"]]
        seen = contents + seen
        if not page["has_more"]:
            break
        url = f"/api/threads/{thread_id}/messages?limit=50&before={page['items'][0]['id']}"
    assert seen == [f"message {i}" for i in range(120)]
    bad = client.get(f"/api/threads/{thread_id}/messages?before=nope", headers=account.headers)
    assert bad.status_code == 422


@pytest.mark.parametrize("route", ["get", "patch", "delete", "messages"])
def test_isolation_other_users_threads_are_404_by_every_route(live_server: LiveServer, client: httpx.Client,
                                                              route: str) -> None:
    owner, intruder = register(client), register(client)
    thread_id = create_threads(client, owner, 1)[0]
    _add_messages(live_server, owner, thread_id, 3)
    message_id = client.get(f"/api/threads/{thread_id}/messages", headers=owner.headers).json()["items"][0]["id"]

    calls = {
        "get": lambda: client.get(f"/api/threads/{thread_id}", headers=intruder.headers),
        "patch": lambda: client.patch(f"/api/threads/{thread_id}", json={"title": "mine"},
                                      headers=intruder.headers),
        "delete": lambda: client.delete(f"/api/threads/{thread_id}", headers=intruder.headers),
        "messages": lambda: client.get(f"/api/threads/{thread_id}/messages?before={message_id}",
                                       headers=intruder.headers),
    }
    response = calls[route]()
    assert response.status_code == 404 and error_code(response) == "not_found"
    assert client.get("/api/threads", headers=intruder.headers).json()["total"] == 0
    # The owner's thread is untouched.
    owner_view = client.get(f"/api/threads/{thread_id}", headers=owner.headers).json()
    assert owner_view["title"] == "thread 0" and owner_view["message_count"] == 3
