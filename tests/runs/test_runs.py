"""Runs over the API: stopping inside a slow tool, timeouts, failing tools, busy threads, idempotency, limits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from parley.app import create_app
from tests.conftest import SettingsFactory
from tests.support.agents import extra_agents, extra_tools
from tests.support.clients import Account, error_code, register
from tests.support.conversation import TERMINAL, Chat, run_events
from tests.support.live import LiveServer, wait_for


def server_with_test_agents(make_settings: SettingsFactory, **overrides: Any) -> LiveServer:
    settings = make_settings(builtin_token_delay_s=0, **overrides)
    app = create_app(settings, extra_agents=extra_agents(), extra_tools=extra_tools())
    return LiveServer(settings, app).start()


@pytest.fixture
def server(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    live = server_with_test_agents(make_settings)
    yield live
    live.stop()


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def post(http: httpx.Client, account: Account, thread_id: str, content: str = "hi", **body: Any) -> httpx.Response:
    return http.post(f"/api/threads/{thread_id}/messages", json={"content": content, **body},
                     headers=account.headers)


def run_status(http: httpx.Client, account: Account, run_id: str) -> str:
    return str(http.get(f"/api/runs/{run_id}", headers=account.headers).json()["status"])


def new_thread(http: httpx.Client, account: Account) -> str:
    return str(http.post("/api/threads", json={}, headers=account.headers).json()["id"])


def test_stop_agent_ends_a_run_inside_a_slow_tool_within_a_second(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    with Chat(server.ws_url, account) as chat:
        chat.send("user_message", {"content": "sleep", "agent": "sleeper"})
        before = chat.until(lambda m: m["type"] == "tool_executing")
        run_id = before[1]["payload"]["run_id"]
        asked = time.monotonic()
        stop_id = chat.send("stop_agent", {"run_id": run_id})
        after = chat.run_to_end(run_id, timeout=5)
        elapsed = time.monotonic() - asked
    assert elapsed < 1.0
    ack = next(m for m in after if m["type"] == "ack")
    assert ack["id"] == stop_id and ack["payload"]["run_id"] == run_id
    assert after[-1]["type"] == "agent_cancelled" and after[-1]["payload"]["reason"]
    run = http.get(f"/api/runs/{run_id}", headers=account.headers).json()
    assert run["status"] == "cancelled" and run["finished_at"]


def test_rest_cancel_is_idempotent_and_leaves_finished_runs_alone(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    thread_id = new_thread(http, account)
    run = post(http, account, thread_id, agent="sleeper").json()["run"]
    wait_for(lambda: run_status(http, account, run["id"]) == "running", message="run started")
    asked = time.monotonic()
    first = http.post(f"/api/runs/{run['id']}/cancel", headers=account.headers)
    assert first.status_code == 202 and first.json()["id"] == run["id"]
    assert http.post(f"/api/runs/{run['id']}/cancel", headers=account.headers).status_code == 202
    wait_for(lambda: run_status(http, account, run["id"]) == "cancelled", timeout=1.0, message="cancelled in 1 s")
    assert time.monotonic() - asked < 1.5
    finished = http.get(f"/api/runs/{run['id']}", headers=account.headers).json()
    again = http.post(f"/api/runs/{run['id']}/cancel", headers=account.headers).json()
    assert again == finished  # a finished run is returned unchanged


def test_a_failing_tool_is_reported_and_the_run_goes_on(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    with Chat(server.ws_url, account) as chat:
        chat.send("user_message", {"content": "break", "agent": "breaker"})
        messages = chat.run_to_end()
    completed = [m for m in messages if m["type"] == "tool_completed"]
    assert completed[0]["payload"]["tool"] == "broken" and completed[0]["payload"]["ok"] is False
    assert completed[0]["payload"]["error"] == "the tool failed unexpectedly"  # no internals
    assert completed[1]["payload"]["tool"] == "slow" and completed[1]["payload"]["ok"] is True
    assert messages[-1]["type"] == "agent_completed"


def test_run_timeout_ends_the_run_with_an_error(make_settings: SettingsFactory) -> None:
    server = server_with_test_agents(make_settings, run_timeout_s=0.5)
    try:
        with httpx.Client(base_url=server.url) as http:
            account = register(http)
            with Chat(server.ws_url, account) as chat:
                chat.send("user_message", {"content": "sleep", "agent": "sleeper"})
                messages = chat.run_to_end(timeout=10)
            error = messages[-1]
            assert error["type"] == "agent_error" and error["payload"]["error"]["code"] == "run_timeout"
            run = http.get(f"/api/runs/{error['run_id']}", headers=account.headers).json()
            assert run["status"] == "failed" and run["error"]["code"] == "run_timeout"
    finally:
        server.stop()


def test_on_busy_reject_interrupt_and_enqueue(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    thread_id = new_thread(http, account)
    first = post(http, account, thread_id, "one", agent="sleeper").json()["run"]

    rejected = post(http, account, thread_id, "two", on_busy="reject")
    assert rejected.status_code == 409 and error_code(rejected) == "run_in_progress"

    queued = post(http, account, thread_id, "three", agent="short_sleeper").json()["run"]
    assert run_status(http, account, queued["id"]) == "queued"  # waits behind the first run

    interrupting = post(http, account, thread_id, "four", on_busy="interrupt", agent="short_sleeper").json()["run"]
    wait_for(lambda: run_status(http, account, interrupting["id"]) == "completed", timeout=10,
             message="the interrupting run")
    assert run_status(http, account, first["id"]) == "cancelled"
    assert run_status(http, account, queued["id"]) == "cancelled"

    events = http_events(http, account, thread_id, runs=3)
    order = [(e["run_id"], e["type"]) for e in events if e["type"] in ("agent_started", "agent_completed",
                                                                       "agent_cancelled")]
    # Runs of one thread never overlap: each run's start follows the previous run's end.
    open_run = None
    for run_id, type_ in order:
        if type_ == "agent_started":
            assert open_run is None, order
            open_run = run_id
        else:
            assert open_run == run_id, order
            open_run = None


def test_concurrent_rejecting_messages_start_one_run(server: LiveServer, http: httpx.Client) -> None:
    """`on_busy=reject` sent several times at once to an idle thread: exactly one is accepted."""
    account = register(http)
    thread_id = new_thread(http, account)

    def send(index: int) -> int:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            return post(own, account, thread_id, f"go {index}", agent="short_sleeper", on_busy="reject").status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = sorted(pool.map(send, range(6)))
    assert statuses == [202] + [409] * 5, statuses


def http_events(http: httpx.Client, account: Account, thread_id: str, runs: int) -> list[dict[str, Any]]:
    """The thread's events over SSE, up to the terminal event of its `runs`-th run."""
    events: list[dict[str, Any]] = []
    with http.stream("GET", f"/api/threads/{thread_id}/events", headers=account.headers) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(json.loads(line[len("data: "):]))
            if sum(1 for e in events if e["type"] in TERMINAL) == runs:
                return events
    return events


