"""A conversation as a browser holds it (incident pattern 2: agent messages never reaching users)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as async_connect

from tests.conftest import SettingsFactory
from tests.support.clients import Account, register
from tests.support.conversation import TERMINAL, Chat, assert_contiguous, run_events, ticket_for
from tests.support.live import LiveServer

EXPECTED_ORDER = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_thinking"]


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Any:
    return make_settings(builtin_token_delay_s=0)


def test_pattern2_new_user_converses_over_a_ticket_and_finds_it_in_history(live_server: LiveServer,
                                                                           client: httpx.Client) -> None:
    account = register(client)
    with Chat(live_server.ws_url, account, ticket=ticket_for(client, account)) as chat:
        assert chat.connected["payload"]["user_id"] == account.id
        request_id = chat.send("user_message", {"content": "What is 12 * (3 + 4)?"})
        messages = chat.run_to_end()

    types = [m["type"] for m in messages]
    assert types[0] == "thread_created" and messages[0]["id"] == request_id
    assert types[1] == "ack" and messages[1]["id"] == request_id
    thread = messages[0]["payload"]["thread"]
    ack = messages[1]["payload"]
    assert ack["thread_id"] == thread["id"]
    events = run_events(messages, ack["run_id"])
    assert [e["type"] for e in events[:5]] == EXPECTED_ORDER
    assert events[2]["payload"]["tool"] == "calculator"
    assert events[3]["payload"]["ok"] is True and events[3]["payload"]["result"]["result"] == 84
    deltas = [e for e in events if e["type"] == "agent_delta"]
    assert len(deltas) >= 2
    completed = events[-1]
    assert completed["type"] == "agent_completed"
    assert_contiguous(events, events[0]["seq"] - 1)
    answer = "".join(d["payload"]["text"] for d in deltas)
    assert completed["payload"]["message"]["content"] == answer and "84" in answer
    assert completed["payload"]["usage"]["output_tokens"] >= len(deltas)
    for event in events:
        assert event["thread_id"] == thread["id"] and event["ts"].endswith("Z")

    history = client.get(f"/api/threads/{thread['id']}/messages", headers=account.headers).json()["items"]
    assert [(m["role"], m["content"]) for m in history] == [("user", "What is 12 * (3 + 4)?"),
                                                          ("assistant", answer)]
    assert history[0]["id"] == ack["message_id"] and history[1]["run_id"] == ack["run_id"]
    run = client.get(f"/api/runs/{ack['run_id']}", headers=account.headers).json()
    assert run["status"] == "completed" and run["finished_at"] and run["error"] is None
    assert run["usage"]["output_tokens"] == completed["payload"]["usage"]["output_tokens"]
    listed = client.get(f"/api/threads/{thread['id']}", headers=account.headers).json()
    assert listed["message_count"] == 2


def test_existing_thread_and_explicit_agent(live_server: LiveServer, client: httpx.Client,
                                            account: Account) -> None:
    thread = client.post("/api/threads", json={"title": "maths"}, headers=account.headers).json()
    with Chat(live_server.ws_url, account) as chat:
        chat.send("start_agent", {"thread_id": thread["id"], "agent": "assistant", "input": "2+2"})
        messages = chat.run_to_end()
        assert messages[0]["type"] == "ack"  # no thread_created for an existing thread
        assert messages[-1]["payload"]["message"]["content"].strip().endswith("4.")
        chat.send("start_agent", {"thread_id": thread["id"], "agent": "nope", "input": "hi"}, "x1")
        error = chat.recv()
        assert error["type"] == "error" and error["id"] == "x1" and error["payload"]["code"] == "agent_not_found"


def test_messages_on_a_followed_thread_are_acknowledged_in_order_and_each_answered_for_itself(
        live_server: LiveServer, client: httpx.Client, account: Account) -> None:
    """On a thread the connection already follows, a run may start while its message is being stored. The
    client still sees `message_created`, then `ack`, then the run; and each run answers its own message,
    including several sent at once, which run one after the other."""
    with Chat(live_server.ws_url, account) as chat:
        chat.send("user_message", {"content": "what is 12 * 7"})
        first = chat.run_to_end()
        thread_id = first[0]["payload"]["thread"]["id"]
        questions = {"what is 3 * 3": "9", "what is 2 ** 10": "1024", "what is 100 - 1": "99"}
        sent = [chat.send("user_message", {"thread_id": thread_id, "content": question}) for question in questions]
        completed_runs: list[str] = []

        def all_completed(frame: dict[str, Any]) -> bool:
            if frame["type"] == "agent_completed":
                completed_runs.append(frame["run_id"])
            return len(completed_runs) == len(questions)

        frames = chat.until(all_completed)

    for request_id, (question, result) in zip(sent, questions.items(), strict=True):
        ack_index = next(i for i, f in enumerate(frames) if f["type"] == "ack" and f["id"] == request_id)
        ack = frames[ack_index]["payload"]
        created = [i for i, f in enumerate(frames)
                   if f["type"] == "message_created" and f["payload"]["message"]["id"] == ack["message_id"]]
        started = [i for i, f in enumerate(frames) if f["type"] == "agent_started" and f["run_id"] == ack["run_id"]]
        assert created and started and created[0] < ack_index < started[0], [f["type"] for f in frames]
        assert frames[created[0]]["payload"]["message"]["content"] == question
        completed = next(f for f in frames if f["type"] == "agent_completed" and f["run_id"] == ack["run_id"])
        assert completed["payload"]["message"]["content"].strip().endswith(f"= {result}."), completed
    assert_contiguous([f for f in frames if "seq" in f], first[-1]["seq"])
    history = client.get(f"/api/threads/{thread_id}/messages", headers=account.headers).json()["items"]
    assert [m["content"] for m in history if m["role"] == "user"] == ["what is 12 * 7", *questions]


def test_every_connection_of_the_user_sees_the_thread_live(live_server: LiveServer, client: httpx.Client,
                                                           account: Account) -> None:
    thread = client.post("/api/threads", json={}, headers=account.headers).json()
    with Chat(live_server.ws_url, account) as phone, Chat(live_server.ws_url, account) as laptop:
        laptop.send("subscribe", {"thread_id": thread["id"]})
        assert laptop.recv()["type"] == "ack"
        phone.send("user_message", {"thread_id": thread["id"], "content": "hello there"})
        on_phone = phone.run_to_end()
        on_laptop = laptop.run_to_end()
    # The laptop also saw the phone's message arrive, then the same run events.
    assert on_laptop[0]["type"] == "message_created"
    assert on_laptop[0]["payload"]["message"]["content"] == "hello there"
    phone_run = [m for m in on_phone if "seq" in m]
    assert [m["seq"] for m in on_laptop[1:]] == [m["seq"] for m in phone_run]


def test_rest_post_message_streams_over_sse(live_server: LiveServer, client: httpx.Client,
                                            account: Account) -> None:
    thread = client.post("/api/threads", json={}, headers=account.headers).json()
    posted = client.post(f"/api/threads/{thread['id']}/messages", json={"content": "what time is it?"},
                         headers=account.headers)
    assert posted.status_code == 202
    body = posted.json()
    assert body["message"]["role"] == "user" and body["run"]["status"] == "queued"
    events = read_sse(live_server.url, thread["id"], account, after_seq=0)
    assert events[0]["type"] == "message_created"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "agent_completed"
    # Resume with Last-Event-ID: only what came after.
    rest = read_sse(live_server.url, thread["id"], account, last_event_id=str(events[2]["seq"]))
    assert [e["seq"] for e in rest] == [e["seq"] for e in events[3:]]


def read_sse(url: str, thread_id: str, account: Account, after_seq: int | None = None,
             last_event_id: str | None = None) -> list[dict[str, Any]]:
    headers = dict(account.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    params = {"after_seq": after_seq} if after_seq is not None else {}
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/api/threads/{thread_id}/events", params=params, headers=headers,
                      timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line == "":
                if current:
                    event = json.loads(current["data"])
                    assert int(current["id"]) == event["seq"] and current["event"] == event["type"]
                    events.append(event)
                    current = {}
                    if event["type"] in TERMINAL:
                        return events
                continue
            field, _, value = line.partition(": ")
            current[field] = value
    return events


def test_100_users_in_parallel_each_get_exactly_their_own_events(live_server: LiveServer,
                                                                 client: httpx.Client) -> None:
    accounts = [register(client) for _ in range(100)]

    async def converse(account: Account, index: int) -> tuple[Account, list[dict[str, Any]]]:
        async with async_connect(f"{live_server.ws_url}/ws", additional_headers=account.headers) as ws:
            received = [json.loads(await ws.recv())]
            await ws.send(json.dumps({"type": "user_message", "payload": {"content": f"{index} + {index}"}}))
            while received[-1]["type"] not in TERMINAL:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return account, received

    async def everyone() -> list[tuple[Account, list[dict[str, Any]]]]:
        return await asyncio.gather(*(converse(a, i) for i, a in enumerate(accounts)))

    results = asyncio.run(everyone())
    thread_ids = set()
    for index, (account, received) in enumerate(results):
        assert received[0]["payload"]["user_id"] == account.id
        thread_id = received[1]["payload"]["thread"]["id"]
        thread_ids.add(thread_id)
        events = [m for m in received if "seq" in m]
        assert all(e["thread_id"] == thread_id for e in events)  # nobody else's events
        assert events[-1]["type"] == "agent_completed"
        assert f"{index * 2}" in events[-1]["payload"]["message"]["content"]
        assert_contiguous(events, events[0]["seq"] - 1)
    assert len(thread_ids) == 100