def test_client_message_id_makes_posting_idempotent(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    thread_id = new_thread(http, account)
    first = post(http, account, thread_id, "hello", client_message_id="c-1")
    second = post(http, account, thread_id, "hello", client_message_id="c-1")
    assert first.status_code == second.status_code == 202
    assert first.json()["message"]["id"] == second.json()["message"]["id"]
    assert first.json()["run"]["id"] == second.json()["run"]["id"]
    wait_for(lambda: run_status(http, account, first.json()["run"]["id"]) == "completed", message="run")
    runs = http.get(f"/api/threads/{thread_id}/runs", headers=account.headers).json()["items"]
    assert len(runs) == 1
    with Chat(server.ws_url, account) as chat:  # the same over the WebSocket
        chat.send("user_message", {"thread_id": thread_id, "content": "hello", "client_message_id": "c-1"})
        ack = chat.until(lambda m: m["type"] == "ack")[-1]
        assert ack["payload"]["run_id"] == first.json()["run"]["id"]
    assert len(http.get(f"/api/threads/{thread_id}/runs", headers=account.headers).json()["items"]) == 1


def test_per_user_concurrency_limit_makes_extra_runs_wait(make_settings: SettingsFactory) -> None:
    server = server_with_test_agents(make_settings, max_concurrent_runs_per_user=2)
    try:
        with httpx.Client(base_url=server.url) as http:
            account = register(http)
            runs = [post(http, account, new_thread(http, account), agent="sleeper").json()["run"]["id"]
                    for _ in range(4)]
            wait_for(lambda: sorted(run_status(http, account, r) for r in runs) ==
                     ["queued", "queued", "running", "running"], message="two running, two waiting")
            other = register(http)  # another user's runs do not wait for this one's
            theirs = post(http, other, new_thread(http, other), agent="sleeper").json()["run"]["id"]
            wait_for(lambda: run_status(http, other, theirs) == "running", message="other user's run")
            for run_id in runs[:2]:
                http.post(f"/api/runs/{run_id}/cancel", headers=account.headers)
            wait_for(lambda: [run_status(http, account, r) for r in runs[2:]] == ["running", "running"],
                     message="waiting runs take the freed slots")
    finally:
        server.stop()


def test_runs_listing_and_agents_catalogue(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    thread_id = new_thread(http, account)
    ids = [post(http, account, thread_id, f"{i} + 1").json()["run"]["id"] for i in range(3)]
    wait_for(lambda: run_status(http, account, ids[-1]) == "completed", message="runs done")
    page = http.get(f"/api/threads/{thread_id}/runs?limit=2", headers=account.headers).json()
    assert [r["id"] for r in page["items"]] == ids[::-1][:2] and page["has_more"] is True
    rest = http.get(f"/api/threads/{thread_id}/runs?limit=2&before={ids[1]}", headers=account.headers).json()
    assert [r["id"] for r in rest["items"]] == [ids[0]] and rest["has_more"] is False

    agents = http.get("/api/agents", headers=account.headers).json()["items"]
    assistant = next(a for a in agents if a["name"] == "assistant")
    tools = {t["name"]: t for t in assistant["tools"]}
    assert set(tools) == {"search_threads", "current_time", "calculator", "usage_report"}
    assert tools["calculator"]["parameters"]["type"] == "object"
    assert "expression" in tools["calculator"]["parameters"]["properties"]
    assert http.get("/api/agents").status_code == 401


def test_message_content_limits(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    thread_id = new_thread(http, account)
    assert post(http, account, thread_id, "").status_code == 422
    too_long = post(http, account, thread_id, "x" * 32_001)
    assert too_long.status_code == 422 and error_code(too_long) == "invalid_request"
    unknown = post(http, account, thread_id, "hi", agent="nope")
    assert unknown.status_code == 404 and error_code(unknown) == "agent_not_found"


def test_deleting_a_thread_stops_its_run(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    thread_id = new_thread(http, account)
    run_id = post(http, account, thread_id, agent="sleeper").json()["run"]["id"]
    wait_for(lambda: run_status(http, account, run_id) == "running", message="running")
    assert http.delete(f"/api/threads/{thread_id}", headers=account.headers).status_code == 204
    assert http.get(f"/api/runs/{run_id}", headers=account.headers).status_code == 404
    assert server.services.runs.active_runs == 0 or wait_for(lambda: server.services.runs.active_runs == 0)
    assert http.get("/health").json()["components"]["agent_bridge"]["status"] == "healthy"


def test_run_events_pair_start_and_end(server: LiveServer, http: httpx.Client) -> None:
    account = register(http)
    with Chat(server.ws_url, account) as chat:
        chat.send("user_message", {"content": "what time is it?"})
        messages = chat.run_to_end()
    ack = next(m for m in messages if m["type"] == "ack")
    events = run_events(messages, ack["payload"]["run_id"])
    assert events[0]["type"] == "agent_started" and events[0]["payload"]["input_message_id"]
    terminal = [e for e in events if e["type"] in ("agent_completed", "agent_error", "agent_cancelled")]
    assert terminal == [events[-1]]
